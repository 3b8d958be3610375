import csv
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from tomoloc.training import (
    TrainConfig,
    VolumeDataModule,
    checkpoint_callbacks,
    hardware,
    load_model,
    split_volumes,
    train,
)


def f_volume(seed, n=32, noise=0.1):
    """An 'F' extruded along axis 0, randomly shifted and scaled, in Gaussian noise.

    Every axis-0 slice shows the F, which has no rotational symmetry: the relative rotation
    of two slices is learnable from a few hundred pairs.
    """
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n), np.float32)
    s = rng.uniform(0.8, 1.0) * n / 32
    t = max(2, int(round(4 * s)))
    h, w = int(round(20 * s)), int(round(14 * s))
    y0 = (n - h) // 2 + int(rng.integers(-3, 4) * n / 32)
    x0 = (n - w) // 2 + int(rng.integers(-3, 4) * n / 32)
    img[y0 : y0 + h, x0 : x0 + t] = 1
    img[y0 : y0 + t, x0 : x0 + w] = 1
    img[y0 + h // 2 - t // 2 : y0 + h // 2 + (t + 1) // 2, x0 : x0 + (2 * w) // 3] = 1
    vol = np.zeros((n, n, n), np.float32)
    vol[n // 8 : n - n // 8] = img
    return vol + rng.normal(0, noise, vol.shape).astype(np.float32)


class Recorder(L.Callback):
    """Keeps the epochs of the sample keys, the global steps, and the final network."""

    def __init__(self):
        self.key_epochs, self.steps, self.net = set(), [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.key_epochs.update(batch[3]["epoch"].tolist())
        self.steps.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        self.net = pl_module.net


def metrics_rows(run):
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_config_round_trip_and_validation():
    cfg = TrainConfig(backbone="resnet34", axes=(0, 2), step=45, devices=2, precision="bf16-mixed")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["axes"] == [0, 2]
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({**d, "bogus": 1})
    for bad in [dict(step=7), dict(backbone="vgg"), dict(task="jigsaw"), dict(axes=(3,)), dict(val_fraction=1.0),
                dict(devices="tpu"), dict(batch_size=1), dict(schedule="step")]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_hardware_mapping():
    assert hardware("auto") == {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}
    assert hardware("cpu")["accelerator"] == "cpu"
    assert hardware("gpu", check_cuda=False) == {"accelerator": "gpu", "devices": 1, "num_nodes": 1,
                                                  "strategy": "auto"}
    assert hardware(4, check_cuda=False) == {"accelerator": "gpu", "devices": 4, "num_nodes": 1, "strategy": "ddp"}
    # one GPU on each of two nodes is DDP too
    assert hardware("gpu", check_cuda=False, num_nodes=2)["strategy"] == "ddp"
    with pytest.raises(ValueError, match="nodes needs GPUs"):
        hardware("cpu", num_nodes=2)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="GPU"):
            hardware(64)


def test_precision_auto_is_bf16_on_gpu_only():
    assert TrainConfig().resolved_precision() == "32-true"
    assert TrainConfig(devices=2, num_nodes=3).resolved_precision() == "bf16-mixed"
    assert TrainConfig(devices="gpu", precision="16-mixed").resolved_precision() == "16-mixed"
    for bad in [dict(num_nodes=0), dict(precision="fp8"), dict(devices="cpu", num_nodes=2)]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_auto_workers(monkeypatch):
    from tomoloc.config import auto_workers

    assert auto_workers("auto") == auto_workers("cpu") == 0  # CPU training: torch's threads use the cores
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert auto_workers("gpu") == 14  # 16 CPUs less the loop and the pin-memory thread
    assert auto_workers(4) == 3  # shared by 4 GPU processes on the node
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert auto_workers("gpu") == 16
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_workers(2) == 1


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("task", ["rotation", "sorting", "simclr"])
def test_mixed_precision_gpu_loader_sends_float16_slices(task):
    """On GPU with mixed precision, slices travel as float16; labels, positions and metadata
    are untouched, and the data module's batch hook gives the network float32 again."""
    vols = [f_volume(s) for s in range(3)]
    kw = dict(task=task, input_size=32, batch_size=8, steps_per_epoch=2, val_samples=8, seed=3)
    batches = {}
    for name, extra in {"cpu": dict(devices="cpu"), "gpu": dict(devices="gpu", precision="auto")}.items():
        dm = VolumeDataModule(vols, TrainConfig(**kw, **extra))
        dm.setup("fit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pin_memory without a GPU here
            batches[name] = next(iter(dm.train_dataloader()))
    full, half = batches["cpu"], batches["gpu"]
    n_img = 1 if task == "sorting" else 2
    for a, b in zip(full[:n_img], half[:n_img]):
        assert a.dtype == torch.float32 and b.dtype == torch.float16 and a.ndim == 4
        np.testing.assert_allclose(b.float().numpy(), a.numpy(), rtol=1e-3, atol=1e-3)
    for a, b in zip(full[n_img:], half[n_img:]):
        _assert_same(a, b)
    restored = dm.on_after_batch_transfer(half, 0)  # dm: the GPU one
    assert all(t.dtype == torch.float32 for t in restored[:n_img])
    for a, b in zip(restored[n_img:], half[n_img:]):
        _assert_same(a, b)


def test_training_casts_float16_slices_back_before_the_network(tmp_path, monkeypatch):
    """The float16 transfer end to end, forced on the CPU: a float16 slice reaching the
    float32 network would stop training with a dtype error."""
    monkeypatch.setattr(VolumeDataModule, "half_transfer", lambda self: True)
    seen = []
    orig = VolumeDataModule.on_after_batch_transfer

    def spy(self, batch, idx):
        seen.append(batch[0].dtype)
        return orig(self, batch, idx)

    monkeypatch.setattr(VolumeDataModule, "on_after_batch_transfer", spy)
    vols = [f_volume(s) for s in range(3)]
    for task in ("rotation", "sorting"):
        seen.clear()
        train(vols, tmp_path / task, TrainConfig(task=task, input_size=32, batch_size=4, epochs=1, steps_per_epoch=2,
                                                 val_samples=4), progress=False)
        assert seen and set(seen) == {torch.float16}


def test_ddp_ranks_draw_disjoint_seeded_samples():
    # What Lightning does with our sampler under DDP (its own wrapper, as injected by the
    # trainer): every rank gets a fixed, disjoint share of the epoch's keys, and the items
    # are functions of (seed, epoch, index), so together the ranks see one epoch's samples.
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from tomoloc.training import _EpochKeySampler

    epoch = [3]
    sampler = _EpochKeySampler(12, lambda: epoch[0])
    shares = []
    for rank in range(3):
        w = DistributedSamplerWrapper(sampler, num_replicas=3, rank=rank, shuffle=False)
        shares.append(list(w))
        assert list(DistributedSamplerWrapper(sampler, num_replicas=3, rank=rank, shuffle=False)) == shares[-1]
    assert sorted(k for share in shares for k in share) == [(3, i) for i in range(12)]
    assert all(len(share) == 4 for share in shares)
    epoch[0] = 4  # the next epoch: new keys, so new samples
    assert {e for e, _ in DistributedSamplerWrapper(sampler, num_replicas=3, rank=0, shuffle=False)} == {4}


def test_sampler_takes_the_epoch_lightning_sets_after_creating_the_iterator():
    # Resuming from an epoch's end, Lightning creates the train iterator while its restored
    # counter still names the finished epoch (0 here), then calls set_epoch(1).
    from tomoloc.training import _EpochKeySampler

    sampler = _EpochKeySampler(3, lambda: 0)
    it = iter(sampler)
    sampler.set_epoch(1)
    assert list(it) == [(1, 0), (1, 1), (1, 2)]
    assert list(_EpochKeySampler(2, lambda: 5)) == [(5, 0), (5, 1)]  # the counter when it is ahead


@pytest.mark.parametrize("task,n_val", [("rotation", 10), ("sorting", 3)])
def test_validation_items_split_evenly_over_the_ranks(task, n_val):
    # Lightning's distributed sampler pads an uneven split with rank 0's items, which then
    # counted twice in the validation means: the set is rounded up to the ranks instead.
    from types import SimpleNamespace

    per_item = 4 if task == "sorting" else 1  # a sorting item is a batch of 4 slices
    cfg = TrainConfig(task=task, input_size=16, batch_size=4, steps_per_epoch=2, val_samples=n_val * per_item)
    sizes = {}
    for world in (1, 2, 3):
        dm = VolumeDataModule([f_volume(s, n=16) for s in range(3)], cfg)
        dm.trainer = SimpleNamespace(world_size=world, current_epoch=0)
        dm.setup("fit")
        sizes[world] = len(dm.val_dataset)
    assert sizes == {1: n_val, 2: -(-n_val // 2) * 2, 3: -(-n_val // 3) * 3}


def test_split_by_volume():
    for n, n_val in [(2, 1), (4, 1), (5, 1), (10, 2), (20, 4)]:
        tr, va = split_volumes(n, 0.2, seed=0)
        assert len(va) == n_val and sorted(tr + va) == list(range(n))
        assert split_volumes(n, 0.2, seed=0) == (tr, va)
    assert {tuple(split_volumes(10, 0.2, seed=s)[1]) for s in range(10)} != {(0, 1)}  # seeded, not fixed
    assert split_volumes(1, 0.2, 0) == ([0], [0])  # one volume: validate on other draws of it
    assert split_volumes(3, 0.0, 0) == ([0, 1, 2], [0, 1, 2])


def test_datamodule_loads_each_volume_once(tmp_path, monkeypatch):
    from tomoloc import io

    paths = []
    for i in range(3):
        p = tmp_path / f"v{i}.npy"
        np.save(p, f_volume(i, n=16))
        paths.append(p)
    opened = []
    real_open = io.open_volume
    monkeypatch.setattr(io, "open_volume", lambda p, *a, **kw: opened.append(str(p)) or real_open(p, *a, **kw))
    cfg = TrainConfig(input_size=16, batch_size=4, steps_per_epoch=2, val_samples=6, max_voxels=8**3)
    dm = VolumeDataModule([*paths, f_volume(3, n=16)], cfg)
    dm.setup("fit")
    dm.setup("validate")
    assert sorted(opened) == sorted(map(str, paths))
    assert [a.shape for a in dm.arrays] == [(8, 8, 8)] * 4  # working copies within max_voxels
    assert dm.volume_names() == [*map(str, paths), None]
    assert len(dm.val_ids) == 1 and not set(dm.val_ids) & set(dm.train_ids)
    assert len(dm.train_dataset) == 8  # steps_per_epoch * batch_size
    first = [b[0] for b in dm.val_dataloader()]
    second = [b[0] for b in dm.val_dataloader()]
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))


def test_training_learns_relative_rotation(tmp_path):
    # 8 volumes -> 6 train, 2 unseen validation volumes (with 3 train volumes the net can
    # fail to generalise to a differently scaled F). 120 steps at 32 px: the eval-mode
    # batch-norm statistics need some 50 steps to catch up with the weights. A quarter of the
    # slices hold noise only, so accuracy tops out near 0.8.
    vols = [f_volume(s) for s in range(8)]
    cfg = TrainConfig(input_size=32, batch_size=32, epochs=4, steps_per_epoch=30, val_samples=128, axes=(0,), seed=0)
    run = train(vols, tmp_path / "run", cfg, progress=False)
    rows = [r for r in metrics_rows(run) if r["val_acc"]]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["val_acc"]) > 0.5  # chance is 0.25
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])


