"""Configuration of a training run (:class:`TrainConfig`) and the hardware it asks for.

Kept apart from :mod:`tomoloc.training` so that code which only reads a run (the localizers,
:func:`tomoloc.checkpoints.load_model`) never imports Lightning: that saves about 250 MB of
resident memory and seconds of start-up in every worker process.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tomoloc.models import ENCODERS
from tomoloc.preprocess import HOLDER_MODES
from tomoloc.sampling import DEFAULT_MAX_VOXELS, SORTING_SAMPLERS, n_angle_classes

__all__ = ["CONTRASTIVE_TASKS", "DEFAULT_AXES", "DEFAULT_HOLDER", "JsonConfig", "PRECISIONS", "RUN_FORMAT", "TASKS",
           "TrainConfig", "hardware"]


class JsonConfig:
    """``to_dict``/``from_dict`` for a dataclass of plain JSON values; unknown keys are errors."""

    #: Name used in the error for unknown keys.
    _what = "config"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls._what} keys: {', '.join(unknown)}")
        return cls(**d)


RUN_FORMAT = "tomoloc-train/1"
TASKS = ("rotation", "sorting", "simclr", "mocov3")
DEFAULT_AXES = {"rotation": (0, 1, 2), "sorting": (0, 1, 2), "simclr": (0, 1, 2), "mocov3": (0, 1, 2)}
#: What the networks see of the holder unless told (:data:`tomoloc.preprocess.HOLDER_MODES`).
DEFAULT_HOLDER = {"rotation": "interior", "sorting": "none", "simclr": "none", "mocov3": "none"}
#: Saved configs older than a field mean what the code did before the field existed.
SAVED_DEFAULTS = {"holder": "none"}
#: Tasks whose items are two augmented views of one slice.
CONTRASTIVE_TASKS = ("simclr", "mocov3")

# Fields that fix the network's shape or the meaning of its output: a resumed run must keep them.
_ARCH_FIELDS = ("task", "backbone", "input_size", "step", "dropout", "holder")


@dataclass
class TrainConfig(JsonConfig):
    """Everything a training run depends on; JSON-serialisable (:meth:`to_dict`).

    Attributes
    ----------
    task : str
        ``"rotation"``, ``"sorting"``, ``"simclr"`` or ``"mocov3"``.
    backbone : str
        ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    input_size : int
        Side ``S`` of the square network input.
    batch_size : int
        Per step and device: pairs (rotation), slices of the one volume (sorting), or
        slices with two views each (simclr, mocov3: ``2 * batch_size`` images per step).
    epochs : int
        Number of epochs; an epoch is ``steps_per_epoch`` optimiser steps on each device.
    steps_per_epoch : int
        Pairs are drawn afresh every step, so an "epoch" is only a logging/validation period.
    val_samples : int
        Size of the fixed validation set: pairs (rotation), or slices, in
        ``val_samples // batch_size`` batches (sorting).
    lr : float
        Peak AdamW learning rate.
    weight_decay : float
        AdamW weight decay.
    schedule : str
        ``"cosine"`` (default: linear warm-up over the first 5% of steps, then cosine decay
        to 0 at the last step of ``epochs``) or ``"constant"``. The schedule is computed from
        the step counter, so a resumed run with the same config follows it exactly; a run
        resumed with more ``epochs`` continues on the stretched schedule.
    seed : int
        Seeds weights, dropout, the volume split and every sample.
    devices : str or int
        ``"auto"`` or ``"cpu"``: one CPU process; ``"gpu"``: one GPU; an int ``n``: ``n``
        GPUs (DDP when ``n > 1``).
    num_nodes : int
        Machines to train on, each with ``devices`` GPUs (Lightning DDP; launch one process
        per node, e.g. with ``srun``). Every rank loads the volumes and precomputes the
        same samples; training items are functions of ``(seed, epoch, index)`` and Lightning
        hands each rank a disjoint, fixed share of the indices, so the samples seen per epoch
        are the same for any number of ranks. What DDP does not keep is the order of
        floating-point sums across ranks (and batch-norm statistics are per rank), so weights
        agree with a one-GPU run in distribution, not bit for bit.
    precision : str
        Lightning precision: ``"auto"`` (``"bf16-mixed"`` on GPU, ``"32-true"`` on CPU),
        ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"``.
    num_workers : int
        DataLoader worker processes (0: sampling in the training process, best on small CPUs).
        With workers they stay alive across epochs, and batches go to pinned memory on GPU.
    axes : tuple of int, optional
        Slicing axes to sample along. Default ``(0, 1, 2)`` for both tasks. Rotation: trained
        on axis 0 alone the task did not start to learn on tube phantoms. Sorting (each batch
        is sorted along one axis): the paper sorts along one axis, but a model sorted along
        axis 0 only gives superpixel maps that are coarse in Y and X and pulled to the
        meniscus along Z; with all three axes the box error on our mixed benchmark fell from
        9.8 to 6.6 voxels and the worst recall rose from 0.002 to 0.72 (BENCHMARKS.md).
    k : int
        Twin slice within ``k`` slices of the reference.
    step : int
        Rotation step in degrees (``360 // step`` classes; 90 = exact rotations).
    val_fraction : float
        Fraction of the volumes held out for validation (split by volume, at least one
        when there are two or more). With one volume, or 0, validation pairs come from the
        training volumes (other draws), which then measures fit only.
    max_voxels : int
        Voxel budget of each volume's working copy.
    dropout : float
        Dropout on the embeddings (Monte-Carlo dropout at inference needs it > 0).
    margin : float
        Sorting-loss margin: the score gap asked of every ordered pair. The scores come from
        a linear head without a fixed scale, so only its ratio to the weight decay matters;
        1.0 (the default of ``torch.nn.MarginRankingLoss`` usage) was kept.
    sampling : str
        Sorting: ``"uniform"`` slice indices, or ``"gengauss"`` (peaked at the centre,
        :func:`tomoloc.sampling.generalized_gaussian_weights` with ``gg_scale``, ``gg_beta``).
    gg_scale, gg_beta : float
        Generalized-Gaussian scale (fraction of the axis) and shape.
    augment : bool
        Sorting: random 90-degree rotations and flips of each slice.
    holder : str, optional
        Default ``"interior"`` for rotation, ``"none"`` for the other tasks
        (:data:`DEFAULT_HOLDER`). ``"none"``: the network sees the normalised intensities. ``"zmedian"``:
        subtract the per-pixel median over axis 0 first
        (:func:`tomoloc.preprocess.suppress_holder`), meant to take the tube's orientation
        cue away; on synthetic tube batches it made boxes tighter but cut samples (mean
        recall 0.47 against 1.0), so it is not the default (see BENCHMARKS.md).
        ``"interior"``: cut the view to the holder's interior, the wall and what lies
        outside it replaced by noise at the medium's level
        (:func:`tomoloc.holder.interior_view`); localizers map their boxes back. With it the
        rotation boxes on our tube batches went from MAE 9.7 and 10.6 voxels to 5.6 and 5.8
        (BENCHMARKS.md, "Rotation localization").
    max_shift : float
        Random translation of each training slice, as a fraction of the input side
        (:class:`tomoloc.sampling.RotationPairDataset`); 0 disables it.
    """

    task: str = "rotation"
    backbone: str = "resnet18"
    input_size: int = 64
    batch_size: int = 32
    epochs: int = 12
    steps_per_epoch: int = 100
    val_samples: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 0
    devices: str | int = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    num_workers: int = 0
    axes: tuple[int, ...] | None = None
    k: int = 2
    step: int = 90
    val_fraction: float = 0.2
    max_voxels: int = DEFAULT_MAX_VOXELS
    dropout: float = 0.1
    margin: float = 1.0
    holder: str | None = None
    max_shift: float = 0.0
    sampling: str = "uniform"
    gg_scale: float = 0.3
    gg_beta: float = 4.0
    augment: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.axes is None:
            self.axes = DEFAULT_AXES[self.task]
        if self.holder is None:
            self.holder = DEFAULT_HOLDER[self.task]
        self.axes = tuple(int(a) for a in self.axes)
        if self.sampling not in SORTING_SAMPLERS:
            raise ValueError(f"sampling must be one of {', '.join(SORTING_SAMPLERS)}, got {self.sampling!r}")
        if self.gg_scale <= 0 or self.gg_beta <= 0 or self.margin <= 0:
            raise ValueError("gg_scale, gg_beta and margin must be > 0")
        if self.backbone not in ENCODERS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(ENCODERS)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        n_angle_classes(self.step)
        for name in ("input_size", "batch_size", "epochs", "steps_per_epoch", "val_samples", "max_voxels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch norm needs two samples)")
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {self.axes!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.k < 0 or self.num_workers < 0:
            raise ValueError("k and num_workers must be >= 0")
        if self.holder not in HOLDER_MODES:
            raise ValueError(f"holder must be one of {', '.join(HOLDER_MODES)}, got {self.holder!r}")
        if int(self.num_nodes) < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        hardware(self.devices, check_cuda=False, num_nodes=self.num_nodes)

    def on_gpu(self) -> bool:
        """Whether ``devices`` asks for GPUs (not whether there are any)."""
        return hardware(self.devices, check_cuda=False, num_nodes=self.num_nodes)["accelerator"] == "gpu"

    def resolved_precision(self) -> str:
        """The Lightning precision string: ``"auto"`` becomes bf16 mixed on GPU, 32-bit on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16-mixed" if self.on_gpu() else "32-true"

    _what = "training config"


def auto_workers(devices: str | int, num_nodes: int = 1) -> int:
    """DataLoader worker processes per training process when the user gives none.

    0 on CPU: workers would compete with torch's own threads for the cores. On GPU, the
    CPUs this process may run on, less two (the training loop and the pin-memory thread),
    shared among the GPU processes of this node, at most 16: on a 16-CPU H100 machine 14
    workers fed resnet18 at input 128 at 0.70 of a bare GPU loop's rate, 8 at 0.50
    (BENCHMARKS.md, "GPU checks for beamline scale").
    """
    hw = hardware(devices, check_cuda=False, num_nodes=num_nodes)
    if hw["accelerator"] != "gpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, (cpus - 2) // hw["devices"]))


#: Accepted ``TrainConfig.precision`` values.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def hardware(devices: str | int, check_cuda: bool = True, num_nodes: int = 1) -> dict[str, Any]:
    """Trainer keyword arguments ``accelerator``, ``devices``, ``num_nodes`` and ``strategy``."""
    if isinstance(devices, bool):
        raise ValueError(f"devices must be 'auto', 'cpu', 'gpu' or a GPU count, got {devices!r}")
    if devices in ("auto", "cpu"):
        if num_nodes > 1:
            raise ValueError("training on several nodes needs GPUs: give devices='gpu' or a GPU count")
        return {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}
    if devices == "gpu":
        n = 1
    elif isinstance(devices, (int, np.integer)) and devices >= 1:
        n = int(devices)
    else:
        raise ValueError(f"devices must be 'auto', 'cpu', 'gpu' or a GPU count, got {devices!r}")
    if check_cuda and torch.cuda.device_count() < n:
        raise ValueError(f"devices={devices!r} asks for {n} GPU(s), but {torch.cuda.device_count()} are available")
    return {"accelerator": "gpu", "devices": n, "num_nodes": int(num_nodes),
            "strategy": "ddp" if n * num_nodes > 1 else "auto"}
