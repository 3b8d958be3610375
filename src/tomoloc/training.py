"""Self-supervised training: configuration, data module, Lightning modules, ``train``.

A run directory ``out_dir`` holds::

    config.json              {"format": "tomoloc-train/1", "config": {...}, "volumes": [...],
                              "train_volumes": [...], "val_volumes": [...]}
    logs/metrics.csv         one row per logged epoch metric (Lightning CSVLogger)
    checkpoints/best.ckpt    lowest ``val_loss`` so far
    checkpoints/last.ckpt    end of the latest epoch; ``train(..., resume=True)`` continues it

Pretext tasks: ``rotation`` (:class:`RotationModule`, pairs of slices), ``sorting``
(:class:`SortingModule`, batches of slices of one volume along one axis), and the
contrastive baselines ``simclr`` (:class:`SimCLRModule`) and ``mocov3``
(:class:`MoCoV3Module`), two augmented views of each slice.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from tomoloc._fsutil import write_text_atomic
from tomoloc.losses import mean_displacement, mocov3_loss, rotation_loss, sorting_loss
from tomoloc.models import ENCODERS, MoCoV3Net, RotationNet, SimCLRNet, SortingNet
from tomoloc.preprocess import HOLDER_MODES
from tomoloc.sampling import (
    DEFAULT_MAX_VOXELS,
    SORTING_SAMPLERS,
    RotationPairDataset,
    SortingBatchDataset,
    TwoViewSliceDataset,
    n_angle_classes,
    prepare_volume,
)

__all__ = [
    "RUN_FORMAT",
    "MoCoV3Module",
    "RotationModule",
    "SimCLRModule",
    "SortingModule",
    "TrainConfig",
    "VolumeDataModule",
    "load_model",
    "split_volumes",
    "train",
]

RUN_FORMAT = "tomoloc-train/1"
TASKS = ("rotation", "sorting", "simclr", "mocov3")
DEFAULT_AXES = {"rotation": (0, 1, 2), "sorting": (0, 1, 2), "simclr": (0, 1, 2), "mocov3": (0, 1, 2)}
#: Tasks whose items are two augmented views of one slice.
CONTRASTIVE_TASKS = ("simclr", "mocov3")

# Fields that fix the network's shape or the meaning of its output: a resumed run must keep them.
_ARCH_FIELDS = ("task", "backbone", "input_size", "step", "dropout", "holder")


@dataclass
class TrainConfig:
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
    holder : str
        ``"none"`` (default): the network sees the normalised intensities. ``"zmedian"``:
        subtract the per-pixel median over axis 0 first
        (:func:`tomoloc.preprocess.suppress_holder`), meant to take the tube's orientation
        cue away; on synthetic tube batches it made boxes tighter but cut samples (mean
        recall 0.47 against 1.0), so it is not the default (see BENCHMARKS.md).
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
    holder: str = "none"
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
        _hardware(self.devices, check_cuda=False, num_nodes=self.num_nodes)

    def resolved_precision(self) -> str:
        """The Lightning precision string: ``"auto"`` becomes bf16 mixed on GPU, 32-bit on CPU."""
        if self.precision != "auto":
            return self.precision
        gpu = _hardware(self.devices, check_cuda=False, num_nodes=self.num_nodes)["accelerator"] == "gpu"
        return "bf16-mixed" if gpu else "32-true"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (``axes`` as a list)."""
        d = dataclasses.asdict(self)
        d["axes"] = list(self.axes or ())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**d)


#: Accepted ``TrainConfig.precision`` values.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def _hardware(devices: str | int, check_cuda: bool = True, num_nodes: int = 1) -> dict[str, Any]:
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


