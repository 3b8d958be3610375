"""Outputs never land in, over or around an input; odd crops round-trip; margins are whole voxels."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tomoloc import io
from tomoloc.boxes import BoxRecord, expand_bbox, write_boxes
from tomoloc.cli import app
from tomoloc.crop import BoxView, crop_volume, input_clash


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]


def volume(seed=0, shape=(12, 16, 16)):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.05, shape).astype(np.float32)
    v[3:9, 4:12, 5:11] += 1.0
    return v


def boxes_for(tmp_path, *paths, bbox=((3, 9), (4, 12), (5, 11))):
    f = tmp_path / "boxes.json"
    write_boxes(f, [BoxRecord(volume=str(p), shape=(12, 16, 16), bbox=bbox, method="truth") for p in paths])
    return f


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("fmt,name", [("tiff-dir", "scan"), ("zarr", "scan.zarr")])
def test_crop_into_a_folder_input_is_refused_and_the_input_untouched(tmp_path, fmt, name):
    src = tmp_path / name
    io.save_volume(src, volume(), fmt)
    before = listing(src)
    boxes = boxes_for(tmp_path, src)
    # The crop would be scan/scan.tif: a stray page in a slice folder, a second array in a store.
    res = run("crop", src, "--boxes", boxes, "--out", src, "--format", "tiff")
    one_error_line(res, "inside its input", "choose another --out")
    assert listing(src) == before
    with io.open_volume(src) as v:
        assert v.shape == (12, 16, 16)


def test_run_with_out_inside_a_slice_folder_deletes_nothing(tmp_path):
    src = tmp_path / "scan"
    io.save_volume(src, volume(), "tiff-dir")
    before = listing(src)
    res = run("run", src, "--out", src / "cropped", "--delete-originals")
    one_error_line(res, "inside its input")
    assert listing(src) == before  # no crop, no job folder, nothing deleted


def test_overwrite_never_replaces_the_folder_that_holds_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vol").mkdir()
    np.save(tmp_path / "vol" / "vol.npy", volume())
    boxes = boxes_for(tmp_path, "vol/vol.npy")
    # vol/vol.npy cropped as a slice folder into "." is ./vol: the folder holding the input.
    res = run("crop", "vol/vol.npy", "--boxes", boxes, "--out", ".", "--format", "tiff-dir", "--overwrite")
    one_error_line(res, "replace a folder that holds its input")
    assert (tmp_path / "vol" / "vol.npy").is_file()
    assert not (tmp_path / "crop_manifest.json").exists()


def test_input_clash_cases(tmp_path):
    (tmp_path / "scan").mkdir()
    assert input_clash(tmp_path / "a.npy", tmp_path / "a.npy") == "the crop would overwrite its own input"
    assert "inside its input" in input_clash(tmp_path / "scan" / "x.tif", tmp_path / "scan")
    assert "holds its input" in input_clash(tmp_path / "scan", tmp_path / "scan" / "x.npy")
    assert "inside its input" in input_clash(tmp_path / "f.h5" / "x", str(tmp_path / "f.h5") + ":/data")
    assert input_clash(tmp_path / "out" / "a.npy", tmp_path / "a.npy") is None  # a sibling folder is fine


@pytest.mark.parametrize("command", ["crop", "run"])
def test_out_under_a_file_is_one_line(tmp_path, command):
    src = tmp_path / "v.npy"
    np.save(src, volume())
    (tmp_path / "f").write_text("not a folder")
    extra = ["--boxes", boxes_for(tmp_path, src)] if command == "crop" else []
    one_error_line(run(command, src, *extra, "--out", tmp_path / "f" / "x"), "f is a file, not a folder")
    one_error_line(run(command, src, *extra, "--out", tmp_path / "f"), "a file, not a folder")
    assert (tmp_path / "f").read_text() == "not a folder"


def test_a_second_crop_into_the_same_folder_keeps_the_first_ones_rows(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, volume(0))
    np.save(b, volume(1))
    boxes = boxes_for(tmp_path, a, b)
    assert run("crop", a, "--boxes", boxes, "--out", tmp_path / "out").exit_code == 0
    res = run("crop", b, "--boxes", boxes, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    # The summary is this run's one volume (12*16*16 float32 and the 128-byte header) ...
    assert "total 12,416 -> " in res.stdout and "1 done, 0 failed" in res.stdout
    # ... and the folder's manifest holds both.
    doc = json.loads((tmp_path / "out" / "crop_manifest.json").read_text())
    assert [r["volume"] for r in doc["volumes"]] == [str(a), str(b)]
    assert doc["done"] == 2 and all(r["verified"] for r in doc["volumes"])


def test_int64_tiff_crops_to_zarr_and_a_one_column_mask_to_tiff(tmp_path):
    import tifffile

    data = np.arange(12 * 16 * 16, dtype=np.int64).reshape(12, 16, 16)
    tifffile.imwrite(tmp_path / "i.tif", data)
    with io.open_volume(tmp_path / "i.tif") as v:
        assert v.dtype.char == "q"  # how tifffile hands int64 back: zarr refused that spelling
    r = crop_volume(tmp_path / "i.tif", [[1, 5], [2, 9], [3, 4]], tmp_path / "out", fmt="zarr")
    with io.open_volume(r.output) as v:
        assert v.dtype == np.int64 and np.array_equal(v[:, :, :], data[1:5, 2:9, 3:4])
    mask = data % 3 == 0
    np.save(tmp_path / "m.npy", mask)
    r = crop_volume(tmp_path / "m.npy", [[1, 4], [0, 6], [6, 7]], tmp_path / "out", fmt="tiff")
    with io.open_volume(r.output) as v:
        assert v.dtype == np.bool_ and np.array_equal(v[:, :, :], mask[1:4, 0:6, 6:7])


def test_box_view_backward_slices_match_numpy():
    data = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    for bbox in (((0, 3), (0, 6), (0, 7)), ((1, 4), (2, 5), (0, 3))):
        view = BoxView(data, bbox)
        ref = data[tuple(slice(lo, hi) for lo, hi in bbox)]
        for key in (np.s_[::-1], np.s_[::-2, 1:, ::-1], np.s_[2::-1], np.s_[:0:-1]):
            assert np.array_equal(view[key], ref[key]), key


def test_margins_are_whole_voxels():
    box, shape = ((2, 5), (2, 5), (2, 5)), (10, 10, 10)
    assert expand_bbox(box, np.array(2), shape) == expand_bbox(box, 2, shape) == expand_bbox(box, 2.0, shape)
    for bad in (1.7, (1, 2), True, -1):
        with pytest.raises(ValueError, match="margin must be"):
            expand_bbox(box, bad, shape)
