"""Independent synthetic X-ray micro-CT phantoms (holders, samples, artefacts).

Written without reference to the localisation tool it is meant to test. Axis 0
is the rotation axis (z); ``volume[k]`` is an axial slice. All randomness comes
from ``np.random.default_rng(seed)``. Geometry is built with z = 0 as the
"bottom"; the volume is flipped along z at the end for about half the seeds.

Usage: ``python _third_phantoms.py --out DIR --seeds 0 40 --shape 64 96 96``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

F = np.float32
MEDIA = {"agarose": (0.20, 0.30), "ethanol": (0.14, 0.22), "resin": (0.30, 0.45),
         "paraffin": (0.24, 0.34)}


def _js(v):
    """Convert nested numpy values to JSON-able Python values."""
    if isinstance(v, dict):
        return {str(k): _js(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_js(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return round(float(v), 5)
    return v


class _Ctx:
    """Broadcastable coordinate grids, shape and random generator."""

    def __init__(self, shape, rng):
        self.shape, self.rng = tuple(int(s) for s in shape), rng
        Z, Y, X = self.shape
        self.z = np.arange(Z, dtype=F)[:, None, None]
        self.y = np.arange(Y, dtype=F)[None, :, None]
        self.x = np.arange(X, dtype=F)[None, None, :]
        self.W = min(Y, X)

    def noise(self, sigma, shape=None):
        """Unit-std smooth Gaussian noise (coarse grid + linear zoom for large sigma)."""
        shape = self.shape if shape is None else tuple(shape)
        k = max(1, int(sigma / 1.5))
        cs = tuple(max(2, -(-n // k) + 1) for n in shape)
        n = ndi.gaussian_filter(self.rng.standard_normal(cs).astype(F), sigma / k, mode="wrap")
        if k > 1:
            n = ndi.zoom(n, [(a + k) / b for a, b in zip(shape, cs)], order=1)
        n = n[tuple(slice(0, s) for s in shape)]
        return ((n - n.mean()) / (n.std() + 1e-8)).astype(F)

    def box(self, lo, hi):
        """Slices and local grids of the clipped box [lo, hi]; None if empty."""
        sl = tuple(slice(max(0, int(np.floor(a))), min(n, int(np.ceil(b)) + 1))
                   for a, b, n in zip(lo, hi, self.shape))
        if any(s.stop <= s.start for s in sl):
            return None
        return sl, self.z[sl[0]], self.y[:, sl[1]], self.x[:, :, sl[2]]


def _frame(rng, max_tilt):
    """Rows u, v, w of a random orthonormal frame; u within max_tilt degrees of z."""
    th, ph, ps = np.deg2rad(rng.uniform(0, max_tilt)), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(th), np.sin(th) * np.sin(ph), np.sin(th) * np.cos(ph)])
    v = np.cross(u, [0.0, 0.0, 1.0] if abs(u[2]) < 0.9 else [0.0, 1.0, 0.0])
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    return np.stack([u, np.cos(ps) * v + np.sin(ps) * w, -np.sin(ps) * v + np.cos(ps) * w])


def _ellipsoid(c, ctr, axes, fr, full=False):
    """(slices, normalised radius rho) of an ellipsoid; rho < 1 inside."""
    e = max(axes) + 1.5
    b = c.box([-1, -1, -1], c.shape) if full else c.box(np.subtract(ctr, e), np.add(ctr, e))
    if b is None:
        return None
    sl, z, y, x = b
    q = [F(r[0]) * (z - ctr[0]) + F(r[1]) * (y - ctr[1]) + F(r[2]) * (x - ctr[2]) for r in fr]
    return sl, np.sqrt(sum((qi / F(a)) ** 2 for qi, a in zip(q, axes)))


def _fit_z(ax, fr, lim):
    """Shrink ellipsoid semi-axes (the first one first) so its z half-extent is <= lim."""
    ax = np.asarray(ax, float).copy()
    ext = lambda a: np.sqrt(np.sum((a * fr[:, 0]) ** 2))
    if ext(ax) > lim:
        rest = np.sqrt(np.sum((ax[1:] * fr[1:, 0]) ** 2))
        ax[0] = max(np.sqrt(max(lim ** 2 - rest ** 2, 0.0)) / max(abs(fr[0, 0]), 1e-3), 0.5 * ax[1:].min())
        ax *= min(1.0, lim / ext(ax))
    return ax


def _capsule(c, out, a, b, r):
    """OR a capsule (segment a-b, radius r) into boolean array ``out``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    bx = c.box(np.minimum(a, b) - r - 1, np.maximum(a, b) + r + 1)
    if bx is None:
        return
    sl, z, y, x = bx
    d = b - a
    p = (z - F(a[0]), y - F(a[1]), x - F(a[2]))
    t = np.clip((p[0] * F(d[0]) + p[1] * F(d[1]) + p[2] * F(d[2])) / F(max(d @ d, 1e-9)), 0, 1)
    out[sl] |= sum((pi - t * F(di)) ** 2 for pi, di in zip(p, d)) <= r * r


