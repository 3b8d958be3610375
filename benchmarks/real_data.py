"""The self-supervised methods on the real CT volumes in ../shared/data/real (not shipped with tomoloc).

    python benchmarks/real_data.py [--real ../shared/data/real] [--epochs 4] [--steps 50]

The four volumes are one unlabelled "batch": the rotation and the sorting model each train on
all of them (no labels), then box each; Otsu and multi-Otsu are shown beside them. The reference boxes are approximate
(about +-5 voxels, see each folder's truth.json). Writes the section "Real CT volumes".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import update_section
from tomoloc.boxes import BoxRecord
from tomoloc.evaluate import evaluate
from tomoloc.localize import MultiOtsuLocalizer, OtsuLocalizer, localize_files
from tomoloc.localize.rotation import RotationLocalizer
from tomoloc.localize.sorting import SortingLocalizer
from tomoloc.training import TrainConfig, quiet_lightning, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    quiet_lightning()
    dirs = sorted(p for p in args.real.iterdir() if (p / "volume.npy").exists())
    paths = [str(d / "volume.npy") for d in dirs]
    lines, train_s = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for task, loc in (("rotation", RotationLocalizer), ("sorting", SortingLocalizer)):
            cfg = TrainConfig(task=task, epochs=args.epochs, steps_per_epoch=args.steps, val_fraction=0.25)
            t0 = time.perf_counter()
            train(paths, Path(tmp) / task, cfg, progress=False)
            train_s[task] = time.perf_counter() - t0
            results[task] = localize_files(paths, loc(Path(tmp) / task))
        # the same sorting model as the paper has it: raw variance, high = sample
        results["sorting, the paper's"] = localize_files(paths, SortingLocalizer(
            Path(tmp) / "sorting", slice_level="none", orient=False))
        results["otsu"] = localize_files(paths, OtsuLocalizer())
        results["multiotsu"] = localize_files(paths, MultiOtsuLocalizer())
    for i, d in enumerate(dirs):
        ref = json.loads((d / "truth.json").read_text())["bbox"]
        for name, recs in results.items():
            r = recs[i]
            truth = BoxRecord(r.volume, r.shape, tuple(map(tuple, ref)), "truth")
            m = evaluate([r], [truth])[0]
            lines.append(f"| {d.name} | {list(r.shape)} | {name} | {[list(b) for b in r.bbox]} | {ref} "
                         f"| {m['mae']:.1f} | {m['rel_err_pct']:.1f} | {m['iou']:.3f} |")
            print(lines[-1], flush=True)
    body = "\n".join([
        f"Rotation and sorting models each trained on the {len(dirs)} real volumes together, without labels "
        f"({args.epochs} x {args.steps} steps, resnet18, input 64, CPU; rotation {train_s['rotation']:.0f} s, "
        f"sorting {train_s['sorting']:.0f} s, default localizer settings, and the sorting model once more as the paper has it: raw variance, high = "
        "sample); Otsu and "
        "multi-Otsu (`tomoloc run`'s default) beside them. "
        "Reference boxes are approximate (about ±5 voxels).",
        "",
        "| volume | shape | method | box | reference box | MAE | rel. error (%) | IoU |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ])
    print(f"updated {update_section('Real CT volumes', body)}")


if __name__ == "__main__":
    main()
