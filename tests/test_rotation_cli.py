"""`tomoloc train --task rotation` and `tomoloc localize --method rotation`, end to end."""

import json
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from test_training import f_volume
from tomoloc.boxes import read_boxes
from tomoloc.cli import TRAIN_DEFAULTS, app
from tomoloc.training import TrainConfig

N = 32
LETTER_Z = (N // 8, N - N // 8)  # axis-0 slices that show the letter; the rest is noise


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rot")
    vols = []
    for s in range(8):
        p = d / f"f_{s}.npy"
        np.save(p, f_volume(s, N))
        vols.append(str(p))
    res = run("train", *vols, "--task", "rotation", "--out", d / "run", "--axes", "0", "--input-size", 32,
              "--epochs", 3, "--steps", 40, "--batch-size", 16, "--seed", 0)
    assert res.exit_code == 0, res.output
    return d, vols


def test_train_writes_a_complete_run(trained):
    d, vols = trained
    run_dir = d / "run"
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["config"]["task"] == "rotation" and doc["config"]["axes"] == [0]
    assert doc["config"]["num_workers"] == 0  # no --workers on CPU: loading in the training process
    assert doc["volumes"] == vols
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch") and any(",0." in r for r in rows[1:])
    # a second run into the same folder is refused, resuming with more epochs works
    res = run("train", *vols, "--out", run_dir, "--axes", "0", "--input-size", 32, "--epochs", 3, "--steps", 40,
              "--batch-size", 16)
    assert res.exit_code == 2 and "already holds a run" in res.stderr
    res = run("train", *vols, "--out", run_dir, "--axes", "0", "--input-size", 32, "--epochs", 4, "--steps", 40,
              "--batch-size", 16, "--resume")
    assert res.exit_code == 0, res.output
    res = run("train", *vols, "--out", run_dir, "--axes", "0", "--input-size", 48, "--epochs", 5, "--resume")
    assert res.exit_code == 2 and "input_size" in res.stderr


def test_localize_rotation_finds_the_letter_slices(trained, tmp_path):
    d, vols = trained
    out = tmp_path / "boxes.json"
    res = run("localize", *vols[:2], "--method", "rotation", "--model", d / "run", "--out", out)
    assert res.exit_code == 0, res.output
    recs = read_boxes(out)
    assert [r.method for r in recs] == ["rotation", "rotation"]
    for r in recs:
        (z0, z1) = r.bbox[0]
        assert abs(z0 - LETTER_Z[0]) <= 3 and abs(z1 - LETTER_Z[1]) <= 3, r.bbox
        stem = r.name[:-4]
        prof = np.load(tmp_path / "boxes_details" / f"{stem}_profiles.npz")
        assert prof["axis0"].shape == (N,)
        # certain on the letter, unsure on pure noise
        assert prof["axis0"][LETTER_Z[0] + 2:LETTER_Z[1] - 2].mean() > prof["axis0"][:LETTER_Z[0] - 1].mean() + 0.2
        # the measured featureless certainty is that of the volume's own pure-noise slices
        assert abs(float(prof["floor0"]) - prof["axis0"][:LETTER_Z[0] - 1].mean()) < 0.05  # 0.2400 / 0.2403 seen
        assert "floor1" not in prof and "floor2" not in prof  # axis 0 only, by default
        png = (tmp_path / "boxes_details" / f"{stem}.png").read_bytes()
        width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
        assert height > 0.9 * width  # profiles, views and the volume's projections
    assert json.loads(out.read_text())["config"]["model"] == str(d / "run")


def test_rotation_in_bf16_gives_nearly_the_float32_profile_and_the_same_letter_slices(trained, tmp_path):
    from tomoloc.localize.rotation import RotationLocalizer

    d, vols = trained
    vol = np.load(vols[0])
    locs = [RotationLocalizer(d / "run", device="cpu", precision=p).localize(vol) for p in ("32", "bf16")]
    p32, p16 = (np.asarray(loc.details["profiles"][0]) for loc in locs)
    assert np.abs(p32 - p16).max() < 0.01 and not np.array_equal(p32, p16)  # 5e-4 seen
    (z0, z1) = locs[1].bbox[0]
    assert abs(z0 - LETTER_Z[0]) <= 3 and abs(z1 - LETTER_Z[1]) <= 3, locs[1].bbox
    out = tmp_path / "b.json"
    res = run("localize", vols[0], "--method", "rotation", "--model", d / "run", "--out", out, "--precision", "bf16")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["config"]["precision"] == "bf16"


def test_a_model_trained_on_the_holder_interior_boxes_in_the_whole_volume(trained):
    from tomoloc.holder import find_interior
    from tomoloc.localize.rotation import RotationLocalizer

    d, vols = trained
    # The letter volumes have no holder (a thin letter is not a container): the run's
    # default holder="interior" gave the network the whole view.
    assert json.loads((d / "run" / "config.json").read_text())["config"]["holder"] == "interior"
    # Now the letter inside an off-centre tube with a medium, 32 x 64 x 64.
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 30, xx - 34)
    vol = np.where(r < 24, 0.3, 0.0)[None].repeat(N, 0).astype(np.float32)
    vol[:, (r >= 24) & (r < 27)] = 1.0
    vol[:, 14:46, 18:50] += f_volume(0, N, noise=0.0)
    vol += np.random.default_rng(0).normal(0, 0.1, vol.shape).astype(np.float32)
    loc = RotationLocalizer(d / "run", device="cpu")
    res = loc.localize(vol)
    inner = find_interior(vol)
    assert inner.found and res.details["offset"] == list(inner.offset) != [0, 0, 0]
    assert len(res.details["profiles"][1]) == inner.y[1] - inner.y[0]  # profiles on the view
    (z0, z1), (y0, y1), (x0, x1) = res.bbox  # on the whole volume: inside the tube's wall
    assert abs(z0 - LETTER_Z[0]) <= 3 and abs(z1 - LETTER_Z[1]) <= 3, res.bbox
    assert inner.y[0] - inner.wall <= y0 < y1 <= inner.y[1] + inner.wall
    assert inner.x[0] - inner.wall <= x0 < x1 <= inner.x[1] + inner.wall


