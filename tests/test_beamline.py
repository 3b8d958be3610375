"""Beamline scale: streaming, verified crops, Dask, resuming, failures, watch mode (issue 6)."""

import json
import math
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_cli import bad_volume, digest
from tomoloc import io, pipeline
from tomoloc.boxes import read_boxes
from tomoloc.crop import CropVerificationError, crop_volume, region_digest, verify_crop
from tomoloc.memory import MIN_MAX_MEMORY, crop_slab_bytes, parse_size, resident_bytes
from tomoloc.pipeline import RunConfig, VolumeFailures, run_batch
from tomoloc.preprocess import BadValuesError, working_copy
from tomoloc.synth import make_phantom
from tomoloc.watch import Watcher


def run(*args):
    from tomoloc.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _target(d, fmt, stem):
    return d / (stem + io.format_suffix(fmt)) if fmt != "tiff-dir" else d / stem


def _phantom(seed, shape=(24, 32, 32)):
    return make_phantom(shape, kind="fish", seed=seed).volume


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    d = tmp_path_factory.mktemp("bl")
    paths = []
    for s in range(4):
        p = d / f"v{s}.npy"
        np.save(p, _phantom(s))
        paths.append(str(p))
    return d, paths


# ------------------------------------------------------------------------- streaming
def _block_mean_reference(a, f):
    """The block mean computed the obvious way, on the whole array in memory."""
    out = np.empty(tuple(math.ceil(n / f) for n in a.shape), np.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for k in range(out.shape[2]):
                out[i, j, k] = a[i * f:(i + 1) * f, j * f:(j + 1) * f, k * f:(k + 1) * f].astype(np.float64).mean()
    return out


@pytest.mark.parametrize("dtype,max_voxels,max_bytes", [
    (np.uint16, 13 * 17 * 19, None),   # f = 1
    (np.float32, 400, 1),               # f = 3, one band of f rows per read
    (np.uint16, 900, 3 * 3 * 19 * 4 * 2),  # f = 3... two bands per read, partial edge blocks
    (np.int8, 60, None),                # f = 5
])
def test_streaming_downsample_equals_in_memory_result(tmp_path, dtype, max_voxels, max_bytes):
    rng = np.random.default_rng(1)
    a = (rng.random((13, 17, 19)) * 100).astype(dtype)
    p = io.save_volume(tmp_path / "a.h5", a, chunks=(2, 5, 7))
    with io.open_volume(p) as vol:
        w = working_copy(vol, max_voxels, max_bytes=max_bytes)
    f = w.factor[0]
    assert math.prod(w.data.shape) <= max_voxels and w.data.dtype == np.float32
    np.testing.assert_allclose(w.data, _block_mean_reference(a, f), rtol=1e-5)


def test_streaming_downsample_finds_nan_and_inf_in_any_block(tmp_path):
    a = np.random.default_rng(2).random((9, 10, 11)).astype(np.float32)
    for bad in (np.nan, np.inf):
        b = a.copy()
        b[8, 9, 10] = bad  # f = 4: in the last, partial block
        with pytest.raises(BadValuesError, match="NaN or infinite.*slices 8-8"):
            working_copy(b, 40, max_bytes=1)
    # values whose float32 sum overflows are finite, not bad
    big = np.full((4, 4, 4), 3e38, np.float32)
    big[0, 0, 0] = 1e38
    assert np.isfinite(working_copy(big, 8).data).all()


def _rss_file_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reading_a_memory_mapped_volume_does_not_keep_it_resident(tmp_path):
    # 48 MiB read through in slabs: a map held open would leave all of it resident.
    a = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(48, 512, 512))
    a[:] = 1.0
    a[:, :, 0] = 2.0
    del a
    base = _rss_file_kb()
    growth = 0
    with io.open_volume(tmp_path / "big.npy") as vol:
        for _, _, slab in vol.iter_slabs(4):
            growth = max(growth, _rss_file_kb() - base)
        w = working_copy(vol, 32**3)
    assert math.prod(w.data.shape) <= 32**3
    assert growth < 16 * 1024, f"{growth} KiB of the file stayed resident"


