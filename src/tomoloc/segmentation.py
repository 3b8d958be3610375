"""Fine-tuning a DeepLabV3+ segmenter on a few labelled slices, and applying it.

The network is ``segmentation_models_pytorch.DeepLabV3Plus`` with a ResNet encoder
(``encoder_weights=None``, ``in_channels=1``), whose encoder is either random or an export
of :mod:`tomoloc.pretrain`. It segments 2D slices along axis 0 (the rotation axis) of
the same working copy the pretext tasks see: block-mean downsampled to ``max_voxels``,
percentile-normalised (:func:`tomoloc.preprocess.working_copy`, ``network_input``), each
slice resized to ``input_size x input_size``.

Classes: ``config.classes`` lists label ids of the label volumes (e.g. 3 = fish eyes,
:data:`tomoloc.synth.LABELS`); class ``i + 1`` of the network is ``classes[i]`` and class
0 everything else. Label volumes are brought to the working-copy grid by taking voxel
``(f i, f j, f k)`` of each ``f``-block (nearest), and slices to ``input_size`` by nearest
resizing.

Labelled fraction: the candidates are the axis-0 slices of the training volumes that
show at least one target class; ``max(1, round(fraction * n))`` of them are drawn without
replacement with ``seed``. Training runs the same number of steps whatever the fraction
(items are drawn with replacement from the chosen slices), so only the labels differ.

A fine-tuning run directory holds::

    config.json          {"format": "tomoloc-segment/1", "config": {...}, volumes, labels,
                          train/test volume indices, chosen slices}
    model.safetensors    the DeepLabV3+ state dict
    metrics.json         IoU per class on the held-out volumes (and their mean)
    logs/metrics.csv     training loss per epoch
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tomoloc._fsutil import atomic_path, write_text_atomic
from tomoloc.config import JsonConfig
from tomoloc.models import ENCODERS
from tomoloc.sampling import DEFAULT_MAX_VOXELS, _SliceDataset, square_slices

__all__ = [
    "SEG_FORMAT",
    "LabelledSliceDataset",
    "SegConfig",
    "SegmentationModule",
    "finetune",
    "iou_per_class",
    "load_labelled",
    "load_segmenter",
    "make_segmenter",
    "predict_classes",
    "predict_labels",
    "segment_files",
    "segment_targets",
    "select_slices",
]

SEG_FORMAT = "tomoloc-segment/1"


@dataclass
class SegConfig(JsonConfig):
    """Everything a fine-tuning run depends on; JSON-serialisable.

    Attributes
    ----------
    classes : tuple of int
        Label ids to segment (network classes ``1..len(classes)``; 0 is the rest).
    backbone : str
        ResNet of the encoder; must match the pre-trained export.
    encoder : str or None
        Run directory of a :mod:`tomoloc.pretrain` export, or ``None`` (random encoder).
    fraction : float
        Share of the candidate labelled slices used, in ``(0, 1]`` (module docstring).
    input_size : int
        Network input side; a multiple of 16 (DeepLabV3+ output stride).
    batch_size, epochs, steps_per_epoch : int
        Slices per step, epochs, optimiser steps per epoch.
    lr, weight_decay : float
        AdamW; cosine schedule with 5 % warm-up (as :mod:`tomoloc.training`).
    holdout : float
        Share of the volumes held out for IoU when no test volumes are given (by volume,
        :func:`tomoloc.training.split_volumes`).
    augment : bool
        Random 90-degree rotations and flips of each training slice.
    seed : int
        Seeds weights, split, slice choice and sampling.
    max_voxels : int
        Working-copy voxel budget.
    devices, precision : str
        As :class:`tomoloc.config.TrainConfig`.
    """

    classes: tuple[int, ...] = (3,)
    backbone: str = "resnet18"
    encoder: str | None = None
    fraction: float = 1.0
    input_size: int = 64
    batch_size: int = 16
    epochs: int = 8
    steps_per_epoch: int = 25
    lr: float = 1e-3
    weight_decay: float = 1e-4
    holdout: float = 0.25
    augment: bool = True
    seed: int = 0
    max_voxels: int = DEFAULT_MAX_VOXELS
    devices: str | int = "auto"
    precision: str = "32-true"

    def __post_init__(self) -> None:
        from tomoloc.config import hardware

        self.classes = tuple(int(c) for c in self.classes)
        if not self.classes or len(set(self.classes)) != len(self.classes) or any(not 0 < c < 256 for c in self.classes):
            raise ValueError(f"classes must be distinct label ids in 1..255, got {self.classes!r}")
        if self.backbone not in ENCODERS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(ENCODERS)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.input_size < 16 or self.input_size % 16:
            raise ValueError(f"input_size must be a positive multiple of 16, got {self.input_size!r}")
        for name in ("batch_size", "epochs", "steps_per_epoch", "max_voxels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch norm needs two samples)")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout!r}")
        hardware(self.devices, check_cuda=False)

    _what = "segmentation config"


def make_segmenter(backbone: str, n_classes: int) -> nn.Module:
    """DeepLabV3+ for one-channel slices, ``n_classes + 1`` outputs (0 = background), random weights."""
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus(encoder_name=backbone, encoder_weights=None, in_channels=1, classes=n_classes + 1)


def _class_lut(classes: Sequence[int]) -> np.ndarray:
    lut = np.zeros(256, np.int64)
    for i, c in enumerate(classes):
        lut[c] = i + 1
    return lut


def load_labelled(volume: Any, labels: Any, classes: Sequence[int], max_voxels: int = DEFAULT_MAX_VOXELS,
                  name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A volume as the network sees it and its class map on the same grid.

    Parameters
    ----------
    volume, labels : path-like or array-like
        ``(Z, Y, X)`` image and integer label volume of the same shape.
    classes : sequence of int
        Label ids to keep (class ``i + 1`` = ``classes[i]``).

    Returns
    -------
    image : np.ndarray
        float32 ``(Z', Y', X')`` working copy, normalised.
    target : np.ndarray
        int64 ``(Z', Y', X')`` class indices in ``[0, len(classes)]``.

    Raises
    ------
    tomoloc.io.VolumeError
        Unreadable files, bad values, a shape mismatch, or labels outside 0..255.
    """
    from tomoloc import io
    from tomoloc.preprocess import BadValuesError, network_input, working_copy

    vname = os.fspath(volume) if isinstance(volume, (str, os.PathLike)) else (name or "in-memory volume")
    lname = os.fspath(labels) if isinstance(labels, (str, os.PathLike)) else f"labels of {vname}"
    vol = io.open_volume(volume) if isinstance(volume, (str, os.PathLike)) else volume
    try:
        wc = working_copy(vol, max_voxels=max_voxels)
    except BadValuesError as exc:
        raise io.VolumeError(f"{vname}: {exc}") from exc
    finally:
        if vol is not volume:
            vol.close()
    if isinstance(labels, (str, os.PathLike)):
        with io.open_volume(labels) as lv:
            lab = lv.read()
    else:
        lab = np.asarray(labels)
    if tuple(lab.shape) != tuple(wc.shape):
        raise io.VolumeError(f"{lname}: shape {list(lab.shape)} differs from the volume's {list(wc.shape)}")
    if lab.dtype.kind not in "biu" or (lab.size and (int(lab.min()) < 0 or int(lab.max()) > 255)):
        raise io.VolumeError(f"{lname}: labels must be integers in 0..255")
    f = wc.factor[0]
    lab = np.asarray(lab[::f, ::f, ::f]).astype(np.int64)
    return network_input(wc.data), _class_lut(classes)[lab]


