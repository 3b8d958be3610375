"""GPU: training slices/s, tomoloc vs a bare torchvision loop, and localization s per 512^3 volume.

    python benchmarks/gpu_throughput.py [--tasks rotation sorting] [--backbones resnet18 resnet50]
                                        [--sizes 128 256] [--batch 128] [--workers N] [--localize]

Training: tomoloc's Lightning path (``tomoloc.training.train``: sampling, rotation, masking
and augmentation of every slice on the CPU in DataLoader workers, pinned memory, bf16-mixed)
against a bare loop of the same torchvision ResNet on random GPU tensors (3-channel input,
``num_classes=4``, cross-entropy, AdamW, bf16 autocast) that pushes the same number of slices
through the encoder per step (rotation: 2 x batch, the pair; sorting: batch). Ratio = tomoloc /
bare slices/s; the goal is >= 0.9 (data loading never the bottleneck).

``--localize``: one synthetic 512^3 uint16 volume; a small model per task trained on the GPU
(1 epoch x 30 steps), then `tomoloc run`'s localizer timed on the volume (second call; the
first loads the model and warms cuDNN up).

Prints Markdown tables (BENCHMARKS.md takes them by hand: the device's copy of the file does
not come back).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from tomoloc.config import auto_workers
from tomoloc.training import TrainConfig, quiet_lightning, train

WARMUP = 10


class Timer(L.Callback):
    """Times training steps WARMUP..last; the end is taken at the last step, before validation,
    checkpointing and worker shutdown, which the bare loop does not have either."""

    def __init__(self, steps: int) -> None:
        self.steps, self.t0, self.t1, self.n = steps, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= WARMUP:
            self.n += 1
        if batch_idx == self.steps - 1:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    def steps_per_s(self) -> float:
        return self.n / (self.t1 - self.t0)


def slices_per_step(task: str, batch: int) -> int:
    return 2 * batch if task == "rotation" else batch


def tomoloc_rate(task: str, size: int, batch: int, steps: int, workers: int, backbone: str) -> float:
    rng = np.random.default_rng(0)
    vols = [rng.normal(size=(96, 128, 128)).astype(np.float32) for _ in range(8)]
    timer = Timer(steps)
    cfg = TrainConfig(task=task, backbone=backbone, input_size=size, batch_size=batch, epochs=1,
                      steps_per_epoch=steps, val_samples=batch, devices="gpu", precision="auto", num_workers=workers)
    assert cfg.resolved_precision() == "bf16-mixed"
    with tempfile.TemporaryDirectory() as d:
        train(vols, d, cfg, progress=False, callbacks=[timer])
    return timer.steps_per_s() * slices_per_step(task, batch)


def bare_rate(task: str, size: int, batch: int, steps: int, backbone: str) -> float:
    import torchvision

    net = getattr(torchvision.models, backbone)(num_classes=4).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    n = slices_per_step(task, batch)
    x = torch.randn(n, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    label = torch.randint(0, 4, (n,), device="cuda")
    for i in range(steps):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return (steps - WARMUP) * n / (time.perf_counter() - t0)


def localize_seconds(tmp: Path) -> list[str]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from beamline import Upsampled

    from tomoloc import io
    from tomoloc.synth import make_phantom, write_batch

    vol = tmp / "vol512.npy"
    io.save_volume(vol, Upsampled(make_phantom((64, 64, 64), kind="fish", seed=60).volume, 8, seed=60))
    gt = write_batch(tmp / "train", n=4, kind="mixed", shape=(64, 96, 96), seed=61)
    vols = sorted(str(p) for p in gt.parent.glob("vol_*[0-9].npy"))
    rows = []
    for task in ("sorting", "rotation"):
        run = tmp / task
        train(vols, run, TrainConfig(task=task, epochs=1, steps_per_epoch=30, devices="gpu"), progress=False)
        if task == "sorting":
            from tomoloc.localize.sorting import SortingLocalizer as Loc
        else:
            from tomoloc.localize.rotation import RotationLocalizer as Loc
        for precision in ("32", "bf16"):  # the localizer's --precision
            loc = Loc(run, device="cuda", precision=precision)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                with io.open_volume(vol) as v:
                    loc.localize(v)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            label = task if precision == "32" else f"{task}, --precision bf16"
            rows.append(f"| {label} | 512^3 uint16 | {times[0]:.1f} | {times[1]:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["rotation", "sorting"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=None, help="default: tomoloc train's (auto_workers)")
    ap.add_argument("--localize", action="store_true")
    args = ap.parse_args()
    if args.workers is None:
        args.workers = auto_workers("gpu")
    quiet_lightning()
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.workers} loader workers")
    print("| task | backbone | input | batch | tomoloc slices/s | bare torchvision slices/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for bb in args.backbones:
            for s in args.sizes:
                t = tomoloc_rate(task, s, args.batch, args.steps, args.workers, bb)
                b = bare_rate(task, s, args.batch, args.steps, bb)
                print(f"| {task} | {bb} | {s} | {args.batch} | {t:.0f} | {b:.0f} | {t / b:.2f} |", flush=True)
    if args.localize:
        print("\n| localizer | volume | first call s (model load, warm-up) | second call s |")
        print("|---|---|---|---|")
        with tempfile.TemporaryDirectory() as d:
            localize_seconds(Path(d))


if __name__ == "__main__":
    main()