def _ball(c, ctr, r):
    bx = c.box(np.subtract(ctr, r + 1), np.add(ctr, r + 1))
    if bx is None:
        return None
    sl, z, y, x = bx
    return sl, (z - ctr[0]) ** 2 + (y - ctr[1]) ** 2 + (x - ctr[2]) ** 2 <= r * r


def _put(mask, f, sl, m, val):
    """Add region m (in box sl) to the sample with relative density val."""
    mask[sl] |= m
    f[sl] = np.where(m, val, f[sl])


# ----------------------------------------------------------------- samples
# Each returns (mask, f): f is the density above the medium in units of the contrast.

def _insect(c, p, rs, rng, tex, hz):
    mask, f = np.zeros(c.shape, bool), np.zeros(c.shape, F)
    n = int(rng.integers(3, 7))
    fr = _frame(rng, 70)
    lens = rng.uniform(0.6, 1.0, n)
    lens[-1] *= 1.4
    lat = np.sqrt(fr[0, 1] ** 2 + fr[0, 2] ** 2)
    lens *= min(2 * hz / max(abs(fr[0, 0]), 1e-3), 2.2 * rs / max(lat, 1e-3)) * rng.uniform(0.5, 0.8) / lens.sum()
    wid = np.minimum(rs * rng.uniform(0.35, 0.6, n), 1.5 * lens)
    wid[-1] *= 1.25; wid[0] *= 0.8
    s = np.cumsum(lens) - lens / 2
    s -= s.mean()
    ctrs = [np.asarray(p) + si * fr[0] + rng.normal(0, 0.08 * rs) * fr[1] for si in s]
    for i, ct in enumerate(ctrs):
        e = _ellipsoid(c, ct, (0.62 * lens[i], wid[i], 0.8 * wid[i]), fr)
        if e is None:
            continue
        sl, rho = e
        m = rho < 1
        val = np.where(rho > 1 - 1.5 / (0.8 * wid[i]), 1.5, 0.75 + 0.25 * tex[sl])
        _put(mask, f, sl, m & ~mask[sl] | m & (val > f[sl]), val)
    legs = np.zeros(c.shape, bool)
    th = [1 + (i % max(1, n - 2)) for i in range(3)]
    for i, side in [(j, sd) for j in th for sd in (-1, 1)]:
        o = ctrs[i] + side * fr[1] * wid[i] * 0.6
        d1 = side * fr[1] + rng.normal(0, 0.3, 3)
        knee = o + rs * rng.uniform(0.5, 1.0) * d1 / np.linalg.norm(d1)
        d2 = 0.3 * side * fr[1] - fr[2] + rng.normal(0, 0.2, 3)
        foot = knee + rs * rng.uniform(0.5, 1.1) * d2 / np.linalg.norm(d2)
        r = max(0.7, rs * rng.uniform(0.03, 0.07))
        _capsule(c, legs, o, knee, r)
        _capsule(c, legs, knee, foot, r * 0.8)
    for side in (-1, 1):  # antennae
        o = ctrs[0] - fr[0] * lens[0] * 0.5
        d = -fr[0] + side * 0.6 * fr[1] + rng.normal(0, 0.2, 3)
        _capsule(c, legs, o, o + rs * rng.uniform(0.4, 0.9) * d / np.linalg.norm(d), 0.75)
    legs &= ~mask
    mask |= legs
    f[legs] = 1.3
    return mask, f


