"""Rotation-task training throughput on a GPU: tomoloc's Lightning path vs a bare PyTorch loop.

    python benchmarks/gpu_throughput.py [--sizes 64 128] [--batch 256] [--workers 8]

Both run the same RotationNet (resnet18) with AdamW in bf16 autocast at the same batch; the
tomoloc path also samples, rotates and masks every pair on the CPU (DataLoader workers). The
ratio tomoloc / bare says how much the data pipeline and Lightning cost. Prints a Markdown
table (BENCHMARKS.md takes it by hand: the device's copy of the file does not come back).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import numpy as np
import torch

from tomoloc.losses import rotation_loss
from tomoloc.models import RotationNet
from tomoloc.training import TrainConfig, train

WARMUP = 10


class Timer(L.Callback):
    def __init__(self) -> None:
        self.t0, self.n = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= WARMUP:
            self.n += 1

    def rate(self, batch: int) -> float:
        torch.cuda.synchronize()
        return self.n * batch / (time.perf_counter() - self.t0)


def tomoloc_rate(size: int, batch: int, steps: int, workers: int, backbone: str) -> float:
    rng = np.random.default_rng(0)
    vols = [rng.normal(size=(64, 96, 96)).astype(np.float32) for _ in range(8)]
    timer = Timer()
    cfg = TrainConfig(backbone=backbone, input_size=size, batch_size=batch, epochs=1, steps_per_epoch=steps,
                      val_samples=batch, devices="gpu", precision="bf16-mixed", num_workers=workers)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train(vols, d, cfg, progress=False, callbacks=[timer])
    return timer.rate(batch)


def bare_rate(size: int, batch: int, steps: int, backbone: str) -> float:
    net = RotationNet(backbone).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ref = torch.randn(batch, 1, size, size, device="cuda")
    twin = torch.randn(batch, 1, size, size, device="cuda")
    label = torch.randint(0, 4, (batch,), device="cuda")
    for i in range(steps):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = rotation_loss(net(ref, twin), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return (steps - WARMUP) * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--backbones", nargs="+", default=["resnet18"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| backbone | input | batch | tomoloc pairs/s | bare loop pairs/s | ratio |")
    print("|---|---|---|---|---|---|")
    for bb in args.backbones:
        for s in args.sizes:
            t = tomoloc_rate(s, args.batch, args.steps, args.workers, bb)
            b = bare_rate(s, args.batch, args.steps, bb)
            print(f"| {bb} | {s} | {args.batch} | {t:.0f} | {b:.0f} | {t / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
