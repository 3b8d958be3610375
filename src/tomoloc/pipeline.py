"""The batch job users run: ``tomoloc run INPUT... --out DIR``.

Self-supervised training on the batch itself (or a given model), localization, cropping into
``DIR`` in each input's format, and what a person needs to check the result before deleting
anything. ``DIR`` ends up holding::

    <stem>.<ext>          one crop per input volume (same format as the input)
    boxes.json            tomoloc-boxes/1: the localized boxes (before the margin)
    manifest.json         per volume: input, output, box, crop box, bytes before/after, seconds, flags
    report.html           one self-contained page: summary, flagged volumes first, figures
    run_config.json       everything the job depended on
    model/                the pretext-task run, when the job trained one
    details/              per-volume figures and profiles / variance maps

A job either completes or leaves nothing behind: every file it wrote is removed if any
volume fails (inputs are never touched).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tomoloc import __version__, io
from tomoloc._fsutil import write_text_atomic
from tomoloc.boxes import Bbox, BoxRecord, write_boxes

__all__ = ["METHODS", "RunConfig", "border_touch", "run_batch"]

METHODS = ("sorting", "rotation", "otsu")
_OUTPUT_FILES = ("boxes.json", "manifest.json", "report.html", "run_config.json")


@dataclass
class RunConfig:
    """Options of :func:`run_batch` (saved as ``run_config.json``).

    Attributes
    ----------
    method : str
        ``"sorting"``, ``"rotation"`` (self-supervised; trained on the batch unless
        ``model`` is given) or ``"otsu"``.
    margin : int
        Voxels added to both sides of every axis of the box before cropping (clipped to the
        volume). A crop must err on the side of too big.
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
    """

    method: str = "otsu"
    margin: int = 8
    model: str | None = None
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0
    format: str | None = None
    low_confidence: float = 0.2
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.model is not None and self.method == "otsu":
            raise ValueError("--model belongs to the self-supervised methods (sorting, rotation)")
        if self.format is not None and self.format not in io.FORMATS:
            raise ValueError(f"unknown format {self.format!r}")


def border_touch(bbox: Bbox, shape: Sequence[int]) -> list[str]:
    """Which volume faces a box touches, e.g. ``["axis 0 start"]``."""
    out = []
    for a, ((lo, hi), n) in enumerate(zip(bbox, shape)):
        if lo <= 0:
            out.append(f"axis {a} start")
        if hi >= n:
            out.append(f"axis {a} end")
    return out


class _Created:
    """Paths this job created, removed again if it fails."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def add(self, p: Path) -> Path:
        if not p.exists():
            self.paths.append(p)
        return p

    def remove(self) -> None:
        for p in reversed(self.paths):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink(missing_ok=True)


def _plan(inputs: Sequence[str], out: Path, cfg: RunConfig, overwrite: bool) -> list[tuple[str, Path, tuple]]:
    """Open every input and decide every output before any work (bad input fails first)."""
    from tomoloc.crop import output_path

    plan, seen = [], {}
    for v in inputs:
        with io.open_volume(v) as vol:
            shape = tuple(int(s) for s in vol.shape)
            target = output_path(v, out, cfg.format or vol.format)
        src = Path(io.split_dataset_path(str(v))[0]).resolve()
        if target.resolve() == src:
            raise FileExistsError(f"{target}: the crop would overwrite its own input; choose another --out")
        if target.name in seen:
            raise ValueError(f"{v}: its crop {target.name} would collide with the crop of {seen[target.name]}")
        seen[target.name] = v
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target}: already exists (use --overwrite to replace it)")
        plan.append((str(v), target, shape))
    for name in (*_OUTPUT_FILES, "details"):
        if (out / name).exists() and not overwrite:
            raise FileExistsError(f"{out / name}: already exists (use --overwrite to replace it)")
    if cfg.model is None and cfg.method != "otsu" and (out / "model").exists() and not overwrite:
        raise FileExistsError(f"{out / 'model'}: already exists (use --overwrite, or --model {out / 'model'} to reuse it)")
    return plan


