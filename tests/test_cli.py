"""Each CLI command end to end on a tiny synthetic batch, and each bad input."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tomoloc.boxes import read_boxes
from tomoloc.cli import app
from tomoloc.io import open_volume

SHAPE = ("20", "28", "28")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()  # no blank line either (a stopped progress bar wrote one)
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    res = run("synth", d, "--n", 3, "--kind", "mixed", "--shape", *SHAPE, "--seed", 3)
    assert res.exit_code == 0, res.output
    gt = d / "ground_truth.json"
    vols = [str(d / r.volume) for r in read_boxes(gt)]
    return d, gt, vols


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_synth_writes_volumes_and_truth(batch):
    d, gt, vols = batch
    recs = read_boxes(gt)
    assert len(recs) == 3
    for r, v in zip(recs, vols):
        with open_volume(v) as vol:
            assert vol.shape == (20, 28, 28) == tuple(r.shape)
        assert (d / r.extra["mask"]).exists()


def test_localize_evaluate_crop(batch, tmp_path):
    d, gt, vols = batch
    before = [digest(v) for v in vols]
    boxes = tmp_path / "boxes.json"
    res = run("localize", *vols, "--method", "otsu", "--out", boxes)
    assert res.exit_code == 0, res.output
    recs = read_boxes(boxes)
    assert [r.volume for r in recs] == vols and all(r.method == "otsu" for r in recs)
    assert json.loads(boxes.read_text())["config"]["method"] == "otsu"

    # no --method: multi-Otsu, and its threshold rule is recorded per volume
    res = run("localize", *vols, "--out", tmp_path / "default.json")
    assert res.exit_code == 0, res.output
    recs_default = read_boxes(tmp_path / "default.json")
    assert all(r.method == "multiotsu" and r.extra["threshold_rule"] in ("multiotsu", "otsu") for r in recs_default)

    res = run("evaluate", boxes, "--truth", gt, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["volumes"]) == 3 and 0 <= doc["mean"]["iou"] <= 1
    assert 0 <= doc["mean"]["recall"] <= 1
    res = run("evaluate", boxes, "--truth", gt)
    assert res.exit_code == 0 and "mean" in res.stdout and "iou" in res.stdout

    out = tmp_path / "cropped"
    res = run("crop", *vols, "--boxes", boxes, "--out", out, "--margin", 2)
    assert res.exit_code == 0, res.output
    assert "reduction" in res.stdout
    for r, v in zip(recs, vols):
        (z0, z1), (y0, y1), (x0, x1) = r.bbox
        want = np.load(v)[max(0, z0 - 2):z1 + 2, max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2]
        with open_volume(out / Path(v).name) as c:
            np.testing.assert_array_equal(c.read(), want)
    manifest = json.loads((out / "crop_manifest.json").read_text())
    assert manifest["config"]["margin"] == 2 and len(manifest["volumes"]) == 3
    # an existing output is not replaced without --overwrite
    one_error_line(run("crop", vols[0], "--boxes", boxes, "--out", out), "already exists")
    assert run("crop", vols[0], "--boxes", boxes, "--out", out, "--overwrite").exit_code == 0
    # a different format on request
    res = run("crop", vols[0], "--boxes", boxes, "--out", tmp_path / "tif", "--format", "tiff")
    assert res.exit_code == 0 and (tmp_path / "tif" / (Path(vols[0]).stem + ".tif")).exists()
    assert [digest(v) for v in vols] == before  # inputs untouched


def test_threshold_value_and_calibration(batch, tmp_path):
    d, gt, vols = batch
    res = run("localize", *vols, "--method", "threshold", "--calibrate", gt, "--out", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "c.json").read_text())["config"]
    assert cfg["method"] == "threshold" and "calibration_mae" in cfg
    res = run("localize", *vols, "--method", "threshold", "--value", cfg["value"], "--out", tmp_path / "v.json")
    assert res.exit_code == 0
    assert [r.bbox for r in read_boxes(tmp_path / "v.json")] == [r.bbox for r in read_boxes(tmp_path / "c.json")]
    one_error_line(run("localize", *vols, "--method", "threshold", "--out", tmp_path / "x.json"), "exactly one")
    one_error_line(run("localize", *vols, "--method", "otsu", "--value", 1, "--out", tmp_path / "x.json"), "--value")
    assert not (tmp_path / "x.json").exists()


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    fast = ("--epochs", 1, "--steps", 4)
    res = run("demo", "--out", out, "--n", 2, "--shape", *SHAPE, *fast)
    assert res.exit_code == 0, res.output
    for word in ("rotation", "sorting", "otsu", "threshold", "iou", "tomoloc run"):
        assert word in res.stdout
    html = (out / "report.html").read_text()
    assert html.count("<img") == 3 and "data:image/png;base64," in html  # boxes + profiles + variance
    for task in ("rotation", "sorting"):
        assert (out / f"{task}_run" / "checkpoints" / "best.ckpt").is_file()
    assert len(list((out / "run").glob("vol_*.npy"))) == 1  # the batch job cropped the test half
    assert (out / "run" / "report.html").is_file() and (out / "run" / "manifest.json").is_file()
    # rerunning into its own folder is fine; into a foreign non-empty folder is refused
    assert run("demo", "--out", out, "--n", 2, "--shape", *SHAPE, *fast).exit_code == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    one_error_line(run("demo", "--out", tmp_path / "mine", "--n", 2), "not a tomoloc demo folder")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


# ------------------------------------------------------------------------- bad input
def bad_volume(tmp_path, kind):
    p = tmp_path / f"{kind}.npy"
    if kind == "missing":
        return p
    if kind == "2d":
        np.save(p, np.ones((5, 5), np.float32))
    elif kind == "nan":
        a = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
        a[3, 3, 3] = np.nan
        np.save(p, a)
    elif kind == "constant":
        np.save(p, np.full((6, 7, 8), 3.0, np.float32))
    elif kind == "truncated":
        np.save(p, np.random.default_rng(0).random((16, 16, 16)))
        p.write_bytes(p.read_bytes()[:3000])
    elif kind == "unknown":
        p = tmp_path / "vol.xyz"
        p.write_bytes(b"abc")
    return p


@pytest.mark.parametrize("kind, needle", [
    ("missing", "missing"), ("2d", "3D"), ("nan", "NaN"), ("constant", "constant"),
    ("truncated", "truncat"), ("unknown", "format"),
])
def test_bad_volume_gives_one_line_exit_2_and_no_output(batch, tmp_path, kind, needle):
    _, _, vols = batch
    p = bad_volume(tmp_path, kind)
    out = tmp_path / "boxes.json"
    res = run("localize", vols[0], p, "--out", out)
    one_error_line(res, p.name)
    assert needle.lower() in res.stderr.lower()
    assert not out.exists()  # no partial output even though the first volume was fine


@pytest.mark.parametrize("kind, needle", [("nan", "NaN"), ("constant", "constant")])
def test_train_on_bad_values_writes_no_run_and_keeps_the_old_one(batch, tmp_path, kind, needle):
    _, _, vols = batch
    p = bad_volume(tmp_path, kind)
    args = ["--task", "sorting", "--epochs", 1, "--steps", 1, "--batch-size", 4]
    res = run("train", vols[0], p, "--out", tmp_path / "new", *args)
    one_error_line(res, p.name, needle)
    assert not (tmp_path / "new").exists()  # found when the volumes are read, before the run dir is made
    old = tmp_path / "old"
    assert run("train", vols[0], "--out", old, *args).exit_code == 0
    before = {f.relative_to(old): f.read_bytes() for f in old.rglob("*") if f.is_file()}
    one_error_line(run("train", vols[0], p, "--out", old, *args, "--overwrite"), needle)
    assert {f.relative_to(old): f.read_bytes() for f in old.rglob("*") if f.is_file()} == before


def test_bad_arguments_exit_2(batch, tmp_path):
    _, gt, vols = batch
    assert run("localize", vols[0], "--method", "nope").exit_code == 2
    assert run("synth", tmp_path / "s", "--shape", "4", "4").exit_code == 2
    assert run("crop", vols[0], "--boxes", gt, "--out", tmp_path / "c", "--margin", "-1").exit_code == 2
    one_error_line(run("evaluate", tmp_path / "nothing.json", "--truth", gt), "nothing.json")
    assert run("frobnicate").exit_code == 2


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "tomoloc.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "localize" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["run", "v.npy", "--out", "o", "--margin", "-1"], "run: Invalid value for '--margin'"),
    (["run", "v.npy", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["run"], "run: Missing argument"),
    (["localize", "v.npy", "--method", "foo"], "Invalid value for '--method'"),
    (["bogus"], "No such command 'bogus'"),
])
def test_argument_errors_are_one_line_with_exit_status_2(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    one_error_line(run(*args), "tomoloc: error: ", needle)
    assert list(tmp_path.iterdir()) == []  # nothing written
