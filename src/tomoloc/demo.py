"""The end-to-end demo on built-in synthetic data: synth, train, localize, crop, evaluate, report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from tomoloc import __version__, io
from tomoloc._fsutil import write_text_atomic
from tomoloc.boxes import BoxRecord, read_boxes, write_boxes
from tomoloc.evaluate import COLUMNS, evaluate, mean_row
from tomoloc.localize import (
    MultiOtsuLocalizer,
    OtsuLocalizer,
    ThresholdLocalizer,
    calibrate_threshold,
    localize_files,
)
from tomoloc.preprocess import working_copy
from tomoloc.report import BoxStyle, ReportEntry, figure_png, orthoviews, write_details, write_report

MARKER = "demo_config.json"


def _prepare(out_dir: Path) -> None:
    """Start from an empty folder; only ever delete a folder an earlier demo made."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise FileExistsError(f"{out_dir}: not empty and not a tomoloc demo folder; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _touches_border(rec: BoxRecord) -> bool:
    return any(lo == 0 or hi == n for (lo, hi), n in zip(rec.bbox, rec.shape))


def run_demo(
    out_dir: str | Path,
    n: int = 8,
    shape: Sequence[int] = (64, 96, 96),
    seed: int = 0,
    margin: int = 4,
    epochs: int = 4,
    steps: int = 50,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline on a synthetic mixed batch and return the mean metrics.

    The rotation and sorting models train on the whole batch without labels (as a user
    would on their own batch). The first half of the batch calibrates the supervised
    threshold baseline; every method is scored on the second half only, so no method sees
    its test labels. The crop is the batch job (:func:`tomoloc.pipeline.run_batch`, the
    ``tomoloc run`` defaults) on the second half, into ``out_dir/run``.
    """
    from tomoloc.synth import write_batch

    console = console or Console()
    out_dir = Path(out_dir)
    _prepare(out_dir)
    config = {"command": "demo", "n": n, "shape": list(shape), "seed": seed, "margin": margin,
              "kind": "mixed", "epochs": epochs, "steps": steps, "tomoloc": __version__}
    write_text_atomic(out_dir / MARKER, json.dumps(config, indent=1) + "\n")

    t0 = time.perf_counter()
    gt_path = write_batch(out_dir / "data", n=n, kind="mixed", shape=tuple(shape), seed=seed, format="npy")
    truth = read_boxes(gt_path)
    paths = [str(gt_path.parent / r.volume) for r in truth]
    n_cal = max(1, n // 2)
    cal, test = slice(0, n_cal), slice(n_cal, n)
    console.print(f"synthesized {n} volumes {tuple(shape)} in {time.perf_counter() - t0:.1f} s "
                  f"({n_cal} to calibrate the threshold baseline, {n - n_cal} to test)")

    vols = [io.open_volume(p) for p in paths[cal]]
    value, cal_mae = calibrate_threshold(vols, [r.bbox for r in truth[cal]])
    for v in vols:
        v.close()

    from tomoloc.localize.rotation import RotationLocalizer
    from tomoloc.localize.sorting import SortingLocalizer
    from tomoloc.pipeline import RunConfig, run_batch
    from tomoloc.training import TrainConfig, quiet_lightning, train

    quiet_lightning()

    runs = {}
    for task in ("rotation", "sorting"):
        t1 = time.perf_counter()
        runs[task] = out_dir / f"{task}_run"
        train(paths, runs[task], TrainConfig(task=task, epochs=epochs, steps_per_epoch=steps, seed=seed),
              progress=False)
        console.print(f"trained the {task} model on all {n} volumes (no labels) in "
                      f"{time.perf_counter() - t1:.0f} s: {runs[task]}")

    methods = {"rotation": RotationLocalizer(runs["rotation"]), "sorting": SortingLocalizer(runs["sorting"]),
               "multiotsu": MultiOtsuLocalizer(), "otsu": OtsuLocalizer(), "threshold": ThresholdLocalizer(value)}
    truth_by_name = {r.name: r for r in truth}
    boxes: dict[str, list[BoxRecord]] = {}
    rows: list[dict[str, Any]] = []
    for name, loc in methods.items():
        t1 = time.perf_counter()
        recs = localize_files(paths[test], loc, keep_details=name in runs)
        if name in runs:
            for r in recs:
                write_details(out_dir / f"{name}_details", r, truth_by_name[r.name].bbox)
                r.extra.pop("details")
        # Store names relative to the box file so the folder can be moved as a whole.
        for r in recs:
            r.volume = str(Path(r.volume).relative_to(out_dir))
        boxes[name] = recs
        write_boxes(out_dir / f"boxes_{name}.json", recs,
                    config={**config, "method": name, **({"value": value} if name == "threshold" else {})})
        scored = evaluate(recs, truth, gt_path.parent)
        rows.append({**mean_row(scored), "method": name,
                     "seconds/volume": (time.perf_counter() - t1) / len(recs)})

    t1 = time.perf_counter()
    job = RunConfig(margin=margin, seed=seed)
    manifest = run_batch(paths[test], out_dir / "run", job, log=lambda _m: None)
    before, after = manifest["bytes_before"], manifest["bytes_after"]
    crops = manifest["volumes"]
    cut = []
    for c in crops:
        t = truth_by_name[Path(c["volume"]).name]
        rec = evaluate([BoxRecord(c["volume"], t.shape, tuple(map(tuple, c["crop_bbox"])), job.method)],
                       [t], gt_path.parent)[0]["recall"]
        cut.append(1.0 - rec)

    table = Table(title=f"Localization on {n - n_cal} held-out synthetic volumes (mean)")
    table.add_column("method")
    for c in (*COLUMNS, "seconds/volume"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["method"], *(f"{r[c]:.3f}" for c in (*COLUMNS, "seconds/volume")))
    console.print(table)
    console.print(f"threshold baseline calibrated on {n_cal} labelled volumes: value {value:.4g} "
                  f"(calibration MAE {cal_mae:.2f} voxels)")
    console.print(f"tomoloc run ({job.method}, margin {margin}) cropped {len(crops)} volumes in "
                  f"{time.perf_counter() - t1:.0f} s: {before:,} -> {after:,} bytes "
                  f"({before / max(after, 1):.2f}x smaller), largest share of a sample cut: {max(cut):.4f}; "
                  f"crops, manifest and report in {out_dir / 'run'}")

    entries = []
    for i, r in enumerate(boxes["rotation"]):
        t = truth_by_name[r.name]
        styles = [BoxStyle(t.bbox, "truth", "#34c759", "--"),
                  BoxStyle(r.bbox, "rotation", "#ff3b30"),
                  BoxStyle(boxes["sorting"][i].bbox, "sorting", "#af52de", "-"),
                  BoxStyle(boxes["multiotsu"][i].bbox, "multiotsu", "#8e8e93", "-"),
                  BoxStyle(boxes["otsu"][i].bbox, "otsu", "#ff9500", "-."),
                  BoxStyle(boxes["threshold"][i].bbox, "threshold (calibrated)", "#0a84ff", ":")]
        with io.open_volume(out_dir / r.volume) as vol:
            img = figure_png(orthoviews(vol, styles, center=[(a + b) // 2 for a, b in t.bbox],
                                        projections=working_copy(vol).projections()))
        prof = (out_dir / "rotation_details" / f"{Path(r.name).stem}.png").read_bytes()
        var = (out_dir / "sorting_details" / f"{Path(r.name).stem}.png").read_bytes()
        flags = []
        if _touches_border(r):
            flags.append("the box touches the volume border: the sample may continue outside the volume")
        if r.extra.get("confidence", 1.0) < 0.2:
            flags.append("low certainty contrast: the sample/background split is weak, check the box")
        entries.append(ReportEntry(r.name, [img, prof, var], {
            "kind": t.extra.get("kind", ""), "rotation box": str([list(b) for b in r.bbox]),
            "sorting box": str([list(b) for b in boxes["sorting"][i].bbox]),
            "true box": str([list(b) for b in t.bbox]),
            "bytes before": crops[i]["bytes_before"], "bytes after": crops[i]["bytes_after"]}, flags))
    report = write_report(
        out_dir / "report.html", "tomoloc demo", entries,
        summary=[{k: v for k, v in r.items() if k != "volume"} for r in rows],
        intro=(f"Synthetic mixed batch (seed {seed}); green dashed = true box, red = rotation, purple = "
               f"sorting (both self-supervised), grey = multi-Otsu (the batch job's default), orange = Otsu, blue dotted = threshold calibrated on {n_cal} "
               "labelled volumes. Below each: the rotation model's certainty profiles and the sorting "
               "model's MC-dropout variance. The crops and the batch job's own report are in run/."),
    )
    console.print(f"report: {report}")
    summary = {"methods": rows, "bytes_before": before, "bytes_after": after, "threshold": value,
               "max_share_cut": max(cut), "run_method": job.method}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