def test_localize_and_crop_memory_does_not_grow_with_the_volume(tmp_path, monkeypatch):
    # Python-side allocations while localizing and cropping a 32 MiB volume with small slabs
    # (1 MiB reads, shared by two working-copy threads).
    monkeypatch.setattr(io, "SLAB_BYTES", 2**20)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    a = np.zeros((64, 256, 512), np.float32)
    a[20:40, 100:150, 200:300] = 1.0
    src = io.save_volume(tmp_path / "big.npy", a)
    from tomoloc.localize import OtsuLocalizer

    tracemalloc.start()
    try:
        with io.open_volume(src) as vol:
            box = OtsuLocalizer(max_voxels=32**3).localize(vol).bbox
        res = crop_volume(src, box, tmp_path / "o", slab_bytes=256 * 512 * 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert box == ((20, 40), (100, 150), (200, 300)) or all(lo <= t0 and hi >= t1 for (lo, hi), (t0, t1) in
                                                          zip(box, ((20, 40), (100, 150), (200, 300))))
    assert res.verified and res.shape_after == tuple(hi - lo for lo, hi in box)
    assert peak < 4 * 2**20, f"peak {peak} bytes for a {a.nbytes}-byte volume (1 MiB slabs)"


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_chunked_crop_equals_numpy_slicing_in_every_format(tmp_path, fmt):
    a = (np.random.default_rng(3).random((11, 13, 15)) * 1000).astype(np.uint16)
    src = io.save_volume(_target(tmp_path, fmt, "src"), a, fmt, chunks=(3, 4, 5))
    box = [[2, 9], [1, 12], [4, 15]]
    one_slice = 11 * 11 * 2  # slabs of one slice of the crop
    res = crop_volume(src, box, tmp_path / "out", margin=1, slab_bytes=one_slice)
    want = a[1:10, 0:13, 3:15]
    with io.open_volume(res.output) as out:
        assert out.format == fmt
        np.testing.assert_array_equal(out.read(), want)
    assert res.verified and res.checksum == region_digest(want) == region_digest(want, slab_bytes=1)


def test_verification_catches_a_wrong_crop(tmp_path):
    a = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    res = crop_volume(io.save_volume(tmp_path / "a.npy", a), [[1, 3], [0, 5], [2, 6]], tmp_path / "o")
    verify_crop(res.output, (2, 5, 4), np.int32, res.checksum)
    b = a[1:3, :, 2:6].copy()
    b[1, 2, 3] += 1  # one voxel off
    np.save(res.output, b)
    with pytest.raises(CropVerificationError, match="checksum"):
        verify_crop(res.output, (2, 5, 4), np.int32, res.checksum)
    np.save(res.output, a[1:3])
    with pytest.raises(CropVerificationError, match="shape"):
        verify_crop(res.output, (2, 5, 4), np.int32, res.checksum)


def test_max_memory_option(tmp_path):
    assert parse_size("1G") == 2**30 and parse_size("512M") == 2**29 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("1073741824") == 2**30
    with pytest.raises(ValueError):
        parse_size("lots")
    assert crop_slab_bytes(2**30) == io.SLAB_BYTES
    assert crop_slab_bytes(MIN_MAX_MEMORY) == 4 * 2**20
    # What the process already holds comes off the budget; the slab never drops below 4 MiB.
    assert crop_slab_bytes(2**30, in_use=2**30 - 120 * 2**20) == 20 * 2**20
    assert crop_slab_bytes(2**30, in_use=2**31) == 4 * 2**20
    assert crop_slab_bytes(2**30, in_use=0) == io.SLAB_BYTES
    held = resident_bytes()
    assert held is None or 10 * 2**20 < held < 2**40
    with pytest.raises(ValueError, match="below the minimum"):
        RunConfig(max_memory=MIN_MAX_MEMORY - 1)
    for bad in ("10M", "lots"):
        res = run("run", tmp_path / "x.npy", "--out", tmp_path / "o", "--max-memory", bad)
        assert res.exit_code == 2 and "--max-memory" in res.stderr and not (tmp_path / "o").exists()


# ----------------------------------------------------------------- failures, resume
def test_a_failing_volume_is_retried_once_and_does_not_stop_the_others(vols, tmp_path, monkeypatch):
    d, paths = vols
    real = pipeline.process_volume
    calls = {}

    def flaky(job, *args):
        calls[job.volume] = calls.get(job.volume, 0) + 1
        if job.volume == paths[1] and calls[job.volume] == 1:
            raise OSError(f"{job.volume}: read failed (transient)")
        if job.volume == paths[2]:
            raise OSError(f"{job.volume}: read failed (disk gone)")
        return real(job, *args)

    monkeypatch.setattr(pipeline, "process_volume", flaky)
    with pytest.raises(VolumeFailures) as info:
        run_batch(paths, tmp_path / "o", RunConfig(margin=2), log=lambda m: None)
    rows = {r["volume"]: r for r in info.value.manifest["volumes"]}
    assert info.value.lines == [f"{paths[2]}: read failed (disk gone)"]
    assert rows[paths[1]]["status"] == "done" and rows[paths[1]]["attempts"] == 2
    assert rows[paths[2]]["status"] == "failed" and rows[paths[2]]["attempts"] == 2
    assert [rows[p]["status"] for p in (paths[0], paths[3])] == ["done", "done"]
    assert not (tmp_path / "o" / "v2.npy").exists()
    # the rerun redoes only the failed volume
    monkeypatch.setattr(pipeline, "process_volume", real)
    man = run_batch(paths, tmp_path / "o", RunConfig(margin=2), log=lambda m: None)
    assert man["done"] == 4 and man["failed"] == 0
    assert len(read_boxes(tmp_path / "o" / "boxes.json")) == 4


def test_crop_retries_a_failing_volume_goes_on_and_a_rerun_resumes(vols, tmp_path, monkeypatch):
    from tomoloc import crop as crop_mod

    _, paths = vols
    boxes = tmp_path / "b.json"
    assert run("localize", *paths, "--out", boxes).exit_code == 0
    real, calls = crop_mod.crop_volume, {}

    def flaky(source, *args, **kwargs):
        calls[source] = calls.get(source, 0) + 1
        if source == paths[1] and calls[source] == 1:
            raise OSError(f"{source}: write failed (transient)")
        if source == paths[2]:
            raise OSError(f"{source}: write failed (disk full)")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(crop_mod, "crop_volume", flaky)
    out = tmp_path / "c"
    res = run("crop", *paths, "--boxes", boxes, "--out", out, "--margin", 2)
    assert res.exit_code == 2 and res.stderr.strip() == f"tomoloc: error: {paths[2]}: write failed (disk full)"
    man = json.loads((out / "crop_manifest.json").read_text())
    rows = {r["volume"]: r for r in man["volumes"]}
    assert [rows[p]["status"] for p in paths] == ["done", "done", "failed", "done"]
    assert rows[paths[1]]["attempts"] == 2 and rows[paths[2]]["attempts"] == 2 and calls[paths[0]] == 1
    assert man["done"] == 3 and man["failed"] == 1 and not (out / "v2.npy").exists()
    # The rerun crops only the failed volume; the others are kept as verified before.
    monkeypatch.setattr(crop_mod, "crop_volume", real)
    stamps = {p: (out / Path(p).name).stat().st_mtime_ns for p in (paths[0], paths[1], paths[3])}
    (out / "v3.npy").write_bytes(b"damaged")  # recorded as done, but no longer as recorded: redone
    res = run("crop", *paths, "--boxes", boxes, "--out", out, "--margin", 2)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("(done earlier)") == 2
    assert [(out / Path(p).name).stat().st_mtime_ns for p in paths[:2]] == [stamps[p] for p in paths[:2]]
    man = json.loads((out / "crop_manifest.json").read_text())
    assert man["done"] == 4 and man["failed"] == 0
    for p in paths:
        with io.open_volume(out / Path(p).name) as v:
            assert region_digest(v) == {r["volume"]: r for r in man["volumes"]}[p]["checksum"]
    # A different margin is a different crop: the earlier outputs are not silently reused.
    res = run("crop", *paths, "--boxes", boxes, "--out", out, "--margin", 3)
    assert res.exit_code == 2 and "already exists" in res.stderr


def test_localize_reports_every_failed_volume_retries_and_writes_nothing(vols, tmp_path, monkeypatch):
    from tomoloc.localize import threshold

    _, paths = vols
    nan, const = str(bad_volume(tmp_path, "nan")), str(bad_volume(tmp_path, "constant"))
    real, calls = threshold.MultiOtsuLocalizer.localize, []

    def flaky(self, volume):
        calls.append(volume.path)
        if volume.path == paths[0] and calls.count(paths[0]) == 1:
            raise OSError("read failed (transient)")
        return real(self, volume)

    monkeypatch.setattr(threshold.MultiOtsuLocalizer, "localize", flaky)
    out = tmp_path / "b.json"
    res = run("localize", paths[0], nan, paths[1], const, "--out", out)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 2 and not out.exists()
    assert nan in lines[0] and "NaN" in lines[0] and const in lines[1] and "constant" in lines[1]
    # bad values are not read twice; the transient error was retried and went through
    assert calls.count(nan) == 1 and calls.count(const) == 1 and calls.count(paths[0]) == 2
    assert run("localize", paths[0], paths[1], "--out", out).exit_code == 0 and len(read_boxes(out)) == 2


def test_a_killed_run_resumes_without_redoing_finished_volumes(vols, tmp_path):
    _, paths = vols
    ref = run_batch(paths, tmp_path / "ref", RunConfig(margin=2), log=lambda m: None)
    out = tmp_path / "o"
    finished = []

    def killed_after_two(p):
        finished.append(p)
        if len(finished) == 2:
            raise KeyboardInterrupt  # the job dies between two volumes

    with pytest.raises(KeyboardInterrupt):
        run_batch(paths, out, RunConfig(margin=2), log=lambda m: None, on_volume=killed_after_two)
    man = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in man["volumes"]] == ["done", "done", "pending", "pending"] and not man["complete"]
    stamps = {p: (out / Path(p).name).stat().st_mtime_ns for p in paths[:2]}
    # a crop recorded as done but damaged since is redone
    (out / "v1.npy").write_bytes(b"broken")
    lines = []
    man = run_batch(paths, out, RunConfig(margin=2), log=lines.append)
    assert "resuming: 1 volume(s) already done" in lines[0]
    assert (out / "v0.npy").stat().st_mtime_ns == stamps[paths[0]]
    assert sum(line.endswith("(verified)") for line in lines) == 3
    assert man["complete"] and [r["bbox"] for r in man["volumes"]] == [r["bbox"] for r in ref["volumes"]]
    assert [r["checksum"] for r in man["volumes"]] == [r["checksum"] for r in ref["volumes"]]


