"""Fine-tuning and segmentation: IoU, slice choice, labelled data, a toy run, the CLI end to end."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tomoloc.cli import SEG_DEFAULTS, app
from tomoloc.io import VolumeError
from tomoloc.segmentation import (
    SegConfig,
    finetune,
    iou_per_class,
    load_labelled,
    load_segmenter,
    predict_labels,
    select_slices,
)

SHAPE = (16, 32, 32)


def toy_pair(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Noise with a bright ball (label 3) inside a dim slab (label 1); float32 volume, uint8 labels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    c = np.array(shape, np.float32) / 2 + rng.uniform(-3, 3, 3)
    ball = ((z - c[0]) / 5) ** 2 + ((y - c[1]) / 7) ** 2 + ((x - c[2]) / 7) ** 2 <= 1
    slab = (np.abs(y - c[1]) < 10) & ~ball
    vol = rng.normal(0, 0.15, shape) + 0.5 * slab + 1.5 * ball
    lab = np.where(ball, 3, np.where(slab, 1, 0)).astype(np.uint8)
    return vol.astype(np.float32), lab


def test_iou_per_class_by_hand():
    target = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    pred = np.array([1, 1, 0, 2, 2, 0, 0, 0])
    # class 1: inter 1, union 3; class 2: inter 2, union 3; class 3 empty in both: NaN
    iou = iou_per_class(pred, target, 3)
    assert iou[:2] == pytest.approx([1 / 3, 2 / 3]) and np.isnan(iou[2])


def test_select_slices_draws_from_labelled_slices_by_seed():
    t = np.zeros((10, 4, 4), np.int64)
    t[2:8, 1, 1] = 1  # slices 2..7 show the class
    picks = select_slices([t, t], 0.01, seed=0)
    assert len(picks) == 1 and 2 <= picks[0][1] <= 7
    half = select_slices([t, t], 0.5, seed=1)
    assert len(half) == 6 and all(2 <= z <= 7 for _, z in half)
    assert half == select_slices([t, t], 0.5, seed=1) and len(select_slices([t, t], 1.0, 0)) == 12
    with pytest.raises(ValueError, match="no training slice"):
        select_slices([np.zeros((3, 4, 4), np.int64)], 1.0, 0)


def test_load_labelled_maps_classes_and_checks_shapes():
    vol, lab = toy_pair(0)
    img, target = load_labelled(vol, lab, classes=(3, 1))
    assert img.shape == target.shape == SHAPE
    assert np.array_equal(target == 1, lab == 3) and np.array_equal(target == 2, lab == 1)
    # A volume downsampled 2x: labels follow on the same grid.
    img2, t2 = load_labelled(vol, lab, classes=(3,), max_voxels=SHAPE[0] * SHAPE[1] * SHAPE[2] // 8)
    assert img2.shape == t2.shape == (8, 16, 16) and np.array_equal(t2 == 1, lab[::2, ::2, ::2] == 3)
    with pytest.raises(VolumeError, match="differs"):
        load_labelled(vol, lab[:-1], classes=(3,))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    pairs = [toy_pair(s) for s in range(5)]
    cfg = SegConfig(classes=(3,), input_size=32, batch_size=8, epochs=3, steps_per_epoch=10, seed=0)
    metrics = finetune([p[0] for p in pairs[:4]], [p[1] for p in pairs[:4]], d, cfg,
                       test_volumes=[pairs[4][0]], test_labels=[pairs[4][1]], label_names={3: "ball"})
    return d, metrics, pairs


def test_finetune_beats_an_all_background_predictor(toy_run):
    d, metrics, pairs = toy_run
    truth = (pairs[4][1] == 3).astype(np.int64)
    # Background everywhere gives IoU 0 for the ball; ball everywhere its volume share, about 0.06.
    assert iou_per_class(np.zeros_like(truth), truth, 1)[0] == 0
    everywhere = iou_per_class(np.ones_like(truth), truth, 1)[0]
    assert metrics["held_out"] and metrics["iou"]["ball"] > max(0.25, 3 * everywhere), metrics
    assert json.loads((d / "metrics.json").read_text()) == metrics
    net, cfg = load_segmenter(d)
    labels = predict_labels(net, cfg, pairs[4][0])
    assert labels.shape == SHAPE and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 3}
    inter = np.sum((labels == 3) & (pairs[4][1] == 3))
    assert inter / np.sum((labels == 3) | (pairs[4][1] == 3)) == pytest.approx(metrics["iou"]["ball"])


def test_finetune_refuses_to_overwrite(toy_run):
    d, _, pairs = toy_run
    with pytest.raises(FileExistsError):
        finetune([pairs[0][0]], [pairs[0][1]], d, SegConfig(classes=(3,), input_size=32))


def test_seg_defaults_mirror_the_config():
    cfg = SegConfig()
    for name in ("classes", "fraction", "input_size", "batch_size", "epochs", "steps_per_epoch", "lr", "holdout",
                 "backbone"):
        assert getattr(SEG_DEFAULTS, name) == getattr(cfg, name), name


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_pretrain_finetune_segment(tmp_path):
    vols, labs = [], []
    for s in range(4):
        v, lab = toy_pair(s)
        vols.append(tmp_path / f"v_{s}.npy")
        labs.append(tmp_path / f"v_{s}_labels.npy")
        np.save(vols[-1], v)
        np.save(labs[-1], lab)
    res = run("pretrain", *vols, "--method", "simclr", "--out", tmp_path / "pre", "--epochs", 1, "--steps", 2,
              "--batch-size", 4, "--input-size", 32)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pre" / "encoder.safetensors").is_file()
    common = ["--classes", 3, "--input-size", 32, "--batch-size", 4, "--epochs", 1, "--steps", 3, "--holdout", 0.25]
    res = run("finetune", *vols, "--labels", str(tmp_path / "v_*_labels.npy"), "--encoder", tmp_path / "pre",
              "--fraction", 0.01, "--out", tmp_path / "seg", *common)
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output
    assert json.loads((tmp_path / "seg" / "metrics.json").read_text())["held_out"] is True
    doc = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert doc["config"]["encoder"] == str(tmp_path / "pre") and len(doc["train_slices"]) == 1
    res = run("segment", vols[0], vols[1], "--model", tmp_path / "seg", "--out", tmp_path / "labels")
    assert res.exit_code == 0, res.output
    out = np.load(tmp_path / "labels" / "v_0_labels.npy")
    assert out.shape == SHAPE and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 3}
    # Again without --overwrite: refused, nothing changed.
    res = run("segment", vols[0], "--model", tmp_path / "seg", "--out", tmp_path / "labels")
    assert res.exit_code == 2 and res.output.startswith("tomoloc: error:") and "already exists" in res.output


def test_cli_finetune_errors_are_one_line(tmp_path):
    v, lab = toy_pair(0)
    np.save(tmp_path / "v.npy", v)
    np.save(tmp_path / "w.npy", v)
    np.save(tmp_path / "l.npy", lab)
    np.save(tmp_path / "short.npy", lab[:-1])
    base = ["--out", tmp_path / "seg", "--input-size", 32]
    cases = [
        (["finetune", tmp_path / "v.npy", tmp_path / "w.npy", "--labels", tmp_path / "l.npy", "--encoder", "none"],
         "1 label volume(s) for 2 volume(s)"),
        (["finetune", tmp_path / "v.npy", "--labels", tmp_path / "l.npy", "--encoder", tmp_path / "nothing"],
         "encoder.safetensors"),
        (["finetune", tmp_path / "v.npy", "--labels", tmp_path / "short.npy", "--encoder", "none"], "differs"),
        (["finetune", tmp_path / "v.npy", "--labels", tmp_path / "l.npy", "--encoder", "none", "--classes", "x"],
         "--classes"),
        (["segment", tmp_path / "v.npy", "--model", tmp_path / "nothing", "--out", tmp_path / "o"], "config.json"),
    ]
    for args, msg in cases:
        res = run(*args, *(base if args[0] == "finetune" else []))
        assert res.exit_code == 2, res.output
        assert res.output.startswith("tomoloc: error:") and msg in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "seg").exists() and not (tmp_path / "o").exists()


def test_predict_labels_restores_the_full_shape_of_a_downsampled_volume(toy_run):
    import dataclasses

    d, _, pairs = toy_run
    net, cfg = load_segmenter(d)
    vol = pairs[4][0][:, :, :30]  # 16 x 32 x 30: blocks of 2 leave a partial block along X
    small = dataclasses.replace(cfg, max_voxels=vol.size // 8 + 1)
    labels = predict_labels(net, small, vol)
    assert labels.shape == vol.shape and labels.dtype == np.uint8
    # Nearest upsampling: every 2x2x2 block carries one label.
    assert np.array_equal(labels[::2, ::2, ::2].repeat(2, 0).repeat(2, 1).repeat(2, 2)[:, :, :30], labels)
