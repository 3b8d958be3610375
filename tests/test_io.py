"""Tests for tomoloc.io: lazy reading, streaming atomic writing, and input errors."""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from tomoloc import io as tio
from tomoloc.io import FORMATS, Volume, VolumeError, open_volume, save_volume

DTYPES = [np.uint8, np.uint16, np.int16, np.float32, np.float64]


def _random_volume(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _target(directory: Path, fmt: str, stem: str = "vol") -> Path:
    return directory / (stem + (tio.format_suffix(fmt) or "_slices"))


def _zarr_array(group, name: str, data: np.ndarray, chunks=None):
    chunks = chunks or data.shape
    if hasattr(group, "create_array"):  # zarr >= 3
        out = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    else:
        out = group.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    out[...] = data
    return out


def _assert_volume_error(path, match: str | None = None) -> str:
    with pytest.raises(VolumeError) as info:
        with open_volume(path):
            pass
    msg = str(info.value)
    assert "\n" not in msg
    assert Path(os.fspath(path).split(":/")[0]).name in msg
    if match is not None:
        assert match in msg
    return msg


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_round_trip(fmt, shape, dtype, seed, data):
    expected = _random_volume(shape, dtype, seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_volume(_target(Path(tmp), fmt), expected, fmt)
        assert tio.detect_format(out) == fmt
        with open_volume(out) as vol:
            assert vol.format == fmt
            assert vol.shape == shape and vol.ndim == 3 and len(vol) == shape[0]
            assert vol.dtype == np.dtype(dtype)
            assert vol.nbytes == expected.nbytes
            whole = vol.read()
            assert whole.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(whole, expected)
            for axis in range(3):
                i = data.draw(st.integers(0, shape[axis] - 1), label=f"index on axis {axis}")
                got = vol.slice(axis, i)
                np.testing.assert_array_equal(got, np.take(expected, i, axis=axis))
                assert got.ndim == 2
            key = data.draw(npst.basic_indices(shape, allow_ellipsis=True), label="key")
            got = vol[key]
            np.testing.assert_array_equal(got, expected[key])
            assert np.shape(got) == np.shape(expected[key])


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_streams_from_lazy_volume_in_slabs(tmp_path, monkeypatch, fmt):
    expected = _random_volume((9, 5, 6), np.uint16, seed=3)
    src = save_volume(tmp_path / "src.h5", expected, chunks=(2, 5, 6))
    # Two slabs are in memory at once (one written, the next read ahead): two slices each.
    monkeypatch.setattr(tio, "SLAB_BYTES", 2 * 2 * 5 * 6 * 2)
    calls = []

    class Spy:
        def __init__(self, vol):
            self.shape, self.dtype, self._vol = vol.shape, vol.dtype, vol

        def __getitem__(self, key):
            calls.append(key)
            return self._vol[key]

    with open_volume(src) as vol:
        out = save_volume(_target(tmp_path, fmt, "copy"), Spy(vol), fmt, chunks=(2, 5, 6))
    assert len(calls) == 5  # ceil(9 / 2) slabs, never the whole volume
    assert sorted(len(range(9)[k]) for k in calls) == [1, 2, 2, 2, 2]
    with open_volume(out) as copy:
        np.testing.assert_array_equal(copy.read(), expected)


def test_big_endian_tiff_reads_native(tmp_path):
    expected = _random_volume((3, 4, 5), np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", expected, byteorder=">", photometric="minisblack")
    with open_volume(tmp_path / "be.tif") as vol:
        assert vol.dtype == np.dtype(np.uint16) and vol.dtype.isnative
        np.testing.assert_array_equal(vol.read(), expected)


@pytest.mark.parametrize(
    "write",
    [
        lambda p, a: tifffile.imwrite(p, a, compression="zlib", photometric="minisblack"),
        lambda p, a: tifffile.imwrite(p, a, imagej=True),
        lambda p, a: tifffile.imwrite(p, a, volumetric=True, tile=(16, 16), compression="zlib"),
    ],
    ids=["compressed-pages", "imagej", "volumetric-tiles"],
)
def test_other_tiff_layouts(tmp_path, write):
    expected = _random_volume((6, 20, 18), np.uint16)
    write(tmp_path / "v.tif", expected)
    with open_volume(tmp_path / "v.tif") as vol:
        assert vol.shape == expected.shape
        np.testing.assert_array_equal(vol[::-2, 3:, 5], expected[::-2, 3:, 5])
        np.testing.assert_array_equal(vol.read(), expected)


# ---------------------------------------------------------------------------------------------
# Volume behaviour


def test_volume_protocol(tmp_path):
    expected = _random_volume((5, 4, 3), np.int16)
    path = save_volume(tmp_path / "v.npy", expected)
    vol = open_volume(str(path))
    assert vol.path == str(path) and isinstance(vol, Volume)
    assert np.asarray(vol, dtype=np.float32).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(vol), expected)
    with pytest.raises(ValueError):
        np.asarray(vol, copy=False)
    with pytest.raises(TypeError):
        vol[0] = 1  # read-only: no __setitem__
    got = vol[1:3]
    got[...] = 0  # results are copies, never views of the file
    np.testing.assert_array_equal(vol[1:3], expected[1:3])
    assert vol[1, 2, 0] == expected[1, 2, 0]
    with pytest.raises(IndexError):
        vol[5]
    with pytest.raises(IndexError):
        vol[0, 0, 0, 0]
    with pytest.raises(TypeError):
        vol[[0, 1]]

    slabs = list(vol.iter_slabs(2))
    assert [(z0, z1) for z0, z1, _ in slabs] == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_array_equal(np.concatenate([s for _, _, s in slabs]), expected)
    assert [(z0, z1) for z0, z1, _ in vol.iter_slabs()] == [(0, 5)]

    clone = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(clone.read(), expected)
    clone.close()
    vol.close()
    with pytest.raises(ValueError, match="closed"):
        vol[0]


def test_iter_slabs_respects_slab_bytes_and_chunks(tmp_path, monkeypatch):
    path = save_volume(tmp_path / "v.zarr", np.zeros((20, 4, 4), np.uint8), chunks=(3, 4, 4))
    monkeypatch.setattr(tio, "SLAB_BYTES", 7 * 16)  # 7 slices fit; rounded down to whole chunks
    with open_volume(path) as vol:
        assert vol.slab_depth() == 6
        bounds = [(z0, z1) for z0, z1, _ in vol.iter_slabs()]
    assert bounds[0] == (0, 6) and bounds[-1] == (18, 20)


# ---------------------------------------------------------------------------------------------
# Format resolution


def test_hdf5_dataset_resolution(tmp_path):
    a = _random_volume((3, 4, 5), np.uint16, 1)
    b = _random_volume((2, 4, 5), np.float32, 2)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = a
        f["exchange/data_white"] = b
        f["entry/stack"] = b[None]  # leading singleton: usable only when asked for
        f["entry/image"] = b[0]
    with open_volume(path) as vol:  # Data Exchange default, despite other 3D datasets
        assert vol.dataset == "/exchange/data"
        np.testing.assert_array_equal(vol.read(), a)
    with open_volume(f"{path}:/exchange/data_white") as vol:
        assert vol.dataset == "/exchange/data_white"
        np.testing.assert_array_equal(vol.read(), b)
    with open_volume(f"{path}:entry/stack") as vol:
        assert vol.shape == b.shape
        np.testing.assert_array_equal(vol.read(), b)
    msg = _assert_volume_error(f"{path}:/entry/missing", "/entry/missing")
    assert "/exchange/data" in msg  # lists what is there
    _assert_volume_error(f"{path}:/entry/image", "not a 3D")
    _assert_volume_error(f"{path}:/entry", "not a dataset")


def test_hdf5_single_and_ambiguous(tmp_path):
    a = _random_volume((3, 4, 5), np.uint8)
    single = tmp_path / "single.nxs"
    with h5py.File(single, "w") as f:
        f["entry/data/data"] = a
        f["entry/image"] = a[0]
    with open_volume(single) as vol:
        assert vol.dataset == "/entry/data/data"
        np.testing.assert_array_equal(vol.read(), a)

    ambiguous = tmp_path / "ambiguous.hdf5"
    with h5py.File(ambiguous, "w") as f:
        f["one"] = a
        f["group/two"] = a
    msg = _assert_volume_error(ambiguous, "ambiguous")
    assert "/one" in msg and "/group/two" in msg

    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f["image"] = a[0]
    _assert_volume_error(flat, "no 3D dataset")


def test_hdf5_target_syntax_on_save(tmp_path):
    a = _random_volume((3, 4, 5), np.int16)
    out = save_volume(f"{tmp_path / 'out.h5'}:/recon/volume", a)
    assert out == tmp_path / "out.h5"
    with open_volume(out) as vol:  # the only 3D dataset
        assert vol.dataset == "/recon/volume"
        np.testing.assert_array_equal(vol.read(), a)
    with pytest.raises(ValueError, match="only supported when writing HDF5"):
        save_volume(f"{tmp_path / 'x.npy'}:/data", a)
    npy = save_volume(tmp_path / "x.npy", a)
    _assert_volume_error(f"{npy}:/data", "only applies to HDF5 and Zarr")


def test_hdf5_default_output_is_data_exchange(tmp_path):
    a = _random_volume((70, 4, 5), np.uint16)
    out = save_volume(tmp_path / "out.h5", a)
    with h5py.File(out, "r") as f:
        assert f["exchange/data"].chunks == (64, 4, 5)
        assert f["exchange/data"].compression is None


@pytest.mark.parametrize("zarr_format", [
    pytest.param(2, marks=pytest.mark.skipif(not hasattr(zarr, "create_array"),
                                             reason="zarr 2 cannot choose the store format")),
    3,
])
def test_ome_zarr_level0_squeezed(tmp_path, zarr_format):
    level0 = _random_volume((1, 1, 6, 8, 10), np.uint16)
    level1 = level0[..., ::2, ::2, ::2].copy()
    root = tmp_path / "image.ome.zarr"
    kwargs = {"zarr_format": zarr_format} if hasattr(zarr, "create_array") else {}
    group = zarr.open_group(str(root), mode="w", **kwargs)
    multiscales = [{"version": "0.4", "datasets": [{"path": "s0"}, {"path": "s1"}]}]
    if zarr_format == 3:
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales
    _zarr_array(group, "s0", level0, chunks=(1, 1, 3, 8, 10))
    _zarr_array(group, "s1", level1)
    with open_volume(root) as vol:
        assert vol.shape == (6, 8, 10) and vol.dataset == "/s0"
        np.testing.assert_array_equal(vol.read(), level0[0, 0])
        np.testing.assert_array_equal(vol.slice(1, 7), level0[0, 0, :, 7, :])
    with open_volume(f"{root}:/s1") as vol:
        assert vol.shape == (3, 4, 5)


def test_zarr_group_resolution(tmp_path):
    a = _random_volume((3, 4, 5), np.float32)
    one = tmp_path / "one.zarr"
    group = zarr.open_group(str(one), mode="w")
    _zarr_array(group.require_group("nested"), "volume", a)
    _zarr_array(group, "thumbnail", a[0])
    with open_volume(one) as vol:
        assert vol.dataset == "/nested/volume"
        np.testing.assert_array_equal(vol.read(), a)

    two = tmp_path / "two.zarr"
    group = zarr.open_group(str(two), mode="w")
    _zarr_array(group, "a", a)
    _zarr_array(group, "b", a)
    msg = _assert_volume_error(two, "ambiguous")
    assert "/a" in msg and "/b" in msg

    channels = tmp_path / "channels.zarr"
    group = zarr.open_group(str(channels), mode="w")
    group.attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    _zarr_array(group, "0", np.zeros((2, 3, 4, 5), np.uint8))  # c=2: not squeezable
    _assert_volume_error(channels, "not a 3D")


def test_tiff_dir_natural_order_and_hidden_files(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(1, 12):
        tifffile.imwrite(folder / f"img_{i}.tif", np.full((3, 4), i, np.uint16))
    tifffile.imwrite(folder / ".img_0.tif", np.full((9, 9), 99, np.uint8))  # hidden: ignored
    (folder / "notes.txt").write_text("not a slice")
    with open_volume(folder) as vol:
        assert vol.format == "tiff-dir" and vol.shape == (11, 3, 4)
        assert vol[:, 0, 0].tolist() == list(range(1, 12))
        np.testing.assert_array_equal(vol.slice(2, 1), np.repeat(np.arange(1, 12)[:, None], 3, 1))


def test_tiff_dir_single_slice_is_3d(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    tifffile.imwrite(folder / "s.tiff", np.ones((3, 4), np.float32))
    with open_volume(folder) as vol:
        assert vol.shape == (1, 3, 4)


@pytest.mark.parametrize(
    "odd", [np.zeros((3, 5), np.uint16), np.zeros((3, 4), np.uint8)], ids=["shape", "dtype"]
)
def test_tiff_dir_mismatch_names_file(tmp_path, odd):
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(1, 6):
        tifffile.imwrite(folder / f"s{i}.tif", np.zeros((3, 4), np.uint16))
    tifffile.imwrite(folder / "s10.tif", odd)
    _assert_volume_error(folder, "s10.tif")


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _bad_missing(d):
    return d / "nope.npy"


def _bad_suffix(d):
    (d / "scan.png").write_bytes(b"\x89PNG")
    return d / "scan.png"


def _bad_npy_2d(d):
    np.save(d / "flat.npy", np.zeros((4, 5)))
    return d / "flat.npy"


def _bad_npy_4d(d):
    np.save(d / "hyper.npy", np.zeros((2, 3, 4, 5)))
    return d / "hyper.npy"


def _bad_npy_truncated(d):
    np.save(d / "cut.npy", np.zeros((10, 20, 30)))
    return _truncated(d / "cut.npy")


def _bad_tiff_truncated(d):
    tifffile.imwrite(
        d / "cut.tif", _random_volume((10, 20, 30), np.uint16), photometric="minisblack"
    )
    return _truncated(d / "cut.tif")


def _bad_tiff_compressed_truncated(d):
    tifffile.imwrite(d / "cutz.tif", _random_volume((10, 20, 30), np.uint16), compression="zlib")
    return _truncated(d / "cutz.tif", 0.999)


def _bad_tiff_2d(d):
    tifffile.imwrite(d / "page.tif", np.zeros((4, 5), np.uint8))
    return d / "page.tif"


def _bad_tiff_garbage(d):
    (d / "junk.tiff").write_bytes(os.urandom(1000))
    return d / "junk.tiff"


def _bad_tiff_first_page_offset(d):
    # a TIFF header whose first page lies past the end: tifffile logs a warning and finds no page
    (d / "nopage.tif").write_bytes(b"II*\x00garbage")
    return d / "nopage.tif"


def _bad_h5_garbage(d):
    (d / "junk.h5").write_bytes(os.urandom(1000))
    return d / "junk.h5"


def _bad_h5_truncated(d):
    with h5py.File(d / "cut.h5", "w") as f:
        f["data"] = np.zeros((10, 20, 30))
    return _truncated(d / "cut.h5")


def _bad_empty_dir(d):
    (d / "emptydir").mkdir()
    return d / "emptydir"


def _bad_dir_without_slices(d):
    (d / "docs").mkdir()
    (d / "docs" / "readme.txt").write_text("x")
    return d / "docs"


def _bad_tiff_dir_corrupt_slice(d):
    (d / "slices").mkdir()
    tifffile.imwrite(d / "slices" / "a1.tif", np.zeros((3, 4), np.uint8))
    (d / "slices" / "a2.tif").write_bytes(b"II*\x00garbage")
    return d / "slices"


def _bad_zarr_empty(d):
    (d / "void.zarr").mkdir()
    return d / "void.zarr"


def _bad_zarr_2d(d):
    root = d / "flat.zarr"
    _zarr_array(zarr.open_group(str(root), mode="w"), "image", np.zeros((4, 5), np.uint8))
    return root


BAD_INPUTS = [
    _bad_missing,
    _bad_suffix,
    _bad_npy_2d,
    _bad_npy_4d,
    _bad_npy_truncated,
    _bad_tiff_truncated,
    _bad_tiff_compressed_truncated,
    _bad_tiff_2d,
    _bad_tiff_garbage,
    _bad_tiff_first_page_offset,
    _bad_h5_garbage,
    _bad_h5_truncated,
    _bad_empty_dir,
    _bad_dir_without_slices,
    _bad_tiff_dir_corrupt_slice,
    _bad_zarr_empty,
    _bad_zarr_2d,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__[5:])
def test_bad_input_raises_one_line_volume_error(tmp_path, make):
    path = make(tmp_path)
    msg = _assert_volume_error(path)
    assert msg.startswith(str(path))


def test_error_wording(tmp_path):
    _assert_volume_error(_bad_missing(tmp_path), "no such file")
    _assert_volume_error(_bad_suffix(tmp_path), "unknown format")
    _assert_volume_error(_bad_npy_4d(tmp_path), "not a 3D volume (shape (2, 3, 4, 5))")
    _assert_volume_error(_bad_tiff_truncated(tmp_path), "truncated or corrupt TIFF")
    _assert_volume_error(_bad_npy_truncated(tmp_path), "truncated or corrupt")
    _assert_volume_error(_bad_empty_dir(tmp_path), "empty directory")
    _assert_volume_error(_bad_tiff_dir_corrupt_slice(tmp_path), "a2.tif")


def test_broken_tiff_is_refused_without_a_stray_log_line(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        _assert_volume_error(_bad_tiff_first_page_offset(tmp_path),
                             "TIFF holds no image data (invalid offset to first page")
    assert [r for r in caplog.records if r.name == "tifffile" and r.levelno >= logging.WARNING] == []


def test_detect_format_and_suffixes(tmp_path):
    assert [tio.format_suffix(f) for f in FORMATS] == [".npy", ".tif", "", ".h5", ".zarr"]
    assert tio.detect_format("a/B.TIFF") == "tiff"
    assert tio.detect_format("scan.nxs:/entry/data") == "h5"
    with pytest.raises(VolumeError):
        tio.detect_format("scan.png")
    with pytest.raises(ValueError):
        tio.format_suffix("png")
    # A Zarr store is recognised by its metadata even without the suffix.
    save_volume(tmp_path / "plain", np.zeros((2, 2, 2), np.uint8), "zarr")
    assert tio.detect_format(tmp_path / "plain") == "zarr"


# ---------------------------------------------------------------------------------------------
# Laziness


@pytest.fixture(scope="module")
def big_volumes(tmp_path_factory):
    """One 8 MiB volume stored in every format (plus compressed TIFF pages)."""
    d = tmp_path_factory.mktemp("big")
    data = _random_volume((64, 256, 256), np.uint16, 7)
    paths = {fmt: save_volume(_target(d, fmt), data, fmt, chunks=(4, 64, 64)) for fmt in FORMATS}
    paths["tiff-zlib"] = d / "zlib.tif"
    tifffile.imwrite(paths["tiff-zlib"], data, compression="zlib", photometric="minisblack")
    return data, paths


@pytest.mark.parametrize("fmt", [*FORMATS, "tiff-zlib"])
def test_open_and_slice_do_not_read_everything(big_volumes, fmt):
    data, paths = big_volumes
    tracemalloc.start()
    try:
        with open_volume(paths[fmt]) as vol:
            page = vol.slice(0, 33)
            box = vol[10:12, 100:120, 5:9]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(page, data[33])
    np.testing.assert_array_equal(box, data[10:12, 100:120, 5:9])
    assert peak < data.nbytes / 8, f"peak {peak} bytes for an {data.nbytes}-byte volume"


def test_npy_is_memory_mapped(big_volumes, monkeypatch):
    _, paths = big_volumes
    real_load = np.load
    modes = []

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    open_volume(paths["npy"]).close()
    assert modes == ["r"]


@pytest.mark.parametrize("fmt", ["tiff", "tiff-zlib"])
def test_tiff_open_never_decodes_whole_series(big_volumes, monkeypatch, fmt):
    data, paths = big_volumes

    def forbidden(*args, **kwargs):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", forbidden)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", forbidden)
    monkeypatch.setattr(tifffile, "imread", forbidden)
    with open_volume(paths[fmt]) as vol:
        np.testing.assert_array_equal(vol.slice(0, 5), data[5])
        np.testing.assert_array_equal(vol.slice(2, 100), data[:, :, 100])


# ---------------------------------------------------------------------------------------------
# Writing: atomicity, overwrite, argument checks


class _FailsAfterFirstSlab:
    shape = (6, 8, 8)
    dtype = np.dtype(np.uint8)

    def __init__(self):
        self.calls = 0

    def __getitem__(self, key):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("disk on fire")
        z = range(self.shape[0])[key]
        return np.ones((len(z), 8, 8), np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(tio, "SLAB_BYTES", 2 * 8 * 8)
    data = _FailsAfterFirstSlab()
    dest = _target(tmp_path / "out", fmt)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_volume(dest, data, fmt, chunks=(1, 8, 8))
    # It did fail midway, after writing a slab (the slab after the failing one may have been
    # read ahead already).
    assert 2 <= data.calls <= 3
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_guard(tmp_path, fmt):
    dest = _target(tmp_path, fmt)
    save_volume(dest, np.zeros((2, 3, 4), np.uint8), fmt)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_volume(dest, np.ones((2, 3, 4), np.uint8), fmt)
    with open_volume(dest) as vol:
        assert vol.read().max() == 0
    save_volume(dest, np.ones((3, 3, 4), np.uint8), fmt, overwrite=True)
    with open_volume(dest) as vol:
        assert vol.shape == (3, 3, 4) and vol.read().min() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no temporaries left


def test_save_argument_checks(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="format"):
        save_volume(tmp_path / "x.png", a)
    with pytest.raises(ValueError, match="does not match"):
        save_volume(tmp_path / "x.npy", a, "tiff")
    with pytest.raises(ValueError, match="unknown volume format"):
        save_volume(tmp_path / "x", a, "png")
    with pytest.raises(ValueError, match="3D"):
        save_volume(tmp_path / "x.npy", a[0])
    with pytest.raises(ValueError, match="empty"):
        save_volume(tmp_path / "x.npy", a[:0])
    with pytest.raises(ValueError, match="data type"):
        save_volume(tmp_path / "x.npy", a.astype(complex))
    with pytest.raises(ValueError, match="chunks"):
        save_volume(tmp_path / "x.zarr", a, chunks=(1, 2))
    assert list(tmp_path.iterdir()) == []
    # No suffix means a directory of TIFF slices, zero padded so names sort in order.
    out = save_volume(tmp_path / "slices", np.zeros((3, 2, 2), np.uint8))
    assert sorted(p.name for p in out.iterdir()) == [
        "slice_00000.tif",
        "slice_00001.tif",
        "slice_00002.tif",
    ]


def test_volume_nbytes_on_disk(tmp_path):
    a = np.zeros((4, 5, 6), np.uint16)
    npy = save_volume(tmp_path / "v.npy", a)
    assert tio.volume_nbytes_on_disk(npy) == npy.stat().st_size
    folder = save_volume(tmp_path / "slices", a)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert tio.volume_nbytes_on_disk(folder) == total > a.nbytes
    h5 = save_volume(tmp_path / "v.h5", a)
    assert tio.volume_nbytes_on_disk(f"{h5}:/exchange/data") == h5.stat().st_size
    with pytest.raises(VolumeError):
        tio.volume_nbytes_on_disk(tmp_path / "missing.npy")


class _CountingSlabs:
    """A (10, 3, 4) volume whose reads are recorded, and which fails at slice ``fail_at``."""

    shape = (10, 3, 4)
    dtype = np.dtype(np.int16)

    def __init__(self, fail_at: int | None = None):
        self.data = np.arange(np.prod(self.shape), dtype=np.int16).reshape(self.shape)
        self.keys: list[slice] = []
        self.fail_at = fail_at

    def __getitem__(self, key):
        self.keys.append(key)
        z = range(self.shape[0])[key]
        if self.fail_at is not None and self.fail_at in z:
            raise OSError("bad sector")
        return self.data[key]


@pytest.mark.parametrize("ahead", [0, 1, 2, 5])
def test_read_slabs_yields_every_slab_in_order_whatever_is_read_ahead(ahead):
    src = _CountingSlabs()
    got = list(tio.read_slabs(src, 3, ahead=ahead, dtype=np.float32))
    assert [(z0, z1) for z0, z1, _ in got] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(s.dtype == np.float32 for _, _, s in got)
    np.testing.assert_array_equal(np.concatenate([s for _, _, s in got]), src.data)
    assert sorted(k.start for k in src.keys) == [0, 3, 6, 9]  # each slab read once


def test_read_slabs_raises_the_readers_error_and_stops_reading():
    src = _CountingSlabs(fail_at=4)
    seen = []
    with pytest.raises(OSError, match="bad sector"):
        for z0, _, _ in tio.read_slabs(src, 2, ahead=1):
            seen.append(z0)
    assert seen == [0, 2]  # the slabs before the bad one came through, in order
    assert len(src.keys) <= 4  # at most one slab past the failing one was read


def test_read_slabs_stopped_early_reads_at_most_ahead_more():
    src = _CountingSlabs()
    it = tio.read_slabs(src, 1, ahead=2)
    assert next(it)[0] == 0
    it.close()
    assert 1 <= len(src.keys) <= 3


def test_atomic_path_without_create_reserves_a_name_the_writer_creates(tmp_path):
    from tomoloc._fsutil import atomic_path

    dest = tmp_path / "v.npy"
    with atomic_path(dest, create=False) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        with open(tmp, "xb") as f:  # exclusive create works: nothing is there
            f.write(b"abc")
    assert dest.read_bytes() == b"abc" and sorted(tmp_path.iterdir()) == [dest]
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "w.npy", create=False):
        pass  # the writer wrote nothing: no empty file passes for an output
    assert sorted(tmp_path.iterdir()) == [dest]


def test_read_slabs_each_sees_every_slab_in_order_before_it_is_yielded():
    src = _CountingSlabs()
    seen = []
    for z0, z1, slab in tio.read_slabs(src, 2, ahead=3, each=lambda a, b, s: seen.append((a, b, s.sum()))):
        assert (z0, z1, slab.sum()) in seen  # already seen when it comes out
    assert [(a, b) for a, b, _ in seen] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_npy_reads_do_not_parse_the_header_again(tmp_path, monkeypatch):
    # np.load parses the header with ast.literal_eval, which CPython 3.11 cannot run in two
    # threads at once ("AST constructor recursion depth mismatch"); reads run on two threads.
    import ast

    expected = _random_volume((6, 5, 4), np.uint16, seed=2)
    np.save(tmp_path / "v.npy", expected)
    np.save(tmp_path / "f.npy", np.asfortranarray(expected))
    vols = [open_volume(tmp_path / "v.npy"), open_volume(tmp_path / "f.npy")]

    def refuse(*_):
        raise AssertionError("header parsed on a read")

    monkeypatch.setattr(ast, "literal_eval", refuse)
    for vol in vols:
        with vol:
            np.testing.assert_array_equal(vol.read(), expected)
            np.testing.assert_array_equal(vol[2:4, 1:3, ::2], expected[2:4, 1:3, ::2])