def _localizer(cfg: RunConfig, model_dir: Path | None) -> Any:
    if cfg.method == "otsu":
        from tomoloc.localize import OtsuLocalizer

        return OtsuLocalizer()
    if cfg.method == "sorting":
        from tomoloc.localize.sorting import SortingLocalizer

        loc = SortingLocalizer(model_dir, seed=cfg.seed, device=cfg.device)  # type: ignore[arg-type]
    else:
        from tomoloc.localize.rotation import RotationLocalizer

        loc = RotationLocalizer(model_dir, device=cfg.device)  # type: ignore[arg-type]
    if loc.config.task != cfg.method:
        raise ValueError(f"--model {model_dir}: trained for the {loc.config.task} task, not {cfg.method}")
    return loc


def run_batch(
    inputs: Sequence[str],
    out_dir: str | Path,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_volume: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (if needed), localize, crop and report a batch of volumes; see the module docstring.

    Parameters
    ----------
    inputs : sequence of str
        Volume paths (any format :func:`tomoloc.io.open_volume` reads).
    out_dir : path
        Output folder (created).
    config : RunConfig
    overwrite : bool
        Replace outputs of an earlier job in ``out_dir``.
    log : callable
        Receives one line per step.
    on_volume : callable, optional
        Called with each volume's path after it is cropped (progress bars).

    Returns
    -------
    dict
        The manifest: ``volumes`` (one row per input), ``bytes_before``, ``bytes_after``,
        ``reduction``, ``seconds``.

    Raises
    ------
    tomoloc.io.VolumeError, FileExistsError, ValueError
        Bad input or outputs in the way; nothing is left written.
    """
    cfg = config or RunConfig()
    out = Path(out_dir)
    if not inputs:
        raise ValueError("no input volumes")
    plan = _plan(inputs, out, cfg, overwrite)
    created = _Created()
    if not out.exists():
        created.add(out)
    t_start = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        model_dir = Path(cfg.model) if cfg.model else None
        train_s = 0.0
        if cfg.method != "otsu" and model_dir is None:
            from tomoloc.training import TrainConfig, quiet_lightning, train

            quiet_lightning()
            model_dir = created.add(out / "model")
            kw: dict[str, Any] = {"task": cfg.method, "seed": cfg.seed}
            if cfg.epochs:
                kw["epochs"] = cfg.epochs
            if cfg.steps:
                kw["steps_per_epoch"] = cfg.steps
            import torch

            if cfg.device in ("auto", "gpu", "cuda") and torch.cuda.is_available():
                kw["devices"] = "gpu"
            tcfg = TrainConfig(**kw)
            t0 = time.perf_counter()
            log(f"training the {cfg.method} model on {len(plan)} volume(s) ({tcfg.epochs} x "
                f"{tcfg.steps_per_epoch} steps) into {model_dir}")
            train([p for p, _, _ in plan], model_dir, tcfg, progress=False, overwrite=overwrite)
            train_s = time.perf_counter() - t0
            log(f"trained in {train_s:.0f} s")
        loc = _localizer(cfg, model_dir)

        # Localize everything before cropping anything: a bad volume found here leaves no crops.
        from tomoloc.localize import localize_files

        records: list[BoxRecord] = []
        loc_s: dict[str, float] = {}
        for path, _, _ in plan:
            t0 = time.perf_counter()
            records += localize_files([path], loc, keep_details=cfg.method != "otsu")
            loc_s[path] = time.perf_counter() - t0
        from tomoloc.report import write_details

        figures: dict[str, Path | None] = {}
        if cfg.method != "otsu":
            created.add(out / "details")
        for r in records:
            figures[r.volume] = write_details(out / "details", r) if cfg.method != "otsu" else None
            r.extra.pop("details", None)

        from tomoloc.crop import crop_volume

        rows = []
        for (path, target, shape), rec in zip(plan, records):
            t0 = time.perf_counter()
            created.add(target)
            res = crop_volume(path, rec.bbox, out, margin=cfg.margin, fmt=cfg.format, overwrite=overwrite)
            flags = []
            touch = border_touch(rec.bbox, shape)
            if touch:
                flags.append("the box touches the volume border (" + ", ".join(touch)
                             + "): the sample may continue outside the volume, or the box fell back to it")
            conf = float(rec.extra.get("confidence", 1.0))
            if conf < cfg.low_confidence:
                flags.append(f"low localizer confidence {conf:.2f} (< {cfg.low_confidence}): check the box")
            rows.append({"volume": path, "output": str(res.output), "shape": list(shape),
                         "bbox": [list(b) for b in rec.bbox], "crop_bbox": [list(b) for b in res.bbox],
                         "bytes_before": res.bytes_before, "bytes_after": res.bytes_after,
                         "reduction": round(res.reduction, 3), "confidence": round(conf, 4),
                         "seconds": round(loc_s[path] + time.perf_counter() - t0, 3), "flags": flags})
            if on_volume is not None:
                on_volume(path)

        before = sum(r["bytes_before"] for r in rows)
        after = sum(r["bytes_after"] for r in rows)
        doc = {"format": "tomoloc-run/1", "tomoloc": __version__, "config": asdict(cfg),
               "inputs": [p for p, _, _ in plan], "model": str(model_dir) if model_dir else None}
        created.add(out / "run_config.json")
        write_text_atomic(out / "run_config.json", json.dumps(doc, indent=1) + "\n")
        created.add(out / "boxes.json")
        write_boxes(out / "boxes.json", records,
                    config={**asdict(cfg), "tomoloc": __version__, "command": "run",
                            "model": str(model_dir) if model_dir else None})
        manifest = {"format": "tomoloc-manifest/1", "volumes": rows, "bytes_before": before, "bytes_after": after,
                    "reduction": round(before / max(after, 1), 3), "train_seconds": round(train_s, 1),
                    "seconds": round(time.perf_counter() - t_start, 1), "config": asdict(cfg)}
        created.add(out / "manifest.json")
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        created.add(out / "report.html")
        _report(out / "report.html", rows, figures, manifest, cfg)
        return manifest
    except BaseException:
        created.remove()
        raise


def _report(path: Path, rows: list[dict[str, Any]], figures: dict[str, Path | None],
            manifest: dict[str, Any], cfg: RunConfig) -> None:
    from tomoloc.report import BoxStyle, ReportEntry, figure_png, orthoviews, write_report

    entries = []
    for r in rows:
        with io.open_volume(r["volume"]) as vol:
            img = figure_png(orthoviews(vol, [BoxStyle(tuple(map(tuple, r["bbox"])), f"{cfg.method} box"),
                                              BoxStyle(tuple(map(tuple, r["crop_bbox"])),
                                                       f"crop (margin {cfg.margin})", "#0a84ff", "--")]))
        images = [img]
        fig = figures.get(r["volume"])
        if fig is not None and fig.is_file():
            images.append(fig.read_bytes())
        entries.append(ReportEntry(
            Path(r["volume"]).name, images,
            {"box": str(r["bbox"]), "crop box": str(r["crop_bbox"]), "confidence": r["confidence"],
             "bytes before": r["bytes_before"], "bytes after": r["bytes_after"], "reduction (x)": r["reduction"],
             "output": Path(r["output"]).name},
            r["flags"]))
    summary = [{"volumes": len(rows), "method": cfg.method, "margin": cfg.margin,
                "bytes before": manifest["bytes_before"], "bytes after": manifest["bytes_after"],
                "reduction (x)": manifest["reduction"], "seconds": manifest["seconds"]}]
    write_report(path, "tomoloc run", entries, summary=summary,
                 intro=(f"Red: the box found by {cfg.method}; blue dashed: what was kept (box + {cfg.margin} "
                        "voxels per side, clipped to the volume). Check flagged volumes before deleting any "
                        "original."))
