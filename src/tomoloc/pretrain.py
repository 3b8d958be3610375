"""Self-supervised pre-training of a segmentation encoder, and its export.

``pretrain`` trains one of the methods below through :func:`tomoloc.training.train` and
then exports the encoder. A pre-training run directory is a training run directory
(``config.json``, ``checkpoints/``, ``logs/metrics.csv``) plus::

    encoder.safetensors   the ResNet's state dict, torchvision key names, no ``fc.*``;
                          ``conv1.weight`` is ``(64, 1, 7, 7)``: one input channel
    encoder.json          {"format": "tomoloc-encoder/1", "backbone", "method",
                           "in_channels": 1, "input_size", "checkpoint"}

The state dict loads into ``torchvision.models.resnet18(...)`` with a one-channel
``conv1`` (:func:`tomoloc.models.make_encoder`) and into the encoder of a
``segmentation_models_pytorch`` model built with ``encoder_weights=None, in_channels=1``
(its ResNet encoders are torchvision ResNets without ``fc``).

Methods: ``sorting`` (the paper's sorting loss, :class:`tomoloc.training.SortingModule`:
one view per slice, one network), ``simclr`` and ``mocov3`` (two augmented views per
slice; MoCo v3 adds a momentum copy of the encoder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from tomoloc._fsutil import atomic_path, write_text_atomic

__all__ = ["ENCODER_FILE", "ENCODER_FORMAT", "METHODS", "encoder_state_dict", "export_encoder", "load_encoder", "load_into",
           "pretrain"]

#: Pre-training methods (tasks of :class:`tomoloc.config.TrainConfig`).
METHODS = ("sorting", "simclr", "mocov3")
ENCODER_FILE = "encoder.safetensors"
ENCODER_META = "encoder.json"
ENCODER_FORMAT = "tomoloc-encoder/1"


def encoder_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's tensors by torchvision name, without ``fc.*``, contiguous on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items() if not k.startswith("fc.")}


def export_encoder(run_dir: str | os.PathLike, which: str = "last") -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` for a training run; return the former.

    Parameters
    ----------
    run_dir : path-like
        A run directory of :func:`tomoloc.training.train` (any task; every task network
        has an ``encoder``).
    which : str
        Checkpoint to export: ``"last"`` (the end of pre-training, the default: the
        contrastive validation loss is not a measure of downstream use) or ``"best"``.
    """
    from safetensors.torch import save_file

    from tomoloc.checkpoints import load_model

    run = Path(run_dir)
    net, cfg = load_model(run, which)
    state = encoder_state_dict(net.encoder)  # type: ignore[union-attr]
    path = run / ENCODER_FILE
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": ENCODER_FORMAT, "backbone": cfg.backbone})
    meta = {"format": ENCODER_FORMAT, "backbone": cfg.backbone, "method": cfg.task, "in_channels": 1,
            "input_size": cfg.input_size, "checkpoint": which}
    write_text_atomic(run / ENCODER_META, json.dumps(meta, indent=2) + "\n")
    return path


def load_encoder(run_dir: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The exported encoder state dict of ``run_dir`` and its ``encoder.json``.

    Raises
    ------
    FileNotFoundError
        No export in ``run_dir`` (message names the file).
    ValueError
        The files are not a tomoloc encoder export.
    """
    from safetensors.torch import load_file

    run = Path(run_dir)
    path, meta_path = run / ENCODER_FILE, run / ENCODER_META
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no encoder export (made by `tomoloc pretrain`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read the encoder export: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{meta_path}: not a {ENCODER_FORMAT} export")
    return state, meta


def pretrain(volumes: Sequence[Any], out_dir: str | os.PathLike, config: Any, *, progress: bool = False,
             overwrite: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Pre-train ``config.task`` (one of :data:`METHODS`) on ``volumes`` and export the encoder.

    Parameters
    ----------
    volumes : sequence of path-like or array-like
        Unlabelled ``(Z, Y, X)`` volumes.
    out_dir : path-like
        Run directory (layout in the module docstring).
    config : tomoloc.config.TrainConfig
        ``task`` is the method; everything else as for :func:`tomoloc.training.train`.
    progress, overwrite, callbacks
        Passed to :func:`tomoloc.training.train`.

    Returns
    -------
    Path
        The ``encoder.safetensors`` written.
    """
    from tomoloc.training import train

    if config.task not in METHODS:
        raise ValueError(f"pre-training method must be one of {', '.join(METHODS)}, got {config.task!r}")
    run = train(volumes, out_dir, config, progress=progress, overwrite=overwrite, callbacks=callbacks)
    return export_encoder(run, "last")


def _check_state(state: dict[str, Tensor], target: nn.Module, name: str) -> None:
    """Raise ValueError naming the first key or shape that ``target`` does not share."""
    want = {k: v.shape for k, v in target.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"{name}: encoder keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in want.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{name}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(shape)}")


def load_into(encoder: nn.Module, state: dict[str, Tensor], name: str = "encoder") -> None:
    """Copy an exported ``state`` into ``encoder`` (an smp or torchvision ResNet), strictly.

    Raises ValueError (key names or shapes differ, e.g. another backbone or a 3-channel
    ``conv1``) before anything is copied.
    """
    _check_state(state, encoder, name)
    with torch.no_grad():
        encoder.load_state_dict(dict(state), strict=True)
