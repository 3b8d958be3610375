"""GPU: where tomoloc's training step loses time against a bare torchvision loop.

    python benchmarks/gpu_overhead.py [--configs rotation:resnet18:128 ...] [--batch 128] [--steps 50]

For each task:backbone:input, slices/s of (same number of slices per step, bf16 autocast,
AdamW, channels-last, cuDNN autotuner, 10 warm-up steps left out):
- ``bare``: torchvision's ResNet (3 channels, 4 classes) on one random batch kept on the GPU
  (``gpu_throughput.bare_rate``);
- ``model``: tomoloc's network and loss (``_TaskModule._step``) in a plain loop on one real
  training batch kept on the GPU: the network and loss, without Lightning or data loading;
- ``lightning``: tomoloc's Lightning module under ``L.Trainer`` fed that same GPU batch
  every step: adds Lightning's per-step work, still no data loading;
- ``loader``: tomoloc's training DataLoader alone (``--workers`` processes, pinned memory),
  each batch copied to the GPU: what the input pipeline can deliver.
The slowest of ``lightning`` and ``loader`` bounds what ``tomoloc train`` reaches.
Prints a Markdown table (BENCHMARKS.md takes it by hand from the device's output).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import WARMUP, bare_rate, slices_per_step  # noqa: E402

from tomoloc.config import auto_workers  # noqa: E402
from tomoloc.training import TrainConfig, VolumeDataModule, _make_module, quiet_lightning  # noqa: E402

DEV = "cuda"  # "cpu" only to smoke-test this script without a GPU


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _config(task: str, bb: str, size: int, batch: int, steps: int, workers: int) -> TrainConfig:
    return TrainConfig(task=task, backbone=bb, input_size=size, batch_size=batch, epochs=1, steps_per_epoch=steps,
                       val_samples=batch, devices="gpu", precision="bf16-mixed", num_workers=workers)


def model_rate(cfg: TrainConfig, gpu_batch, steps: int) -> float:
    module = _make_module(cfg).to(DEV)
    module.net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for i in range(steps):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = module._step(gpu_batch)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return (steps - WARMUP) * slices_per_step(cfg.task, cfg.batch_size) / (time.perf_counter() - t0)


class _Const(torch.utils.data.Dataset):
    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.batch


def lightning_rate(cfg: TrainConfig, gpu_batch, steps: int) -> float:
    from gpu_throughput import Timer

    timer = Timer(steps)
    module = _make_module(cfg)
    dl = torch.utils.data.DataLoader(_Const(gpu_batch, steps), batch_size=None, num_workers=0)
    trainer = L.Trainer(max_epochs=1, precision="bf16-mixed", accelerator="gpu" if DEV == "cuda" else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, benchmark=True, callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=dl)
    return timer.steps_per_s() * slices_per_step(cfg.task, cfg.batch_size)


def loader_rate(cfg: TrainConfig, vols, steps: int) -> float:
    dm = VolumeDataModule(vols, cfg)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    n = 0
    for i, b in enumerate(it):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        _to(b, DEV)
        n += i >= WARMUP
    torch.cuda.synchronize()
    return n * slices_per_step(cfg.task, cfg.batch_size) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+",
                    default=["rotation:resnet18:128", "rotation:resnet18:256", "sorting:resnet18:256"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=None, help="default: tomoloc train's (auto_workers)")
    args = ap.parse_args()
    if args.workers is None:
        args.workers = auto_workers("gpu")
    quiet_lightning()
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    vols = [rng.normal(size=(96, 128, 128)).astype(np.float32) for _ in range(8)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.workers} loader workers")
    print("| task | backbone | input | batch | bare slices/s | model | lightning | loader |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.configs:
        task, bb, size = spec.split(":")
        cfg = _config(task, bb, int(size), args.batch, args.steps, args.workers)
        dm = VolumeDataModule(vols, _config(task, bb, int(size), args.batch, 2, 0))
        dm.setup("fit")
        gpu_batch = dm.on_after_batch_transfer(_to(next(iter(dm.train_dataloader())), DEV), 0)
        r = [bare_rate(task, int(size), args.batch, args.steps, bb), model_rate(cfg, gpu_batch, args.steps),
             lightning_rate(cfg, gpu_batch, args.steps), loader_rate(cfg, vols, args.steps)]
        print(f"| {task} | {bb} | {size} | {args.batch} | " + " | ".join(f"{x:.0f}" for x in r) + " |", flush=True)


if __name__ == "__main__":
    main()
