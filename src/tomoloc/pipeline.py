"""The batch job users run: ``tomoloc run INPUT... --out DIR``.

Self-supervised training on the batch itself (or a given model), localization, cropping into
``DIR`` in each input's format, and what a person needs to check the result before deleting
anything. ``DIR`` ends up holding::

    <stem>.<ext>          one crop per input volume (same format as the input)
    boxes.json            tomoloc-boxes/1: the localized boxes (before the margin)
    manifest.json         per volume: status, input, output, box, crop box, bytes, checksum, seconds, flags
    report.html           one self-contained page: summary, failed and flagged volumes first, figures
    run_config.json       everything the job depended on
    model/                the pretext-task run, when the job trained one
    details/              per-volume figures (orthogonal views; profiles / variance maps)

Failures and resuming
---------------------
Problems found before any work (a missing, unreadable or non-3D input, bad arguments, an
output in the way) stop the job with nothing written. After that, every volume is on its
own: a volume that fails (NaN or constant values, an I/O error, a crop that does not verify)
is recorded in the manifest with a one-line error, and the others go on; no partial crop is
left for it (every write is atomic). Errors that can change on a second try (anything but
NaN/constant values) are retried once. The job then raises :class:`VolumeFailures`.

The manifest is rewritten after every volume, so a killed job loses at most the volumes in
flight. Running the job again into the same ``DIR`` resumes it: volumes the manifest marks
done whose crop is still there with its recorded size and shape are skipped, failed and
missing ones are redone, and new inputs are added (so one ``DIR`` can collect a beamline's
volumes over time). Resuming requires the same result-defining options
(:data:`RESULT_KEYS`); a ``DIR`` holding another configuration is refused, and
``overwrite=True`` starts afresh.

A crop is marked done only once it has been read back and matched the source region
(shape and checksum, :func:`tomoloc.crop.verify_crop`). With ``delete_originals`` an input is
deleted only after that, and after the manifest saying so is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tomoloc import __version__, io
from tomoloc._fsutil import atomic_path, write_text_atomic
from tomoloc.boxes import Bbox, BoxRecord, normalize_bbox, write_boxes
from tomoloc.memory import DEFAULT_MAX_MEMORY, crop_slab_bytes, release_freed, resident_bytes
from tomoloc.preprocess import BadValuesError

__all__ = ["METHODS", "RESULT_KEYS", "THRESHOLD_METHODS", "RunConfig", "VolumeFailures", "VolumeJob",
           "attempt_volume", "border_touch", "process_volume", "run_batch", "write_report"]

METHODS = ("multiotsu", "sorting", "rotation", "otsu")
#: Methods that need no trained model.
THRESHOLD_METHODS = ("multiotsu", "otsu")
#: The crop margin (voxels per side) each method gets when none is given. Thresholding: 4,
#: for the faint edges of data unlike ours (our second generator's phantoms: 8 of 200 samples
#: cut at margin 0, 1 at 4). The self-supervised boxes cut more: 16 is the smallest margin
#: that cut no sample on the batches of our generator we measured; on the second generator's
#: phantoms rotation still cut 7 of 184 at 16 (BENCHMARKS.md, "Reading the sorting and
#: `tomoloc run` results"). A crop must err on the side of too big.
DEFAULT_MARGINS = {"multiotsu": 4, "otsu": 4, "sorting": 16, "rotation": 16}
_OUTPUT_FILES = ("boxes.json", "manifest.json", "report.html", "run_config.json")
#: The :class:`RunConfig` fields that decide a job's results: a resumed job must match them.
RESULT_KEYS = ("method", "margin", "model", "epochs", "steps", "seed", "format", "low_confidence", "precision")
_RUN_FORMAT = "tomoloc-run/1"
_MANIFEST_FORMAT = "tomoloc-manifest/1"


@dataclass
class RunConfig:
    """Options of :func:`run_batch` (saved as ``run_config.json``).

    Attributes
    ----------
    method : str
        ``"multiotsu"`` (the default: thresholding built not to cut the sample, see
        :class:`tomoloc.localize.MultiOtsuLocalizer`), ``"sorting"``, ``"rotation"``
        (self-supervised; trained on the batch unless ``model`` is given) or ``"otsu"``.
    margin : int, optional
        Voxels added to both sides of every axis of the box before cropping (clipped to the
        volume). ``None`` (the default): the method's :data:`DEFAULT_MARGINS` (4 for the
        thresholdings, 16 for sorting and rotation), set in place when the config is made.
    model : str, optional
        Run directory of a trained model to reuse instead of training.
    epochs, steps : int, optional
        Training length; ``None``: the training defaults.
    seed : int
        Seeds training and the localizer.
    format : str, optional
        Output format; default: each input's own.
    low_confidence : float
        Volumes whose localizer confidence is below this are flagged in the report.
    device : str
        ``"auto"`` (GPU when available) or ``"cpu"`` for training and localization.
    precision : str
        ``"32"`` or ``"bf16"``: the self-supervised localizer's network passes (not training;
        see :class:`tomoloc.localize.sorting.SortingLocalizer`). Part of the results.
    max_memory : int
        Peak-memory budget in bytes for one volume's data (per worker process); see
        :mod:`tomoloc.memory`. Does not change results.
    delete_originals : bool
        Delete each input once its crop has been verified and recorded.
    grow : float or None
        Multi-Otsu only: its hysteresis share (:class:`tomoloc.localize.MultiOtsuLocalizer`'s
        ``grow``; None: its default, 0.5). Part of the results.
    """

    method: str = "multiotsu"
    margin: int | None = None
    model: str | None = None
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0
    format: str | None = None
    low_confidence: float = 0.2
    device: str = "auto"
    precision: str = "32"
    max_memory: int = DEFAULT_MAX_MEMORY
    delete_originals: bool = False
    grow: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.margin is None:
            self.margin = DEFAULT_MARGINS[self.method]
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.model is not None and self.method in THRESHOLD_METHODS:
            raise ValueError("--model belongs to the self-supervised methods (sorting, rotation)")
        if self.format is not None and self.format not in io.FORMATS:
            raise ValueError(f"unknown format {self.format!r}")
        from tomoloc.localize.base import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "32" and self.method in THRESHOLD_METHODS:
            raise ValueError("--precision belongs to the self-supervised methods (sorting, rotation)")
        if self.grow is not None:
            if self.method != "multiotsu":
                raise ValueError("--grow belongs to --method multiotsu")
            from tomoloc.localize import MultiOtsuLocalizer

            try:
                MultiOtsuLocalizer(grow=self.grow)  # its own check of the range
            except ValueError as exc:
                raise ValueError(f"--{exc}") from None
        crop_slab_bytes(self.max_memory)  # validates the budget


@dataclass(frozen=True)
class VolumeJob:
    """One volume of a job: its input path (as given), its crop's path, and its shape."""

    volume: str
    output: str
    shape: tuple[int, int, int]


