"""Thresholding (Otsu, multi-Otsu, calibrated) on a synthetic mixed batch, and on the real CT volumes.

    python benchmarks/baselines.py [--n 16] [--shape 64 96 96] [--real ../shared/data/real]

Writes the table into BENCHMARKS.md (section "Thresholding baselines").
Protocol: a 16-volume mixed test batch (seed 0). The calibrated threshold is chosen
(a) on a separate 16-volume calibration batch (seed 1): what a user with a few labelled
volumes gets, and (b) on the test batch itself, the paper's optimistic protocol
("supervision available on the whole set").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from _common import update_section
from tomoloc import io
from tomoloc.boxes import BoxRecord, read_boxes
from tomoloc.evaluate import COLUMNS, evaluate, mean_row
from tomoloc.localize import (
    MultiOtsuLocalizer,
    OtsuLocalizer,
    ThresholdLocalizer,
    calibrate_threshold,
    localize_files,
)
from tomoloc.synth import write_batch


def _cal(gt: Path) -> tuple[float, float]:
    recs = read_boxes(gt)
    vols = [io.open_volume(gt.parent / r.volume) for r in recs]
    try:
        return calibrate_threshold(vols, [r.bbox for r in recs])
    finally:
        for v in vols:
            v.close()


def _row(name: str, rows: list[dict], secs: float) -> str:
    m = mean_row(rows)
    worst_recall = min(r["recall"] for r in rows)
    return (f"| {name} | {m['mae']:.2f} | {m['rel_err_pct']:.2f} | {m['iou']:.3f} | {m['recall']:.4f} "
            f"| {worst_recall:.3f} | {m['reduction']:.2f} | {secs:.2f} |")


def real_rows(real_dir: Path) -> list[str]:
    """Otsu and multi-Otsu on each real volume against its approximate reference box."""
    lines = []
    for d in sorted(p for p in real_dir.iterdir() if (p / "volume.npy").exists()):
        truth = json.loads((d / "truth.json").read_text())
        vol = io.open_volume(d / "volume.npy")
        for localizer in (OtsuLocalizer(), MultiOtsuLocalizer()):
            t0 = time.perf_counter()
            loc = localizer.localize(vol)
            secs = time.perf_counter() - t0
            rec = BoxRecord(d.name, vol.shape, loc.bbox, localizer.name)
            ref = BoxRecord(d.name, vol.shape, tuple(map(tuple, truth["bbox"])), "truth")
            r = evaluate([rec], [ref])[0]
            inside = all(lo <= rlo and hi >= rhi for (lo, hi), (rlo, rhi) in zip(loc.bbox, truth["bbox"]))
            lines.append(f"| {d.name} | {list(vol.shape)} | {localizer.name} | {[list(b) for b in loc.bbox]} "
                         f"| {truth['bbox']} | {r['mae']:.1f} | {r['rel_err_pct']:.1f} | {r['iou']:.3f} "
                         f"| {'yes' if inside else 'no'} | {secs:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96))
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        gt_test = write_batch(tmp / "test", n=args.n, kind="mixed", shape=tuple(args.shape), seed=0)
        gt_cal = write_batch(tmp / "cal", n=args.n, kind="mixed", shape=tuple(args.shape), seed=1)
        print(f"synthesized 2x{args.n} volumes in {time.perf_counter() - t0:.0f} s")
        truth = read_boxes(gt_test)
        paths = [str(gt_test.parent / r.volume) for r in truth]
        v_sep, mae_sep = _cal(gt_cal)
        v_self, mae_self = _cal(gt_test)
        lines = []
        for name, loc in [("Otsu (label-free)", OtsuLocalizer()),
                          ("multi-Otsu (label-free, `tomoloc run`'s default)", MultiOtsuLocalizer()),
                          (f"threshold calibrated on a separate batch (value {v_sep:.3g})", ThresholdLocalizer(v_sep)),
                          (f"threshold calibrated on the test batch itself (value {v_self:.3g})", ThresholdLocalizer(v_self))]:
            t1 = time.perf_counter()
            recs = localize_files(paths, loc)
            secs = (time.perf_counter() - t1) / len(paths)
            rows = evaluate(recs, truth, gt_test.parent)
            lines.append(_row(name, rows, secs))
            print(lines[-1])
        kinds = {}
        for r in truth:
            kinds[r.extra.get("kind")] = kinds.get(r.extra.get("kind"), 0) + 1
    body = [
        f"Test batch: {args.n} synthetic volumes of {tuple(args.shape)}, kind mixed "
        f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), seed 0; calibration batch: seed 1.",
        "",
        "| method | MAE (voxels) | rel. error (%) | IoU | mean recall | worst recall | reduction (x) | s/volume |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        "Columns: " + "; ".join(f"{k} = {v[0]}" for k, v in COLUMNS.items()) + ".",
    ]
    if args.real.is_dir():
        body += ["", f"Otsu and multi-Otsu on the real CT volumes in `{args.real.name}/` (reference boxes are "
                 "approximate, about ±5 voxels; 'holds it' = the box contains the reference box):", "",
                 "| volume | shape | method | box | reference box | MAE | rel. error (%) | IoU | holds it | s |",
                 "|---|---|---|---|---|---|---|---|---|---|", *real_rows(args.real)]
    path = update_section("Thresholding baselines", "\n".join(body))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