def split_volumes(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of volume indices ``range(n)`` into (train, validation), by volume.

    At least one validation volume when ``n >= 2`` and ``val_fraction > 0``, and at least
    one training volume. With ``n == 1`` or ``val_fraction == 0`` validation reuses the
    training volumes.
    """
    if n < 1:
        raise ValueError("training needs at least one volume")
    if n == 1 or val_fraction <= 0:
        return list(range(n)), list(range(n))
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


class _EpochKeySampler(Sampler):
    """Yields ``(epoch, i)`` keys so every item is a function of the epoch, whatever process loads it.

    The epoch is read when iteration starts, from ``current_epoch()`` (the trainer's
    counter, already restored when resuming) or else from :meth:`set_epoch`. Lightning
    creates and prefetches from the train iterator before its ``on_train_epoch_start``
    hook on the first and on a resumed epoch, so state set in that hook would come late.
    """

    def __init__(self, length: int, current_epoch: Callable[[], int | None] | None = None):
        self.length = length
        self.epoch = 0
        self._current_epoch = current_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self._current_epoch() if self._current_epoch is not None else None
        epoch = self.epoch if epoch is None else epoch
        return iter([(epoch, i) for i in range(self.length)])


class VolumeDataModule(L.LightningDataModule):
    """Loads each volume once, splits by volume, and serves the task's pair datasets.

    Parameters
    ----------
    volumes : sequence of path-like or array-like
        Volume files (read with :func:`tomoloc.io.open_volume`) or 3D ``(Z, Y, X)`` arrays.
    config : TrainConfig

    Notes
    -----
    Each volume becomes a float32 working copy of at most ``config.max_voxels`` voxels,
    normalised to its 1st/99th percentiles (:func:`tomoloc.sampling.prepare_volume`). The
    validation set is the same ``config.val_samples`` pairs at every epoch.
    """

    def __init__(self, volumes: Sequence[Any], config: TrainConfig):
        super().__init__()
        self.sources = list(volumes)
        self.config = config
        self.train_ids, self.val_ids = split_volumes(len(self.sources), config.val_fraction, config.seed)
        self.arrays: list[np.ndarray] | None = None
        self.train_dataset: RotationPairDataset | SortingBatchDataset | None = None
        self.val_dataset: RotationPairDataset | SortingBatchDataset | None = None

    def volume_names(self) -> list[str | None]:
        """The path of each volume as given, ``None`` for in-memory arrays."""
        return [os.fspath(v) if isinstance(v, (str, os.PathLike)) else None for v in self.sources]

    def load(self) -> list[np.ndarray]:
        """Working copies of all volumes (read on first call only)."""
        if self.arrays is None:
            self.arrays = [prepare_volume(v, self.config.max_voxels, name=f"volume #{i}", holder=self.config.holder)
                           for i, v in enumerate(self.sources)]
        return self.arrays

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _current_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        arrays = self.load()
        c = self.config
        train_arrays, val_arrays = [arrays[i] for i in self.train_ids], [arrays[i] for i in self.val_ids]
        if c.task == "sorting":
            common_s = dict(axes=c.axes, n_slices=c.batch_size, input_size=c.input_size, sampling=c.sampling,
                            gg_scale=c.gg_scale, gg_beta=c.gg_beta)
            # One item is one batch: steps_per_epoch items per device and epoch.
            self.train_dataset = SortingBatchDataset(train_arrays, length=c.steps_per_epoch * self._world_size(),
                                                     seed=c.seed, augment=c.augment, **common_s).precompute()
            # Validation batches are unaugmented: the control metric measures order only.
            self.val_dataset = SortingBatchDataset(val_arrays, length=max(1, c.val_samples // c.batch_size),
                                                   seed=c.seed + 1, augment=False, **common_s).precompute()
            return
        if c.task in CONTRASTIVE_TASKS:
            from tomoloc.transforms import MOCOV3_VIEWS, SIMCLR_VIEWS

            recipes = SIMCLR_VIEWS if c.task == "simclr" else MOCOV3_VIEWS
            common_v = dict(recipes=recipes, axes=c.axes, input_size=c.input_size)
            self.train_dataset = TwoViewSliceDataset(train_arrays, length=c.steps_per_epoch * c.batch_size
                                                     * self._world_size(), seed=c.seed, **common_v).precompute()
            self.val_dataset = TwoViewSliceDataset(val_arrays, length=c.val_samples, seed=c.seed + 1,
                                                   **common_v).precompute()
            return
        common = dict(axes=c.axes, k=c.k, step=c.step, input_size=c.input_size, max_shift=c.max_shift)
        # Every device runs steps_per_epoch steps of batch_size pairs per epoch.
        length = c.steps_per_epoch * c.batch_size * self._world_size()
        self.train_dataset = RotationPairDataset(train_arrays, length=length,
                                                 seed=c.seed, **common).precompute()
        # A different seed: with a single volume the validation pairs still differ from training ones.
        self.val_dataset = RotationPairDataset(val_arrays, length=c.val_samples,
                                               seed=c.seed + 1, **common).precompute()

    def _loader(self, dataset: Any, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        nw = self.config.num_workers
        # A sorting item is already a batch (slices of one volume): no collation.
        batched = self.config.task == "sorting"
        return DataLoader(dataset, batch_size=None if batched else self.config.batch_size, sampler=sampler,
                          shuffle=False, drop_last=False if batched else drop_last, num_workers=nw, persistent_workers=nw > 0,
                          pin_memory=_hardware(self.config.devices, check_cuda=False)["accelerator"] == "gpu")

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        sampler = _EpochKeySampler(len(self.train_dataset), self._current_epoch)
        # drop_last: a batch of one pair would break the head's batch norm.
        return self._loader(self.train_dataset, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup() first"
        return self._loader(self.val_dataset, None, drop_last=False)


def _lr_lambda(total_steps: int, schedule: str) -> Callable[[int], float]:
    warmup = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + float(np.cos(np.pi * t)))

    return factor


class _TaskModule(L.LightningModule):
    """Shared by the pretext tasks: config, network, optimiser and logging.

    Subclasses define :meth:`_step`, which returns the loss, the metrics to log and the
    batch size; the network comes from :func:`_net_for`.
    """

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__()
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.config = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.net = _net_for(cfg)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        raise NotImplementedError

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        loss, metrics, n = self._step(batch)
        for name, value in {"loss": loss, **metrics}.items():
            self.log(f"{stage}_{name}", value, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                     batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def configure_optimizers(self) -> Any:
        c = self.config
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, c.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RotationModule(_TaskModule):
    """:class:`tomoloc.models.RotationNet` trained with :func:`tomoloc.losses.rotation_loss`.

    Logs per epoch ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (accuracy of
    the arg-max class; chance is ``step / 360``).
    """

    def forward(self, ref: Tensor, twin: Tensor) -> Tensor:
        """Logits ``(B, n_classes)`` for pairs ``(B, 1, S, S)``."""
        return self.net(ref, twin)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        ref, twin, label, _ = batch
        logits = self.net(ref, twin)
        acc = (logits.argmax(dim=1) == label).float().mean()
        return rotation_loss(logits, label), {"acc": acc}, int(label.shape[0])


class SortingModule(_TaskModule):
    """:class:`tomoloc.models.SortingNet` trained with :func:`tomoloc.losses.sorting_loss`.

    Logs per epoch ``train_loss``, ``val_loss`` and the control metric ``train_md``,
    ``val_md``: the mean displacement between predicted and true order of a batch's slices
    (:func:`tomoloc.losses.mean_displacement`; random order gives ``(n**2 - 1) / (3 n)``
    for ``n`` slices, about ``n / 3``).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N,)`` for slices ``(N, 1, S, S)``."""
        return self.net(x)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        x, positions, _ = batch
        scores = self.net(x)
        loss = sorting_loss(scores.float(), positions, self.config.margin)
        return loss, {"md": mean_displacement(scores, positions)}, int(positions.shape[0])


def _pair_accuracy(z0: Tensor, z1: Tensor) -> Tensor:
    """Share of first views whose most cosine-similar second view is their own: ``(B, D)`` each."""
    sim = F.normalize(z0.detach().float(), dim=1) @ F.normalize(z1.detach().float(), dim=1).T
    return (sim.argmax(dim=1) == torch.arange(z0.shape[0], device=z0.device)).float().mean()


class SimCLRModule(_TaskModule):
    """:class:`tomoloc.models.SimCLRNet` trained with lightly's ``NTXentLoss``.

    Temperature 0.5 (lightly's default and its SimCLR examples). Both views go through
    the network in one batch, so batch norm sees ``2 B`` images, as SimCLR's global batch
    norm. Logs ``train_loss``, ``val_loss`` and ``train_acc``, ``val_acc``: the share of
    first views whose nearest second view (cosine) is their own (chance ``1 / B``).
    """

    TEMPERATURE = 0.5

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__(config)
        from lightly.loss import NTXentLoss

        self.criterion = NTXentLoss(temperature=self.TEMPERATURE)

    def forward(self, x: Tensor) -> Tensor:
        """Projections ``(B, 128)`` for slices ``(B, 1, S, S)``."""
        return self.net(x)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        a, b, _ = batch
        n = a.shape[0]
        z = self.net(torch.cat([a, b], dim=0)).float()
        return self.criterion(z[:n], z[n:]), {"acc": _pair_accuracy(z[:n], z[n:])}, int(n)


class MoCoV3Module(_TaskModule):
    """:class:`tomoloc.models.MoCoV3Net` trained with :func:`tomoloc.losses.mocov3_loss`.

    The MoCo v3 ResNet recipe: temperature 1.0, key momentum rising from 0.99 to 1 on a
    cosine schedule over the run (lightly's ``cosine_schedule``), updated before each
    training step. Logs ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc`` (query of
    view 1 against keys of view 2, as :class:`SimCLRModule`).
    """

    TEMPERATURE = 1.0
    MOMENTUM = (0.99, 1.0)

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__(config)
        from lightly.loss import NTXentLoss

        self.criterion = NTXentLoss(temperature=self.TEMPERATURE)

    def forward(self, x: Tensor) -> Tensor:
        """Query predictions ``(B, 256)`` for slices ``(B, 1, S, S)``."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        from lightly.utils.scheduler import cosine_schedule

        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.net.update_momentum(cosine_schedule(int(self.global_step), total, *self.MOMENTUM))
        return super().training_step(batch, batch_idx)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        a, b, _ = batch
        n = a.shape[0]
        x = torch.cat([a, b], dim=0)
        q = self.net(x).float()
        k = self.net.forward_momentum(x).float()
        loss = mocov3_loss(q[:n], q[n:], k[:n], k[n:], self.criterion)
        return loss, {"acc": _pair_accuracy(q[:n], k[n:])}, int(n)


_TASKS: dict[str, type[_TaskModule]] = {"rotation": RotationModule, "sorting": SortingModule,
                                        "simclr": SimCLRModule, "mocov3": MoCoV3Module}


def _make_module(config: TrainConfig) -> _TaskModule:
    if config.task not in _TASKS:
        raise NotImplementedError(f"task {config.task!r} is not implemented yet")
    return _TASKS[config.task](config)


def _is_rank_zero() -> bool:
    # DDP re-runs the calling script in one process per extra GPU; only rank 0 writes files.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _read_run_config(out: Path) -> dict[str, Any]:
    path = out / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the run's config: {exc}") from exc
    if doc.get("format") != RUN_FORMAT or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{path}: not a {RUN_FORMAT} run config")
    return doc


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _keep_old_metrics(logger: Any, rows: list[dict[str, str]], keys: list[str], last_epoch: int) -> None:
    """Put the metrics of epochs ``<= last_epoch`` back into a fresh CSVLogger's file.

    Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run
    keeps the history of the epochs its checkpoint covers (rows of a crashed, unfinished
    epoch are dropped: they will be logged again).
    """
    rows = [r for r in rows if r.get("epoch", "") == "" or int(float(r["epoch"])) <= last_epoch]
    writer = logger.experiment  # creating it removes the old file
    if not rows:
        return
    with open(writer.metrics_file_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    # Known columns: the writer only rewrites the header when a new one appears.
    writer.metrics_keys = sorted(keys)


def quiet_lightning() -> None:
    """Keep Lightning's start-up notices (accelerator found, tips) off a command's output."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train(
    volumes: Sequence[Any],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Train the configured pretext task on ``volumes``; return the run directory.

    Parameters
    ----------
    volumes : sequence of path-like or array-like
        Volume files or 3D ``(Z, Y, X)`` arrays.
    out_dir : path-like
        Run directory (layout in the module docstring).
    config : TrainConfig, optional
        Defaults to ``TrainConfig()``.
    resume : bool
        Continue from ``out_dir/checkpoints/last.ckpt`` (weights, optimiser, scheduler,
        step and epoch counters), training until ``config.epochs``. The task, backbone,
        input size, angle step and dropout must match the run's ``config.json``.
    progress : bool
        Show a progress bar (rich).
    overwrite : bool
        Replace the checkpoints and logs of an earlier run in ``out_dir``; without it, an
        existing ``last.ckpt`` and ``resume=False`` is an error.
    callbacks : sequence of lightning.Callback
        Extra callbacks for the trainer.

    Returns
    -------
    Path
        ``out_dir``.
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    metrics_path = out / "logs" / "metrics.csv"
    old_keys: list[str] = []
    old_rows: list[dict[str, str]] = []
    last_epoch = -1
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"{last}: no checkpoint to resume from")
        old = TrainConfig.from_dict(_read_run_config(out)["config"])
        changed = [f for f in _ARCH_FIELDS if getattr(old, f) != getattr(config, f)]
        if changed:
            raise ValueError(f"cannot resume {out}: {', '.join(changed)} differ from the run's config.json")
        old_keys, old_rows = _csv_rows(metrics_path)
        last_epoch = int(torch.load(last, map_location="cpu", weights_only=True).get("epoch", -1))
    elif last.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run; pass resume=True to continue it or overwrite=True")
        if _is_rank_zero():
            shutil.rmtree(ckpt_dir)
            shutil.rmtree(out / "logs", ignore_errors=True)

    hw = _hardware(config.devices, num_nodes=config.num_nodes)
    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = VolumeDataModule(volumes, config)
    module = _make_module(config)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": RUN_FORMAT, "config": config.to_dict(), "volumes": dm.volume_names(),
           "train_volumes": dm.train_ids, "val_volumes": dm.val_ids}
    if _is_rank_zero():
        write_text_atomic(out / "config.json", json.dumps(doc, indent=2) + "\n")

    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    with warnings.catch_warnings():
        # Expected here: a resumed run reuses its directories; 0 workers is the CPU default.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning's own use of a torch API deprecated in newer torch releases.
        warnings.filterwarnings("ignore", message=".*treespec.*")
        # version="" gives the stable path out_dir/logs/metrics.csv.
        logger = CSVLogger(save_dir=out, name="logs", version="")
        if resume and _is_rank_zero():
            _keep_old_metrics(logger, old_rows, old_keys, last_epoch)
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                               save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
        cbs: list[L.Callback] = [ckpt, *callbacks]
        if progress:
            cbs.append(RichProgressBar())
        trainer = L.Trainer(
            max_epochs=config.epochs,
            precision=config.resolved_precision(),  # type: ignore[arg-type]
            logger=logger,
            callbacks=cbs,
            enable_checkpointing=True,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            default_root_dir=out,
            **hw,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    return out


def _net_for(config: TrainConfig) -> nn.Module:
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
    config = TrainConfig.from_dict(ckpt["hyper_parameters"]["config"])
    net = _net_for(config)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    del ckpt, state
    return net.to(map_location).eval(), config
