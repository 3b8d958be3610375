"""CPU side of GPU training: slices/s one DataLoader process delivers, per task and input size.

    python benchmarks/loader_throughput.py [--tasks rotation sorting] [--sizes 64 128 256] [--batches 20]

Builds tomoloc's training data module (:class:`tomoloc.training.VolumeDataModule`) on 8 random
volumes of 96x128x128 and iterates its training loader in this process (``num_workers=0``,
one torch thread): what one loader worker process produces, collation included. Rotation:
a pair per item (sampling, rotation, inscribed-circle mask), batch 256 pairs; sorting: one
batch of 128 slices of one volume per item. Two warm-up batches are left out.

A GPU step is fed by ``--workers`` such processes (on GPU by default the CPUs less 2, at most 16), so
data loading keeps up with the GPU as long as the GPU's own slices/s stays below about
``workers x`` these figures. Writes the "Training data loader throughput" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import update_section
from tomoloc.training import TrainConfig, VolumeDataModule


def rate(task: str, size: int, batches: int, vols: list[np.ndarray]) -> tuple[float, int]:
    batch = 256 if task == "rotation" else 128
    cfg = TrainConfig(task=task, input_size=size, batch_size=batch, epochs=1, steps_per_epoch=batches + 2,
                      val_samples=batch, devices="cpu", num_workers=0)
    dm = VolumeDataModule(vols, cfg)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it), next(it)
    t0, n = time.perf_counter(), 0
    for _ in it:
        n += 1
    per = 2 * batch if task == "rotation" else batch
    return n * per / (time.perf_counter() - t0), batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["rotation", "sorting"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    vols = [rng.normal(size=(96, 128, 128)).astype(np.float32) for _ in range(8)]
    rows = []
    for task in args.tasks:
        for size in args.sizes:
            r, batch = rate(task, size, args.batches, vols)
            print(f"{task} {size}: {r:.0f} slices/s", flush=True)
            rows.append(f"| {task} | {size} | {batch} | {r:.0f} |")
    body = ("One DataLoader process (`num_workers=0`, one torch thread) iterating tomoloc's training loader on "
            "8 random volumes of 96x128x128, collation included; a rotation item is a pair (two slices).\n\n"
            "| task | input | batch | slices/s per loader process |\n|---|---|---|---|\n" + "\n".join(rows))
    print(update_section("Training data loader throughput (CPU)", body))


if __name__ == "__main__":
    main()