def test_rotation_batch_size_does_not_change_the_profiles(trained):
    from tomoloc.localize.rotation import RotationLocalizer

    d, vols = trained
    vol = np.load(vols[0])
    auto = RotationLocalizer(d / "run", device="cpu")
    res = auto.localize(vol)
    assert auto._batch() == 32  # the CPU default: as fast as 128 pairs, 126 MiB lower peak (BENCHMARKS.md)
    small = RotationLocalizer(d / "run", device="cpu", batch_size=5)  # batches that do not divide N
    res5 = small.localize(vol)
    assert small._batch() == 5 and res5.bbox == res.bbox
    for a in res.details["profiles"]:
        np.testing.assert_allclose(res5.details["profiles"][a], res.details["profiles"][a], atol=1e-5)


def test_rotation_needs_a_model_of_the_right_kind(trained, tmp_path):
    d, vols = trained
    res = run("localize", vols[0], "--method", "rotation", "--out", tmp_path / "b.json")
    assert res.exit_code == 2 and "--model" in res.stderr
    res = run("localize", vols[0], "--method", "rotation", "--model", tmp_path / "nothing", "--out", tmp_path / "b.json")
    assert res.exit_code == 2 and "nothing" in res.stderr
    assert not (tmp_path / "b.json").exists()


def test_train_rejects_bad_input(tmp_path):
    res = run("train", tmp_path / "missing.npy", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "missing.npy" in res.stderr
    np.save(tmp_path / "v.npy", np.zeros((8, 8, 8), np.float32) + np.arange(8))
    assert run("train", tmp_path / "v.npy", "--out", tmp_path / "r", "--axes", "0,x").exit_code == 2
    assert run("train", tmp_path / "v.npy", "--out", tmp_path / "r", "--angle-step", "7").exit_code == 2
    assert not (tmp_path / "r").exists()


def test_cli_defaults_mirror_the_training_config():
    cfg = TrainConfig()
    for name in ("epochs", "steps_per_epoch", "batch_size", "backbone", "input_size", "k", "step", "lr", "margin",
                 "sampling"):
        assert getattr(TRAIN_DEFAULTS, name) == getattr(cfg, name), name
    for task in ("rotation", "sorting"):
        assert TRAIN_DEFAULTS.axes[task] == TrainConfig(task=task).axes
    assert TrainConfig(task="rotation").holder == "interior" and TrainConfig(task="sorting").holder == "none"


def test_localize_runs_the_network_on_the_device_asked_for(trained, tmp_path):
    import torch

    d, vols = trained
    res = run("localize", vols[0], "--method", "rotation", "--model", d / "run", "--out", tmp_path / "cpu.json",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cpu.json").read_text())["config"]["device"] == "cpu"
    auto = run("localize", vols[0], "--method", "rotation", "--model", d / "run", "--out", tmp_path / "auto.json")
    assert auto.exit_code == 0, auto.output
    if not torch.cuda.is_available():  # on a CPU-only machine auto is the CPU: the same box
        assert read_boxes(tmp_path / "cpu.json")[0].bbox == read_boxes(tmp_path / "auto.json")[0].bbox
    bad = [("tpu0", "not a device"), ("cuda:99", "cuda"), ("cpu", "self-supervised")]
    for device, said in bad:
        args = ["--method", "rotation", "--model", d / "run"] if device != "cpu" else ["--method", "multiotsu"]
        res = run("localize", vols[0], *args, "--out", tmp_path / "bad.json", "--device", device)
        assert res.exit_code == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "bad.json").exists()