class _WorseEachEpoch(L.LightningModule):
    """A module whose validation loss rises every epoch: only its first epoch is the best."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _i):
        return ((self.w - batch[0]) ** 2).mean()

    def validation_step(self, batch, _i):
        self.log("val_loss", float(self.current_epoch), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    trainer = L.Trainer(max_epochs=3, callbacks=checkpoint_callbacks(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_WorseEachEpoch(), loader, loader)
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert (best["epoch"], best["global_step"]) == (0, 2)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # Lightning's save_last alone left it at (0, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.parametrize("task", ["rotation", "sorting"])
def test_a_run_stopped_and_resumed_ends_with_the_same_weights(tmp_path, task):
    # The same schedule (2 epochs) both ways; one run stopped after its first epoch and
    # resumed. Before, a resumed sorting run drew its first epoch's batches again, and
    # either task its first epoch's dropout masks: the weights differed.
    vols = [f_volume(s, n=16) for s in range(3)]
    cfg = TrainConfig(task=task, input_size=16, batch_size=4, epochs=2, steps_per_epoch=2, val_samples=8, seed=0)
    straight = train(vols, tmp_path / "straight", cfg, progress=False)
    stopped = train(vols, tmp_path / "stopped", cfg, progress=False, callbacks=[_StopAfterFirstEpoch()])
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    train(vols, stopped, cfg, progress=False, resume=True)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert metrics_rows(straight) == metrics_rows(stopped)


def test_train_resume_and_load_model(tmp_path):
    vols = [f_volume(s, n=16) for s in range(3)]
    cfg = TrainConfig(input_size=16, batch_size=4, epochs=1, steps_per_epoch=3, val_samples=8, seed=0)
    run = tmp_path / "run"
    rec1 = Recorder()
    assert train(vols, run, cfg, progress=False, callbacks=[rec1]) == run
    last = run / "checkpoints" / "last.ckpt"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert rec1.key_epochs == {0} and rec1.steps == [0, 1, 2]
    first_state = {k: v.clone() for k, v in rec1.net.state_dict().items()}

    doc = json.loads((run / "config.json").read_text())
    assert doc["format"] == "tomoloc-train/1" and doc["volumes"] == [None, None, None]
    assert TrainConfig.from_dict(doc["config"]) == cfg
    assert len(doc["val_volumes"]) == 1

    # Same seed, fresh directory: the same weights (deterministic on CPU).
    rec_again = Recorder()
    train(vols, tmp_path / "again", cfg, progress=False, callbacks=[rec_again])
    for k, v in rec_again.net.state_dict().items():
        torch.testing.assert_close(v, first_state[k], rtol=0, atol=0)

    with pytest.raises(FileExistsError):
        train(vols, run, cfg, progress=False)
    with pytest.raises(ValueError, match="backbone"):
        train(vols, run, TrainConfig.from_dict({**cfg.to_dict(), "backbone": "resnet34"}), resume=True, progress=False)

    cfg2 = TrainConfig.from_dict({**cfg.to_dict(), "epochs": 2})
    rec2 = Recorder()
    train(vols, run, cfg2, resume=True, progress=False, callbacks=[rec2])
    assert rec2.steps == [3, 4, 5]  # continued, not restarted
    assert rec2.key_epochs == {1}  # fresh pairs for the new epoch
    assert torch.load(last, weights_only=True)["global_step"] == 6
    epochs = {int(r["epoch"]) for r in metrics_rows(run)}
    assert epochs == {0, 1}  # the first run's rows are kept
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics_rows(run)[0])
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"]).epochs == 2

    net, loaded_cfg = load_model(run, "last")
    assert loaded_cfg == cfg2 and not net.training
    trained = rec2.net.eval()
    for k, v in trained.state_dict().items():  # the weights exactly (training kept them NHWC)
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    assert trained.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.encoder.conv1.weight.is_contiguous()  # loaded models are ordinary ones
    x = torch.rand(5, 1, 16, 16), torch.rand(5, 1, 16, 16)
    with torch.no_grad():  # the same function, up to the summation order of NHWC convolutions
        torch.testing.assert_close(net(*x), trained(*x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net(*x), type(net)("resnet18", 4).eval()(*x))
    best, _ = load_model(run)  # default: best
    assert type(best) is type(net)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")