def _resize_nearest(stack: np.ndarray, size: int) -> np.ndarray:
    """``(N, H, W)`` integer maps resized to ``(N, size, size)`` by nearest neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy().astype(np.int64)


def select_slices(targets: Sequence[np.ndarray], fraction: float, seed: int) -> list[tuple[int, int]]:
    """The labelled slices a run may use: ``(volume, slice)`` pairs, sorted.

    Candidates are the axis-0 slices with any class > 0 in ``targets`` (``(Z, Y, X)``
    class maps); ``max(1, round(fraction * n))`` are drawn without replacement.
    """
    cands = [(v, int(z)) for v, t in enumerate(targets) for z in np.flatnonzero((np.asarray(t) > 0).any(axis=(1, 2)))]
    if not cands:
        raise ValueError("no training slice shows any of the target classes")
    n = max(1, int(round(fraction * len(cands))))
    pick = np.random.default_rng([seed, 7]).choice(len(cands), size=n, replace=False)
    return sorted(cands[i] for i in pick)


class LabelledSliceDataset(_SliceDataset):
    """Training items: a random chosen slice and its class map, randomly turned and flipped.

    Item ``idx`` is drawn with ``np.random.default_rng([seed, epoch, idx])`` from the
    ``slices`` (with replacement). Returns float32 ``(1, S, S)`` and int64 ``(S, S)``.
    """

    def __init__(self, images: Sequence[np.ndarray], targets: Sequence[np.ndarray], slices: Sequence[tuple[int, int]],
                 input_size: int, length: int, seed: int = 0, augment: bool = True):
        self.input_size, self.length, self.seed, self.augment, self.epoch = int(input_size), int(length), int(seed), augment, 0
        self.slices = list(slices)
        if not self.slices:
            raise ValueError("no labelled slice to train on")
        self.x = np.stack([square_slices(images[v], 0, self.input_size, [z])[0] for v, z in self.slices])
        self.y = np.stack([_resize_nearest(np.asarray(targets[v][z])[None], self.input_size)[0] for v, z in self.slices])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, idx = self._key(key)
        rng = np.random.default_rng([self.seed, epoch, idx])
        i = int(rng.integers(len(self.slices)))
        x, y = self.x[i], self.y[i]
        if self.augment:
            t, flip = int(rng.integers(4)), bool(rng.integers(2))
            x, y = (np.rot90(a[:, ::-1] if flip else a, t) for a in (x, y))
        return torch.from_numpy(np.ascontiguousarray(x)[None]), torch.from_numpy(np.ascontiguousarray(y))


class SegmentationModule(L.LightningModule):
    """DeepLabV3+ trained with Dice + cross-entropy (``smp.losses.DiceLoss``, multiclass).

    Logs ``train_loss`` per epoch.
    """

    def __init__(self, config: SegConfig | dict[str, Any]):
        super().__init__()
        import segmentation_models_pytorch as smp

        cfg = config if isinstance(config, SegConfig) else SegConfig.from_dict(config)
        self.config = cfg
        self.net = make_segmenter(cfg.backbone, len(cfg.classes))
        self.dice = smp.losses.DiceLoss(mode="multiclass")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C + 1, S, S)`` for slices ``(B, 1, S, S)``."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x).float()
        loss = self.dice(logits, y) + F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=int(y.shape[0]),
                 sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        from tomoloc.training import _lr_lambda

        c = self.config
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(int(self.trainer.estimated_stepping_batches), "cosine"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def predict_classes(net: nn.Module, image: np.ndarray, input_size: int, batch_size: int = 32) -> np.ndarray:
    """Class map ``(Z, Y, X)`` int64 of a normalised working copy ``(Z, Y, X)``, slice by slice.

    Each axis-0 slice is resized to ``input_size``, its logits resized back to ``(Y, X)``
    (bilinear) and arg-maxed there, so the map has the working copy's resolution.
    """
    net.eval()
    dev = next(net.parameters()).device
    z, h, w = image.shape
    out = np.empty((z, h, w), np.int64)
    for s in range(0, z, batch_size):
        x = torch.from_numpy(square_slices(image, 0, input_size, range(s, min(z, s + batch_size))))[:, None].to(dev)
        logits = F.interpolate(net(x).float(), size=(h, w), mode="bilinear", align_corners=False)
        out[s:s + len(x)] = logits.argmax(dim=1).cpu().numpy()
    return out


def iou_per_class(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """IoU of classes ``1..n_classes`` between two class maps of one shape: ``(n_classes,)``.

    ``|pred == c & target == c| / |pred == c | target == c|``; NaN where both are empty.
    """
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {target.shape}")
    k = n_classes + 1
    conf = np.bincount(target * k + pred, minlength=k * k).reshape(k, k)
    inter = np.diag(conf)[1:].astype(np.float64)
    union = conf.sum(0)[1:] + conf.sum(1)[1:] - np.diag(conf)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _names(volumes: Sequence[Any]) -> list[str | None]:
    return [os.fspath(v) if isinstance(v, (str, os.PathLike)) else None for v in volumes]


def finetune(volumes: Sequence[Any], labels: Sequence[Any], out_dir: str | os.PathLike, config: SegConfig, *,
             test_volumes: Sequence[Any] | None = None, test_labels: Sequence[Any] | None = None,
             label_names: dict[int, str] | None = None, overwrite: bool = False, progress: bool = False,
             callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fine-tune DeepLabV3+ on labelled volumes and score it on held-out ones.

    Parameters
    ----------
    volumes, labels : sequences of path-like or array-like
        ``(Z, Y, X)`` images and their label volumes, pairwise.
    out_dir : path-like
        Run directory (module docstring); must not hold a run unless ``overwrite``.
    config : SegConfig
    test_volumes, test_labels : sequences, optional
        Held-out volumes for the IoU. Without them ``config.holdout`` of ``volumes`` are
        held out (by volume); with ``holdout == 0`` or one volume, the IoU is measured on
        the training volumes and ``metrics["held_out"]`` is False.
    label_names : dict, optional
        Names of the label ids for the metrics (e.g. ``synth.LABELS["fish"]``).

    Returns
    -------
    dict
        ``metrics.json``: ``iou`` (per class name), ``mean_iou``, ``held_out``,
        ``n_train_slices``, ``seconds``.
    """
    import time

    from tomoloc.config import hardware
    from tomoloc.training import split_volumes

    if len(volumes) != len(labels):
        raise ValueError(f"{len(volumes)} volume(s) but {len(labels)} label volume(s)")
    if (test_volumes is None) != (test_labels is None) or (test_volumes is not None
                                                            and len(test_volumes) != len(test_labels)):  # type: ignore[arg-type]
        raise ValueError("test volumes and test labels must be given together, pairwise")
    out = Path(out_dir)
    if (out / "model.safetensors").exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a fine-tuned model (overwrite to replace it)")
    hw = hardware(config.devices)
    state = None
    if config.encoder is not None:
        from tomoloc.pretrain import load_encoder

        state, meta = load_encoder(config.encoder)
        if meta.get("backbone") != config.backbone:
            raise ValueError(f"{config.encoder}: encoder is a {meta.get('backbone')}, the run asks for {config.backbone}")
    t0 = time.perf_counter()
    pairs = [load_labelled(v, lab, config.classes, config.max_voxels, name=f"volume #{i}")
             for i, (v, lab) in enumerate(zip(volumes, labels))]
    if test_volumes is not None:
        train_ids, test_ids, held_out = list(range(len(pairs))), [], True
        tests = [load_labelled(v, lab, config.classes, config.max_voxels, name=f"test volume #{i}")
                 for i, (v, lab) in enumerate(zip(test_volumes, test_labels))]  # type: ignore[arg-type]
    else:
        train_ids, test_ids = split_volumes(len(pairs), config.holdout, config.seed)
        held_out = train_ids != test_ids
        tests = [pairs[i] for i in test_ids]
    images, targets = [pairs[i][0] for i in train_ids], [pairs[i][1] for i in train_ids]
    chosen = select_slices(targets, config.fraction, config.seed)

    L.seed_everything(config.seed, workers=True, verbose=False)
    module = SegmentationModule(config)
    if state is not None:
        from tomoloc.pretrain import load_into

        load_into(module.net.encoder, state, str(config.encoder))
    data = LabelledSliceDataset(images, targets, chosen, config.input_size,
                                # As in tomoloc train: steps_per_epoch steps on every rank.
                                length=config.steps_per_epoch * config.batch_size * hw["devices"] * hw["num_nodes"],
                                seed=config.seed,
                                augment=config.augment)
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from tomoloc.training import _EpochKeySampler

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        logger = CSVLogger(save_dir=out, name="logs", version="")
        trainer = L.Trainer(max_epochs=config.epochs, precision=config.precision, logger=logger,  # type: ignore[arg-type]
                            callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=progress,
                            enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
                            default_root_dir=out, **hw)
        sampler = _EpochKeySampler(len(data), lambda: int(trainer.current_epoch))
        loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, drop_last=True)
        trainer.fit(module, train_dataloaders=loader)
    net = module.net.eval()
    k = len(config.classes)
    pred = np.concatenate([predict_classes(net, img, config.input_size).ravel() for img, _ in tests])
    true = np.concatenate([t.ravel() for _, t in tests])
    ious = iou_per_class(pred, true, k)
    names = [(label_names or {}).get(c, str(c)) for c in config.classes]
    metrics = {"iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, ious)},
               "mean_iou": None if np.isnan(ious).all() else float(np.nanmean(ious)), "held_out": bool(held_out),
               "n_train_slices": len(chosen), "n_candidate_slices": int(sum((t > 0).any(axis=(1, 2)).sum() for t in targets)),
               "seconds": round(time.perf_counter() - t0, 2)}
    from safetensors.torch import save_file

    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k_: v.detach().cpu().contiguous() for k_, v in net.state_dict().items()}, str(tmp))
    doc = {"format": SEG_FORMAT, "config": config.to_dict(), "label_names": {str(c): n for c, n in zip(config.classes, names)},
           "volumes": _names(volumes), "labels": _names(labels), "train_volumes": train_ids, "test_volumes": test_ids,
           "external_test": _names(test_volumes) if test_volumes is not None else None,
           "train_slices": [list(s) for s in chosen]}
    write_text_atomic(out / "config.json", json.dumps(doc, indent=2) + "\n")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_segmenter(run_dir: str | os.PathLike) -> tuple[nn.Module, SegConfig]:
    """The fine-tuned network of ``run_dir`` (CPU, eval mode) and its config."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    cpath, mpath = run / "config.json", run / "model.safetensors"
    for p in (cpath, mpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no fine-tuned model (made by `tomoloc finetune`)")
    try:
        doc = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cpath}: cannot read: {exc}") from exc
    if doc.get("format") != SEG_FORMAT:
        raise ValueError(f"{cpath}: not a {SEG_FORMAT} run")
    cfg = SegConfig.from_dict(doc["config"])
    net = make_segmenter(cfg.backbone, len(cfg.classes))
    net.load_state_dict(load_file(str(mpath)))
    return net.eval(), cfg


def _predict_small(net: nn.Module, config: SegConfig, volume: Any) -> tuple[np.ndarray, int, tuple[int, int, int]]:
    """Label ids (uint8) on the working-copy grid, the block factor and the original shape."""
    from tomoloc import io
    from tomoloc.preprocess import BadValuesError, network_input, working_copy

    vol = io.open_volume(volume) if isinstance(volume, (str, os.PathLike)) else volume
    try:
        wc = working_copy(vol, max_voxels=config.max_voxels)
    except BadValuesError as exc:
        raise io.VolumeError(f"{os.fspath(volume) if isinstance(volume, (str, os.PathLike)) else 'volume'}: {exc}") from exc
    finally:
        if vol is not volume:
            vol.close()
    cls = predict_classes(net, network_input(wc.data), config.input_size)
    return np.array([0, *config.classes], np.uint8)[cls], wc.factor[0], wc.shape


def _full_size(ids: np.ndarray, f: int, shape: tuple[int, int, int]) -> np.ndarray:
    if f > 1:
        ids = ids.repeat(f, 0).repeat(f, 1).repeat(f, 2)
    z, y, x = shape
    return np.ascontiguousarray(ids[:z, :y, :x])


def predict_labels(net: nn.Module, config: SegConfig, volume: Any) -> np.ndarray:
    """Label volume (uint8 label ids, 0 elsewhere) of ``volume``'s full shape ``(Z, Y, X)``.

    The class map on the working copy (:func:`predict_classes`) is repeated ``f`` times
    along every axis (nearest) and cut to the original shape.
    """
    return _full_size(*_predict_small(net, config, volume))


def segment_targets(volumes: Sequence[str], out_dir: str | os.PathLike, fmt: str | None = None,
                    overwrite: bool = False) -> list[tuple[str, Path, str]]:
    """``(volume, output path, format)`` per volume: ``out_dir/<stem>_labels<suffix>``.

    Raises FileExistsError for an existing output (unless ``overwrite``) or an output that
    would replace its own input; opens every volume, so unreadable ones fail here.
    """
    from tomoloc import io
    from tomoloc.crop import output_path

    plan = []
    for v in volumes:
        with io.open_volume(v) as vol:
            form = fmt or vol.format
        suffix = io.format_suffix(form)
        base = output_path(v, out_dir, form)
        target = base.with_name(base.name[: len(base.name) - len(suffix)] + "_labels" + suffix)
        src = Path(io.split_dataset_path(v)[0])
        if target.exists() and src.exists() and os.path.samefile(src, target):
            raise FileExistsError(f"{target}: is an input volume; choose another --out")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target}: already exists (use --overwrite to replace it)")
        plan.append((v, target, form))
    return plan


def segment_files(run_dir: str | os.PathLike, volumes: Sequence[str], out_dir: str | os.PathLike,
                  fmt: str | None = None, overwrite: bool = False,
                  on_volume: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``<stem>_labels<suffix>`` into ``out_dir`` for each volume; return the paths.

    Every target is checked (:func:`segment_targets`) and every volume segmented (on its
    small working-copy grid) before anything is written, so a bad volume leaves no
    partial output; each file is written atomically by :func:`tomoloc.io.save_volume`
    as uint8 label ids of the input's shape.
    """
    from tomoloc import io

    net, cfg = load_segmenter(run_dir)
    plan = segment_targets(volumes, out_dir, fmt, overwrite)
    small = []
    for v, _, _ in plan:
        small.append(_predict_small(net, cfg, v))
        if on_volume is not None:
            on_volume(v)
    return [io.save_volume(target, _full_size(*pred), format=form, overwrite=overwrite)
            for (_, target, form), pred in zip(plan, small)]