class VolumeFailures(Exception):
    """Some volumes of a job failed; the others were done and everything was written.

    Attributes
    ----------
    lines : list of str
        One line per failed volume, ``"<volume>: <problem>"``.
    manifest : dict
        The job's manifest.
    """

    def __init__(self, lines: list[str], manifest: dict[str, Any]):
        super().__init__(lines[0] if lines else "volumes failed")
        self.lines = lines
        self.manifest = manifest


def border_touch(bbox: Bbox, shape: Sequence[int]) -> list[str]:
    """Which volume faces a box touches, e.g. ``["axis 0 start"]``."""
    out = []
    for a, ((lo, hi), n) in enumerate(zip(bbox, shape)):
        if lo <= 0:
            out.append(f"axis {a} start")
        if hi >= n:
            out.append(f"axis {a} end")
    return out


def _key(volume: str) -> str:
    return os.path.abspath(volume)


# ------------------------------------------------------------------------ one volume
_LOCALIZERS: dict[tuple[Any, ...], Any] = {}


def _localizer(cfg: RunConfig, model_dir: str | None) -> Any:
    """The job's localizer, built once per process (worker processes load the model once)."""
    key = (cfg.method, model_dir, cfg.seed, cfg.device, cfg.precision, cfg.grow)
    if key in _LOCALIZERS:
        return _LOCALIZERS[key]
    if cfg.method == "otsu":
        from tomoloc.localize import OtsuLocalizer

        loc: Any = OtsuLocalizer()
    elif cfg.method == "multiotsu":
        from tomoloc.localize import MultiOtsuLocalizer

        loc = MultiOtsuLocalizer() if cfg.grow is None else MultiOtsuLocalizer(grow=cfg.grow)
    elif cfg.method == "sorting":
        from tomoloc.localize.sorting import SortingLocalizer

        loc = SortingLocalizer(Path(model_dir), seed=cfg.seed, device=cfg.device,  # type: ignore[arg-type]
                               precision=cfg.precision)
    else:
        from tomoloc.localize.rotation import RotationLocalizer

        loc = RotationLocalizer(Path(model_dir), device=cfg.device, precision=cfg.precision)  # type: ignore[arg-type]
    if cfg.method not in THRESHOLD_METHODS and loc.config.task != cfg.method:
        raise ValueError(f"--model {model_dir}: trained for the {loc.config.task} task, not {cfg.method}")
    _LOCALIZERS[key] = loc
    return loc


