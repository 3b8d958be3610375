"""Speed of the synthetic CT generator (tomoloc.synth.make_phantom) on one CPU core.

    python benchmarks/synth_speed.py [--n 4] [--shapes 64x64x64 64x96x96 128x128x128]

Times ``make_phantom`` at default settings (oversample 2, n_angles = round(pi/2 * min(Y, X)),
phase contrast per kind, rings, noise, clutter) for fish and embryo volumes, seeds 0..n-1.
The first volume of a shape also builds the sparse projector, which is then cached per
(shape, oversample, n_angles); it is reported separately ("cold"). Prints a table and
writes it into BENCHMARKS.md (section "Synthetic generator speed").
"""

from __future__ import annotations

import os

# One core: pin every BLAS/OpenMP pool before numpy/scipy are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from _common import update_section  # noqa: E402
from tomoloc import synth  # noqa: E402


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape must look like 64x96x96, got {text!r}")
    return parts  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="volumes per kind and shape (seeds 0..n-1)")
    ap.add_argument("--shapes", type=_shape, nargs="+", default=[(64, 64, 64), (64, 96, 96), (128, 128, 128)])
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    load0 = os.getloadavg()[0]
    rows = []
    for shape in args.shapes:
        synth._projector.cache_clear()
        for k, kind in enumerate(synth.KINDS):
            times = []
            for seed in range(args.n):
                t0 = time.perf_counter()
                synth.make_phantom(shape, kind, seed)
                times.append(time.perf_counter() - t0)
            cold = times[0] if k == 0 else None  # only the first volume of a shape builds the projector
            warm = times[1:] if k == 0 else times
            row = {
                "shape": "x".join(map(str, shape)), "kind": kind,
                "angles": synth._default_n_angles(min(shape[1:])),
                "cold": cold, "mean": statistics.mean(warm) if warm else float("nan"),
                "min": min(warm) if warm else float("nan"), "max": max(warm) if warm else float("nan"),
            }
            rows.append(row)
            print(f"{row['shape']:>12} {kind:>6}: {row['mean']:.2f} s/volume "
                  f"(min {row['min']:.2f}, max {row['max']:.2f}"
                  + (f", first incl. projector build {cold:.2f}" if cold is not None else "") + ")", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lines = [
        "One core (BLAS/OpenMP pools pinned to 1 thread), `make_phantom` at default settings: "
        "oversample 2, n_angles = round(pi/2 * min(Y, X)), rings, noise, clutter; phase contrast "
        "on for embryos, random for fish. Seconds per volume over seeds "
        f"0..{args.n - 1}; the first volume of each shape also builds the sparse projector "
        "(cached afterwards) and is excluded from mean/min/max and shown as *first*.",
        "",
        "| shape (Z x Y x X) | kind | angles | s/volume (mean) | min | max | first (incl. projector build) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cold = f"{r['cold']:.2f}" if r["cold"] is not None else ""
        lines.append(f"| {r['shape']} | {r['kind']} | {r['angles']} | {r['mean']:.2f} | {r['min']:.2f} | "
                     f"{r['max']:.2f} | {cold} |")
    lines += ["", f"Peak resident memory of the run: {peak_mb:.0f} MB. 1-minute load average at the start: "
              f"{load0:.2f}, at the end: {os.getloadavg()[0]:.2f} (other processes share the cores; "
              "above ~1 the times are inflated)."]
    body = "\n".join(lines)
    if not args.no_write:
        path = update_section("Synthetic generator speed", body)
        print(f"updated {path}")


if __name__ == "__main__":
    main()