def _stem(c, p, rs, rng, tex, hz):
    Z = c.shape[0]
    Rs = rs * rng.uniform(0.6, 1.0)
    full = rng.random() < 0.45
    half = Z if full else rng.uniform(0.5, 0.95) * hz
    A, P, ph = rng.uniform(0, 0.35) * rs, rng.uniform(1.0, 3.0) * Z, rng.uniform(0, 2 * np.pi, 2)
    tl = rng.normal(0, 0.12, 2)
    cy = p[1] + A * np.sin(2 * np.pi * c.z / P + ph[0]) + tl[0] * (c.z - p[0])
    cx = p[2] + A * np.cos(2 * np.pi * c.z / P + ph[1]) + tl[1] * (c.z - p[0])
    dy, dx = c.y - cy, c.x - cx
    rr, ang = np.sqrt(dy ** 2 + dx ** 2), np.arctan2(dy, dx)
    k = int(rng.integers(3, 9))
    Rth = Rs * (1 + rng.uniform(0, 0.1) * np.cos(k * ang + rng.uniform(0, 6.3)))
    inside = (rr < Rth) & (np.abs(c.z - p[0]) < half)
    hollow = rng.uniform(0.2, 0.5) if rng.random() < 0.6 else 0.0
    f = np.where(rr > Rth - rng.uniform(1.0, 2.5), 1.45, 0.65 + 0.3 * tex).astype(F)
    Rb = Rs * (0.5 * hollow + 0.5 * 0.75 + 0.1)
    nb = int(rng.integers(6, 15))
    f = np.where((np.cos(nb * ang + ph[0]) > 0.75) & (np.abs(rr - Rb) < max(1.0, 0.08 * Rs)), 1.2, f)
    if hollow == 0:
        f = np.where(rr < 0.25 * Rs, 1.3, f)  # root stele
    mask = inside & (rr >= hollow * Rs)
    return mask, np.where(mask, f, 0).astype(F)


def _seed(c, p, rs, rng, tex, hz):
    mask, f = np.zeros(c.shape, bool), np.zeros(c.shape, F)
    fr = _frame(rng, 40)
    ax = rs * np.array([rng.uniform(0.8, 1.2), rng.uniform(0.55, 0.9), rng.uniform(0.5, 0.85)])
    ax = _fit_z(ax, fr, hz)
    e = _ellipsoid(c, p, ax, fr)
    if e is None:
        return mask, f
    sl, rho = e
    t = rng.uniform(1.0, 3.0)
    val = np.where(rho > 1 - t / ax.min(), 1.6, 0.55 + 0.25 * tex[sl])
    off = np.asarray(p) + fr[0] * ax[0] * rng.uniform(-0.3, 0.3)
    e2 = _ellipsoid(c, off, ax * rng.uniform(0.3, 0.55), fr)
    _put(mask, f, sl, rho < 1, val)
    if e2 is not None:
        _put(mask, f, e2[0], (e2[1] < 1) & mask[e2[0]], 1.0 + 0.15 * tex[e2[0]])
    return mask, f


def _biopsy(c, p, rs, rng, tex, hz):
    mask, f = np.zeros(c.shape, bool), np.zeros(c.shape, F)
    fr = _frame(rng, 25)
    ax = rs * np.array([rng.uniform(0.9, 1.4), rng.uniform(0.6, 1.05), rng.uniform(0.5, 0.95)])
    ax = _fit_z(ax, fr, hz * rng.uniform(0.7, 0.85))
    if getattr(c, "packed_ok", False) and rng.random() < 0.3:  # packed: tissue stuffed into the holder, shaped by it
        ax, fr = ax * rng.uniform(1.2, 1.6) * np.array([3.0, 1, 1]), _frame(rng, 5)
    e = _ellipsoid(c, p, ax * 1.4, fr)
    if e is None:
        return mask, f
    sl, rho = e
    rho = rho * 1.4
    n = c.noise(max(1.5, 0.3 * rs), rho.shape)
    m = rho + rng.uniform(0.2, 0.4) * n < 1
    lab, nl = ndi.label(m)
    if nl > 1:
        m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    fib = np.abs(c.noise(rng.uniform(1.0, 2.5), rho.shape)) < 0.15
    _put(mask, f, sl, m, np.where(fib, 1.3, 0.8 + 0.3 * tex[sl]))
    return mask, f


