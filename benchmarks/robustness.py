"""Stray bright objects: do the thresholding boxes still hold the sample?

    python benchmarks/robustness.py [--n 24] [--seed 40]

1. Synthesizes a mixed batch (64x96x96, masks as ground truth; seed 40 by default: not one of
   the batches the multi-Otsu rule was designed on) and a separate 8-volume calibration batch
   (seed 41) for the label-calibrated threshold.
2. Adds to each volume, one at a time, things users find in their scans:
   - a scanner table: a slab 6 voxels thick across the whole bottom of Y (all of Z and X),
     at twice the volume's 99.9th percentile (denser than anything in the scan), with 5% noise;
   - the same slab only as dense as the densest part of the sample (the 99.9th percentile);
   - a thick table: 22 voxels (a quarter of the volume), twice the 99.9th percentile;
   - a metal speck: 3x3x3 voxels at 20 times the 99.9th percentile, near a corner.
3. Boxes every volume with Otsu, multi-Otsu and the calibrated threshold, and reports the
   share of sample voxels inside each box (recall) with no margin and with a 4-voxel margin
   (`tomoloc run`'s default), how many volumes lost any sample voxel at that margin, and the
   storage reduction of the crops.

4. Boxes the phantoms of a second generator (`benchmarks/_simple_phantoms.py`, written apart from
   `tomoloc.synth`: cuvettes or no holder, media as dense as the sample, faint sample parts,
   tables, rings, strong correlated noise, a field-of-view fill) with Otsu and multi-Otsu. Seeds
   0-59 were looked at while multi-Otsu was being made (they showed that it needed smoothing);
   seeds 60-259 were not.

5. The same with the phantoms of a third generator (`benchmarks/_third_phantoms.py`, written
   apart from both: capillaries, pipette tips, wraps, pins; insects, stems, seeds, biopsies;
   streaks, cupping, fringes). Seeds 0-199 were looked at while multi-Otsu's hysteresis was
   chosen; seeds 200-599 were not. Multi-Otsu also runs without its hysteresis (grow=1).

Writes the "Stray bright objects" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import update_section
from _simple_phantoms import simple_phantom
from _third_phantoms import make_phantom as third_phantom
from tomoloc.boxes import expand_bbox, read_boxes
from tomoloc.localize import MultiOtsuLocalizer, OtsuLocalizer, ThresholdLocalizer, calibrate_threshold

MARGIN = 4


def perturbations(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The clean volume and its perturbed copies (float32, same shape)."""
    z, y, xx = x.shape
    hi = float(np.percentile(x, 99.9))
    rng = np.random.default_rng(seed)
    out = {"none": x}
    for name, rows, level in (("scanner table, 2x the densest voxel", 6, 2.0),
                              ("scanner table, as dense as the sample", 6, 1.0),
                              ("thick scanner table (a quarter of the volume), 2x", 22, 2.0)):
        v = x.copy()
        # 5% noise: a slab of one exact value would be a spike, not a population, in the histogram
        v[:, y - 2 - rows:y - 2, :] = hi * level * (1 + 0.05 * rng.standard_normal((z, rows, xx)))
        out[name] = v
    v = x.copy()
    v[z // 2 - 1:z // 2 + 2, 3:6, xx - 6:xx - 3] = hi * 20.0
    out["metal speck (27 voxels, 20x)"] = v
    return out


def recall(box, mask: np.ndarray, margin: int) -> float:
    sl = tuple(slice(lo, hi) for lo, hi in expand_bbox(box, margin, mask.shape))
    return float(mask[sl].sum() / max(1, mask.sum()))


NO_GROW = "multi-Otsu without its hysteresis (grow=1)"


def generator_table(make, ranges, methods: dict) -> list[str]:
    """Table rows: per seed range and method, volumes cut at margin 0 and at MARGIN, worst recall, reduction."""
    rows_out = [f"| seeds | method | volumes cut, margin 0 | volumes cut, margin {MARGIN} | worst recall, margin {MARGIN} "
                f"| reduction, margin {MARGIN} (x) |", "|---|---|---|---|---|---|"]
    for lo, hi, note in ranges:
        got: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in methods}
        for s in range(lo, hi):
            v, mask, _ = make(s)
            for name, loc in methods.items():
                box = loc.localize(v).bbox
                crop = expand_bbox(box, MARGIN, v.shape)
                got[name].append((recall(box, mask, 0), recall(box, mask, MARGIN),
                                  int(np.prod([b - a for a, b in crop])), v.size))
        for name, rows in got.items():
            r = np.array(rows, dtype=np.float64)
            rows_out.append(f"| {note} | {name} | {int((r[:, 0] < 1).sum())} of {len(r)} | {int((r[:, 1] < 1).sum())} "
                            f"of {len(r)} | {r[:, 1].min():.4f} | {r[:, 3].sum() / r[:, 2].sum():.2f} |")
            print(rows_out[-1], flush=True)
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=40)
    args = ap.parse_args()
    from tomoloc.synth import write_batch

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        gt = write_batch(tmp / "test", n=args.n, kind="mixed", shape=(64, 96, 96), seed=args.seed)
        gt_cal = write_batch(tmp / "cal", n=8, kind="mixed", shape=(64, 96, 96), seed=args.seed + 1)
        print(f"synthesized {args.n} + 8 volumes in {time.perf_counter() - t0:.0f} s", flush=True)
        cal = read_boxes(gt_cal)
        value, _ = calibrate_threshold([np.load(gt_cal.parent / r.volume) for r in cal], [r.bbox for r in cal])
        methods = {"Otsu": OtsuLocalizer(), "multi-Otsu": MultiOtsuLocalizer(), NO_GROW: MultiOtsuLocalizer(grow=1.0),
                   f"threshold calibrated on 8 labelled volumes ({value:.3g})": ThresholdLocalizer(value)}
        stats: dict[tuple[str, str], list[tuple[float, float, int, int]]] = {}
        for t in read_boxes(gt):
            x = np.load(gt.parent / t.volume).astype(np.float32)
            mask = np.load(gt.parent / t.extra["mask"])
            for pert, v in perturbations(x, int(t.extra["seed"]) % 2**32).items():
                for name, loc in methods.items():
                    box = loc.localize(v).bbox
                    crop = expand_bbox(box, MARGIN, x.shape)
                    stats.setdefault((pert, name), []).append(
                        (recall(box, mask, 0), recall(box, mask, MARGIN),
                         int(np.prod([hi - lo for lo, hi in crop])), x.size))
    lines = [f"| added object | method | worst recall, margin 0 | worst recall, margin {MARGIN} "
             f"| volumes cut, margin {MARGIN} | reduction, margin {MARGIN} (x) |", "|---|---|---|---|---|---|"]
    for (pert, name), rows in stats.items():
        r = np.array(rows, dtype=np.float64)
        lines.append(f"| {pert} | {name} | {r[:, 0].min():.4f} | {r[:, 1].min():.4f} | "
                     f"{int((r[:, 1] < 1.0).sum())} of {len(r)} | {r[:, 3].sum() / r[:, 2].sum():.2f} |")
        print(lines[-1], flush=True)
    generated = {"Otsu": methods["Otsu"], "multi-Otsu": methods["multi-Otsu"], NO_GROW: methods[NO_GROW]}
    second = generator_table(simple_phantom, ((0, 60, "0-59 (looked at)"), (60, 260, "60-259 (held out)")), generated)
    third = generator_table(third_phantom, ((0, 200, "0-199 (looked at)"), (200, 600, "200-599 (held out)")),
                            generated)
    body = "\n".join([
        f"Synthetic mixed batch: {args.n} volumes of 64x96x96 (seed {args.seed}), with masks; the calibrated "
        f"threshold is chosen on 8 other volumes (seed {args.seed + 1}) without the added objects. Each object is "
        "added to every volume on its own. Recall = share of sample voxels inside the box (grown by the margin, "
        "clipped); a volume is cut when its recall is below 1; reduction = volume voxels / crop voxels over the "
        "batch.",
        "",
        *lines,
        "",
        "Phantoms of a second generator (`benchmarks/_simple_phantoms.py`, 64x96x96: tube, square cuvette or no "
        "holder; media up to 0.7 of the sample's density; 1-4 ellipsoids, some barely above the medium; bubbles, "
        "debris, a scanner table in 30%, rings in 50%, blur, correlated noise up to a quarter of the sample's "
        "contrast, a field-of-view fill in 30%):",
        "",
        *second,
        "",
        "Phantoms of a third generator (`benchmarks/_third_phantoms.py`, 64x96x96, written apart from both: plastic "
        "tubes (some off-centre or tilted), glass capillaries, pipette tips, paper or Kapton wraps, or no holder "
        "with the sample on a pin; agarose, ethanol, resin or paraffin part-filling the holder, meniscus, "
        "bubbles, debris, mount plates; insects with 1-2 voxel legs, hollow plant stems, seeds, biopsies, fish, "
        "2-3 samples together, samples against the wall or cut by the field of view; streaks from a dense speck, "
        "cupping, phase-contrast fringes, rings, blur, Gaussian, Poisson-like or correlated noise, a drift along "
        "z, a reconstruction circle; negative backgrounds and uint16 values):",
        "",
        *third,
    ])
    print(f"updated {update_section('Stray bright objects', body)}")


if __name__ == "__main__":
    main()