def test_delete_originals_only_after_verification(vols, tmp_path):
    _, paths = vols
    d = tmp_path / "in"
    d.mkdir()
    copies = []
    for p in paths[:2]:
        q = d / Path(p).name
        q.write_bytes(Path(p).read_bytes())
        copies.append(str(q))
    h5 = io.save_volume(d / "c.h5:/entry/data", _phantom(7))
    inputs = copies + [f"{h5}:/entry/data"]
    man = run_batch(inputs, tmp_path / "o", RunConfig(margin=2, delete_originals=True), log=lambda m: None)
    assert [r["original_deleted"] for r in man["volumes"]] == [True, True, False]
    assert not any(Path(c).exists() for c in copies) and h5.exists()  # a dataset in a container stays
    for r, p in zip(man["volumes"], paths[:2]):
        (z0, z1), (y0, y1), (x0, x1) = r["crop_bbox"]
        np.testing.assert_array_equal(np.load(r["output"]), np.load(p)[z0:z1, y0:y1, x0:x1])
    # resuming after the inputs are gone: done volumes need no input
    assert run_batch(inputs, tmp_path / "o", RunConfig(margin=2, delete_originals=True),
                     log=lambda m: None)["done"] == 3


# ------------------------------------------------------------------------------ Dask
@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    # Worker processes import tomoloc from the same source tree as the tests.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                os.environ.get("PYTHONPATH", "")])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def test_dask_path_gives_the_serial_boxes(vols, tmp_path, cluster):
    d, paths = vols
    bad = str(bad_volume(tmp_path, "nan"))
    inputs = paths + [bad]
    with pytest.raises(VolumeFailures) as serial:
        run_batch(inputs, tmp_path / "serial", RunConfig(margin=2), log=lambda m: None)
    with pytest.raises(VolumeFailures) as dask:
        run_batch(inputs, tmp_path / "dask", RunConfig(margin=2), scheduler=cluster, log=lambda m: None)
    assert dask.value.lines == serial.value.lines and "NaN" in dask.value.lines[0]
    key = lambda r: (r["volume"], r["status"], r.get("bbox"), r.get("crop_bbox"), r.get("checksum"))  # noqa: E731
    assert [key(r) for r in dask.value.manifest["volumes"]] == [key(r) for r in serial.value.manifest["volumes"]]
    assert [r.to_json() for r in read_boxes(tmp_path / "dask" / "boxes.json")] == \
        [r.to_json() for r in read_boxes(tmp_path / "serial" / "boxes.json")]
    for r in dask.value.manifest["volumes"][:4]:
        assert digest(r["output"]) == digest(tmp_path / "serial" / Path(r["output"]).name)
    # localize and crop over the same cluster agree with the serial commands
    assert run("localize", *paths, "--out", tmp_path / "b.json").exit_code == 0
    res = run("localize", *paths, "--out", tmp_path / "bd.json", "--scheduler", cluster)
    assert res.exit_code == 0, res.output
    assert [r.bbox for r in read_boxes(tmp_path / "bd.json")] == [r.bbox for r in read_boxes(tmp_path / "b.json")]
    res = run("crop", *paths, "--boxes", tmp_path / "bd.json", "--out", tmp_path / "c", "--scheduler", cluster)
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "c" / "crop_manifest.json").read_text())["volumes"]
    assert all(r["verified"] for r in rows) and [r["volume"] for r in rows] == paths
    assert run("crop", *paths, "--boxes", tmp_path / "bd.json", "--out", tmp_path / "c2",
               "--workers", 2).exit_code == 2  # --workers belongs to --scheduler local
    # a volume that fails in a worker is reported like in the serial command, and nothing is written
    for sched in ([], ["--scheduler", cluster]):
        res = run("localize", paths[0], bad, "--out", tmp_path / "bad.json", *sched)
        assert res.exit_code == 2 and res.stderr.count("tomoloc: error:") == 1 and "NaN" in res.stderr
        assert not (tmp_path / "bad.json").exists()