def _fish(c, p, rs, rng, tex, hz):
    fr = _frame(rng, 25)
    L = rng.uniform(1.2, 2.4) * hz
    rmax = max(2.0, rs * rng.uniform(0.5, 0.8))
    q = [F(r[0]) * (c.z - p[0]) + F(r[1]) * (c.y - p[1]) + F(r[2]) * (c.x - p[2]) for r in fr]
    t = q[0] / F(L) + F(0.5)
    q1 = q[1] - F(rng.uniform(-0.12, 0.12) * L) * (2 * t - 1) ** 2
    prof = rmax * np.sqrt(np.clip(t / 0.1, 0, 1)) * (1 - 0.75 * np.clip((t - 0.25) / 0.75, 0, 1))
    rad = np.sqrt(q1 ** 2 + (q[2] / 0.8) ** 2)
    mask = (t >= 0) & (t <= 1) & (rad < prof)
    f = (0.7 + 0.25 * tex).astype(F)
    spine = np.sqrt(q1 ** 2 + (q[2] - 0.3 * prof) ** 2) < max(0.9, 0.12 * rmax)
    f = np.where(spine & (t > 0.12) & (t < 0.95), 1.9, f)
    f = np.where((np.sqrt((q1) ** 2 + (q[2] + 0.3 * prof) ** 2) < 0.45 * prof) & (t > 0.15) & (t < 0.35), 1.0, f)
    for side in (-1, 1):  # eyes
        ct = np.asarray(p) + fr[0] * (0.07 - 0.5) * L + side * fr[1] * 0.6 * rmax
        b = _ball(c, ct, 0.4 * rmax)
        if b is not None:
            _put(mask, f, b[0], b[1], 1.6)
    return mask, np.where(mask, f, 0).astype(F)


KINDS = {"insect": _insect, "stem": _stem, "seed": _seed, "biopsy": _biopsy, "fish": _fish}


def _pick(rng, opts, p):
    return opts[int(rng.choice(len(opts), p=p))]


