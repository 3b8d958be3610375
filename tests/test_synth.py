"""Tests for tomoloc.synth: determinism, ground truth, physics sanity, batches on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from tomoloc import io as tio
from tomoloc.boxes import bbox_from_mask, read_boxes
from tomoloc.synth import LABELS, Phantom, make_phantom, volume_seed, write_batch

TINY = (16, 24, 24)
SMALL = (16, 32, 32)


def _tube_radius(p: Phantom, cap: bool = True) -> np.ndarray:
    """Distance of every voxel from the tube axis (coarse voxels), from the recorded params;
    with ``cap``, beyond the start of the rounded bottom the (ellipsoidal) distance to its centre."""
    t = p.params["tube"]
    Z, Y, X = p.volume.shape
    cy, cx = t["centre_yx_at_mid_z"]
    sy, sx = t["slope_yx_per_z"]
    zz = np.arange(Z, dtype=float)[:, None, None]
    z = zz - (Z - 1) / 2
    y = np.arange(Y)[None, :, None]
    x = np.arange(X)[None, None, :]
    r2 = (y - cy - sy * z) ** 2 + (x - cx - sx * z) ** 2
    if cap and t["bottom"] is not None:
        b = t["bottom"]
        r2 = r2 + (np.maximum((zz - b["z"]) * b["down"], 0) / b["k"]) ** 2
    return np.sqrt(r2)


def _flat_medium(p: Phantom, margin: int = 2, wall: float = 3.5) -> np.ndarray:
    """Medium voxels ``wall`` voxels inside the tube (the wall's blur reaches that far), below
    any meniscus and ``margin`` voxels away from the sample."""
    t = p.params["tube"]
    near = ndimage.binary_dilation(p.mask, iterations=margin)
    region = (_tube_radius(p) < t["r_inner"] - wall) & ~near
    if t["meniscus"] is not None:
        m = t["meniscus"]
        z = np.arange(p.volume.shape[0], dtype=float)[:, None, None]
        r2 = _tube_radius(p, cap=False) ** 2
        region &= ((z - m["z"]) * m["up"] - m["h"] * r2 / t["r_inner"] ** 2) < -margin
    return region


def _fov_radius(shape) -> np.ndarray:
    Y, X = shape[1], shape[2]
    yy, xx = np.mgrid[0:Y, 0:X]
    return np.sqrt((yy - (Y - 1) / 2) ** 2 + (xx - (X - 1) / 2) ** 2)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", ["fish", "embryo"])
def test_same_seed_same_phantom_other_seed_differs(kind):
    a = make_phantom(TINY, kind, 7)
    b = make_phantom(TINY, kind, 7)
    c = make_phantom(TINY, kind, 8)
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.labels, b.labels)
    assert a.params == b.params and a.bbox == b.bbox
    assert not np.array_equal(a.volume, c.volume)
    assert a.params != c.params


def test_no_global_random_state_used():
    np.random.seed(1)
    a = make_phantom(TINY, "fish", 3)
    np.random.seed(2)
    b = make_phantom(TINY, "fish", 3)
    assert np.array_equal(a.volume, b.volume)


# ---------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("kind", ["fish", "embryo"])
def test_ground_truth_consistent(kind):
    fracs = []
    for seed in range(6):
        p = make_phantom(SMALL, kind, seed)
        assert p.kind == kind and p.seed == seed
        assert p.volume.shape == SMALL and p.volume.dtype == np.float32
        assert p.mask.dtype == bool and p.labels.dtype == np.uint8
        assert np.isfinite(p.volume).all()
        # tight box: equal to the mask's box, and the mask touches all six faces
        assert p.bbox == bbox_from_mask(p.mask)
        (z0, z1), (y0, y1), (x0, x1) = p.bbox
        m = p.mask
        assert m[z0].any() and m[z1 - 1].any()
        assert m[:, y0].any() and m[:, y1 - 1].any()
        assert m[:, :, x0].any() and m[:, :, x1 - 1].any()
        # labels: nonzero exactly on the mask, ids from this kind's table
        assert np.array_equal(p.labels > 0, p.mask)
        assert set(np.unique(p.labels)) - {0} <= set(LABELS[kind])
        assert 1 in np.unique(p.labels)
        # the sample lies inside the tube's interior
        assert _tube_radius(p)[p.mask].max() <= p.params["tube"]["r_inner"] + 0.5
        fracs.append(np.prod([b - a for a, b in p.bbox]) / np.prod(SMALL))
        json.dumps(p.params)  # serialisable
    assert all(0.04 <= f <= 0.55 for f in fracs), fracs
    assert 0.08 <= np.mean(fracs) <= 0.4, fracs


def test_params_record_the_random_choices():
    p = make_phantom(TINY, "embryo", 1)
    for key in ("tube", "samples", "medium", "acquisition", "energy_keV", "voxel_size_um", "bubbles", "debris"):
        assert key in p.params
    acq = p.params["acquisition"]
    assert acq["dose_photons"] > 0 and acq["phase_contrast"] is True  # embryos: phase contrast by default
    assert p.params["tube"]["r_outer"] > p.params["tube"]["r_inner"] > 0


def test_several_samples_do_not_overlap():
    for seed in range(3):
        p = make_phantom((24, 40, 40), "embryo", seed, n_samples=2)
        assert len(p.params["samples"]) == 2
        _, n = ndimage.label(p.mask)
        assert n >= 2
        assert p.bbox == bbox_from_mask(p.mask)


def test_non_square_slices_and_oversample_one():
    p = make_phantom((12, 20, 28), "fish", 2, oversample=1, n_angles=40)
    assert p.volume.shape == (12, 20, 28)
    assert p.bbox == bbox_from_mask(p.mask)
    outside = _fov_radius((12, 20, 28)) > 10.5
    assert np.all(p.volume[:, outside] == 0.0)


@pytest.mark.parametrize("bad", [dict(kind="frog"), dict(shape=(4, 24, 24)), dict(shape=(16, 24)), dict(seed=-1),
                                 dict(oversample=0), dict(n_samples=0), dict(dose=0.0), dict(recon_filter="x")])
def test_bad_arguments(bad):
    kw = {"shape": TINY, "kind": "fish", "seed": 0, **bad}
    with pytest.raises(ValueError):
        make_phantom(kw.pop("shape"), kw.pop("kind"), kw.pop("seed"), **kw)


# --------------------------------------------------------------------------------- physics
def test_fish_differs_from_medium():
    checked = 0
    for seed in range(6):
        # noise-free: the sample is denser than the medium by about its true contrast
        clean = make_phantom(SMALL, "fish", seed, noise=False, rings=False)
        mu = clean.params["samples"][0]["mu_per_cm"]
        true = mu["body"] - clean.params["medium"]["mu_per_cm"]
        region = _flat_medium(clean)
        if region.sum() >= 100:  # (some samples fill the tube: no flat medium left)
            body = clean.volume[ndimage.binary_erosion(clean.labels == 1)]
            assert 0.3 * true < np.median(body) - np.median(clean.volume[region]) < 2.0 * true, seed
        # noisy: a stained fish stands out of the noise
        p = make_phantom(SMALL, "fish", seed)
        if p.params["samples"][0]["stain"] == "none":
            continue
        med = p.volume[_flat_medium(p)]
        centre = np.median(med)
        spread = 1.4826 * np.median(np.abs(med - centre))
        sample = p.volume[p.mask]
        # FBP noise is correlated over a few voxels: count ~20 voxels as one sample
        z = (sample.mean() - centre) / (spread / np.sqrt(sample.size / 20))
        assert z > 3, (seed, z)
        checked += 1
    assert checked >= 2


def test_medium_near_water_and_air_near_zero():
    p = make_phantom(SMALL, "fish", 3, noise=False, rings=False)
    med = np.median(p.volume[_flat_medium(p)])
    assert med == pytest.approx(p.params["medium"]["mu_per_cm"], rel=0.15)
    r = _tube_radius(p)
    air = (r > p.params["tube"]["r_outer"] + 2) & (_fov_radius(SMALL) < SMALL[1] / 2 - 2)[None]
    if air.any():
        assert abs(np.median(p.volume[air])) < 0.1 * med


@pytest.mark.parametrize("fill", [0.0, -1.5])
def test_outside_field_of_view_is_padding(fill):
    p = make_phantom(TINY, "embryo", 0, fov_fill=fill)
    r = _fov_radius(TINY)
    assert np.all(p.volume[:, r > TINY[1] / 2] == np.float32(fill))
    assert np.mean(p.volume[:, r < TINY[1] / 2 - 1] == np.float32(fill)) < 0.01


def test_noise_grows_as_dose_falls():
    for kind, seed in (("fish", 0), ("embryo", 1)):
        kw = dict(rings=False, clutter=False)
        clean = make_phantom(SMALL, kind, seed, noise=False, **kw).volume
        stds, flat = [], []
        for dose in (1e5, 1e4, 1e3):
            p = make_phantom(SMALL, kind, seed, dose=dose, **kw)
            region = _flat_medium(p)
            stds.append((p.volume - clean)[region].std())
            flat.append(p.volume[region].std())
        assert stds[0] < stds[1] < stds[2]
        assert stds[2] / stds[0] > 5  # ~ sqrt(100) = 10 for pure Poisson noise
        assert flat[2] > 2 * flat[0]


def test_rings_are_rings():
    """Gain errors only add a pattern that is rotationally symmetric about the rotation axis."""
    r = _fov_radius(SMALL)
    inside = r < SMALL[1] / 2 - 1
    rbin = np.round(r[inside] * 2).astype(int)

    def radial_share(d: np.ndarray) -> float:
        explained = total = 0.0
        for sl in d:
            v = sl[inside]
            prof = np.bincount(rbin, v) / np.maximum(np.bincount(rbin), 1)
            explained += ((prof[rbin] - v.mean()) ** 2).sum()
            total += ((v - v.mean()) ** 2).sum()
        return explained / total

    for kind, seed in (("fish", 1), ("embryo", 2)):
        on = make_phantom(SMALL, kind, seed, dose=1e4)
        off = make_phantom(SMALL, kind, seed, dose=1e4, rings=False)
        other = make_phantom(SMALL, kind, seed, dose=2e4, rings=False)
        ring = on.volume - off.volume
        assert np.abs(ring).mean() > 0
        assert radial_share(ring) > 0.3
        assert radial_share(other.volume - off.volume) < 0.15  # noise is not ring-shaped
        strong = make_phantom(SMALL, kind, seed, dose=1e4, rings=3.0)
        assert np.abs(strong.volume - off.volume).mean() > 2 * np.abs(ring).mean()


def test_phase_contrast_acts_at_edges():
    kw = dict(noise=False, rings=False, clutter=False)
    p = make_phantom(SMALL, "embryo", 4, phase_contrast=False, **kw)
    q = make_phantom(SMALL, "embryo", 4, phase_contrast=100.0, **kw)
    d = np.abs(q.volume - p.volume)
    edge = ndimage.binary_dilation(p.mask, iterations=1) & ~ndimage.binary_erosion(p.mask, iterations=1)
    assert d[edge].mean() > 2 * d[_flat_medium(p, margin=3)].mean()


# ------------------------------------------------------------------------------- batches
def _load(path):
    with tio.open_volume(path) as v:
        return v.read()


def test_write_batch_npy(tmp_path):
    gt = write_batch(tmp_path / "b", n=3, kind="mixed", shape=TINY, seed=5)
    assert gt == tmp_path / "b" / "ground_truth.json"
    recs = read_boxes(gt)
    assert [r.volume for r in recs] == ["vol_000.npy", "vol_001.npy", "vol_002.npy"]
    assert {r.extra["kind"] for r in recs} == {"fish", "embryo"}
    for i, r in enumerate(recs):
        assert r.method == "truth" and r.shape == TINY
        vol = np.load(gt.parent / r.volume)
        mask = np.load(gt.parent / r.extra["mask"])
        labels = np.load(gt.parent / r.extra["labels"])
        assert r.extra["mask"] == f"vol_{i:03d}_mask.npy" and r.extra["labels"] == f"vol_{i:03d}_labels.npy"
        assert vol.dtype == np.float32 and mask.dtype == np.uint8 and labels.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert bbox_from_mask(mask) == r.bbox
        assert np.array_equal(labels > 0, mask > 0)
        # the recorded seed reproduces the volume
        assert r.extra["seed"] == volume_seed(5, i)
        p = make_phantom(TINY, r.extra["kind"], r.extra["seed"])
        assert np.array_equal(p.volume, vol)
        assert r.extra["params"] == p.params
    assert not list(gt.parent.glob(".*tmp*"))  # no temporaries left behind


def test_batch_volume_i_does_not_depend_on_n(tmp_path):
    a = write_batch(tmp_path / "a", n=2, kind="mixed", shape=TINY, seed=11)
    b = write_batch(tmp_path / "b", n=3, kind="mixed", shape=TINY, seed=11)
    ra, rb = read_boxes(a), read_boxes(b)
    for i in range(2):
        assert ra[i].extra["kind"] == rb[i].extra["kind"]
        assert np.array_equal(np.load(a.parent / f"vol_{i:03d}.npy"), np.load(b.parent / f"vol_{i:03d}.npy"))
        assert ra[i].bbox == rb[i].bbox


def test_batch_passes_phantom_options(tmp_path):
    gt = write_batch(tmp_path, n=1, kind="embryo", shape=TINY, seed=0, rings=False, fov_fill=-1.0)
    rec = read_boxes(gt)[0]
    assert rec.extra["params"]["acquisition"]["ring_scale"] == 0.0
    assert np.load(tmp_path / "vol_000.npy")[0, 0, 0] == -1.0


@pytest.mark.parametrize("fmt", ["tiff", "tiff-dir", "h5", "zarr"])
def test_write_batch_other_formats(tmp_path, fmt):
    gt = write_batch(tmp_path / fmt, n=1, kind="fish", shape=TINY, seed=2, format=fmt)
    ref = make_phantom(TINY, "fish", volume_seed(2, 0))
    rec = read_boxes(gt)[0]
    assert rec.volume == "vol_000" + tio.format_suffix(fmt)
    assert np.array_equal(_load(gt.parent / rec.volume), ref.volume)
    mask = _load(gt.parent / rec.extra["mask"])
    assert np.array_equal(mask > 0, ref.mask) and bbox_from_mask(mask) == rec.bbox
    assert np.array_equal(_load(gt.parent / rec.extra["labels"]), ref.labels)


def test_write_batch_rejects_bad_kind_and_format(tmp_path):
    with pytest.raises(ValueError):
        write_batch(tmp_path, n=1, kind="frog", shape=TINY)
    with pytest.raises(ValueError):
        write_batch(tmp_path, n=1, shape=TINY, format="png")


def test_write_batch_refuses_to_replace_existing_files(tmp_path):
    victim = tmp_path / "vol_001.npy"
    victim.write_bytes(b"a user's volume")
    with pytest.raises(FileExistsError, match="vol_001.npy"):
        write_batch(tmp_path, n=2, kind="fish", shape=TINY, seed=0)
    assert victim.read_bytes() == b"a user's volume"
    assert not (tmp_path / "vol_000.npy").exists()  # checked before anything was written
    write_batch(tmp_path, n=2, kind="fish", shape=TINY, seed=0, overwrite=True)
    assert np.load(victim).shape == TINY
