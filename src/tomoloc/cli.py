"""The ``tomoloc`` command line.

Every command reports bad input as one line ``tomoloc: error: <file>: <problem>`` on
stderr and exits with status 2, leaving no partial output behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tomoloc import __version__, io
from tomoloc._fsutil import write_text_atomic
from tomoloc.boxes import BoxFileError, BoxRecord, index_by_name, match_box, read_boxes, write_boxes
from tomoloc.localize.base import BadValuesError


class _TrainDefaults:
    """Mirror of ``tomoloc.config.TrainConfig`` defaults (a test keeps them equal) so the
    CLI starts without importing torch and Lightning."""

    epochs, steps_per_epoch, batch_size, backbone, input_size = 12, 100, 32, "resnet18", 64
    axes = {"rotation": (0, 1, 2), "sorting": (0, 1, 2)}
    k, step, lr, margin, sampling = 2, 90, 1e-3, 1.0, "uniform"


TRAIN_DEFAULTS = _TrainDefaults

class _OneLineUsageErrors(TyperGroup):
    """Argument errors as one line, like every other error: ``tomoloc: error: <command>: <problem>``.

    Click's own usage errors print the usage, a hint and a framed message; scripts that read
    stderr, and the rule that every error is one line, want the problem alone.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


# Click's UsageError as this typer raises it (recent typer vendors its own copy of click).
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line_usage_errors() -> Any:
    try:
        yield
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `tomoloc` alone: the help is the answer
            raise
        where = exc.ctx.command_path if exc.ctx is not None else "tomoloc"
        err.print(f"tomoloc: error: {where}: {exc.format_message()} (see {where} --help)",
                  markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the sample in 3D tomography volumes without labels, and crop to it.",
)
out = Console()
err = Console(stderr=True)

USER_ERRORS = (io.VolumeError, BoxFileError, FileExistsError, FileNotFoundError, BadValuesError)
SCHEDULER_HELP = ("Map volumes over Dask: 'local' (a LocalCluster of --workers processes) or a scheduler "
                  "address such as tcp://host:8786 (workers must see the same paths).")
MAX_MEMORY_HELP = ("Peak memory per process, e.g. 1G or 768M, whatever the volume size: buffers are sized "
                   "to what the libraries and the model leave of it.")

MARGIN_HELP = ("Voxels kept on both sides of every axis around the box, clipped to the volume (default: 4 for "
               "multiotsu and otsu, 16 for sorting and rotation, whose boxes cut more; see README).")
GROW_HELP = ("Multi-Otsu: the box also takes every voxel connected to the sample that is at least this share "
             "of the way from the background's level to the threshold (thin, blurred parts; default 0.5, 1 turns "
             "it off; see README).")
PRECISION_HELP = ("Rotation, sorting: the network passes in 32 (float32) or bf16 (bfloat16 autocast: twice as "
                  "fast on a CPU with AMX, boxes within 2 voxels; see README).")


