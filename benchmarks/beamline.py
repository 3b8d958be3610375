"""Beamline scale: `tomoloc run` on one big volume against `cp`, and volumes per hour over Dask.

    python benchmarks/beamline.py [--gb 4] [--methods sorting sorting-bf16 rotation multiotsu otsu] [--n-rate 4]
                                  [--workers 1 2] [--repeats 3] [--skip-big] [--skip-rate] [--tmp DIR]

1. Trains a small sorting model on 4 synthetic volumes of 64x96x96 (2 epochs x 20 steps,
   CPU), and a rotation model the same way when a rotation row is asked for: the `--model`
   the runs below reuse. Small on purpose: this measures throughput and memory, not box
   quality.
2. Big volume: a synthetic mixed phantom (sample in a tube, 64x90x90) upsampled x16 with
   per-voxel noise into a uint16 .npy of about ``--gb`` GiB, written slab by slab. For each
   method, `tomoloc run BIG --out OUT [--model RUN]` (localize + crop + verify + report) and
   `cp BIG COPY` run as child processes; wall time and peak RSS (``/usr/bin/time``) of each. Page cache:
   "cold" evicts the input (``posix_fadvise DONTNEED`` after ``fsync``) before each command,
   "warm" reads it once before each; ``sync`` before each; ``--repeats`` pairs per method and
   page-cache state, alternating which goes first (median and range reported).
3. Volumes per hour: ``--n-rate`` volumes of 512^3 uint16 (256 MiB each, different phantoms),
   `tomoloc run ... --model RUN` serially and with `--scheduler local --workers N`; the wall
   time includes the LocalCluster start.

Everything is written under ``--tmp`` (default: a temporary folder) and removed afterwards.
Writes the "Beamline scale" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import update_section
from tomoloc import io
from tomoloc.synth import make_phantom

SRC = Path(__file__).resolve().parent.parent / "src"


class Upsampled:
    """A phantom upsampled by ``factor`` (nearest) plus seeded uint16 noise, made slab by slab."""

    def __init__(self, phantom: np.ndarray, factor: int, seed: int):
        lo, hi = np.percentile(phantom, [0.5, 99.5])
        self.small = (np.clip((phantom - lo) / (hi - lo), 0, 1) * 40000 + 2000).astype(np.uint16)
        self.f = factor
        self.shape = tuple(n * factor for n in phantom.shape)
        self.dtype = np.dtype(np.uint16)
        self.seed = seed

    def __getitem__(self, key: slice) -> np.ndarray:
        z0, z1, _ = key.indices(self.shape[0])
        idx = np.arange(z0, z1) // self.f
        slab = self.small[idx].repeat(self.f, axis=1).repeat(self.f, axis=2)
        noise = np.random.default_rng((self.seed, z0)).integers(0, 1500, slab.shape, dtype=np.uint16)
        return slab + noise


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (clean pages; no root needed)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit status) of one command, from ``/usr/bin/time``.

    Through ``time`` rather than ``wait4`` from here: a child exec'd straight from this
    (large) process would start its peak RSS at this process's size.
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as rep:
        proc = subprocess.run(["/usr/bin/time", "-o", rep.name, "-f", "%e %M", *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
        wall, kb = Path(rep.name).read_text().split()[-2:]
    return float(wall), int(kb) / 1024, proc.returncode


def tomoloc(*args: str) -> list[str]:
    return [sys.executable, "-m", "tomoloc.cli", *args]


def train_model(tmp: Path, task: str = "sorting") -> Path:
    from tomoloc.synth import write_batch
    from tomoloc.training import TrainConfig, quiet_lightning, train

    quiet_lightning()
    gt = write_batch(tmp / f"train_{task}", n=4, kind="mixed", shape=(64, 96, 96), seed=40)
    vols = sorted(str(p) for p in gt.parent.glob("vol_*[0-9].npy"))
    run = tmp / ("model" if task == "sorting" else f"model_{task}")
    t0 = time.perf_counter()
    train(vols, run, TrainConfig(task=task, epochs=2, steps_per_epoch=20, devices="cpu"), progress=False)
    print(f"trained the {task} model in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def big_volume(tmp: Path, gb: float) -> Path:
    ph = make_phantom((64, 90, 90), kind="fish", seed=41).volume
    f = max(1, round((gb * 2**30 / 2 / ph.size) ** (1 / 3)))
    data = Upsampled(ph, f, seed=41)
    path = tmp / "big.npy"
    t0 = time.perf_counter()
    io.save_volume(path, data)
    print(f"wrote {path} {data.shape} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path


def bench_big(tmp: Path, models: dict[str, Path], gb: float, methods: list[str], repeats: int) -> list[str]:
    big = big_volume(tmp, gb)
    size = big.stat().st_size
    rows = []
    copy, out = tmp / "copy.npy", tmp / "out"

    def run_cmd(method: str) -> list[str]:
        name, _, precision = method.partition("-")  # "sorting-bf16": --precision bf16
        extra = ["--model", str(models[name])] if name in models else []
        extra += ["--precision", precision] if precision else []
        return tomoloc("run", str(big), "--out", str(out), "--method", name, "--device", "cpu", *extra)

    for method in methods:
        for cache in ("cold", "warm"):
            got: dict[str, list[tuple[float, float, int]]] = {"cp": [], "run": []}
            for rep in range(repeats):
                # Alternate which goes first: whichever runs second finds the other's traces.
                for what in (("cp", "run"), ("run", "cp"))[rep % 2]:
                    shutil.rmtree(out, ignore_errors=True)
                    copy.unlink(missing_ok=True)
                    # No dirty pages left from the previous command: its writeback would slow this one.
                    os.sync()
                    (evict if cache == "cold" else warm)(big)
                    cmd = ["cp", str(big), str(copy)] if what == "cp" else run_cmd(method)
                    got[what].append(measure(cmd))
                    if got[what][-1][2] != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed with status {got[what][-1][2]}")
                    if what == "run":
                        after = json.loads((out / "manifest.json").read_text())["volumes"][0]["bytes_after"]
            run_s = [w for w, _, _ in got["run"]]
            cp_s = [w for w, _, _ in got["cp"]]
            row = (f"| {method} | {cache} | {repeats} | {np.median(run_s):.1f} ({min(run_s):.1f}-{max(run_s):.1f}) | "
                   f"{np.median(cp_s):.1f} ({min(cp_s):.1f}-{max(cp_s):.1f}) | "
                   f"{np.median(run_s) / np.median(cp_s):.2f} | {max(r for _, r, _ in got['run']):.0f} | "
                   f"{max(r for _, r, _ in got['cp']):.0f} | {size / after:.2f} | {uptime()} |")
            rows.append(row)
            print(row, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    copy.unlink(missing_ok=True)
    big.unlink()
    return rows


def bench_rate(tmp: Path, model: Path, n: int, workers: list[int]) -> list[str]:
    d = tmp / "rate"
    d.mkdir()
    paths = []
    for s in range(n):
        ph = make_phantom((64, 64, 64), kind=("fish", "embryo")[s % 2], seed=50 + s).volume
        p = d / f"vol_{s:03d}.npy"
        io.save_volume(p, Upsampled(ph, 8, seed=50 + s))
        paths.append(str(p))
    rows = []
    for w in [0, *workers]:
        out = tmp / f"rate_out_{w}"
        sched = ["--scheduler", "local", "--workers", str(w)] if w else []
        wall, rss, rc = measure(tomoloc("run", *paths, "--out", str(out), "--model", str(model), "--method",
                                        "sorting", "--device", "cpu", *sched))
        if rc != 0:
            raise SystemExit(f"tomoloc run with {w} workers failed ({rc})")
        man = json.loads((out / "manifest.json").read_text())
        per = np.mean([r["seconds"] for r in man["volumes"]])
        row = (f"| {'serial (no Dask)' if not w else f'Dask LocalCluster, {w} worker(s)'} | {n} | {wall:.1f} | "
               f"{n / wall * 3600:.0f} | {per:.1f} | {uptime()} |")
        rows.append(row)
        print(row, flush=True)
        shutil.rmtree(out)
    shutil.rmtree(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--methods", nargs="+", default=["sorting", "multiotsu"],
                    choices=["sorting", "sorting-bf16", "rotation", "rotation-bf16", "multiotsu", "otsu"])
    ap.add_argument("--n-rate", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="cp/run pairs per method and page-cache state")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-rate", action="store_true")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None, help="reuse this sorting run instead of training one")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tomoloc-beamline-", dir=args.tmp))
    try:
        model = args.model or train_model(tmp)
        models = {"sorting": model}
        if not args.skip_big and any(m.startswith("rotation") for m in args.methods):
            models["rotation"] = train_model(tmp, "rotation")
        big = [] if args.skip_big else bench_big(tmp, models, args.gb, args.methods, args.repeats)
        rate = [] if args.skip_rate else bench_rate(tmp, model, args.n_rate, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trained = ("trained beforehand and passed with --model" if args.model else "trained here")
    body = [
        f"Model for `--model`: a sorting run on 4 synthetic mixed volumes of 64x96x96, 2 epochs x 20 steps on the "
        f"CPU, {trained}; for the rotation rows a rotation run trained the same way, here (small on purpose: "
        "these figures are throughput and memory, not box quality). Each method crops with its default margin "
        "(4 voxels for the thresholdings, 16 for sorting and rotation). Load "
        "average (1, 5, 15 min) from /proc/loadavg right after each measurement; the 2 cores are shared.",
        "",
    ]
    if big:
        body += [
            "A method named M-bf16 runs with `--precision bf16` (the network passes in bfloat16 autocast). "
            f"One uint16 volume of about {args.gb:g} GiB (.npy; a 64x90x90 phantom upsampled with per-voxel noise). "
            "`tomoloc run BIG --out OUT --method M [--model RUN] --device cpu` (localize, crop, verify the crop by "
            "re-reading it, figures, report) against `cp BIG COPY`, each a child process: wall time and peak RSS "
            "(`/usr/bin/time`). cold: the input evicted from the page cache before each command; warm: read once "
            f"before each. `sync` before each command. {args.repeats} pairs per row, alternating which of the two "
            "goes first; times are the median (min-max), the ratio is of the medians, peak RSS the largest. "
            "Goals: ratio <= 1.5, run peak RSS <= 1024 MiB.",
            "",
            "| method | page cache | pairs | run s | cp s | ratio | run peak RSS (MiB) | cp peak RSS (MiB) | "
            "reduction (x) | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *big,
            "",
        ]
    if rate:
        body += [
            f"Volumes per hour: {args.n_rate} volumes of 512^3 uint16 (256 MiB each), `tomoloc run ... --model RUN "
            "--method sorting --device cpu [--scheduler local --workers N]`; wall time of the whole command "
            "(Python start, LocalCluster start, report included); s/volume is the mean of the manifest's "
            "per-volume seconds (inside a worker).",
            "",
            "| mode | volumes | wall s | volumes/hour | s/volume (in worker) | load |",
            "|---|---|---|---|---|---|",
            *rate,
        ]
    print(f"updated {update_section('Beamline scale: one big volume vs cp, volumes per hour (CPU)', chr(10).join(body))}")


if __name__ == "__main__":
    main()
