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
import functools
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from tomoloc._fsutil import write_text_atomic
from tomoloc.checkpoints import load_model, net_for  # noqa: F401
from tomoloc.config import (  # noqa: F401  (re-exported: the training API)
    _ARCH_FIELDS,
    CONTRASTIVE_TASKS,
    DEFAULT_AXES,
    PRECISIONS,
    RUN_FORMAT,
    SAVED_DEFAULTS,
    TASKS,
    TrainConfig,
    hardware,
)
from tomoloc.losses import mean_displacement, mocov3_loss, rotation_loss, sorting_loss
from tomoloc.sampling import (
    RotationPairDataset,
    SortingBatchDataset,
    TwoViewSliceDataset,
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

    The epoch is read when the first key is drawn, as the later of ``current_epoch()`` (the
    trainer's counter) and the value :meth:`set_epoch` was given. Lightning creates and
    prefetches from the train iterator before its ``on_train_epoch_start`` hook on the first
    and on a resumed epoch, so state set in that hook would come late; and when it resumes
    from the checkpoint saved at an epoch's end, the restored counter still names that
    epoch (its ``completed`` count is saved before it is incremented) until the loop moves
    on, while ``set_epoch`` already has the next one. With either alone, a resumed sorting
    run (whose loader draws keys without a batch sampler) trained on its last epoch again.
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
        # A generator: its body runs at the first key drawn, after Lightning's set_epoch.
        current = self._current_epoch() if self._current_epoch is not None else None
        epoch = self.epoch if current is None else max(current, self.epoch)
        for i in range(self.length):
            yield epoch, i


def _map_images(batch: Any, fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Any:
    """``fn`` applied to every 4D ``(B, C, H, W)`` tensor of ``dtype`` in a batch (tuples, lists, dicts)."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.ndim == 4 and batch.dtype == dtype else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_images(b, fn, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_images(v, fn, dtype) for k, v in batch.items()}
    return batch


def _collate_half(items: Any, batched: bool) -> Any:
    """The default collation, then slice images as float16 (clipped to its range); labels,
    positions and other tensors are left as they are."""
    from torch.utils.data import default_collate, default_convert

    batch = default_convert(items) if batched else default_collate(items)
    return _map_images(batch, lambda x: x.clamp(-65504.0, 65504.0).half(), torch.float32)


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

    def _val_length(self, n: int) -> int:
        """``n`` validation items rounded up to a multiple of the ranks: Lightning's
        distributed sampler pads an uneven split with items of rank 0's share, which then
        counted twice in the validation means. The items added are new ones (functions of
        their index), and on one rank there are none."""
        w = self._world_size()
        return -(-n // w) * w

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
            n_val = self._val_length(max(1, c.val_samples // c.batch_size))
            self.val_dataset = SortingBatchDataset(val_arrays, length=n_val, seed=c.seed + 1, augment=False,
                                                   **common_s).precompute()
            return
        if c.task in CONTRASTIVE_TASKS:
            from tomoloc.transforms import MOCOV3_VIEWS, SIMCLR_VIEWS

            recipes = SIMCLR_VIEWS if c.task == "simclr" else MOCOV3_VIEWS
            common_v = dict(recipes=recipes, axes=c.axes, input_size=c.input_size)
            self.train_dataset = TwoViewSliceDataset(train_arrays, length=c.steps_per_epoch * c.batch_size
                                                     * self._world_size(), seed=c.seed, **common_v).precompute()
            self.val_dataset = TwoViewSliceDataset(val_arrays, length=self._val_length(c.val_samples),
                                                   seed=c.seed + 1,
                                                   **common_v).precompute()
            return
        common = dict(axes=c.axes, k=c.k, step=c.step, input_size=c.input_size, max_shift=c.max_shift)
        # Every device runs steps_per_epoch steps of batch_size pairs per epoch.
        length = c.steps_per_epoch * c.batch_size * self._world_size()
        self.train_dataset = RotationPairDataset(train_arrays, length=length,
                                                 seed=c.seed, **common).precompute()
        # A different seed: with a single volume the validation pairs still differ from training ones.
        self.val_dataset = RotationPairDataset(val_arrays, length=self._val_length(c.val_samples),
                                               seed=c.seed + 1, **common).precompute()

    def _loader(self, dataset: Any, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        nw = self.config.num_workers
        # A sorting item is already a batch (slices of one volume): no collation.
        batched = self.config.task == "sorting"
        collate = functools.partial(_collate_half, batched=batched) if self.half_transfer() else None
        return DataLoader(dataset, batch_size=None if batched else self.config.batch_size, sampler=sampler,
                          shuffle=False, drop_last=False if batched else drop_last, num_workers=nw, persistent_workers=nw > 0,
                          pin_memory=self.config.on_gpu(), collate_fn=collate)

    def half_transfer(self) -> bool:
        """Whether slices travel as float16: on GPU under mixed precision, which computes in
        16 bits anyway. Halves the bytes through shared memory, pinning and the copy to the
        GPU; :meth:`on_after_batch_transfer` casts them back to float32."""
        return self.config.on_gpu() and self.config.resolved_precision() in ("bf16-mixed", "16-mixed")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Slices may travel as float16 (half_transfer); the network gets float32.
        return _map_images(batch, lambda x: x.float(), torch.float16)

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
    batch size; the network comes from :func:`net_for`.
    """

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__()
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.config = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.net = net_for(cfg)
        self._epoch_sums: dict[str, dict[str, Any]] = {}

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # One seed on every rank would give every rank the same dropout masks (the data
        # differ by rank already: they are functions of the sample's index). Runs before a
        # checkpoint is restored.
        if stage == "fit" and self.trainer.world_size > 1:
            torch.manual_seed(self.config.seed + 1_000_003 * self.trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning saves no random state: without it a resumed run drew the dropout masks
        # of its first epoch again. (Under DDP only rank 0's is saved; see on_load_checkpoint.)
        import random

        # Tensors, ints and tuples only: checkpoints are read with torch.load(weights_only=True).
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["tomoloc_rng"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import random

        state = checkpoint.get("tomoloc_rng")
        trainer = self._trainer  # None when a checkpoint is loaded outside of fit
        if state is None or trainer is None or trainer.world_size > 1:
            return  # DDP: every rank keeps its own seeded stream (rank 0's is all there is)
        torch.set_rng_state(state["torch"])
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

    def on_fit_start(self) -> None:
        # NHWC weights: what tensor cores want (the bare torchvision loop we measure against
        # uses it); on 2 CPU cores a training step took the same time either way. Checkpoints
        # load into contiguous models as usual.
        self.net.to(memory_format=torch.channels_last)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        loss, metrics, n = self._step(batch)
        # Sums kept here and logged once per epoch: Lightning's self.log cost about 0.6 ms a
        # call on the CPU (it re-walks the metric's state every time), 2-3 calls a step
        # (BENCHMARKS.md, "GPU checks for beamline scale"; on an H100 the gain was in the noise).
        sums = self._epoch_sums.setdefault(stage, {})
        for name, value in {"loss": loss, **metrics}.items():
            v = torch.as_tensor(value).detach().float() * n
            sums[name] = sums[name] + v if name in sums else v
        sums["_n"] = sums.get("_n", 0) + n
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Batch-size-weighted epoch means as ``{stage}_{name}``; across DDP ranks (equal
        shares), the mean of the ranks' means."""
        sums = self._epoch_sums.pop(stage, None)
        if not sums:
            return
        n = sums.pop("_n")
        for name, total in sums.items():
            self.log(f"{stage}_{name}", total / n, prog_bar=True, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums.pop("train", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

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
    norm. On several GPUs the negatives are gathered from every rank (``gather_distributed``)
    and batch norm is synchronised across ranks (:func:`train`), so N GPUs with B pairs each
    compute the loss, and its gradient, of one batch of N B pairs. Logs ``train_loss``,
    ``val_loss`` and ``train_acc``, ``val_acc``: the share of first views whose nearest
    second view (cosine) is their own (chance ``1 / B``, per rank).
    """

    TEMPERATURE = 0.5

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__(config)
        from lightly.loss import NTXentLoss

        # Outside DDP the gather is a no-op (world size 1).
        self.criterion = NTXentLoss(temperature=self.TEMPERATURE, gather_distributed=True)

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
    training step. On several GPUs, as :class:`SimCLRModule`: keys gathered from every
    rank, batch norm synchronised. Logs ``train_loss``, ``val_loss``, ``train_acc``,
    ``val_acc`` (query of view 1 against keys of view 2, as :class:`SimCLRModule`).
    """

    TEMPERATURE = 1.0
    MOMENTUM = (0.99, 1.0)

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__(config)
        from lightly.loss import NTXentLoss

        self.criterion = NTXentLoss(temperature=self.TEMPERATURE, gather_distributed=True)

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


def device_options(config: TrainConfig, hw: dict[str, Any]) -> dict[str, Any]:
    """``L.Trainer`` keyword arguments that depend on the hardware ``hw`` (:func:`hardware`)."""
    return {
        **hw,
        # Fixed input sizes: let cuDNN pick its fastest convolutions once.
        "benchmark": hw["accelerator"] == "gpu",
        # Contrastive batch norm must see the global batch (SimCLR, MoCo v3); a sorting
        # batch is one volume per rank and keeps its own statistics, as on one GPU.
        "sync_batchnorm": config.task in CONTRASTIVE_TASKS and hw["strategy"] == "ddp",
    }


def checkpoint_callbacks(ckpt_dir: Path) -> list[L.Callback]:
    """The callbacks that write ``ckpt_dir/best.ckpt`` (lowest validation loss) and
    ``ckpt_dir/last.ckpt`` (end of the latest epoch).

    Two callbacks, because Lightning's ``save_last=True`` writes ``last.ckpt`` only at steps
    where it also writes a top-k checkpoint: with one callback, ``last.ckpt`` stayed at the
    best epoch once the validation loss stopped improving, so ``--resume`` restarted from
    there and ``which="last"`` loaded the best model. The second callback has no monitor and
    keeps one file, the newest.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    common = dict(dirpath=ckpt_dir, save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    return [ModelCheckpoint(filename="best", monitor="val_loss", mode="min", **common),  # type: ignore[arg-type]
            ModelCheckpoint(filename="last", monitor=None, every_n_epochs=1, **common)]  # type: ignore[arg-type]


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
        old = TrainConfig.from_dict({**SAVED_DEFAULTS, **_read_run_config(out)["config"]})
        changed = [f for f in _ARCH_FIELDS if getattr(old, f) != getattr(config, f)]
        if changed:
            raise ValueError(f"cannot resume {out}: {', '.join(changed)} differ from the run's config.json")
        old_keys, old_rows = _csv_rows(metrics_path)
        last_epoch = int(torch.load(last, map_location="cpu", weights_only=True).get("epoch", -1))
    elif last.exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a run; pass resume=True to continue it or overwrite=True")

    hw = hardware(config.devices, num_nodes=config.num_nodes)
    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = VolumeDataModule(volumes, config)
    module = _make_module(config)
    # Every volume read (and its values checked) before anything is written or replaced: a
    # NaN or constant volume leaves no half-made run directory behind.
    dm.load()
    if not resume and last.exists() and _is_rank_zero():
        shutil.rmtree(ckpt_dir)
        shutil.rmtree(out / "logs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": RUN_FORMAT, "config": config.to_dict(), "volumes": dm.volume_names(),
           "train_volumes": dm.train_ids, "val_volumes": dm.val_ids}
    if _is_rank_zero():
        write_text_atomic(out / "config.json", json.dumps(doc, indent=2) + "\n")

    from lightning.pytorch.callbacks import RichProgressBar
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
        cbs: list[L.Callback] = [*checkpoint_callbacks(ckpt_dir), *callbacks]
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
            **device_options(config, hw),
        )
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    return out