def make_phantom(seed: int, shape: tuple[int, int, int] = (64, 96, 96)) -> tuple[np.ndarray, np.ndarray, dict]:
    """Generate one synthetic micro-CT volume.

    Parameters
    ----------
    seed : int
        Seed of ``np.random.default_rng``; the same seed gives identical output.
    shape : tuple of int
        (Z, Y, X); axis 0 is the rotation axis.

    Returns
    -------
    volume : np.ndarray
        float32 array of ``shape``.
    mask : np.ndarray
        bool array of ``shape``, True on the biological sample's voxels only.
    info : dict
        JSON-able record of the random choices.
    """
    rng = np.random.default_rng(seed)
    c = _Ctx(shape, rng)
    Z, Y, X = c.shape
    W = c.W
    yc, xc = (Y - 1) / 2, (X - 1) / 2
    info: dict = {"seed": int(seed), "shape": list(c.shape)}
    holder = _pick(rng, ["tube", "capillary", "pipette", "wrap", "none"], [.32, .14, .14, .1, .3])
    kind = _pick(rng, ["insect", "stem", "seed", "biopsy", "fish", "multi"], [.17, .17, .17, .21, .12, .16])
    place = _pick(rng, ["free", "touch_wall", "cut_fov"], [.7, .15, .15])
    contrast = float(np.exp(rng.uniform(np.log(0.05), np.log(0.8))))
    tex = c.noise(rng.uniform(0.8, 2.0))
    info.update(holder=holder, kind=kind, placement=place, contrast=contrast)
    tubular = holder in ("tube", "capillary", "pipette")
    c.packed_ok = holder != "none"
    plate = int(rng.integers(2, 6)) if rng.random() < 0.2 else 0
    # ---- holder geometry
    off, tilt = np.zeros(2), np.zeros(2)
    if tubular and rng.random() < 0.2:
        off = rng.uniform(-0.15, 0.15, 2) * W
    if tubular and rng.random() < 0.2:
        tilt = np.deg2rad(rng.uniform(-4, 4, 2))
    R = rng.uniform(0.22, 0.42) * W if holder == "capillary" else rng.uniform(0.3, 0.47) * W
    cy = yc + off[0] + np.tan(tilt[0]) * (c.z - Z / 2)
    cx = xc + off[1] + np.tan(tilt[1]) * (c.z - Z / 2)
    r = np.sqrt((c.y - cy) ** 2 + (c.x - cx) ** 2)
    Rz = np.full((Z, 1, 1), R, F)
    if holder == "pipette":
        a = rng.uniform(0.4, 0.8)
        Rz = (R * (a + (1 - a) * c.z / max(Z - 1, 1))).astype(F)
    zb = None
    reff = r
    if tubular and rng.random() < 0.35:
        zb = rng.uniform(0.08, 0.3) * Z + plate
        hb = rng.uniform(0.3, 1.0) * R
        reff = np.sqrt(r ** 2 + (np.maximum(0, zb - c.z) * Rz / hb) ** 2)
    if holder == "wrap":
        ang = np.arctan2(c.y - cy, c.x - cx)
        Rz = R * (1 + rng.uniform(0.01, 0.05) * np.sin(int(rng.integers(2, 6)) * ang + rng.uniform(0, 6.3)))
    wt = {"tube": rng.uniform(1, 4), "capillary": rng.uniform(0.7, 1.5), "pipette": rng.uniform(1, 3),
          "wrap": rng.uniform(0.8, 2.0), "none": 0.0}[holder]
    if holder == "none":
        interior = np.ones(c.shape, bool)
        wall = np.zeros(c.shape, bool)
    else:
        interior = reff < Rz
        wall = (reff < Rz + wt) & ~interior
    zcap = None
    if holder in ("tube", "pipette") and rng.random() < 0.15:
        zcap = rng.uniform(0.8, 0.92) * Z
        interior &= c.z < zcap
    info.update(tube_radius=R, wall_thickness=wt, axis_offset=off, axis_tilt_deg=np.rad2deg(tilt),
                bottom_z=zb, cap_z=zcap, plate_slices=plate)
    # ---- sample
    Ravail = 0.9 * R if holder != "none" else 0.42 * W
    zlo, zhi = (zb if zb is not None else plate), (zcap if zcap is not None else Z)
    rs = Ravail * rng.uniform(0.5, 1.05)
    hz = 0.44 * (zhi - zlo) if place != "cut_fov" else rng.uniform(0.4, 0.7) * Z
    pz = zlo + (zhi - zlo) * rng.uniform(0.45, 0.55)
    ang0 = rng.uniform(0, 2 * np.pi)
    rad0 = rng.uniform(0, max(0.0, Ravail - rs)) * 0.7
    if place == "touch_wall":
        rad0 = Ravail - 0.4 * rs
    py = yc + off[0] + rad0 * np.sin(ang0)
    px = xc + off[1] + rad0 * np.cos(ang0)
    if place == "cut_fov":
        if holder == "none" and rng.random() < 0.5:
            py, px = yc + (0.5 * W) * np.sin(ang0), xc + (0.5 * W) * np.cos(ang0)
        else:
            pz = rng.uniform(-0.05, 0.12) * Z if rng.random() < 0.5 else rng.uniform(0.88, 1.05) * Z
    if kind == "multi":
        n = int(rng.integers(2, 4))
        sub = [_pick(rng, ["seed", "biopsy", "insect"], [.4, .35, .25]) for _ in range(n)]
        mask, f = np.zeros(c.shape, bool), np.zeros(c.shape, F)
        edges = np.linspace(zlo + 0.1 * (zhi - zlo), zhi - 0.1 * (zhi - zlo), n + 1)
        for i, k in enumerate(sub):
            rsi = min(rs * rng.uniform(0.6, 1.0), 0.6 * (edges[1] - edges[0]))
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, max(0.0, Ravail - rsi))
            pi = (rng.uniform(edges[i] + rsi * 0.5, edges[i + 1] - rsi * 0.5) if edges[i + 1] - edges[i] > rsi
                  else (edges[i] + edges[i + 1]) / 2, yc + off[0] + d * np.sin(a), xc + off[1] + d * np.cos(a))
            mi, fi = KINDS[k](c, pi, rsi, rng, tex, 0.5 * (edges[1] - edges[0]))
            f = np.where(mi, fi, f); mask |= mi
        info["sub_kinds"] = sub
    else:
        mask, f = KINDS[kind](c, (pz, py, px), rs, rng, tex, hz)
    mask &= interior
    if plate:
        mask[:plate] = False
    info.update(sample_center=[pz, py, px], sample_size=rs)
    # ---- densities and medium
    medium = None
    m = 0.0
    fill = Z
    if tubular and rng.random() < 0.75:
        medium = _pick(rng, list(MEDIA), [.35, .25, .2, .2])
        m = rng.uniform(*MEDIA[medium])
        if rng.random() < 0.5:
            zz = np.nonzero(mask.any(axis=(1, 2)))[0]
            top = zz.max() if zz.size else Z / 2
            fill = top + rng.uniform(2, 12) if rng.random() < 0.75 else rng.uniform(zz.min(), top) if zz.size else top
        men = rng.uniform(-3, 6) if rng.random() < 0.7 else 0.0
        medreg = interior & (c.z < fill + men * (r / Rz) ** 2)
        info.update(fill_level=min(fill, Z), meniscus=men if fill < Z else None)
    else:
        medreg = np.zeros(c.shape, bool)
    info.update(medium=medium, medium_density=m)
    S = m + contrast
    vol = np.where(medreg, F(m), F(0)).astype(F)
    if medium and rng.random() < 0.4:  # air bubbles
        cand = np.flatnonzero(medreg & ~mask)
        nb = int(rng.integers(1, 7))
        for i in rng.choice(cand, min(nb, cand.size), replace=False) if cand.size else []:
            b = _ball(c, np.unravel_index(i, c.shape), rng.uniform(1, 4.5))
            if b is not None:
                vol[b[0]] = np.where(b[1] & ~mask[b[0]], 0, vol[b[0]])
        info["bubbles"] = nb
    vol = np.where(mask, F(m) + F(contrast) * f, vol)
    wd = rng.uniform(1.3, 3.0) * S + 0.3 if holder == "capillary" else rng.uniform(0.2, 0.9) * S
    if holder == "wrap" and rng.random() < 0.5:  # paper: fibrous
        vol = np.where(wall, F(wd) * (1 + 0.3 * tex), vol)
    else:
        vol[wall] = wd
    if zcap is not None:
        ct = rng.uniform(2, 5)
        capr = (reff < Rz + wt + 2) & (c.z >= zcap) & ((c.z < zcap + ct) | (reff > Rz + wt - 0.5))
        vol[capr] = wd * 1.1
    info["wall_density"] = wd if holder != "none" else None
    if holder == "none" and rng.random() < 0.75:  # pin / needle with glue
        zz = np.nonzero(mask.any(axis=(1, 2)))[0]
        if zz.size and zz.min() > 0:
            z0 = zz.min()
            yy, xx = np.nonzero(mask[z0:z0 + 2].any(axis=0))
            tip = np.array([z0 + 1.5, yy.mean(), xx.mean()])
            base = np.array([-2.0, tip[1] + rng.normal(0, 4), tip[2] + rng.normal(0, 4)])
            pin = np.zeros(c.shape, bool)
            _capsule(c, pin, base, tip, rng.uniform(0.8, 2.2))
            b = _ball(c, tip - [1, 0, 0], rng.uniform(1.5, 3.5))
            if b is not None:
                vol[b[0]] = np.where(b[1] & ~mask[b[0]], F(0.6 * S), vol[b[0]])
            pin &= ~mask
            vol[pin] = max(rng.uniform(1.5, 4.0) * S, 1.0)
            info["pin"] = True
    if plate:
        pr = rng.uniform(0.5, 0.8) * W
        sl = (np.arange(Z) < plate)[:, None, None] & (((c.y - yc) ** 2 + (c.x - xc) ** 2) < pr * pr)
        vol = np.where(sl, F(rng.uniform(0.8, 2.0) * S), vol)
    debris = medreg if medium else (interior & (c.z < zlo + 6) if tubular else None)
    if debris is not None and rng.random() < 0.35:
        cand = np.flatnonzero(debris & ~mask)
        nd = int(rng.integers(5, 41))
        for i in rng.choice(cand, min(nd, cand.size), replace=False) if cand.size else []:
            b = _ball(c, np.unravel_index(i, c.shape), rng.uniform(0.6, 1.6))
            vol[b[0]] = np.where(b[1] & ~mask[b[0]], F(rng.uniform(0.5, 2.5) * S), vol[b[0]])
        info["debris"] = nd
    specks = []
    if rng.random() < 0.3:
        src = mask if rng.random() < 0.5 and mask.any() else (interior if holder != "none" else mask)
        cand = np.flatnonzero(src)
        for i in rng.choice(cand, min(int(rng.integers(1, 3)), cand.size), replace=False) if cand.size else []:
            ctr, rr_ = np.unravel_index(i, c.shape), rng.uniform(0.6, 1.5)
            b = _ball(c, ctr, rr_)
            vol[b[0]][b[1]] = rng.uniform(5, 20) * max(float(vol.max()), S)
            specks.append([int(v) for v in ctr] + [rr_])
        info["specks"] = specks
    # ---- artefacts
    art = {}
    if rng.random() < 0.35:  # beam-hardening cupping: brighter near object edges
        obj = vol > 0.5 * min(m if m > 0 else S, S, wd if holder != "none" else S)
        d = ndi.distance_transform_edt(obj, sampling=(1e4, 1, 1))
        k, Lc = rng.uniform(0.1, 0.4), rng.uniform(2, 0.2 * W)
        vol = vol * (1 + F(k) * np.exp(-d / Lc).astype(F) * obj)
        art["cupping"] = [k, Lc]
    if rng.random() < 0.2:  # phase-contrast edge enhancement
        sg = rng.uniform(0.6, 1.3)
        k = rng.uniform(0.5, 2.0) * sg * sg
        vol = vol - F(k) * ndi.gaussian_laplace(vol, sg)
        art["phase_contrast"] = [sg, k]
    if rng.random() < 0.85:
        sg = rng.uniform(0.5, 1.5)
        vol = ndi.gaussian_filter(vol, sg)
        art["blur_sigma"] = sg
    r2 = np.sqrt((c.y - yc) ** 2 + (c.x - xc) ** 2)[0]
    for zs, ys, xs, rad in specks:  # radial streaks through the speck
        na, A = int(rng.integers(6, 17)), rng.uniform(0.3, 1.5) * contrast
        th = rng.uniform(0, np.pi, na)[:, None, None]
        dy, dx = (c.y[0] - ys)[None], (c.x[0] - xs)[None]
        perp = np.abs(dx * np.sin(th) - dy * np.cos(th))
        sgn = rng.choice([-1.0, 1.0], na)[:, None, None]
        dist = np.sqrt(dy ** 2 + dx ** 2)[0]
        pat = (sgn * np.exp(-(perp / rng.uniform(0.5, 1.2)) ** 2)).sum(0) * np.exp(-dist / (rng.uniform(0.3, 1) * W))
        z0, z1 = max(0, int(zs - rad - 1)), min(Z, int(zs + rad + 2))
        vol[z0:z1] += F(A) * pat.astype(F)
        art["streaks"] = True
    if rng.random() < 0.4:  # ring artefacts centred on the rotation axis
        nr = int(np.ceil(r2.max())) + 2
        amp = rng.uniform(0.05, 0.5) * contrast
        prof = [rng.normal(0, amp, nr) * (rng.random(nr) < rng.uniform(0.05, 0.3)) for _ in range(2)]
        rings = [np.interp(r2, np.arange(nr), pr).astype(F) for pr in prof]
        if rng.random() < 0.5:
            wz = np.zeros((Z, 1, 1), F)
        else:
            wz = (0.5 + 0.5 * np.sin(2 * np.pi * c.z / rng.uniform(0.5, 2) / Z + rng.uniform(0, 6.3))).astype(F)
        vol += rings[0] * (1 - wz) + rings[1] * wz
        art["rings"] = {"amp": amp, "z_varying": bool(wz.any())}
    sig = rng.uniform(0.02, 0.3) * contrast
    nt = _pick(rng, ["gaussian", "poisson", "correlated"], [.45, .3, .25])
    nz = rng.standard_normal(c.shape).astype(F)
    if nt == "poisson":
        nz *= np.sqrt(np.maximum(vol, 0) / max(S, 1e-6) + 0.2).astype(F)
    elif nt == "correlated":
        nz = ndi.gaussian_filter(nz, rng.uniform(0.7, 1.5))
        nz /= nz.std() + 1e-8
    vol += F(sig) * nz
    art["noise"] = [nt, sig]
    if rng.random() < 0.3:  # slow intensity drift along z
        a = rng.uniform(0.02, 0.15) * S
        dz = a * ((c.z / Z - 0.5) * rng.uniform(-2, 2) + np.sin(2 * np.pi * c.z / Z * rng.uniform(0.3, 1.2) + rng.uniform(0, 6.3)))
        vol += dz.astype(F)
        art["z_drift"] = a
    mode = _pick(rng, ["raw", "negative_bg", "uint16"], [.5, .25, .25])
    if mode == "negative_bg":
        sc = 10 ** rng.uniform(-1, 1.5)
        vol = vol * F(sc) - F(sc * (m + rng.uniform(0.02, 0.4) * S + 0.02))
    elif mode == "raw":
        vol *= F(10 ** rng.uniform(-1, 1))
    if rng.random() < 0.3:  # reconstruction circle
        cval = 0.0 if rng.random() < 0.5 else float(vol.min())
        vol[:, r2 > min(Y, X) / 2] = cval
        mask[:, r2 > min(Y, X) / 2] = False  # a sample beyond the field of view is not in the volume
        art["recon_circle"] = cval
    if mode == "uint16":
        lo, hi = np.percentile(vol, [0.01, 99.99])
        A, B = rng.uniform(0, 8000), rng.uniform(25000, 65535)
        vol = np.clip(np.round((vol - lo) / max(hi - lo, 1e-9) * (B - A) + A), 0, 65535)
    info.update(artefacts=art, value_mode=mode)
    if rng.random() < 0.5:
        vol, mask = vol[::-1], mask[::-1]
        info["z_flipped"] = True
    else:
        info["z_flipped"] = False
    return np.ascontiguousarray(vol, dtype=F), np.ascontiguousarray(mask), _js(info)