class UsageProblem(ValueError):
    """Arguments that parse but make no sense together."""


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected input problems into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, NotADirectoryError, UsageProblem) as exc:
            msg = _not_a_folder(exc) if isinstance(exc, (NotADirectoryError, FileExistsError)) else str(exc)
            msg = msg.splitlines()[0] if msg else type(exc).__name__
            err.print(f"tomoloc: error: {msg}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _not_a_folder(exc: OSError) -> str:
    """``f/x: f is a file, not a folder`` for an output folder at or under a file (``--out f/x``,
    ``--out f``); ``exc`` itself when it is no such error of the operating system."""
    if exc.filename is None or exc.errno is None:
        return str(exc)
    path = Path(os.fsdecode(exc.filename))
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    # Temporary names (".x.tmp...") mean nothing to the user: name the output it was for.
    shown = path.with_name(path.name.split(".tmp")[0].lstrip(".")) if path.name.startswith(".") else path
    if blocking is None:
        return str(exc)
    return f"{shown}: a file, not a folder" if blocking == shown else f"{shown}: {blocking} is a file, not a folder"


def _progress() -> Progress:
    # Off when stderr is no terminal (a log file, a pipe): a stopped transient bar still
    # writes a newline there, which put a blank line above a one-line error.
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


class Kind(str, Enum):
    fish = "fish"
    embryo = "embryo"
    mixed = "mixed"


class Format(str, Enum):
    npy = "npy"
    tiff = "tiff"
    tiff_dir = "tiff-dir"
    h5 = "h5"
    zarr = "zarr"


class Method(str, Enum):
    multiotsu = "multiotsu"
    otsu = "otsu"
    threshold = "threshold"
    rotation = "rotation"
    sorting = "sorting"


class Task(str, Enum):
    rotation = "rotation"
    sorting = "sorting"


class Sampling(str, Enum):
    uniform = "uniform"
    gengauss = "gengauss"


class RunMethod(str, Enum):
    multiotsu = "multiotsu"
    sorting = "sorting"
    rotation = "rotation"
    otsu = "otsu"


def version_callback(value: bool) -> None:
    if value:
        out.print(f"tomoloc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """tomoloc: label-free sample localization and cropping for X-ray tomography batches."""


# ----------------------------------------------------------------------------- synth
@app.command()
@_user_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Output folder (created)."),
    n: int = typer.Option(16, "--n", min=1, help="Number of volumes."),
    kind: Kind = typer.Option(Kind.mixed, help="Sample kind."),
    shape: tuple[int, int, int] = typer.Option((64, 96, 96), help="Volume shape Z Y X (axis 0 = rotation axis)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same batch."),
    fmt: Format = typer.Option(Format.npy, "--format", help="Volume file format."),
    overwrite: bool = typer.Option(False, help="Replace files of the same names in OUT_DIR."),
) -> None:
    """Write a synthetic CT batch with ground truth (volumes, masks, ground_truth.json).

    Example: tomoloc synth data/ --n 16 --kind mixed --shape 64 96 96 --seed 0
    """
    from tomoloc.synth import write_batch

    if min(shape) < 8:
        raise UsageProblem(f"--shape {shape}: every side must be at least 8 voxels")
    t0 = time.perf_counter()
    gt = write_batch(out_dir, n=n, kind=kind.value, shape=shape, seed=seed, format=fmt.value,
                     overwrite=overwrite)
    out.print(f"wrote {n} {kind.value} volume(s) of shape {tuple(shape)} to {out_dir} "
              f"in {time.perf_counter() - t0:.1f} s; ground truth: {gt}")


# -------------------------------------------------------------------------- localize
def _truth_volumes(truth_path: Path) -> tuple[list[BoxRecord], list[Path]]:
    recs = read_boxes(truth_path)
    paths = []
    for r in recs:
        p = Path(r.volume)
        paths.append(p if p.is_absolute() else truth_path.parent / p)
    return recs, paths


def _check_device(device: str, method: str) -> None:
    """A ``--device`` other than ``auto`` must name a device torch knows and can use."""
    if method not in ("sorting", "rotation"):
        raise UsageProblem(f"--device {device}: only the self-supervised methods (sorting, rotation) run a network")
    import torch

    from tomoloc.localize.base import resolve_device

    try:
        dev = resolve_device(device)
    except RuntimeError:
        raise UsageProblem(f"--device {device}: not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageProblem(f"--device {device}: no CUDA GPU is visible to this process")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageProblem(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageProblem(f"--device {device}: only cpu and cuda are supported")


def make_localizer(method: str, value: float | None = None, calibrate: Path | None = None,
                   max_voxels: int = 256**3, model: Path | None = None,
                   stride: int = 1, mc_samples: int = 10, top_fraction: float = 0.1,
                   seed: int = 0, paper_variance: bool = False,
                   precision: str = "32", device: str = "auto",
                   grow: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the localizer a CLI invocation asks for; returns it and its config."""
    from tomoloc.localize import MultiOtsuLocalizer, OtsuLocalizer, ThresholdLocalizer, calibrate_threshold
    from tomoloc.localize.base import PRECISIONS

    if precision not in PRECISIONS:
        raise UsageProblem(f"--precision {precision}: must be one of {', '.join(PRECISIONS)}")
    if precision != "32" and method not in ("sorting", "rotation"):
        raise UsageProblem(f"--precision {precision}: only the self-supervised methods (sorting, rotation) "
                           "run a network")
    if device != "auto":
        _check_device(device, method)
    if grow is not None and method != "multiotsu":
        raise UsageProblem("--grow belongs to --method multiotsu")

    if method == "sorting":
        if model is None:
            raise UsageProblem("--method sorting needs --model RUN_DIR (made by `tomoloc train --task sorting`)")
        if not 0 < top_fraction <= 1:
            raise UsageProblem(f"--top-fraction {top_fraction}: must be in (0, 1]")
        from tomoloc.localize.sorting import SortingLocalizer

        extra: dict[str, Any] = {"slice_level": "none", "orient": False} if paper_variance else {}
        sloc = SortingLocalizer(model, mc_samples=mc_samples, top_fraction=top_fraction, seed=seed,
                                precision=precision, device=device, **extra)
        if sloc.config.task != "sorting":
            raise UsageProblem(f"--model {model}: trained for the {sloc.config.task} task, not sorting")
        return sloc, {"method": "sorting", "model": str(model), "mc_samples": mc_samples,
                      "top_fraction": top_fraction, "output_stride": sloc.output_stride,
                      "statistic": sloc.statistic, "slice_level": sloc.slice_level,
                      "orient": sloc.orient, "seed": seed, "precision": precision, "device": device}
    if method == "rotation":
        if model is None:
            raise UsageProblem("--method rotation needs --model RUN_DIR (made by `tomoloc train --task rotation`)")
        from tomoloc.localize.rotation import RotationLocalizer

        loc = RotationLocalizer(model, stride=stride, precision=precision, device=device)
        if loc.config.task != "rotation":
            raise UsageProblem(f"--model {model}: trained for the {loc.config.task} task, not rotation")
        return loc, {"method": "rotation", "model": str(model), "stride": stride,
                     "sigma": loc.sigma, "min_contrast": loc.min_contrast, "max_gap": loc.max_gap,
                     "extend": loc.extend, "keep": loc.keep, "floor_axes": list(loc.floor_axes),
                     "precision": precision, "device": device}
    if model is not None:
        raise UsageProblem("--model belongs to the self-supervised methods (--method rotation or sorting)")
    if method in ("otsu", "multiotsu") and (value is not None or calibrate is not None):
        raise UsageProblem("--value and --calibrate belong to --method threshold")
    if method == "otsu":
        return OtsuLocalizer(max_voxels=max_voxels), {"method": "otsu", "max_voxels": max_voxels}
    if method == "multiotsu":
        mloc = MultiOtsuLocalizer(max_voxels=max_voxels) if grow is None else \
            MultiOtsuLocalizer(max_voxels=max_voxels, grow=grow)
        return mloc, {"method": "multiotsu", "classes": mloc.classes, "min_fraction": mloc.min_fraction,
                      "min_share": mloc.min_share, "min_voxels": mloc.min_voxels, "smooth": mloc.smooth, "grow": mloc.grow,
                      "max_voxels": max_voxels}
    if (value is None) == (calibrate is None):
        raise UsageProblem("--method threshold needs exactly one of --value V or --calibrate ground_truth.json")
    cfg: dict[str, Any] = {"method": "threshold", "max_voxels": max_voxels}
    if calibrate is not None:
        recs, paths = _truth_volumes(calibrate)
        vols = [io.open_volume(p) for p in paths]
        try:
            value, mae = calibrate_threshold(vols, [r.bbox for r in recs], max_voxels=max_voxels)
        finally:
            for v in vols:
                v.close()
        cfg.update(calibrated_on=str(calibrate), calibration_mae=mae)
        err.print(f"calibrated threshold {value:.6g} (mean box MAE {mae:.2f} voxels on "
                  f"{len(recs)} labelled volume(s) of {calibrate})")
    cfg["value"] = float(value)  # type: ignore[arg-type]
    return ThresholdLocalizer(float(value), max_voxels=max_voxels), cfg  # type: ignore[arg-type]


@app.command()
@_user_errors
def localize(
    volumes: list[str] = typer.Argument(..., help="Volume files (npy, tif, TIFF-slice folder, h5[:/path], zarr)."),
    method: Method = typer.Option(Method.multiotsu, help="Localization method (see the README for which to pick)."),
    out_path: Path = typer.Option(Path("boxes.json"), "--out", help="Box file to write."),
    value: Optional[float] = typer.Option(None, help="Threshold value (method threshold)."),
    calibrate: Optional[Path] = typer.Option(None, help="Calibrate the threshold on this ground_truth.json."),
    max_voxels: int = typer.Option(256**3, help="Localize on a block-mean copy of at most this many voxels."),
    model: Optional[Path] = typer.Option(None, help="Run directory of a trained model (rotation, sorting)."),
    stride: int = typer.Option(1, min=1, help="Rotation: evaluate every n-th slice, interpolate the rest."),
    mc_samples: int = typer.Option(10, min=2, help="Sorting: Monte-Carlo dropout passes per slice."),
    top_fraction: float = typer.Option(0.1, help="Sorting: share of superpixels with the highest variance kept."),
    seed: int = typer.Option(0, help="Sorting: seed of the dropout masks."),
    paper_variance: bool = typer.Option(False, "--paper-variance",
                                        help="Sorting: the raw variance, high = sample (the paper's), without "
                                             "the per-slice median removal and the orientation (see README)."),
    precision: str = typer.Option("32", help=PRECISION_HELP),
    grow: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=GROW_HELP),
    device: str = typer.Option("auto", help="Rotation, sorting: where the network runs: auto (a GPU when there is "
                                            "one), cpu, cuda or cuda:N."),
    truth: Optional[Path] = typer.Option(None, help="ground_truth.json: draw the true boxes in the figures."),
    scheduler: Optional[str] = typer.Option(None, help=SCHEDULER_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes of --scheduler local (default: CPUs)."),
) -> None:
    """Box the sample in each volume and write a tomoloc-boxes/1 file.

    Self-supervised methods also write, per volume, their certainty profiles or variance
    maps (.npz) and a figure (.png) into OUT's sibling folder <out-stem>_details/.

    Example: tomoloc localize data/vol_*.npy --out boxes.json
    """
    _check_scheduler(scheduler, workers)
    localizer, cfg = make_localizer(method.value, value, calibrate, max_voxels, model, stride, mc_samples,
                                    top_fraction, seed, paper_variance, precision, device, grow)
    from tomoloc.localize import localize_file

    ssl = method.value in ("rotation", "sorting")
    details = out_path.parent / f"{out_path.stem}_details" if ssl else None
    truth_by_name = index_by_name(read_boxes(truth), truth) if truth else {}
    for v in volumes:  # unreadable or non-3D files fail here, before any work (or a cluster) starts
        io.open_volume(v).close()
    with _progress() as prog:
        task = prog.add_task(f"localize ({method.value})", total=len(volumes))
        results = _map_volumes(localize_file, volumes, localizer, details is not None, scheduler=scheduler,
                               workers=workers, advance=lambda *_: prog.advance(task),
                               permanent=(io.VolumeError, BadValuesError))
    # Every volume was tried; a box file is one artifact, so none is written unless all were boxed.
    _exit_on_failures(_error_lines(volumes, results))
    records = [r for r, _ in results]
    if details is not None:
        from tomoloc.crop import output_names
        from tomoloc.report import write_details

        try:  # same-named volumes in separate folders get distinct figure names, as crops do
            stems: list[str | None] = [Path(n).stem for n in output_names(volumes, ["npy"] * len(volumes))]
        except ValueError:  # a volume given twice: its figures are the same
            stems = [None] * len(volumes)
        for r, stem in zip(records, stems):
            t = truth_by_name.get(r.name)
            write_details(details, r, t.bbox if t else None, stem=stem)
            r.extra.pop("details", None)
        out.print(f"{'certainty profiles' if method.value == 'rotation' else 'variance maps'} and figures in {details}")
    write_boxes(out_path, records, config={**cfg, "tomoloc": __version__, "command": "localize"})
    for r in records:
        out.print(f"{r.volume}: bbox {[list(b) for b in r.bbox]}"
                  + ("  (no sample/background split found: the whole extent was kept)"
                     if r.extra["confidence"] == 0 and method.value == "rotation" else ""))
    out.print(f"wrote {len(records)} box(es) to {out_path}")


# ----------------------------------------------------------------------------- train
@app.command()
@_user_errors
def train(
    volumes: list[str] = typer.Argument(..., help="Unlabelled volumes to learn from."),
    task: Task = typer.Option(Task.rotation, help="Pretext task."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory: config, checkpoints, logs/metrics.csv."),
    epochs: int = typer.Option(TRAIN_DEFAULTS.epochs, min=1, help="Epochs (validation and checkpoint after each)."),
    steps: int = typer.Option(TRAIN_DEFAULTS.steps_per_epoch, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(TRAIN_DEFAULTS.batch_size, min=2, help="Pairs per step (per device)."),
    backbone: str = typer.Option(TRAIN_DEFAULTS.backbone, help="resnet18, resnet34 or resnet50."),
    input_size: int = typer.Option(TRAIN_DEFAULTS.input_size, min=16, help="Network input side (slices are resized)."),
    axes: Optional[str] = typer.Option(None, help="Slicing axes, e.g. 0,1,2 (default: all three)."),
    k: int = typer.Option(TRAIN_DEFAULTS.k, min=0, help="Rotation: twin slice within k slices of the reference."),
    angle_step: int = typer.Option(TRAIN_DEFAULTS.step, help="Rotation: angle step in degrees (divides 360)."),
    lr: float = typer.Option(TRAIN_DEFAULTS.lr, help="Peak learning rate (AdamW, cosine schedule)."),
    margin: float = typer.Option(TRAIN_DEFAULTS.margin, help="Sorting: ranking margin between ordered slices."),
    sampling: Sampling = typer.Option(Sampling.uniform, help="Sorting: slice indices uniform or generalized-Gaussian."),
    holder: Optional[str] = typer.Option(None, help="What the network sees of the holder: interior (rotation's "
                                         "default): the tube's interior only, wall and outside left out; none "
                                         "(the other tasks' default): everything; zmedian: less the per-pixel "
                                         "median over axis 0."),
    devices: str = typer.Option("auto", help="auto/cpu, gpu, or a number of GPUs per node (DDP when > 1)."),
    num_nodes: int = typer.Option(1, min=1, help="Nodes with --devices GPUs each (Lightning DDP; one process "
                                  "per node, e.g. under srun)."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed on GPU, 32-true on CPU), 32-true, bf16-mixed, "
                                  "16-mixed."),
    workers: Optional[int] = typer.Option(None, min=0, help="Data-loading worker processes per training process "
                                         "(default: 0 on CPU; on GPU the CPUs less 2, shared by the GPUs, at most 16)."),
    seed: int = typer.Option(0, help="Random seed (weights, split, samples)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
) -> None:
    """Self-supervised training on an unlabelled batch (no labels needed).

    Example: tomoloc train data/vol_*[0-9].npy --task rotation --out runs/rot
    """
    from tomoloc.training import TrainConfig, quiet_lightning, train as run_training

    quiet_lightning()
    try:
        ax = tuple(int(a) for a in axes.split(",")) if axes else None
    except ValueError:
        raise UsageProblem(f"--axes {axes!r}: expected comma-separated axes such as 0,1,2") from None
    dev: str | int = int(devices) if devices.isdigit() else devices
    try:
        cfg = TrainConfig(task=task.value, backbone=backbone, input_size=input_size, batch_size=batch_size,
                          epochs=epochs, steps_per_epoch=steps, lr=lr, seed=seed, devices=dev, num_nodes=num_nodes,
                          precision=precision, num_workers=_workers(workers, dev, num_nodes), axes=ax, k=k,
                          step=angle_step, holder=holder, margin=margin, sampling=sampling.value)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    for v in volumes:  # fail on a bad path before any work, with the file named
        io.open_volume(v).close()
    t0 = time.perf_counter()
    try:
        run_training(volumes, out_dir, cfg, resume=resume, progress=sys.stderr.isatty(), overwrite=overwrite)
    except ValueError as exc:
        if "cannot resume" in str(exc):
            raise UsageProblem(str(exc)) from None
        raise
    out.print(f"trained {task.value} on {len(volumes)} volume(s) in {time.perf_counter() - t0:.0f} s; "
              f"run in {out_dir} (checkpoints/best.ckpt, logs/metrics.csv)")


# -------------------------------------------------------------------------- evaluate
def _metrics_table(rows: list[dict[str, Any]], title: str) -> Table:
    from tomoloc.evaluate import COLUMNS

    t = Table(title=title)
    for c in ("volume", "method", *COLUMNS):
        t.add_column(c, justify="left" if c in ("volume", "method") else "right")
    for r in rows:
        t.add_row(*(str(r[c]) if c in ("volume", "method") else
                    ("-" if isinstance(r[c], float) and math.isnan(r[c]) else f"{r[c]:.3f}")
                    for c in ("volume", "method", *COLUMNS)),
                  end_section=r["volume"] == "mean")
    return t


@app.command()
@_user_errors
def evaluate(
    boxes: Path = typer.Argument(..., help="Box file to score."),
    truth: Path = typer.Option(..., help="ground_truth.json (tomoloc-boxes/1, optional masks)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Score boxes against ground truth: MAE, relative error, IoU, recall, reduction.

    Example: tomoloc evaluate boxes.json --truth data/ground_truth.json
    """
    from tomoloc.evaluate import evaluate as score, mean_row

    pred = read_boxes(boxes)
    index_by_name(pred, boxes)
    rows = score(pred, read_boxes(truth), truth.parent)
    if not rows:
        raise BoxFileError(f"{boxes}: no volume matches a volume of {truth} by file name")
    summary = mean_row(rows)
    if as_json:
        clean = lambda r: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}  # noqa: E731
        out.print_json(json.dumps({"volumes": [clean(r) for r in rows], "mean": clean(summary)}))
    else:
        out.print(_metrics_table(rows + [summary], f"{boxes} vs {truth}"))


# ------------------------------------------------------------------------------ crop
@app.command()
@_user_errors
def crop(
    volumes: list[str] = typer.Argument(..., help="Volumes to crop (matched to boxes by file name)."),
    boxes: Path = typer.Option(..., help="Box file (tomoloc-boxes/1)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder; inputs are never overwritten."),
    margin: int = typer.Option(0, min=0, help="Voxels added on both sides of every axis, clipped to the volume."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="Output format (default: the input's)."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs in --out."),
    max_memory: str = typer.Option("1G", help=MAX_MEMORY_HELP),
    scheduler: Optional[str] = typer.Option(None, help=SCHEDULER_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes of --scheduler local (default: CPUs)."),
) -> None:
    """Crop each volume to its box (plus margin), verify each crop, and report the storage saved.

    Example: tomoloc crop data/vol_*.npy --boxes boxes.json --out cropped/ --margin 4
    """
    from tomoloc.boxes import expand_bbox, normalize_bbox
    from tomoloc.crop import crop_item, input_clash, output_names
    from tomoloc.memory import crop_slab_bytes

    _check_scheduler(scheduler, workers)
    budget = _max_memory(max_memory)
    try:
        crop_slab_bytes(budget)  # validates the budget
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    records = read_boxes(boxes)
    plan, fmts = [], []
    # Check everything before writing anything: a bad volume must not leave half a batch.
    for v in volumes:
        rec = match_box(records, v, boxes)
        if rec is None:
            raise BoxFileError(f"{v}: no box for this volume in {boxes}")
        with io.open_volume(v) as vol:
            if tuple(vol.shape) != tuple(rec.shape):
                raise BoxFileError(f"{v}: shape {list(vol.shape)} differs from the box file's {list(rec.shape)}")
            fmts.append(fmt.value if fmt else vol.format)
        plan.append((v, rec))
    try:
        names = output_names([v for v, _ in plan], fmts)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    for (v, _), name in zip(plan, names):
        clash = input_clash(out_dir / name, v)
        if clash is not None:
            raise FileExistsError(f"{out_dir / name}: {clash}; choose another --out")
    manifest_path = out_dir / "crop_manifest.json"
    config = {"command": "crop", "boxes": str(boxes), "margin": margin, "format": fmt.value if fmt else None,
              "tomoloc": __version__}
    # A rerun into the same folder keeps crops an earlier run verified and that are still as recorded.
    rows: list[Any] = [None] * len(plan)
    replace = [False] * len(plan)
    earlier = {} if overwrite else _done_crops(manifest_path)
    # Rows of other volumes an earlier crop into this folder recorded stay in its manifest,
    # unless this run writes over their output.
    ours = {str(v) for v, _ in plan}
    targets = {(out_dir / n).resolve() for n in names}
    others = [r for r in _manifest_rows(manifest_path) if str(r.get("volume")) not in ours
              and Path(str(r.get("output", ""))).resolve() not in targets]
    for i, ((v, rec), name) in enumerate(zip(plan, names)):
        crop_box = [list(b) for b in expand_bbox(normalize_bbox(rec.bbox, rec.shape), margin, rec.shape)]
        row = earlier.get(str(v))
        if row is not None and row.get("bbox") == crop_box and _still_there(row, out_dir / name):
            rows[i] = {**row, "resumed": True}
        elif (out_dir / name).exists() and not overwrite:
            if not _ours(row, out_dir / name, crop_box):
                raise FileExistsError(f"{out_dir / name}: already exists (use --overwrite to replace it)")
            replace[i] = True
    todo = [i for i, r in enumerate(rows) if r is None]
    t0 = time.perf_counter()

    def record(k: int, res: Any, attempts: int) -> None:
        i = todo[k]
        v = plan[i][0]
        if isinstance(res, BaseException):
            from tomoloc.pipeline import _error_line

            rows[i] = {"volume": v, "status": "failed", "output": str(out_dir / names[i]),
                       "error": _error_line(str(v), res), "attempts": attempts}
        else:
            rows[i] = {"volume": v, "status": "done", "output": str(res.output), "bbox": [list(b) for b in res.bbox],
                       "bytes_before": res.bytes_before, "bytes_after": res.bytes_after, "checksum": res.checksum,
                       "verified": res.verified, "attempts": attempts}
        _write_crop_manifest(manifest_path, config, others + rows, t0)  # after every volume: a killed job resumes
        prog.advance(task)

    items = [(plan[i][0], plan[i][1].bbox, names[i], replace[i]) for i in todo]
    with _progress() as prog:
        task = prog.add_task("crop", total=len(plan), completed=len(plan) - len(todo))
        _map_volumes(crop_item, items, out_dir, scheduler=scheduler, workers=workers, advance=record,
                     permanent=(FileExistsError,), margin=margin, fmt=fmt.value if fmt else None,
                     overwrite=overwrite, max_memory=budget)
    _write_crop_manifest(manifest_path, config, others + rows, t0)
    manifest = _crop_totals(rows)  # this run's volumes only
    for r in rows:
        if r["status"] == "done":
            out.print(f"{r['volume']} -> {r['output']}: {r['bytes_before']:,} -> {r['bytes_after']:,} bytes"
                      + ("  (done earlier)" if r.get("resumed") else ""))
    out.print(f"total {manifest['bytes_before']:,} -> {manifest['bytes_after']:,} bytes: reduction "
              f"{manifest['bytes_before'] / max(manifest['bytes_after'], 1):.2f}x; {manifest['done']} done, "
              f"{manifest['failed']} failed")
    _exit_on_failures([r["error"] for r in rows if r["status"] == "failed"])


def _done_crops(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of the crops an earlier ``tomoloc crop`` into the same folder verified, by volume."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {str(r["volume"]): r for r in doc["volumes"]
                if r.get("status", "done") == "done" and r.get("verified")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileExistsError(f"{path}: not a readable crop manifest ({exc}); use --overwrite to start afresh") from None


def _still_there(row: dict[str, Any], output: Path) -> bool:
    """The crop an earlier run verified is still at ``output`` with its recorded size."""
    try:
        return (Path(row["output"]).resolve() == output.resolve()
                and io.volume_nbytes_on_disk(output) == row["bytes_after"])
    except (OSError, KeyError):
        return False


def _ours(row: dict[str, Any] | None, output: Path, crop_box: list[list[int]]) -> bool:
    """``output`` is the crop of this box that an earlier run wrote (damaged since: redo it)."""
    return row is not None and row.get("bbox") == crop_box and Path(row["output"]).resolve() == output.resolve()


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of the crop manifest at ``path``; none when it is missing or unreadable
    (unreadable stops a run without ``--overwrite`` earlier, in :func:`_done_crops`)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["volumes"]
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _crop_totals(rows: list[Any]) -> dict[str, Any]:
    done = [r for r in rows if r is not None and r.get("status") == "done"]
    return {"done": len(done), "failed": sum(1 for r in rows if r is not None and r.get("status") == "failed"),
            "bytes_before": sum(r["bytes_before"] for r in done), "bytes_after": sum(r["bytes_after"] for r in done)}


def _write_crop_manifest(path: Path, config: dict[str, Any], rows: list[Any], t0: float) -> dict[str, Any]:
    manifest = {"config": config, "volumes": [r for r in rows if r is not None], **_crop_totals(rows),
                "seconds": round(time.perf_counter() - t0, 3)}
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------- run
@app.command("run")
@_user_errors
def run_cmd(
    volumes: list[str] = typer.Argument(..., help="Volumes to box and crop (any supported format)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: crops, boxes.json, manifest.json, report.html."),
    method: RunMethod = typer.Option(RunMethod.multiotsu, help="Localization method (see the README for which to pick)."),
    margin: Optional[int] = typer.Option(None, min=0, help=MARGIN_HELP),
    model: Optional[Path] = typer.Option(None, help="Reuse this trained run instead of training on the batch."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (default: the training default)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Training steps per epoch."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="Output format (default: each input's)."),
    device: str = typer.Option("auto", help="auto (GPU when available) or cpu."),
    seed: int = typer.Option(0, help="Random seed (training, dropout masks)."),
    precision: str = typer.Option("32", help=PRECISION_HELP),
    grow: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=GROW_HELP),
    overwrite: bool = typer.Option(False, help="Start afresh: replace the outputs of an earlier run in --out."),
    resume: bool = typer.Option(True, help="Resume the run already in --out (same options): skip volumes done."),
    scheduler: Optional[str] = typer.Option(None, help=SCHEDULER_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes of --scheduler local (default: CPUs)."),
    max_memory: str = typer.Option("1G", help=MAX_MEMORY_HELP),
    delete_originals: bool = typer.Option(False, help="Delete each input once its crop is verified and recorded."),
) -> None:
    """The batch job: (train,) localize, crop, verify, and write boxes, a manifest and a report.

    A volume that fails is reported (one line each, exit status 2) and the others go on; a
    rerun into the same --out resumes, skipping volumes already done.

    Example: tomoloc run scans/*.h5 --out cropped/ --margin 4
    """
    from tomoloc.pipeline import RunConfig, VolumeFailures, run_batch

    if model is not None and not (model / "config.json").is_file():
        raise UsageProblem(f"--model {model}: not a tomoloc training run (no config.json)")
    try:
        cfg = RunConfig(method=method.value, margin=margin, model=str(model) if model else None, epochs=epochs,
                        steps=steps, seed=seed, format=fmt.value if fmt else None, device=device,
                        precision=precision, max_memory=_max_memory(max_memory),
                        delete_originals=delete_originals, grow=grow)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    _check_scheduler(scheduler, workers)
    failures: list[str] = []
    with _progress() as prog:
        task = prog.add_task(f"run ({method.value})", total=len(volumes))
        try:
            manifest = run_batch(volumes, out_dir, cfg, overwrite=overwrite, resume=resume, scheduler=scheduler,
                                 workers=workers, log=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True),
                                 on_volume=lambda _p: prog.advance(task))
        except VolumeFailures as exc:
            manifest, failures = exc.manifest, exc.lines
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
    _print_run(manifest, out_dir)
    _exit_on_failures(failures)



def _max_memory(text: str) -> int:
    from tomoloc.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageProblem(f"--max-memory {exc}") from None


def _workers(workers: int | None, devices: str | int, num_nodes: int = 1) -> int:
    """``--workers``, or :func:`tomoloc.config.auto_workers` when not given."""
    from tomoloc.config import auto_workers

    if workers is not None:
        return workers
    try:
        return auto_workers(devices, num_nodes)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None


def _check_scheduler(scheduler: str | None, workers: int | None) -> None:
    if workers is not None and scheduler != "local":
        raise UsageProblem("--workers sizes --scheduler local; give --scheduler local, or leave --workers out")


def _print_run(manifest: dict[str, Any], out_dir: Path) -> None:
    for r in manifest["volumes"]:
        if r["status"] != "done":
            continue
        # markup=False: "[check: ...]" is text, not a rich style tag.
        out.print(f"{r['volume']} -> {r['output']}: box {r['bbox']}, {r['bytes_before']:,} -> "
                  f"{r['bytes_after']:,} bytes" + ("  [check: " + "; ".join(r["flags"]) + "]" if r["flags"] else ""),
                  markup=False, highlight=False)
    out.print(f"total {manifest['bytes_before']:,} -> {manifest['bytes_after']:,} bytes: reduction "
              f"{manifest['reduction']:.2f}x in {manifest['seconds']:.0f} s; {manifest['done']} done, "
              f"{manifest['failed']} failed; report: {out_dir / 'report.html'}")


def _exit_on_failures(lines: list[str]) -> None:
    """One ``tomoloc: error:`` line per failed volume, then exit status 2."""
    for line in lines:
        err.print(f"tomoloc: error: {line}", markup=False, highlight=False, soft_wrap=True)
    if lines:
        raise typer.Exit(2)


def _map_volumes(fn: Callable[..., Any], items: list[Any], *args: Any, scheduler: str | None,
                 workers: int | None, advance: Callable[[int, Any, int], None],
                 permanent: tuple[type[BaseException], ...] = (), **kwargs: Any) -> list[tuple[Any, int]]:
    """``[(fn(item, *args, **kwargs), attempts) for item in items]``, over Dask when ``scheduler``.

    Every item is tried (twice after an error that is not ``permanent``,
    :func:`tomoloc.cluster.attempt_twice`); a failure is its exception in place of the result,
    and one failure never stops the others. ``advance(index, result, attempts)`` is called as
    each item finishes.
    """
    from contextlib import nullcontext

    from tomoloc.cluster import attempt_twice, dask_client, map_unordered

    results: list[Any] = [None] * len(items)
    with dask_client(scheduler, workers) if scheduler else nullcontext() as client:
        for i, got in map_unordered(attempt_twice, items, fn, *args, client=client, permanent=permanent, **kwargs):
            # A worker lost twice (Dask's own retries spent) comes back as a bare exception.
            results[i] = got if isinstance(got, tuple) else (got, 1)
            advance(i, *results[i])
    return results


def _error_lines(volumes: list[str], results: list[tuple[Any, int]]) -> list[str]:
    from tomoloc.pipeline import _error_line

    return [_error_line(str(v), res) for v, (res, _) in zip(volumes, results) if isinstance(res, BaseException)]


# ----------------------------------------------------------------------------- watch
@app.command()
@_user_errors
def watch(
    directory: Path = typer.Argument(..., help="Folder the acquisition writes volumes into."),
    out_dir: Path = typer.Option(..., "--out", help="Job folder (crops, manifest.json: the watcher's state)."),
    model: Optional[Path] = typer.Option(None, help="Trained run (its task is the method); none: multiotsu."),
    method: Optional[RunMethod] = typer.Option(None, help="Localization method (default: the model's task)."),
    margin: Optional[int] = typer.Option(None, min=0, help=MARGIN_HELP),
    fmt: Optional[Format] = typer.Option(None, "--format", help="Output format (default: each input's)."),
    device: str = typer.Option("auto", help="auto (GPU when available) or cpu."),
    seed: int = typer.Option(0, help="Random seed (dropout masks)."),
    precision: str = typer.Option("32", help=PRECISION_HELP),
    grow: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=GROW_HELP),
    interval: float = typer.Option(5.0, min=0.0, help="Seconds between two scans of the folder."),
    stable_seconds: float = typer.Option(30.0, min=0.0, help="A volume is complete once unchanged this long."),
    done_marker: Optional[str] = typer.Option(None, help="Suffix of the writer's done-marker (e.g. .done): "
                                              "take a volume only once <name><suffix> exists."),
    max_volumes: Optional[int] = typer.Option(None, min=1, help="Stop after this many volumes."),
    timeout: Optional[float] = typer.Option(None, min=0.0, help="Stop after this many seconds."),
    max_memory: str = typer.Option("1G", help=MAX_MEMORY_HELP),
    delete_originals: bool = typer.Option(False, help="Delete each input once its crop is verified and recorded."),
    scheduler: Optional[str] = typer.Option(None, help=SCHEDULER_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes of --scheduler local (default: CPUs)."),
) -> None:
    """Crop each new volume in DIRECTORY once it is complete; a restart resumes from --out.

    One log line per volume; Ctrl-C (or --max-volumes/--timeout) stops and writes the report.

    Example: tomoloc watch /beamline/scans --model runs/sort --out /beamline/cropped
    """
    from tomoloc.pipeline import THRESHOLD_METHODS, RunConfig
    from tomoloc.watch import Watcher

    if model is not None and not (model / "config.json").is_file():
        raise UsageProblem(f"--model {model}: not a tomoloc training run (no config.json)")
    if method is not None:
        name = method.value
    elif model is not None:
        name = json.loads((model / "config.json").read_text(encoding="utf-8"))["config"]["task"]
    else:
        name = "multiotsu"
    if name not in THRESHOLD_METHODS and model is None:
        raise UsageProblem(f"--method {name} needs --model RUN_DIR (train it first: tomoloc train --task {name})")
    try:
        cfg = RunConfig(method=name, margin=margin, model=str(model) if model else None, seed=seed,
                        format=fmt.value if fmt else None, device=device, precision=precision,
                        max_memory=_max_memory(max_memory), delete_originals=delete_originals, grow=grow)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    _check_scheduler(scheduler, workers)
    w = Watcher(directory, out_dir, cfg, stable_seconds=stable_seconds, done_marker=done_marker,
                log=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True),
                scheduler=scheduler, workers=workers)
    err.print(f"watching {directory} ({name}; complete = "
              + (f"'<name>{done_marker}' exists" if done_marker else f"unchanged for {stable_seconds:g} s")
              + f"); crops into {out_dir}", markup=False, highlight=False, soft_wrap=True)
    n = w.run(interval=interval, max_volumes=max_volumes, timeout=timeout)
    out.print(f"took {n} volume(s); manifest: {out_dir / 'manifest.json'}")


# ------------------------------------------------------- pretrain / finetune / segment
class _SegDefaults:
    """Mirror of ``tomoloc.segmentation.SegConfig`` defaults (a test keeps them equal) so the
    CLI starts without importing torch."""

    classes, fraction, input_size, batch_size, epochs, steps_per_epoch = (3,), 1.0, 64, 16, 8, 25
    lr, holdout, backbone = 1e-3, 0.25, "resnet18"


SEG_DEFAULTS = _SegDefaults


class PretrainMethod(str, Enum):
    sorting = "sorting"
    simclr = "simclr"
    mocov3 = "mocov3"


def _devices(devices: str) -> str | int:
    return int(devices) if devices.isdigit() else devices


def _expand_labels(values: list[str]) -> list[str]:
    """Each ``--labels`` value is a path, or a quoted glob pattern expanded in natural order."""
    import glob

    paths: list[str] = []
    for v in values:
        if any(ch in v for ch in "*?[") and not Path(io.split_dataset_path(v)[0]).exists():
            hits = sorted(glob.glob(v), key=io._natural_key)
            if not hits:
                raise FileNotFoundError(f"{v}: no file matches this pattern")
            paths.extend(hits)
        else:
            paths.append(v)
    return paths


@app.command()
@_user_errors
def pretrain(
    volumes: list[str] = typer.Argument(..., help="Unlabelled volumes to pre-train on."),
    method: PretrainMethod = typer.Option(PretrainMethod.sorting, help="sorting (one view, one model), simclr or mocov3."),
    backbone: str = typer.Option(TRAIN_DEFAULTS.backbone, help="resnet18, resnet34 or resnet50."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory; the encoder goes to RUN_DIR/encoder.safetensors."),
    epochs: int = typer.Option(TRAIN_DEFAULTS.epochs, min=1, help="Epochs."),
    steps: int = typer.Option(TRAIN_DEFAULTS.steps_per_epoch, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(TRAIN_DEFAULTS.batch_size, min=2, help="Slices per step (contrastive: two views each)."),
    input_size: int = typer.Option(TRAIN_DEFAULTS.input_size, min=16, help="Network input side (slices are resized)."),
    lr: float = typer.Option(TRAIN_DEFAULTS.lr, help="Peak learning rate (AdamW, cosine schedule)."),
    devices: str = typer.Option("auto", help="auto/cpu, gpu, or a number of GPUs (DDP when > 1)."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed on GPU, 32-true on CPU), 32-true, bf16-mixed, 16-mixed."),
    workers: Optional[int] = typer.Option(None, min=0, help="Data-loading worker processes per training process "
                                         "(default: 0 on CPU; on GPU the CPUs less 2, shared by the GPUs, at most 16)."),
    seed: int = typer.Option(0, help="Random seed (weights, split, samples, augmentations)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
) -> None:
    """Self-supervised pre-training of a segmentation encoder on an unlabelled batch.

    Writes a training run and its encoder as a torchvision ResNet state dict
    (RUN_DIR/encoder.safetensors, one input channel) for `tomoloc finetune --encoder`.

    Example: tomoloc pretrain data/vol_*[0-9].npy --method sorting --out runs/pre
    """
    from tomoloc.pretrain import pretrain as run_pretrain
    from tomoloc.training import TrainConfig, quiet_lightning

    quiet_lightning()
    try:
        cfg = TrainConfig(task=method.value, backbone=backbone, input_size=input_size, batch_size=batch_size,
                          epochs=epochs, steps_per_epoch=steps, lr=lr, seed=seed, devices=_devices(devices),
                          precision=precision, num_workers=_workers(workers, _devices(devices)))
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    for v in volumes:  # fail on a bad path before any work, with the file named
        io.open_volume(v).close()
    t0 = time.perf_counter()
    path = run_pretrain(volumes, out_dir, cfg, progress=sys.stderr.isatty(), overwrite=overwrite)
    out.print(f"pre-trained {backbone} with {method.value} on {len(volumes)} volume(s) in "
              f"{time.perf_counter() - t0:.0f} s; encoder: {path}")


@app.command()
@_user_errors
def finetune(
    volumes: list[str] = typer.Argument(..., help="Volumes with label volumes (same order as --labels)."),
    labels: list[str] = typer.Option(..., help="Label volume per volume (uint8 ids), repeated, or one quoted glob."),
    encoder: str = typer.Option(..., help="Pre-training RUN_DIR (encoder.safetensors), or none for random weights."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory: model.safetensors, metrics.json, config.json."),
    classes: str = typer.Option(",".join(map(str, SEG_DEFAULTS.classes)),
                                help="Label ids to segment, e.g. 3 or 3,4 (fish: 2 skeleton, 3 eyes, 4 organs)."),
    fraction: float = typer.Option(SEG_DEFAULTS.fraction, help="Share of the labelled slices to train on, (0, 1]."),
    holdout: float = typer.Option(SEG_DEFAULTS.holdout, help="Share of the volumes held out for the IoU."),
    backbone: Optional[str] = typer.Option(None, help="Encoder backbone (default: the export's, else resnet18)."),
    epochs: int = typer.Option(SEG_DEFAULTS.epochs, min=1, help="Epochs."),
    steps: int = typer.Option(SEG_DEFAULTS.steps_per_epoch, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(SEG_DEFAULTS.batch_size, min=2, help="Slices per step."),
    input_size: int = typer.Option(SEG_DEFAULTS.input_size, min=16, help="Network input side, a multiple of 16."),
    lr: float = typer.Option(SEG_DEFAULTS.lr, help="Peak learning rate (AdamW, cosine schedule)."),
    devices: str = typer.Option("auto", help="auto/cpu, gpu, or a number of GPUs."),
    precision: str = typer.Option("32-true", help="32-true; on GPU also bf16-mixed or 16-mixed."),
    seed: int = typer.Option(0, help="Random seed (weights, split, slice choice, sampling)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
) -> None:
    """Fine-tune a DeepLabV3+ segmenter on axis-0 slices; report IoU per class on held-out volumes.

    Example: tomoloc finetune data/vol_00[0-7].npy --labels 'data/vol_00[0-7]_labels.npy'
    --encoder runs/pre --fraction 0.01 --out runs/seg
    """
    label_paths = _expand_labels(labels)
    if len(label_paths) != len(volumes):
        raise UsageProblem(f"--labels: {len(label_paths)} label volume(s) for {len(volumes)} volume(s) (give --labels "
                           "once per volume, or one glob pattern in quotes so that the shell does not expand it)")
    try:
        ids = tuple(int(c) for c in classes.split(","))
    except ValueError:
        raise UsageProblem(f"--classes {classes!r}: expected comma-separated label ids such as 3,4") from None
    enc = None if encoder.lower() == "none" else encoder
    if enc is not None:
        from tomoloc.pretrain import load_encoder

        _, meta = load_encoder(enc)  # a missing or foreign export fails here, before any work
        backbone = backbone or meta.get("backbone")
    for v in [*volumes, *label_paths]:
        io.open_volume(v).close()
    from tomoloc.segmentation import SegConfig, finetune as run_finetune
    from tomoloc.training import quiet_lightning

    quiet_lightning()
    try:
        cfg = SegConfig(classes=ids, backbone=backbone or SEG_DEFAULTS.backbone, encoder=enc, fraction=fraction,
                        input_size=input_size, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps, lr=lr,
                        holdout=holdout, seed=seed, devices=_devices(devices), precision=precision)
        metrics = run_finetune(volumes, label_paths, out_dir, cfg, overwrite=overwrite, progress=sys.stderr.isatty())
    except ValueError as exc:
        if isinstance(exc, USER_ERRORS):
            raise
        raise UsageProblem(str(exc)) from None
    where = "held-out volumes" if metrics["held_out"] else "the training volumes (nothing held out)"
    out.print(f"IoU on {where}:")
    t = Table()
    t.add_column("label id")
    t.add_column("IoU", justify="right")
    for name, v in metrics["iou"].items():
        t.add_row(name, "-" if v is None else f"{v:.3f}")
    out.print(t)
    out.print(f"fine-tuned on {metrics['n_train_slices']} labelled slice(s) in {metrics['seconds']:.0f} s; "
              f"model in {out_dir} (model.safetensors, metrics.json)")


@app.command()
@_user_errors
def segment(
    volumes: list[str] = typer.Argument(..., help="Volumes to segment (any supported format)."),
    model: Path = typer.Option(..., help="Fine-tuning run directory (made by `tomoloc finetune`)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: <name>_labels<suffix> per volume."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="Output format (default: each input's)."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs in --out."),
) -> None:
    """Write a label volume (uint8 label ids, the input's shape) for each volume.

    Example: tomoloc segment scans/*.npy --model runs/seg --out labels/
    """
    from tomoloc.segmentation import load_segmenter, segment_files, segment_targets

    try:  # everything that can be checked cheaply, before the progress bar
        load_segmenter(model)
        segment_targets(volumes, out_dir, fmt.value if fmt else None, overwrite)
    except ValueError as exc:
        if isinstance(exc, USER_ERRORS):
            raise
        raise UsageProblem(str(exc)) from None
    with _progress() as prog:
        task = prog.add_task("segment", total=len(volumes))
        try:
            written = segment_files(model, volumes, out_dir, fmt=fmt.value if fmt else None, overwrite=overwrite,
                                    on_volume=lambda _p: prog.advance(task))
        except ValueError as exc:
            if isinstance(exc, USER_ERRORS):
                raise
            raise UsageProblem(str(exc)) from None
    for v, w in zip(volumes, written):
        out.print(f"{v} -> {w}")
    out.print(f"wrote {len(written)} label volume(s) to {out_dir}")


# ------------------------------------------------------------------------------ demo
@app.command()
@_user_errors
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", help="Output folder."),
    n: int = typer.Option(8, "--n", min=2, help="Volumes to synthesize (half calibrate the threshold)."),
    shape: tuple[int, int, int] = typer.Option((64, 96, 96), help="Volume shape Z Y X."),
    seed: int = typer.Option(0, help="Random seed."),
    margin: int = typer.Option(4, min=0, help="Crop margin in voxels (as tomoloc run)."),
    epochs: int = typer.Option(4, min=1, help="Rotation-model training epochs."),
    steps: int = typer.Option(50, min=1, help="Training steps per epoch."),
) -> None:
    """Synthesize a batch, train, localize, crop, evaluate and write a report, end to end.

    Example: tomoloc demo --out demo_out
    """
    from tomoloc.demo import run_demo

    run_demo(out_dir, n=n, shape=shape, seed=seed, margin=margin, epochs=epochs, steps=steps, console=out)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
