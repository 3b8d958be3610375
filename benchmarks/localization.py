"""Self-supervised localization against the thresholding baselines on synthetic batches.

    python benchmarks/localization.py [--task rotation|sorting] [--batches embryo mixed] [--epochs 12] [--steps 100]

Protocol (issues 3 and 4): per batch kind, 16 training volumes (seed 20) and 8 held-out test
volumes (seed 21) of 64x96x96. The self-supervised model trains on the 16 without labels
(default `tomoloc train` settings unless overridden) and boxes the 8 it never saw. Otsu needs
no training; the threshold is calibrated on the 16 training volumes' true boxes (the paper's
supervised baseline). Writes the table into BENCHMARKS.md ("Rotation localization" or
"Sorting localization").
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from _common import update_section
from tomoloc import io
from tomoloc.boxes import read_boxes
from tomoloc.evaluate import evaluate, mean_row
from tomoloc.localize import OtsuLocalizer, ThresholdLocalizer, calibrate_threshold, localize_files
from tomoloc.localize.rotation import RotationLocalizer
from tomoloc.localize.sorting import SortingLocalizer
from tomoloc.synth import write_batch
from tomoloc.training import TrainConfig, train


class InteriorWindow:
    """A baseline "localizer": the Y/X window of :func:`tomoloc.holder.find_interior`, all of Z."""

    name = "interior-window"

    def localize(self, volume):
        from tomoloc.holder import find_interior
        from tomoloc.localize.base import Localization
        from tomoloc.preprocess import NetworkView, working_copy
        from tomoloc.sampling import DEFAULT_MAX_VOXELS

        work = working_copy(volume, DEFAULT_MAX_VOXELS)
        inner = find_interior(work.data)
        view = NetworkView(inner.mask.astype("float32"), inner.offset, inner.wall)
        box = view.to_working(tuple((0, n) for n in inner.mask.shape), work.data.shape)
        return Localization(work.to_original(box), self.name, 1.0, {})


def _row(batch: str, name: str, rows: list[dict], extra: str = "") -> str:
    m = mean_row(rows)
    return (f"| {batch} | {name} | {m['mae']:.2f} | {m['rel_err_pct']:.2f} | {m['iou']:.3f} | {m['recall']:.3f} "
            f"| {min(r['recall'] for r in rows):.3f} | {m['reduction']:.2f} | {extra} |")


def bench(kind: str, tmp: Path, cfg: TrainConfig, sorting_options: dict | None = None) -> list[str]:
    shape = (64, 96, 96)
    gt_train = write_batch(tmp / kind / "train", n=16, kind=kind, shape=shape, seed=20)
    gt_test = write_batch(tmp / kind / "test", n=8, kind=kind, shape=shape, seed=21)
    train_recs, truth = read_boxes(gt_train), read_boxes(gt_test)
    train_paths = [str(gt_train.parent / r.volume) for r in train_recs]
    test_paths = [str(gt_test.parent / r.volume) for r in truth]

    run = tmp / kind / "run"
    t0 = time.perf_counter()
    train(train_paths, run, cfg, progress=False)
    train_s = time.perf_counter() - t0
    metric = "val_acc" if cfg.task == "rotation" else "val_md"
    with open(run / "logs" / "metrics.csv", newline="") as f:
        final = [float(r[metric]) for r in csv.DictReader(f) if r.get(metric)][-1]
    items = cfg.epochs * cfg.steps_per_epoch * cfg.batch_size

    lines = []
    loc = RotationLocalizer(run) if cfg.task == "rotation" else SortingLocalizer(run, **(sorting_options or {}))
    t0 = time.perf_counter()
    recs = localize_files(test_paths, loc)
    loc_s = (time.perf_counter() - t0) / len(test_paths)
    if cfg.task == "rotation":
        slices = sum(sum(r.shape) for r in recs)  # one pair per slice along each axis (working copy = full size)
        note = (f"train {train_s:.0f} s ({items / train_s:.0f} pairs/s, final val acc {final:.2f}); "
                f"localize {loc_s:.2f} s/volume ({slices / len(recs) / loc_s:.0f} slices/s)")
    else:
        n = cfg.batch_size
        slices = sum(r.shape[a] for r in recs for a in cfg.axes)
        note = (f"train {train_s:.0f} s ({items / train_s:.0f} slices/s); final val mean displacement "
                f"{final:.2f} (random order {(n * n - 1) / (3 * n):.2f}); localize {loc_s:.2f} s/volume "
                f"({slices / len(recs) / loc_s:.0f} slices/s x {loc.mc_samples} MC passes)")
    lines.append(_row(kind, f"{cfg.task} (self-supervised)", evaluate(recs, truth, gt_test.parent), note))
    if cfg.task == "rotation":
        # The same model with the interval rule before 2026-12-02: the strongest run alone.
        strongest = localize_files(test_paths, RotationLocalizer(run, keep=1.0))
        lines.append(_row(kind, "rotation, strongest run only", evaluate(strongest, truth, gt_test.parent)))
    if cfg.holder == "interior":
        # What the network adds: the holder's interior window alone, all of axis 0.
        lines.append(_row(kind, "holder's interior window alone (no network)",
                          evaluate(localize_files(test_paths, InteriorWindow()), truth, gt_test.parent)))
    if cfg.task == "sorting":
        # The same model without each of the localizer's steps beyond the paper: what each buys.
        for name, opts in (("sorting, not oriented", {"orient": False}),
                           ("sorting, raw variance, not oriented (the paper's)", {"orient": False, "slice_level": "none"})):
            ablated = SortingLocalizer(run, **{**(sorting_options or {}), **opts})
            lines.append(_row(kind, name, evaluate(localize_files(test_paths, ablated), truth, gt_test.parent)))
    recs = localize_files(test_paths, OtsuLocalizer())
    lines.append(_row(kind, "Otsu (label-free)", evaluate(recs, truth, gt_test.parent)))
    vols = [io.open_volume(p) for p in train_paths]
    value, _ = calibrate_threshold(vols, [r.bbox for r in train_recs])
    for v in vols:
        v.close()
    recs = localize_files(test_paths, ThresholdLocalizer(value))
    lines.append(_row(kind, f"threshold calibrated on the 16 training volumes ({value:.3g})",
                      evaluate(recs, truth, gt_test.parent)))
    for ln in lines:
        print(ln, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="rotation", choices=["rotation", "sorting"])
    ap.add_argument("--batches", nargs="+", default=None, choices=["fish", "embryo", "mixed"],
                    help="default: embryo mixed (rotation), fish mixed (sorting)")
    defaults = TrainConfig()
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--steps", type=int, default=defaults.steps_per_epoch)
    ap.add_argument("--holder", default=None, help="default: the task's (interior for rotation, none for sorting)")
    ap.add_argument("--max-shift", type=float, default=defaults.max_shift)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", default="auto", help="auto/cpu, or gpu")
    ap.add_argument("--precision", default="32-true")
    args = ap.parse_args()
    args.batches = args.batches or (["embryo", "mixed"] if args.task == "rotation" else ["fish", "mixed"])
    cfg = TrainConfig(task=args.task, epochs=args.epochs, steps_per_epoch=args.steps, holder=args.holder,
                      seed=args.seed, devices=args.devices, precision=args.precision, max_shift=args.max_shift)
    device = torch.cuda.get_device_name() if args.devices == "gpu" else "CPU"
    lines = []
    sorting_options = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.batches:
            lines += bench(kind, Path(tmp), cfg, sorting_options)
    if cfg.task == "rotation":
        model = (f"Rotation model: resnet18, input {cfg.input_size}, batch {cfg.batch_size}, "
                 f"{cfg.epochs} epochs x {cfg.steps_per_epoch} steps, axes {list(cfg.axes)}, twin range {cfg.k}, "
                 f"{cfg.step}-degree classes, holder {cfg.holder!r}, max shift {cfg.max_shift}")
        title = (f"Rotation localization: {'+'.join(args.batches)}, holder {cfg.holder}, shift {cfg.max_shift}, "
                 f"{cfg.epochs}x{cfg.steps_per_epoch} steps, {'GPU' if args.devices == 'gpu' else 'CPU'}")
    else:
        loc = SortingLocalizer("unused", **sorting_options)
        model = (f"Sorting model: resnet18, input {cfg.input_size}, {cfg.batch_size} slices of one volume per "
                 f"batch, {cfg.epochs} epochs x {cfg.steps_per_epoch} steps, axes {list(cfg.axes)}, holder "
                 f"{cfg.holder!r}, sampling "
                 f"{cfg.sampling}, margin {cfg.margin}, dropout {cfg.dropout}; localizer: {loc.mc_samples} MC "
                 f"passes, output stride {loc.output_stride}, top {loc.top_fraction:.0%} of superpixels, "
                 f"statistic {loc.statistic!r}, slice level {loc.slice_level!r}, oriented {loc.orient}")
        title = (f"Sorting localization: {'+'.join(args.batches)}, {cfg.epochs}x{cfg.steps_per_epoch} steps, "
                 f"{'GPU' if args.devices == 'gpu' else 'CPU'}")
        if cfg.holder != TrainConfig(task="sorting").holder:
            title += f", holder {cfg.holder}"  # its own section beside the default's
    if args.devices != "gpu" and cfg.precision != "32-true":
        title += f", {cfg.precision}"  # its own section beside the float32 one
    body = "\n".join([
        "Per batch kind: train on 16 synthetic volumes of 64x96x96 (seed 20), evaluate on 8 held-out volumes "
        f"(seed 21). {model}, trained on {device} ({cfg.precision}).",
        "",
        "| batch | method | MAE (voxels) | rel. error (%) | IoU | mean recall | worst recall | reduction (x) | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ])
    print(f"updated {update_section(title, body)}")


if __name__ == "__main__":
    main()