def _bbox(mask):
    out = []
    for ax in range(3):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def write_batch(out_dir, seeds, shape=(64, 96, 96)) -> list[dict]:
    """Write phantoms, masks and ``truth.json`` to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created if needed).
    seeds : iterable of int
        Seeds; a seed whose mask comes out empty is regenerated with seed + 100000
        (repeatedly) and the seed actually used is recorded.
    shape : tuple of int
        Volume shape (Z, Y, X).

    Returns
    -------
    list of dict
        The truth records (file, mask_file, shape, bbox, seed, used_seed, info).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for s in seeds:
        used = int(s)
        vol, mask, info = make_phantom(used, shape)
        while not mask.any():
            used += 100000
            vol, mask, info = make_phantom(used, shape)
        name = f"phantom_{int(s):04d}"
        np.save(out / f"{name}.npy", vol)
        np.save(out / f"{name}_mask.npy", mask)
        recs.append({"file": f"{name}.npy", "mask_file": f"{name}_mask.npy", "shape": list(vol.shape),
                     "bbox": _bbox(mask), "seed": int(s), "used_seed": used,
                     "mask_fraction": round(float(mask.mean()), 5), "info": info})
    (out / "truth.json").write_text(json.dumps(recs, indent=1))
    return recs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 10], metavar=("A", "B"))
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 96, 96], metavar=("Z", "Y", "X"))
    a = ap.parse_args()
    r = write_batch(a.out, range(a.seeds[0], a.seeds[1]), tuple(a.shape))
    print(f"wrote {len(r)} volumes to {a.out}")
