"""Multi-process (DDP) correctness of the contrastive baselines, on CPU with gloo.

N ranks with B pairs each must compute what one process computes on the N B pairs: the same
loss (negatives gathered from every rank) and, once DDP averages the ranks' gradients, the
same gradient. Batch norm is in eval mode here so that a sample's embedding does not depend
on which rank holds it (in training, ``train`` synchronises batch norm for these tasks).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("lightly")

from tomoloc.training import TrainConfig, _make_module  # noqa: E402

TASKS = ("simclr", "mocov3")
WORLD, PAIRS = 2, 8


def _setup(task: str):
    torch.manual_seed(0)
    module = _make_module(TrainConfig(task=task, input_size=32, batch_size=PAIRS, devices="cpu")).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(PAIRS, 1, 32, 32, generator=g), torch.randn(PAIRS, 1, 32, 32, generator=g)
    return module, a, b


def _loss_and_grad(module, a, b):
    module.zero_grad(set_to_none=True)
    loss = module._step((a, b, {}))[0]
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.detach(), grad


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for task in TASKS:
            module, a, b = _setup(task)
            part = slice(rank * PAIRS // WORLD, (rank + 1) * PAIRS // WORLD)
            loss, grad = _loss_and_grad(module, a[part], b[part])
            # What DDP does with the ranks' gradients and what Lightning logs: their means.
            dist.all_reduce(grad)
            dist.all_reduce(loss)
            results[task] = (loss / WORLD, grad / WORLD)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_contrastive_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for task in TASKS:
        module, a, b = _setup(task)
        full_loss, full_grad = _loss_and_grad(module, a, b)
        # Without the gather a rank's loss would see only its own negatives: not the same.
        half_loss, _ = _loss_and_grad(module, a[: PAIRS // WORLD], b[: PAIRS // WORLD])
        assert abs(half_loss - full_loss) > 1e-2, task
        for loss, grad in (r[task] for r in ranks):
            torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-6)


def test_batch_norm_is_synchronised_for_contrastive_tasks_on_several_gpus():
    from tomoloc.training import device_options, hardware

    for task in ("simclr", "mocov3", "sorting", "rotation"):
        cfg = TrainConfig(task=task, devices=2)
        several = device_options(cfg, hardware(2, check_cuda=False))
        assert several["strategy"] == "ddp" and several["benchmark"]
        assert several["sync_batchnorm"] == (task in TASKS)
        one = device_options(TrainConfig(task=task, devices="gpu"), hardware("gpu", check_cuda=False))
        assert not one["sync_batchnorm"]
        assert device_options(TrainConfig(task=task), hardware("cpu")) == {**hardware("cpu"), "benchmark": False,
                                                                           "sync_batchnorm": False}