def test_watch_over_dask_crops_like_the_serial_job(vols, tmp_path, cluster):
    d, paths = vols
    src = tmp_path / "acq"
    src.mkdir()
    for p in paths[:2]:
        (src / Path(p).name).write_bytes(Path(p).read_bytes())
    lines = []
    w = Watcher(src, tmp_path / "w", RunConfig(margin=2), stable_seconds=0, log=lines.append, scheduler=cluster)
    assert w.run(interval=0, max_volumes=2) == 2
    assert any("over Dask" in line for line in lines) and w._client is None  # closed after the watch
    ref = run_batch([str(src / Path(p).name) for p in paths[:2]], tmp_path / "serial", RunConfig(margin=2),
                    log=lambda m: None)
    got = json.loads((tmp_path / "w" / "manifest.json").read_text())["volumes"]
    assert sorted((r["bbox"], r["checksum"]) for r in got) == sorted((r["bbox"], r["checksum"]) for r in ref["volumes"])


def _thread_env() -> tuple[str | None, int, str | None]:
    import torch

    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_cluster_shares_the_cores_among_its_workers(monkeypatch):
    from tomoloc.cluster import _ENV_VARS, dask_client, default_workers

    for k in _ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    with dask_client("local", 1) as client:
        got = list(client.run(_thread_env).values())
    # One worker gets every core (Dask's own default would leave it one thread) and glibc's
    # default trimming (Dask's made NumPy-heavy work 1.4x slower).
    assert got == [(str(default_workers()), default_workers(), None)]
    # The nanny writes the variables into this process before spawning; they are put back.
    assert all(k not in os.environ for k in _ENV_VARS)