def _views_png(volume: Any, bbox: Bbox, crop_bbox: Bbox, cfg: RunConfig,
               projections: dict[str, Any] | None = None) -> bytes:
    from tomoloc.report import BoxStyle, figure_png, orthoviews

    return figure_png(orthoviews(volume, [BoxStyle(bbox, f"{cfg.method} box"),
                                          BoxStyle(crop_bbox, f"crop (margin {cfg.margin})", "#0a84ff", "--")],
                                 projections=projections))


def process_volume(job: VolumeJob, cfg: RunConfig, model_dir: str | None, out_dir: str) -> dict[str, Any]:
    """Localize, crop and verify one volume; write its figures; return its manifest row.

    Runs in a worker process under ``--scheduler``: everything it needs comes in its
    arguments. The row has ``status`` ``"done"`` and ``verified`` true; any failure raises.
    """
    from tomoloc.boxes import expand_bbox
    from tomoloc.crop import crop_volume
    from tomoloc.localize.base import whole_volume

    t0 = time.perf_counter()
    out = Path(out_dir)
    loc = _localizer(cfg, model_dir)
    with io.open_volume(job.volume) as vol:
        shape = tuple(int(s) for s in vol.shape)
        res = loc.localize(vol)
        release_freed()
        bbox = normalize_bbox(res.bbox, shape)
        extra: dict[str, Any] = {"confidence": res.confidence}
        extra.update({k: v for k, v in res.details.items() if isinstance(v, (int, float, str, bool, type(None)))})
        record = BoxRecord(job.volume, shape, bbox, res.method, extra)  # type: ignore[arg-type]
        crop_box = expand_bbox(bbox, cfg.margin, shape)
        details = out / "details"
        stem = Path(job.output).stem  # unique in the job, unlike the inputs' names
        views = details / f"{stem}_views.png"
        png = _views_png(vol, bbox, crop_box, cfg, res.details.get("projections"))
    with atomic_path(views) as tmp:
        tmp.write_bytes(png)
    figure = None
    if cfg.method not in THRESHOLD_METHODS:
        from tomoloc.report import write_details

        # The projections are on the views figure already.
        record.extra["details"] = {k: v for k, v in res.details.items() if k != "projections"}
        fig = write_details(details, record, stem=stem)
        figure = str(fig) if fig is not None else None
        record.extra.pop("details")
    release_freed()  # the figures' buffers, before the copy's slabs
    crop = crop_volume(job.volume, bbox, out, margin=cfg.margin, fmt=cfg.format, overwrite=True,
                       slab_bytes=crop_slab_bytes(cfg.max_memory, resident_bytes()), verify=True, name=Path(job.output).name)
    flags = []
    touch = border_touch(bbox, shape)
    if len(touch) == 6:
        # Said apart: a whole-volume box saves nothing, and the reasons differ from a box
        # that reaches one face (the report's projections show which it is).
        flags.append("the box is the whole volume: nothing was cropped away (the object fills the field of view, "
                     "the holder and its medium were kept with it, or nothing was found)")
    else:
        if touch:
            flags.append("the box touches the volume border (" + ", ".join(touch)
                         + "): the sample may continue outside the volume")
        if crop_box == whole_volume(shape):
            flags.append(f"the crop (box and {cfg.margin}-voxel margin) is the whole volume: nothing was saved")
    conf = float(res.confidence)
    if conf < cfg.low_confidence:
        flags.append(f"low localizer confidence {conf:.2f} (< {cfg.low_confidence}): check the box")
    return {"volume": job.volume, "status": "done", "output": str(crop.output), "shape": list(shape),
            "bbox": [list(b) for b in bbox], "crop_bbox": [list(b) for b in crop.bbox],
            "bytes_before": crop.bytes_before, "bytes_after": crop.bytes_after,
            "reduction": round(crop.reduction, 3), "confidence": round(conf, 4),
            "checksum": crop.checksum, "verified": crop.verified, "original_deleted": False,
            "seconds": round(time.perf_counter() - t0, 3), "flags": flags,
            "views": str(views), "figure": figure, "record": record.to_json()}


