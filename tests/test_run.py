"""`tomoloc run` (the batch job) and the sorting commands, end to end on tiny batches."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_cli import bad_volume, digest, one_error_line
from test_sorting import cone_volume
from tomoloc.boxes import read_boxes
from tomoloc.io import open_volume
from tomoloc.localize.base import largest_component_bbox
from tomoloc.localize.sorting import top_region
from tomoloc.pipeline import RunConfig, border_touch


def run(*args):
    return CliRunner().invoke(app_(), [str(a) for a in args])


def app_():
    from tomoloc.cli import app

    return app


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("runbatch")
    res = run("synth", d, "--n", 4, "--kind", "mixed", "--shape", 24, 32, 32, "--seed", 5)
    assert res.exit_code == 0, res.output
    gt = d / "ground_truth.json"
    return d, gt, [str(d / r.volume) for r in read_boxes(gt)]


def test_run_otsu_crops_reports_and_never_touches_inputs(batch, tmp_path):
    d, gt, vols = batch
    before = [digest(v) for v in vols]
    out = tmp_path / "out"
    res = run("run", *vols, "--out", out, "--method", "otsu", "--margin", 3)
    assert res.exit_code == 0, res.output
    assert [digest(v) for v in vols] == before
    man = json.loads((out / "manifest.json").read_text())
    boxes = {r.name: r for r in read_boxes(out / "boxes.json")}
    assert len(man["volumes"]) == 4 and set(boxes) == {f"vol_00{i}.npy" for i in range(4)}
    for row in man["volumes"]:
        bbox = boxes[row["volume"].split("/")[-1]].bbox
        assert row["bbox"] == [list(b) for b in bbox]
        # the margin means exactly 3 voxels per side, clipped to the volume
        assert row["crop_bbox"] == [[max(0, lo - 3), min(n, hi + 3)] for (lo, hi), n in zip(bbox, row["shape"])]
        crop = np.load(row["output"])
        src = np.load(row["volume"])
        (z0, z1), (y0, y1), (x0, x1) = row["crop_bbox"]
        np.testing.assert_array_equal(crop, src[z0:z1, y0:y1, x0:x1])
        assert row["bytes_after"] <= row["bytes_before"] and row["seconds"] >= 0
        assert bool(row["flags"]) == bool(border_touch(bbox, row["shape"]))
    assert man["reduction"] == pytest.approx(man["bytes_before"] / man["bytes_after"], rel=1e-3)
    html = (out / "report.html").read_text()
    assert html.count("<section>") == 4 and "data:image/png;base64," in html
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"]["margin"] == 3 and cfg["config"]["method"] == "otsu" and cfg["inputs"] == vols
    assert "reduction" in res.stdout
    assert all(row["status"] == "done" and row["verified"] and not row["original_deleted"] for row in man["volumes"])
    crops = {row["output"]: (Path(row["output"]).stat().st_mtime_ns, digest(row["output"])) for row in man["volumes"]}
    # the same job again resumes: every volume is already done, no crop is rewritten
    res = run("run", *vols, "--out", out, "--method", "otsu", "--margin", 3)
    assert res.exit_code == 0, res.output
    assert "4 volume(s) already done" in res.stderr
    assert {o: (Path(o).stat().st_mtime_ns, digest(o)) for o in crops} == crops
    assert json.loads((out / "manifest.json").read_text())["volumes"] == man["volumes"]
    # a job folder written before run configs had "precision" resumes as float32
    doc = json.loads((out / "run_config.json").read_text())
    del doc["config"]["precision"]
    (out / "run_config.json").write_text(json.dumps(doc))
    res = run("run", *vols, "--out", out, "--method", "otsu", "--margin", 3)
    assert res.exit_code == 0 and "4 volume(s) already done" in res.stderr, res.output
    # other options are refused (resuming would mix two configurations), and change nothing
    stamp = (out / "manifest.json").stat().st_mtime_ns
    res = run("run", *vols, "--out", out, "--method", "otsu")
    one_error_line(res, "another configuration", "margin 3 -> 4", "--overwrite")
    res = run("run", *vols, "--out", out, "--method", "otsu", "--margin", 3, "--no-resume")
    one_error_line(res, "already holds", "--overwrite")
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert [digest(v) for v in vols] == before
    # the defaults: multi-Otsu boxes, 4 voxels of margin
    assert run("run", *vols, "--out", out, "--overwrite").exit_code == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["margin"] == 4 and man["config"]["method"] == "multiotsu"
    assert all(row["status"] == "done" and row["verified"] for row in man["volumes"])


def test_run_in_another_format(batch, tmp_path):
    _, _, vols = batch
    res = run("run", vols[0], "--out", tmp_path / "o", "--method", "otsu", "--format", "h5")
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "o" / "manifest.json").read_text())["volumes"][0]
    assert row["output"].endswith(".h5")
    with open_volume(row["output"]) as v:
        (z0, z1), (y0, y1), (x0, x1) = row["crop_bbox"]
        np.testing.assert_array_equal(v.read(), np.load(vols[0])[z0:z1, y0:y1, x0:x1])


@pytest.mark.parametrize("kind", ["missing", "2d"])
def test_run_bad_input_leaves_nothing(batch, tmp_path, kind):
    # found before any work: the job stops with nothing written
    _, _, vols = batch
    p = bad_volume(tmp_path, kind)
    out = tmp_path / "out"
    res = run("run", vols[0], p, "--out", out, "--method", "otsu")
    one_error_line(res, p.name)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_run_bad_values_fail_that_volume_only(batch, tmp_path, kind):
    # found at run time: the volume is recorded as failed, the others are done
    _, _, vols = batch
    p = bad_volume(tmp_path, kind)
    out = tmp_path / "out"
    res = run("run", vols[0], p, vols[1], "--out", out, "--method", "otsu")
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("tomoloc: error:")]
    assert len(errors) == 1 and p.name in errors[0] and ("NaN" if kind == "nan" else "constant") in errors[0]
    man = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in man["volumes"]] == ["done", "failed", "done"]
    assert man["failed"] == 1 and man["volumes"][1]["attempts"] == 1  # bad values are not retried
    assert not (out / p.name).exists() and not list(out.glob(".*tmp*"))
    assert [r.name for r in read_boxes(out / "boxes.json")] == ["vol_000.npy", "vol_001.npy"]
    assert "1 failed" in res.stdout


def test_run_bad_arguments(batch, tmp_path):
    _, _, vols = batch
    assert run("run", vols[0], "--out", tmp_path / "o", "--margin", -1).exit_code == 2
    assert run("run", vols[0], "--out", tmp_path / "o", "--method", "nope").exit_code == 2
    one_error_line(run("run", vols[0], "--out", tmp_path / "o", "--method", "otsu", "--model", tmp_path),
                   "--model")
    one_error_line(run("run", vols[0], vols[0], "--out", tmp_path / "o", "--method", "otsu"), "vol_000")
    one_error_line(run("run", vols[0], "--out", tmp_path / "o", "--precision", "bf16"), "--precision")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError):
        RunConfig(method="sorting", margin=-2)
    # each method's default margin, and a given margin means exactly that
    assert [RunConfig(method=m).margin for m in ("multiotsu", "otsu", "sorting", "rotation")] == [4, 4, 16, 16]
    assert RunConfig(method="rotation", margin=0).margin == 0 and RunConfig(margin=7).margin == 7
    with pytest.raises(ValueError, match="precision"):
        RunConfig(method="sorting", precision="fp8")
    assert RunConfig(method="sorting", precision="bf16").precision == "bf16"


def test_output_names_disambiguate_same_named_inputs(tmp_path):
    from tomoloc.crop import output_names

    # Unique stems keep their names (a format change only changes the suffix).
    assert output_names(["x/a.npy", "y/b.h5"], ["npy", "zarr"]) == ["a.npy", "b.zarr"]
    # The beamline layout: one folder per sample, every volume named alike.
    got = output_names(["s/alpha/volume.npy", "s/beta/volume.npy", "s/beta/other.npy"], ["npy"] * 3)
    assert got == ["alpha_volume.npy", "beta_volume.npy", "other.npy"]
    # The nearest parent is not enough: two levels are used.
    got = output_names(["r1/scan/v.h5", "r2/scan/v.h5"], ["h5", "h5"])
    assert got == ["r1_scan_v.h5", "r2_scan_v.h5"]
    # A name already used in the folder (a resumed job's) is not reused.
    assert output_names(["new/a.npy"], ["npy"], taken=["a.npy"]) == ["new_a.npy"]
    with pytest.raises(ValueError, match="given twice"):
        output_names(["d/a.npy", "d/a.npy"], ["npy", "npy"])


def test_run_and_crop_same_named_volumes_in_separate_folders(batch, tmp_path):
    import shutil

    d, gt, vols = batch
    inputs = []
    for k, v in enumerate(vols[:2]):
        (tmp_path / f"sample{k}").mkdir()
        inputs.append(tmp_path / f"sample{k}" / "volume.npy")
        shutil.copy(v, inputs[-1])
    res = run("run", *inputs, "--out", tmp_path / "out", "--margin", 2)
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [Path(r["output"]).name for r in man["volumes"]] == ["sample0_volume.npy", "sample1_volume.npy"]
    # each volume's picture is its own (same-named inputs once shared, and overwrote, one figure)
    views = [Path(r["views"]) for r in man["volumes"]]
    assert [p.name for p in views] == ["sample0_volume_views.png", "sample1_volume_views.png"]
    assert views[0].read_bytes() != views[1].read_bytes()

    width, height = struct.unpack(">II", views[0].read_bytes()[16:24])
    assert height > 0.6 * width  # the slices, and below them the volume's projections
    report = (tmp_path / "out" / "report.html").read_text()
    assert "sample0/volume.npy" in report and "sample1/volume.npy" in report
    for r, v in zip(man["volumes"], vols):
        sl = tuple(slice(lo, hi) for lo, hi in r["crop_bbox"])
        np.testing.assert_array_equal(np.load(r["output"]), np.load(v)[sl])
    # crop matches each box to its volume by path when names repeat
    res = run("crop", *inputs, "--boxes", tmp_path / "out" / "boxes.json", "--out", tmp_path / "c", "--margin", 2)
    assert res.exit_code == 0, res.output
    for r in man["volumes"]:
        assert digest(tmp_path / "c" / Path(r["output"]).name) == digest(r["output"])


def test_border_touch():
    assert border_touch(((0, 4), (2, 8), (1, 10)), (10, 8, 10)) == ["axis 0 start", "axis 1 end", "axis 2 end"]
    assert border_touch(((1, 4), (2, 7), (1, 9)), (10, 8, 10)) == []


@pytest.fixture(scope="module")
def cones(tmp_path_factory):
    d = tmp_path_factory.mktemp("cones")
    paths = []
    for s in range(6):
        p = d / f"cone_{s}.npy"
        np.save(p, cone_volume(s))
        paths.append(str(p))
    return d, paths


def test_sorting_train_localize_and_run_end_to_end(cones, tmp_path):
    d, vols = cones
    res = run("train", *vols, "--task", "sorting", "--out", tmp_path / "m", "--input-size", 32, "--epochs", 2,
              "--steps", 20, "--batch-size", 16, "--sampling", "gengauss", "--margin", 0.5)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["config"]["task"] == "sorting" and doc["config"]["axes"] == [0, 1, 2]
    assert doc["config"]["sampling"] == "gengauss" and doc["config"]["margin"] == 0.5
    header = (tmp_path / "m" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "val_md" in header and "train_md" in header

    res = run("localize", *vols[:2], "--method", "sorting", "--model", tmp_path / "m", "--out", tmp_path / "b.json",
              "--mc-samples", 4, "--top-fraction", 0.1)
    assert res.exit_code == 0, res.output
    recs = read_boxes(tmp_path / "b.json")
    assert len(recs) == 2 and all(r.method == "sorting" for r in recs)
    doc = json.loads((tmp_path / "b.json").read_text())
    assert (doc["config"]["slice_level"], doc["config"]["orient"]) == ("median", True)
    assert all(isinstance(b["mirrored"], bool) for b in doc["boxes"])
    res = run("localize", vols[0], "--method", "sorting", "--model", tmp_path / "m", "--out", tmp_path / "p.json",
              "--mc-samples", 4, "--paper-variance")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert (doc["config"]["slice_level"], doc["config"]["orient"], doc["boxes"][0]["mirrored"]) == ("none", False, False)
    det = tmp_path / "b_details"
    assert (det / "cone_0.png").is_file()
    with np.load(det / "cone_0_variance.npz") as z:
        assert z["score"].shape == (32, 32, 32) and z["axis0"].shape == (32, 4, 4)
        # the box is that of the largest connected region of the saved score's top 10% (what the figure shows)
        region, _ = top_region(z["score"], 0.1)
        assert recs[0].bbox == largest_component_bbox(region)
        assert region.sum() >= 0.25 * np.count_nonzero(z["score"] >= np.quantile(z["score"], 0.9))
    # same-named volumes in separate folders get their own figures, named as their crops would be
    import shutil

    same = []
    for k in range(2):
        (tmp_path / f"s{k}").mkdir()
        same.append(tmp_path / f"s{k}" / "cone.npy")
        shutil.copy(vols[k], same[-1])
    res = run("localize", *same, "--method", "sorting", "--model", tmp_path / "m", "--out", tmp_path / "s.json",
              "--mc-samples", 4)
    assert res.exit_code == 0, res.output
    figs = [tmp_path / "s_details" / f"s{k}_cone.png" for k in range(2)]
    assert all(f.is_file() for f in figs) and figs[0].read_bytes() != figs[1].read_bytes()
    width, height = struct.unpack(">II", figs[0].read_bytes()[16:24])
    assert height > 1.0 * width  # variance, views and the volume's projections
    # a rotation model is refused for --method sorting and vice versa
    one_error_line(run("localize", vols[0], "--method", "rotation", "--model", tmp_path / "m",
                       "--out", tmp_path / "x.json"), "sorting")

    # bf16 passes: the same dropout masks, the score nearly the same as float32's, recorded in the box file
    from tomoloc.localize.sorting import SortingLocalizer

    vol = np.load(vols[0])
    scores = []
    for p in ("32", "bf16"):
        det = SortingLocalizer(tmp_path / "m", mc_samples=4, device="cpu", precision=p).localize(vol).details
        # undo the orientation: on this tiny model its two sides can be a near tie that bf16 tips
        s = det["score"]
        scores.append(s.max() + s.min() - s if det["mirrored"] else s)
    assert np.corrcoef(scores[0].ravel(), scores[1].ravel())[0, 1] > 0.99
    assert not np.array_equal(scores[0], scores[1])  # it did run in another arithmetic
    res = run("localize", vols[0], "--method", "sorting", "--model", tmp_path / "m", "--out", tmp_path / "f.json",
              "--mc-samples", 4, "--precision", "bf16")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f.json").read_text())["config"]["precision"] == "bf16"
    one_error_line(run("localize", vols[0], "--method", "sorting", "--model", tmp_path / "m",
                       "--out", tmp_path / "g.json", "--precision", "fp8"), "--precision fp8")
    with pytest.raises(ValueError, match="precision"):
        SortingLocalizer(tmp_path / "m", precision="16").localize(vol)
    assert not (tmp_path / "g.json").exists()

    # the batch job reusing the model: details and report carry the variance figures
    out = tmp_path / "run"
    res = run("run", *vols[:2], "--out", out, "--method", "sorting", "--model", tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert (out / "details" / "cone_1.png").is_file() and not (out / "model").exists()
    # the projections are drawn once, on the views figure, not again under the variance
    width, height = struct.unpack(">II", (out / "details" / "cone_1.png").read_bytes()[16:24])
    assert height < 0.9 * width
    assert struct.unpack(">II", (out / "details" / "cone_1_views.png").read_bytes()[16:24])[1] > 0.6 * width
    # no --margin: sorting's own default, 16 voxels per side (its boxes cut more than thresholding's)
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["margin"] == 16
    for row in man["volumes"]:
        want = [[max(0, lo - 16), min(n, hi + 16)] for (lo, hi), n in zip(row["bbox"], row["shape"])]
        assert row["crop_bbox"] == want
    html = (out / "report.html").read_text()
    assert len(re.findall("data:image/png;base64,", html)) == 4  # orthoviews + variance figure per volume


def test_run_trains_on_the_batch_when_no_model_is_given(cones, tmp_path):
    _, vols = cones
    out = tmp_path / "run"
    res = run("run", *vols[:3], "--out", out, "--method", "sorting", "--epochs", 1, "--steps", 3, "--margin", 1)
    assert res.exit_code == 0, res.output
    assert (out / "model" / "checkpoints" / "best.ckpt").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["train_seconds"] > 0 and len(man["volumes"]) == 3
    assert json.loads((out / "run_config.json").read_text())["model"] == str(out / "model")


def test_run_trains_on_gpu_with_loader_workers_when_there_is_one(monkeypatch):
    from tomoloc.pipeline import train_config

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cfg = RunConfig(method="sorting", seed=3, epochs=2)
    on_gpu = train_config(cfg, cuda=True)
    assert (on_gpu.task, on_gpu.seed, on_gpu.epochs, on_gpu.devices, on_gpu.num_workers) == ("sorting", 3, 2, "gpu", 14)
    on_cpu = train_config(cfg, cuda=False)
    assert (on_cpu.devices, on_cpu.num_workers) == ("auto", 0)
    forced_cpu = train_config(RunConfig(method="rotation", device="cpu"), cuda=True)
    assert (forced_cpu.devices, forced_cpu.num_workers) == ("auto", 0)


def test_a_whole_volume_box_is_flagged_as_such_and_a_face_touch_by_its_faces(tmp_path):
    rng = np.random.default_rng(3)
    whole = (100.0 + rng.normal(0, 1, (16, 24, 24))).astype(np.float32)
    whole[6:10, 8:14, 8:14] = 0.0  # a dark pocket: everything else is foreground, to every face
    face = rng.normal(0, 1, (16, 24, 24)).astype(np.float32)
    face[0:6, 8:16, 8:16] += 100.0  # an object on the axis-0 start face only
    np.save(tmp_path / "whole.npy", whole)
    np.save(tmp_path / "face.npy", face)
    res = run("run", tmp_path / "whole.npy", tmp_path / "face.npy", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    rows = {Path(r["volume"]).name: r for r in json.loads((tmp_path / "out" / "manifest.json").read_text())["volumes"]}
    assert rows["whole.npy"]["bbox"] == [[0, 16], [0, 24], [0, 24]]
    assert len(rows["whole.npy"]["flags"]) == 1
    assert rows["whole.npy"]["flags"][0].startswith("the box is the whole volume: nothing was cropped away")
    assert rows["face.npy"]["bbox"][0][0] == 0 and rows["face.npy"]["bbox"][1] != [0, 24]
    assert rows["face.npy"]["flags"] == ["the box touches the volume border (axis 0 start): "
                                         "the sample may continue outside the volume"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "the box is the whole volume" in report and "(axis 0 start)" in report
    # a margin that reaches every face: the box is not the whole volume, the crop is
    res = run("run", tmp_path / "face.npy", "--out", tmp_path / "wide", "--margin", 16)
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "wide" / "manifest.json").read_text())["volumes"]
    assert row["crop_bbox"] == [[0, 16], [0, 24], [0, 24]] and row["bbox"] != row["crop_bbox"]
    assert row["flags"][1:] == ["the crop (box and 16-voxel margin) is the whole volume: nothing was saved"]