# ----------------------------------------------------------------------------- watch
def test_watch_takes_a_file_written_in_pieces_only_once_complete(tmp_path):
    src, out = tmp_path / "acq", tmp_path / "out"
    src.mkdir()
    data = _phantom(11)
    whole = tmp_path / "whole.npy"
    np.save(whole, data)
    raw = whole.read_bytes()
    lines = []
    w = Watcher(src, out, RunConfig(margin=2), stable_seconds=10, log=lines.append)
    target = src / "scan_000.npy"
    target.write_bytes(raw[: len(raw) // 3])  # the writer's first piece
    assert w.poll(now=0) == []
    assert w.poll(now=20) == []  # unchanged for 20 s, but truncated: not a volume yet
    assert sum("truncated" in line for line in lines) == 1
    assert w.poll(now=40) == []  # said once, not at every scan
    assert sum("truncated" in line for line in lines) == 1
    with open(target, "ab") as f:
        f.write(raw[len(raw) // 3:])  # the rest
    assert w.poll(now=41) == []  # it changed: wait again
    assert w.poll(now=45) == []
    assert w.poll(now=52) == [str(target.resolve())]
    assert w.poll(now=60) == []  # once only
    man = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in man["volumes"]] == ["done"] and not (out / "report.html").exists()
    assert sum(line.endswith("(verified)") for line in lines) == 1
    # a restarted watcher (state = the manifest) skips it and takes the next one only
    np.save(src / "scan_001.npy", _phantom(12))
    w2 = Watcher(src, out, RunConfig(margin=2), stable_seconds=0, log=lines.append)
    assert w2.poll(now=0) == [] and w2.poll(now=0) == [str((src / "scan_001.npy").resolve())]
    assert w2.write_report().is_file()


def test_watch_done_marker_and_cli(tmp_path):
    src, out = tmp_path / "acq", tmp_path / "out"
    src.mkdir()
    np.save(src / "a.npy", _phantom(13))
    w = Watcher(src, out, RunConfig(margin=2), done_marker=".done", log=lambda m: None)
    assert w.poll(now=0) == [] and w.poll(now=1000) == []  # complete only when the writer says so
    (src / "a.npy.done").touch()
    assert w.poll(now=1001) == [str((src / "a.npy").resolve())]
    np.save(src / "b.npy", _phantom(14))
    (src / "b.npy.done").touch()
    res = run("watch", src, "--out", out, "--done-marker", ".done", "--interval", 0, "--max-volumes", 1,
              "--margin", 2)
    assert res.exit_code == 0, res.output
    assert "b.npy: done" in res.stderr and "a.npy" not in res.stderr.replace(str(src), "")
    assert "took 1 volume(s)" in res.stdout and (out / "report.html").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert [Path(r["volume"]).name for r in man["volumes"]] == ["a.npy", "b.npy"]
    one = run("watch", src, "--out", out, "--method", "sorting")
    assert one.exit_code == 2 and "--model" in one.stderr


def _peak_growth_kb(fn):
    """Peak resident memory (VmHWM) above the start while ``fn()`` runs, in KiB, and its result."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    status = lambda: dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())  # noqa: E731
    base = int(status()["VmRSS"].split()[0])
    out = fn()
    return int(status()["VmHWM"].split()[0]) - base, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sagittal_slice_of_a_mapped_volume_is_read_in_mapped_pieces(tmp_path, monkeypatch):
    # One voxel per row touches every page of the file: 48 MiB resident at once if mapped whole,
    # at most one piece (8 MiB here) when read in pieces.
    monkeypatch.setattr(io, "SLAB_BYTES", 8 * 2**20)
    a = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint16, shape=(96, 512, 512))
    a[:] = 7
    a[:, :, 3] = np.arange(96)[:, None]
    del a
    with io.open_volume(tmp_path / "big.npy") as vol:
        growth, col = _peak_growth_kb(lambda: vol.slice(2, 3))
        np.testing.assert_array_equal(col, np.repeat(np.arange(96)[:, None], 512, axis=1))
        np.testing.assert_array_equal(vol[90:2:-7, 5, 3:5], np.load(tmp_path / "big.npy")[90:2:-7, 5, 3:5])
    assert growth < 24 * 1024, f"peak {growth} KiB above the start"