def _error_line(volume: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (io.VolumeError, BadValuesError, OSError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return text if text.startswith(volume) else f"{volume}: {text}"


def attempt_volume(job: VolumeJob, cfg: RunConfig, model_dir: str | None, out_dir: str) -> dict[str, Any]:
    """:func:`process_volume`, tried a second time after an error that may not recur.

    Never raises: a volume that fails gets a row with ``status`` ``"failed"`` and a one-line
    ``error``. NaN or constant values fail at once (a second read finds the same values).
    """
    from tomoloc.cluster import attempt_twice

    t0 = time.perf_counter()
    row, attempts = attempt_twice(job, process_volume, cfg, model_dir, out_dir, permanent=(BadValuesError,))
    if isinstance(row, BaseException):
        return _failed(job, _error_line(job.volume, row), attempts, t0)
    row["attempts"] = attempts
    return row


def _failed(job: VolumeJob, error: str, attempts: int, t0: float) -> dict[str, Any]:
    return {"volume": job.volume, "status": "failed", "output": job.output, "shape": list(job.shape),
            "error": error, "attempts": attempts, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------- whole job
def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileExistsError(f"{path}: not a readable tomoloc file ({exc}); use --overwrite to replace it") from None
    if not isinstance(doc, dict):
        raise FileExistsError(f"{path}: not a tomoloc file; use --overwrite to replace it")
    return doc


def _earlier_run(out: Path, cfg: RunConfig, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """The run config of the job to resume in ``out``, or ``None`` to start afresh."""
    rc = out / "run_config.json"
    if overwrite or not rc.exists():
        return None
    doc = _read_json(rc)
    if doc.get("format") != _RUN_FORMAT:
        raise FileExistsError(f"{rc}: not a tomoloc run config; use --overwrite to replace it")
    if not resume:
        raise FileExistsError(f"{out}: already holds a tomoloc run (resume it, or use --overwrite to replace it)")
    # A key an older tomoloc did not write had its default value then (precision: float32).
    old, new = {**asdict(RunConfig()), **doc.get("config", {})}, asdict(cfg)
    diff = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in RESULT_KEYS if old.get(k) != new[k]]
    if diff:
        raise ValueError(f"{out}: holds a run with another configuration ({', '.join(diff)}); "
                         "use --overwrite to start afresh, or another --out")
    return doc


def _still_done(row: dict[str, Any]) -> bool:
    """A done row whose crop is still there with its recorded size and shape."""
    if row.get("status") != "done":
        return False
    try:
        if io.volume_nbytes_on_disk(row["output"]) != row["bytes_after"]:
            return False
        with io.open_volume(row["output"]) as vol:
            return [int(s) for s in vol.shape] == [hi - lo for lo, hi in row["crop_bbox"]]
    except (io.VolumeError, OSError, KeyError, TypeError):
        return False


def _plan(inputs: Sequence[str], out: Path, cfg: RunConfig, overwrite: bool, resuming: bool,
          done: dict[str, dict[str, Any]]) -> list[VolumeJob]:
    """Open every input still to do and decide every output before any work (bad input fails first)."""
    from tomoloc.crop import input_clash, output_names

    todo, shapes, fmts = [], {}, []
    for v in inputs:
        if _key(v) in done:
            continue
        with io.open_volume(v) as vol:
            shapes[v] = tuple(int(s) for s in vol.shape)
            fmts.append(cfg.format or vol.format)
        todo.append(v)
    names = dict(zip(todo, output_names(todo, fmts, taken=[Path(r["output"]).name for r in done.values()])))
    plan = []
    for v in inputs:
        row = done.get(_key(v))
        if row is not None:
            target = Path(row["output"])
            shape = tuple(row["shape"])
        else:
            target, shape = out / names[v], shapes[v]
            clash = input_clash(target, v)
            if clash is not None:
                raise FileExistsError(f"{target}: {clash}; choose another --out")
            # In a resumed job's folder a crop not yet in the manifest is this job's own (killed
            # between writing it and recording it); anywhere else it is someone's file.
            if target.exists() and not overwrite and not resuming:
                raise FileExistsError(f"{target}: already exists (use --overwrite to replace it)")
        plan.append(VolumeJob(str(v), str(target), shape))  # type: ignore[arg-type]
    if not resuming:
        for name in (*_OUTPUT_FILES, "details"):
            if (out / name).exists() and not overwrite:
                raise FileExistsError(f"{out / name}: already exists (use --overwrite to replace it)")
        if cfg.model is None and cfg.method not in THRESHOLD_METHODS and (out / "model").exists() and not overwrite:
            raise FileExistsError(f"{out / 'model'}: already exists (use --overwrite, or --model {out / 'model'} "
                                  "to reuse it)")
    return plan


def train_config(cfg: RunConfig, cuda: bool) -> Any:
    """The :class:`tomoloc.config.TrainConfig` of a job that trains its own model: the
    defaults, the job's method, seed, epochs and steps; on a GPU when ``cfg.device`` allows
    and ``cuda`` is there, with :func:`tomoloc.config.auto_workers` loader processes."""
    from tomoloc.config import TrainConfig, auto_workers

    kw: dict[str, Any] = {"task": cfg.method, "seed": cfg.seed}
    if cfg.epochs:
        kw["epochs"] = cfg.epochs
    if cfg.steps:
        kw["steps_per_epoch"] = cfg.steps
    if cfg.device in ("auto", "gpu", "cuda") and cuda:
        kw.update(devices="gpu", num_workers=auto_workers("gpu"))
    return TrainConfig(**kw)


def _train(plan: list[VolumeJob], out: Path, cfg: RunConfig, log: Callable[[str], None]) -> Path:
    import torch

    from tomoloc.training import quiet_lightning, train

    quiet_lightning()
    model_dir = out / "model"
    tcfg = train_config(cfg, torch.cuda.is_available())
    log(f"training the {cfg.method} model on {len(plan)} volume(s) ({tcfg.epochs} x "
        f"{tcfg.steps_per_epoch} steps) into {model_dir}")
    # A model folder without a finished run (a killed job) is this job's: train it afresh.
    train([j.volume for j in plan], model_dir, tcfg, progress=False, overwrite=True)
    return model_dir


def _summary(rows: list[dict[str, Any]], cfg: RunConfig, train_s: float, seconds: float,
             complete: bool) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "done"]
    before = sum(r["bytes_before"] for r in done)
    after = sum(r["bytes_after"] for r in done)
    return {"format": _MANIFEST_FORMAT, "complete": complete, "volumes": rows, "done": len(done),
            "failed": sum(r["status"] == "failed" for r in rows), "bytes_before": before,
            "bytes_after": after, "reduction": round(before / max(after, 1), 3),
            "train_seconds": round(train_s, 1), "seconds": round(seconds, 1), "config": asdict(cfg)}


def run_batch(
    inputs: Sequence[str],
    out_dir: str | Path,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    scheduler: Any = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    on_volume: Callable[[str], None] | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Train (if needed), localize, crop, verify and report a batch; see the module docstring.

    Parameters
    ----------
    inputs : sequence of str
        Volume paths (any format :func:`tomoloc.io.open_volume` reads).
    out_dir : path
        Output folder (created).
    config : RunConfig
    overwrite : bool
        Start afresh: replace the outputs of an earlier job in ``out_dir``.
    resume : bool
        Resume the job already in ``out_dir`` (same :data:`RESULT_KEYS`); if false, such a
        folder is refused unless ``overwrite``.
    scheduler : str, optional
        ``None``: volumes one after the other in this process; ``"local"``: a Dask
        LocalCluster of ``workers`` processes; otherwise a Dask scheduler address, or a
        :class:`distributed.Client` the caller keeps open (``tomoloc watch``). Training (self-supervised methods without a model) always runs here first.
    workers : int, optional
        Processes of the local cluster (default: the CPU count).
    log : callable
        Receives one line per step and one per volume.
    on_volume : callable, optional
        Called with each volume's path once it is finished, done or failed (progress bars).
    report : bool
        Write ``report.html`` (``tomoloc watch`` writes it when it stops).

    Returns
    -------
    dict
        The manifest: ``volumes`` (one row per volume ever done or failed in ``out_dir``),
        ``done``, ``failed``, ``bytes_before``, ``bytes_after``, ``reduction``, ``seconds``.

    Raises
    ------
    tomoloc.io.VolumeError, FileExistsError, ValueError
        Bad input, an output in the way, or a folder holding another configuration:
        found before any work, nothing is written.
    VolumeFailures
        Some volumes failed; everything else was done and written.
    """
    cfg = config or RunConfig()
    out = Path(out_dir)
    if not inputs:
        raise ValueError("no input volumes")
    earlier = _earlier_run(out, cfg, overwrite, resume)
    resuming = earlier is not None
    previous: list[dict[str, Any]] = []
    if resuming and (out / "manifest.json").is_file():
        previous = [r for r in _read_json(out / "manifest.json").get("volumes", []) if isinstance(r, dict)]
    wanted = {_key(v) for v in inputs}  # rows of other volumes are kept as they are, unchecked
    done = {_key(r["volume"]): r for r in previous if _key(r["volume"]) in wanted and _still_done(r)}
    plan = _plan(inputs, out, cfg, overwrite, resuming, done)
    todo = [j for j in plan if _key(j.volume) not in done]

    t_start = time.perf_counter()
    created_out = not out.exists()
    model_dir = Path(cfg.model) if cfg.model else None
    trained = bool(earlier and earlier.get("model_trained"))
    doc = {"format": _RUN_FORMAT, "tomoloc": __version__, "config": asdict(cfg),
           "inputs": [j.volume for j in plan], "model": str(model_dir) if model_dir else None,
           "model_trained": trained}
    train_s = 0.0
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "run_config.json", json.dumps(doc, indent=1) + "\n")
        if cfg.method not in THRESHOLD_METHODS and model_dir is None:
            model_dir = out / "model"
            if trained and (model_dir / "checkpoints" / "best.ckpt").is_file():
                log(f"reusing the model this job trained in {model_dir}")
            elif todo:
                t0 = time.perf_counter()
                _train(todo, out, cfg, log)
                train_s = time.perf_counter() - t0
                log(f"trained in {train_s:.0f} s")
                doc.update(model=str(model_dir), model_trained=True)
                write_text_atomic(out / "run_config.json", json.dumps(doc, indent=1) + "\n")
        if model_dir is not None and todo:
            _localizer(cfg, str(model_dir))  # a wrong --model fails here, before any volume
    except BaseException:
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        elif not resuming:
            with contextlib.suppress(OSError):  # out may be no folder at all: keep that error
                (out / "run_config.json").unlink(missing_ok=True)
            if model_dir == out / "model" and cfg.model is None:
                shutil.rmtree(out / "model", ignore_errors=True)
        raise

    # Earlier rows first (in their order), this job's volumes after, in input order.
    rows: dict[str, dict[str, Any]] = {_key(r["volume"]): r for r in previous}
    for j in plan:
        rows.setdefault(_key(j.volume), {"volume": j.volume, "status": "pending", "output": j.output,
                                         "shape": list(j.shape)})
    skipped = len(plan) - len(todo)
    if skipped:
        log(f"resuming: {skipped} volume(s) already done in {out}, {len(todo)} to do")

    def save(complete: bool) -> dict[str, Any]:
        manifest = _summary(list(rows.values()), cfg, train_s, time.perf_counter() - t_start, complete)
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        return manifest

    save(False)
    from contextlib import nullcontext

    from tomoloc.cluster import dask_client, map_unordered

    mdir = str(model_dir) if model_dir else None
    if scheduler is None or not isinstance(scheduler, str):
        clients: Any = nullcontext(scheduler)  # this process, or a Client the caller holds open
    else:
        clients = dask_client(scheduler, workers)
    with clients as client:
        if client is not None:
            where = scheduler if isinstance(scheduler, str) else client.scheduler.address
            log(f"{len(todo)} volume(s) over Dask ({where}, {len(client.scheduler_info()['workers'])} workers)")
        for i, row in map_unordered(attempt_volume, todo, cfg, mdir, str(out), client=client):
            job = todo[i]
            if isinstance(row, BaseException):  # the worker itself was lost
                row = _failed(job, _error_line(job.volume, row), 1, time.perf_counter())
            rows[_key(job.volume)] = row
            save(False)
            if row["status"] == "done":
                log(f"{job.volume}: done in {row['seconds']:.1f} s, box {row['bbox']}, "
                    f"{row['bytes_before']:,} -> {row['bytes_after']:,} bytes (verified)")
                if cfg.delete_originals:
                    _delete_original(row, log)
                    save(False)
            else:
                log(f"{row['error']} (failed after {row['attempts']} attempt(s))")
            if on_volume is not None:
                on_volume(job.volume)

    all_rows = list(rows.values())
    records = [_record(r) for r in all_rows if r["status"] == "done"]
    write_boxes(out / "boxes.json", records,
                config={**asdict(cfg), "tomoloc": __version__, "command": "run", "model": mdir})
    manifest = save(True)
    if report:
        write_report(out, manifest)
    failed = [r["error"] for r in all_rows if r["status"] == "failed"]
    if failed:
        raise VolumeFailures(failed, manifest)
    return manifest


def _delete_original(row: dict[str, Any], log: Callable[[str], None]) -> None:
    from tomoloc.crop import delete_original

    try:
        row["original_deleted"] = delete_original(row["volume"], row["output"], bool(row.get("verified")))
    except OSError as exc:
        log(f"{row['volume']}: kept ({exc})")
        return
    log(f"{row['volume']}: " + ("deleted (crop verified)" if row["original_deleted"]
                                 else "kept: a dataset inside a container is never deleted"))


def _record(row: dict[str, Any]) -> BoxRecord:
    r = dict(row["record"])
    return BoxRecord(r.pop("volume"), tuple(r.pop("shape")), normalize_bbox(r.pop("bbox")),  # type: ignore[arg-type]
                     r.pop("method"), r)


def write_report(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``report.html`` in ``out_dir`` from a job's manifest and the figures in ``details/``."""
    from tomoloc.report import ReportEntry, write_report as write_html

    cfg = RunConfig(**manifest["config"])
    rows = manifest["volumes"]
    files = [Path(io.split_dataset_path(r["volume"])[0]) for r in rows]
    names = [f.name for f in files]
    entries = []
    for r, name, f in zip(rows, names, files):
        if names.count(name) > 1:  # same-named inputs in separate folders: show the folder too
            name = "/".join(f.parts[-2:])
        if r["status"] != "done":
            entries.append(ReportEntry(name, [], {"output": Path(r["output"]).name, "status": r["status"]},
                                       [r.get("error", "not done yet")]))
            continue
        images = [Path(p).read_bytes() for p in (r.get("views"), r.get("figure")) if p and Path(p).is_file()]
        entries.append(ReportEntry(
            name, images,
            {"box": str(r["bbox"]), "crop box": str(r["crop_bbox"]), "confidence": r["confidence"],
             "bytes before": r["bytes_before"], "bytes after": r["bytes_after"], "reduction (x)": r["reduction"],
             "checksum": r["checksum"], "output": Path(r["output"]).name,
             "original": "deleted" if r.get("original_deleted") else "kept"},
            r["flags"]))
    summary = [{"volumes": len(rows), "done": manifest["done"], "failed": manifest["failed"],
                "method": cfg.method, "margin": cfg.margin,
                "bytes before": manifest["bytes_before"], "bytes after": manifest["bytes_after"],
                "reduction (x)": manifest["reduction"], "seconds": manifest["seconds"]}]
    path = Path(out_dir) / "report.html"
    write_html(path, "tomoloc run", entries, summary=summary,
               intro=(f"Red: the box found by {cfg.method}; blue dashed: what was kept (box + {cfg.margin} "
                      "voxels per side, clipped to the volume). Every crop was read back and matched its "
                      "source region (shape and checksum). Check failed and flagged volumes before deleting "
                      "any original."))
    return path

