"""Reading a training run's trained network back, without Lightning."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tomoloc.config import SAVED_DEFAULTS, TrainConfig
from tomoloc.models import MoCoV3Net, RotationNet, SimCLRNet, SortingNet
from tomoloc.sampling import n_angle_classes

__all__ = ["load_model", "net_for"]


def net_for(config: TrainConfig) -> nn.Module:
    if config.task == "rotation":
        return RotationNet(config.backbone, n_angle_classes(config.step), dropout=config.dropout)
    if config.task == "simclr":
        return SimCLRNet(config.backbone)
    if config.task == "mocov3":
        return MoCoV3Net(config.backbone)
    return SortingNet(config.backbone, dropout=config.dropout)


def load_model(run_dir: str | os.PathLike, which: str = "best",
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained network of a run, in eval mode, and the config that trained it.

    Parameters
    ----------
    run_dir : path-like
        A run directory written by :func:`train`.
    which : str
        ``"best"`` (lowest validation loss), ``"last"``, or a path to a ``.ckpt`` file.
    map_location : str or torch.device
        Where to put the weights (CPU by default).

    Returns
    -------
    net : nn.Module
        :class:`~tomoloc.models.RotationNet` (or ``SortingNet``, ``SimCLRNet``,
        ``MoCoV3Net``), plain PyTorch.
    config : TrainConfig
    """
    path = Path(run_dir) / "checkpoints" / f"{which}.ckpt" if which in ("best", "last") else Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    # Memory-mapped: the optimizer state (twice the weights for AdamW) is never read in.
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    config = TrainConfig.from_dict({**SAVED_DEFAULTS, **ckpt["hyper_parameters"]["config"]})
    net = net_for(config)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    del ckpt, state
    return net.to(map_location).eval(), config
