"""`tomoloc run` on a synthetic mixed batch: storage saved with no sample voxel cut, and wall time.

    python benchmarks/run_job.py [--methods multiotsu otsu sorting] [--n 24]

1. Synthesizes a mixed batch (seed 22, 64x96x96, masks as ground truth).
2. Per method, localizes every volume (self-supervised methods train on the batch itself,
   default settings, as `tomoloc run` does) and, for margins 0..24 voxels, computes the share
   of sample voxels inside each crop box and the storage reduction: the smallest margin that
   cuts no sample voxel in any volume is what the `--margin` default was chosen from.
3. Runs `tomoloc run` with its defaults on the whole batch and on 4 volumes, timed, and checks
   from the masks that no sample voxel was cut.

Writes the "tomoloc run" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import update_section
from tomoloc.boxes import expand_bbox, read_boxes
from tomoloc.localize import MultiOtsuLocalizer, OtsuLocalizer, localize_files
from tomoloc.pipeline import RunConfig, run_batch
from tomoloc.synth import write_batch

MARGINS = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24)


def crop_stats(boxes, truth, root: Path, margin: int) -> tuple[float, float, float]:
    """(worst recall, mean recall, storage reduction) of boxes grown by ``margin``."""
    recalls, kept, total = [], 0, 0
    for b, t in zip(boxes, truth):
        box = expand_bbox(b, margin, t.shape)
        m = np.load(root / t.extra["mask"])
        sl = tuple(slice(lo, hi) for lo, hi in box)
        recalls.append(m[sl].sum() / max(1, m.sum()))
        kept += int(np.prod([hi - lo for lo, hi in box]))
        total += int(np.prod(t.shape))
    return float(min(recalls)), float(np.mean(recalls)), total / kept


def localize(method: str, paths: list[str], tmp: Path) -> tuple[list, float]:
    t0 = time.perf_counter()
    if method in ("otsu", "multiotsu"):
        recs = localize_files(paths, OtsuLocalizer() if method == "otsu" else MultiOtsuLocalizer())
    else:
        from tomoloc.training import TrainConfig, quiet_lightning, train

        quiet_lightning()
        run = tmp / f"model_{method}"
        train(paths, run, TrainConfig(task=method), progress=False)
        if method == "sorting":
            from tomoloc.localize.sorting import SortingLocalizer

            recs = localize_files(paths, SortingLocalizer(run))
        else:
            from tomoloc.localize.rotation import RotationLocalizer

            recs = localize_files(paths, RotationLocalizer(run))
    return recs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=["multiotsu", "otsu"],
                    choices=["multiotsu", "otsu", "sorting", "rotation"])
    ap.add_argument("--n", type=int, default=24)
    args = ap.parse_args()
    default = RunConfig()
    lines = ["| method | margin (voxels) | worst recall | mean recall | reduction (x) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        gt = write_batch(tmp / "data", n=args.n, kind="mixed", shape=(64, 96, 96), seed=22)
        truth = read_boxes(gt)
        paths = [str(gt.parent / r.volume) for r in truth]
        safe = {}
        for method in args.methods:
            recs, secs = localize(method, paths, tmp)
            for m in MARGINS:
                worst, mean, red = crop_stats([r.bbox for r in recs], truth, gt.parent, m)
                lines.append(f"| {method} | {m} | {worst:.4f} | {mean:.4f} | {red:.2f} |")
                if worst == 1.0 and method not in safe:
                    safe[method] = (m, red)
            print(lines[-len(MARGINS):], f"{secs:.0f} s", flush=True)

        job = []
        for n_vol in (args.n, 4):
            out = tmp / f"run_{n_vol}"
            t0 = time.perf_counter()
            man = run_batch(paths[:n_vol], out, RunConfig(), log=lambda _m: None)
            wall = time.perf_counter() - t0
            worst = min(
                crop_stats([tuple(map(tuple, r["crop_bbox"]))], [t], gt.parent, 0)[0]
                for r, t in zip(man["volumes"], truth[:n_vol])
            )
            flagged = sum(bool(r["flags"]) for r in man["volumes"])
            job.append(f"| {n_vol} | {default.method} | {default.margin} | {man['reduction']:.2f} | {worst:.4f} | "
                       f"{flagged} | {wall:.1f} |")
            print(job[-1], json.dumps({k: man[k] for k in ("bytes_before", "bytes_after")}), flush=True)

    safe_txt = "; ".join(f"{k}: {m} voxels (reduction {r:.2f}x)" for k, (m, r) in safe.items()) or "none"
    body = "\n".join([
        f"Synthetic mixed batch: {args.n} volumes of 64x96x96 (seed 22) with masks. Recall = share of sample "
        "voxels inside the crop box (box + margin on both sides, clipped); reduction = volume voxels / crop "
        "voxels, over the whole batch.",
        "",
        *lines,
        "",
        f"Smallest margin with no sample voxel cut in any volume: {safe_txt}.",
        "",
        "`tomoloc run` with its defaults (`run_batch(paths, out, RunConfig())`), wall time including every "
        "output (crops, boxes, manifest, report):",
        "",
        "| volumes | method | margin | reduction (bytes, x) | worst recall | flagged for a look | seconds |",
        "|---|---|---|---|---|---|---|",
        *job,
    ])
    print(f"updated {update_section('tomoloc run: storage saved without cutting the sample', body)}")


if __name__ == "__main__":
    main()
