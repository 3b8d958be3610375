"""Synthetic tomography phantoms with ground truth: the demo data, test fixture and benchmark load.

A phantom is a tube (glass or plastic wall) along the rotation axis (axis 0), filled with a
mounting medium, holding one or more biological samples (a fish, or a frog-like embryo), plus
air bubbles, dense debris, sometimes a meniscus with air above it and the tube's rounded
bottom. The attenuation map is built analytically on a grid ``oversample`` times finer than
the output, then *measured*: every axial slice is projected in parallel beam over
``n_angles`` angles in [0, 180), with Beer-Lambert transmission, optional propagation
phase contrast, detector blur, per-pixel gain errors (rings), beam flicker, Poisson noise at
dose ``I0`` and the odd zinger; the volume is then reconstructed by filtered back-projection
on the output grid. Values are linear attenuation coefficients in 1/cm (air ~ 0, water
~ 0.3-1.7 depending on the randomised energy); voxels outside the circular field of view hold
``fov_fill``.

Everything is deterministic given ``seed`` (no global random state is touched); every random
choice is recorded in :attr:`Phantom.params`, which is JSON-serialisable.

Physics is simplified but honest: projections are pixel-driven (linear interpolation) line
integrals on the fine grid, binned to detector pixels in *intensity* (so the in-slice
partial-volume non-linearity is there; the fine sub-slices along z are averaged in
attenuation first). Phase contrast is the transport-of-intensity edge term
``I = I_abs * exp(d * laplacian(integral of delta))`` (first order equal to the TIE's
``1 + d * laplacian``) over (detector column, detector row), from a separate electron-density
map, so weakly absorbing but dense structures (unstained tissue, cell membranes, bubbles)
get fringes. Not modelled: beam hardening (monochromatic beam), scatter, sample motion,
cone-beam geometry, and objects outside the field of view (the tube always fits in it).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from tomoloc.boxes import Bbox, BoxRecord, bbox_from_mask, write_boxes

__all__ = ["LABELS", "KINDS", "Phantom", "make_phantom", "write_batch", "volume_seed"]

#: Structure ids in :attr:`Phantom.labels` per sample kind (0 is "not sample" for both).
#: fish: body = skin, muscle and everything else inside the body outline; skeleton = spine,
#: ribs, arches, skull and otoliths; eyes = eyeball incl. lens and pigment layer; organs =
#: brain, gut, liver, heart, swim bladder (may be gas-filled) and yolk sac; fins = fin folds,
#: caudal and pectoral fins (thin, so often below the 50 % rule at coarse resolution).
#: embryo: body = outer (pigmented) layer and cell membranes; yolk = yolk-laden vegetal cells;
#: cells = animal-half cells; cavity = fluid-filled blastocoel (part of the sample).
LABELS: dict[str, dict[int, str]] = {
    "fish": {1: "body", 2: "skeleton", 3: "eyes", 4: "organs", 5: "fins"},
    "embryo": {1: "body", 6: "yolk", 7: "cells", 8: "cavity"},
}
KINDS = ("fish", "embryo")

# Fine-grid material classes (internal).
_AIR, _WALL, _MEDIUM, _SAMPLE, _BUBBLE, _DEBRIS = 0, 1, 2, 3, 4, 5

# Linear attenuation of water (1/cm) vs photon energy (keV), NIST XCOM, total with coherent.
_MU_WATER = ((10.0, 5.329), (15.0, 1.673), (20.0, 0.8096), (30.0, 0.3756), (40.0, 0.2683), (50.0, 0.2269))
# Refractive index decrement of water at 20 keV; delta ~ 1/E^2.
_DELTA_WATER_20KEV = 5.77e-7

# Tube materials: (mu relative to water range, electron density relative to water).
_TUBE_MATERIALS = {
    "borosilicate glass": ((7.0, 11.0), 2.10),
    "polyimide": ((0.95, 1.15), 1.40),
    "FEP": ((2.6, 3.6), 1.90),
    "PMMA": ((0.80, 0.90), 1.15),
    "polypropylene": ((0.45, 0.55), 0.88),
}
_TUBE_P = (0.35, 0.25, 0.15, 0.15, 0.10)
# Mounting media: (mu relative to water range, electron density relative to water).
_MEDIA = {
    "water": ((1.0, 1.0), 1.0),
    "agarose": ((1.0, 1.02), 1.005),
    "PBS": ((1.02, 1.04), 1.01),
    "ethanol 70%": ((0.82, 0.9), 0.90),
    "epoxy resin": ((0.92, 1.15), 1.10),
}
_MEDIA_FOR = {"fish": (("water", "agarose", "ethanol 70%", "epoxy resin"), (0.25, 0.3, 0.3, 0.15)),
              "embryo": (("water", "agarose", "PBS"), (0.3, 0.45, 0.25))}
_FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


@dataclass
class Phantom:
    """One synthetic reconstructed volume with its ground truth.

    Attributes
    ----------
    volume : np.ndarray
        float32 ``(Z, Y, X)``: reconstructed linear attenuation (1/cm); axis 0 is the rotation
        axis. Voxels outside the circular field of view hold ``params["acquisition"]["fov_fill"]``.
    mask : np.ndarray
        bool ``(Z, Y, X)``: sample voxels (a voxel is sample if at least half of its fine
        sub-voxels are), never tube, medium, bubbles or debris.
    labels : np.ndarray
        uint8 ``(Z, Y, X)``: 0 outside the mask, else the structure id (see :data:`LABELS`)
        holding most of the voxel's sample sub-voxels. ``labels > 0`` equals ``mask``.
    bbox : Bbox
        ``bbox_from_mask(mask)``: half-open ``((z0, z1), (y0, y1), (x0, x1))``.
    kind : str
        ``"fish"`` or ``"embryo"``.
    seed : int
        The seed that reproduces this phantom with the same keyword arguments.
    params : dict
        Every random choice (geometry, materials, acquisition), JSON-serialisable.
    """

    volume: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    bbox: Bbox
    kind: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- small helpers
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.7g}")
    return obj


def _mu_water(energy_kev: float) -> float:
    e, m = np.log(np.array(_MU_WATER)).T
    return float(np.exp(np.interp(math.log(energy_kev), e, m)))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perp_frame(t: np.ndarray, roll: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``t`` (and each other), rotated by ``roll``."""
    helper = np.array([0.0, 1.0, 0.0]) if abs(t[1]) < 0.9 else np.array([0.0, 0.0, 1.0])
    p1 = _unit(np.cross(t, helper))
    p2 = np.cross(t, p1)
    n = math.cos(roll) * p1 + math.sin(roll) * p2
    b = np.cross(t, n)
    return n, b


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _sphere_dirs(n: int = 26) -> np.ndarray:
    """Roughly uniform unit vectors (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.cos(th), np.sin(phi) * np.sin(th)], axis=1)


def _fine_coords(lo: int, hi: int, os_: int) -> np.ndarray:
    """Coarse-unit coordinates of fine voxel centres ``lo..hi-1`` (coarse voxel i is at i)."""
    return ((np.arange(lo, hi, dtype=np.float32) + 0.5) / os_ - 0.5).astype(np.float32)


def _fine_box(pts: np.ndarray, margin: float, fshape: tuple[int, int, int], os_: int) -> tuple[slice, ...] | None:
    """Fine-index slices covering points (coarse units) plus a margin, clipped; None if empty."""
    lo = np.floor((pts.min(axis=0) - margin + 0.5) * os_).astype(int)
    hi = np.ceil((pts.max(axis=0) + margin + 0.5) * os_).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, fshape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


class _Canvas:
    """Fine-grid maps being painted: attenuation, electron density, labels, material class."""

    def __init__(self, fshape: tuple[int, int, int], os_: int):
        self.fshape = fshape
        self.os = os_
        self.mu = np.zeros(fshape, np.float32)
        self.de = np.zeros(fshape, np.float32)
        self.lab = np.zeros(fshape, np.uint8)
        self.mat = np.zeros(fshape, np.uint8)

    def coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = _fine_coords(box[0].start, box[0].stop, self.os)[:, None, None]
        y = _fine_coords(box[1].start, box[1].stop, self.os)[None, :, None]
        x = _fine_coords(box[2].start, box[2].stop, self.os)[None, None, :]
        return z, y, x

    def flat_index(self, box: tuple[slice, ...], local_flat: np.ndarray) -> np.ndarray:
        sub = tuple(s.stop - s.start for s in box)
        kz, ky, kx = np.unravel_index(local_flat, sub)
        Yf, Xf = self.fshape[1], self.fshape[2]
        return ((kz + box[0].start) * Yf + (ky + box[1].start)) * Xf + (kx + box[2].start)

    def paint(self, gidx: np.ndarray, mu: Any, de: Any, lab: Any, mat: int) -> None:
        self.mu.reshape(-1)[gidx] = mu
        self.de.reshape(-1)[gidx] = de
        self.lab.reshape(-1)[gidx] = lab
        self.mat.reshape(-1)[gidx] = mat


# --------------------------------------------------------------------------------- tube
class _Tube:
    """A straight tube along axis 0 (maybe off-centre and tilted), with optional rounded
    bottom and a meniscus. Coordinates are coarse voxel units ``(z, y, x)``."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]):
        Z, Y, X = shape
        n = min(Y, X)
        self.rfov = n / 2.0
        self.zref = (Z - 1) / 2.0
        self.material = str(rng.choice(list(_TUBE_MATERIALS), p=_TUBE_P))
        (mlo, mhi), self.rel_e = _TUBE_MATERIALS[self.material]
        self.rel_mu = _u(rng, mlo, mhi)
        self.r_out = self.rfov * _u(rng, 0.62, 0.93)
        wall = _u(rng, 0.04, 0.13) if self.material != "borosilicate glass" else _u(rng, 0.03, 0.08)
        self.r_in = self.r_out * (1.0 - wall)
        tilt = min(abs(rng.normal(0.0, 0.8)), 2.5) * math.pi / 180
        az = _u(rng, 0, 2 * math.pi)
        self.sy, self.sx = math.tan(tilt) * math.cos(az), math.tan(tilt) * math.sin(az)
        excursion = math.tan(tilt) * Z / 2
        room = max(0.0, 0.97 * self.rfov - self.r_out - excursion)
        off = room * math.sqrt(rng.uniform()) if rng.uniform() < 0.8 else 0.0
        oa = _u(rng, 0, 2 * math.pi)
        self.cy = (Y - 1) / 2.0 + off * math.cos(oa)
        self.cx = (X - 1) / 2.0 + off * math.sin(oa)
        self.tilt_deg = tilt * 180 / math.pi
        # "up" is the z direction opposite to gravity; the bottom is at the other end.
        self.up = 1 if rng.uniform() < 0.5 else -1
        self.bottom: dict[str, float] | None = None
        self.meniscus: dict[str, float] | None = None
        has_bottom = rng.uniform() < 0.25
        zb_frac, k = _u(rng, 0.0, 0.2), _u(rng, 0.3, 1.0)
        k = min(k, 0.3 * Z / self.r_out)  # long caps are flattened (plugged / flat-bottomed tubes)
        has_men = rng.uniform() < 0.3
        zm_frac, hm = _u(rng, 0.03, 0.25), _u(rng, 0.05, 0.45)
        if has_bottom:
            down = -self.up
            tip_from_end = zb_frac * Z  # outer tip, measured inward from the bottom end
            tip = (-0.5 + tip_from_end) if down < 0 else (Z - 0.5 - tip_from_end)
            zb = tip - down * k * self.r_out  # centre of the cap (end of the straight part)
            self.bottom = {"z": zb, "down": down, "k": k}
        if has_men:
            z_m = (Z - 0.5 - zm_frac * Z) if self.up > 0 else (-0.5 + zm_frac * Z)
            # wetting glass: concave (liquid climbs the wall); hydrophobic plastics: convex.
            sign = 1.0 if self.material in ("borosilicate glass", "polyimide", "PMMA") else -1.0
            self.meniscus = {"z": z_m, "up": self.up, "h": sign * hm * self.r_in}

    def centre(self, z: Any) -> tuple[Any, Any]:
        return self.cy + self.sy * (z - self.zref), self.cx + self.sx * (z - self.zref)

    def _r2(self, z: Any, y: Any, x: Any) -> tuple[Any, Any]:
        cy, cx = self.centre(z)
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        rho2 = r2
        if self.bottom is not None:
            dz = np.maximum((z - self.bottom["z"]) * self.bottom["down"], 0) / self.bottom["k"]
            rho2 = r2 + dz * dz
        return r2, rho2

    def medium_margin(self, pts: np.ndarray) -> np.ndarray:
        """Distance-like margin (coarse voxels) of points inside the medium; < 0 outside."""
        z, y, x = pts[:, 0], pts[:, 1], pts[:, 2]
        r2, rho2 = self._r2(z, y, x)
        m = self.r_in - np.sqrt(rho2)
        if self.meniscus is not None:
            men = self.meniscus
            zs = men["z"] + men["up"] * men["h"] * r2 / self.r_in**2
            m = np.minimum(m, -(z - zs) * men["up"])
        return m

    def random_medium_point(self, rng: np.random.Generator, Z: int, r_max: float) -> np.ndarray:
        z = _u(rng, -0.5, Z - 0.5)
        cy, cx = self.centre(z)
        r = r_max * math.sqrt(rng.uniform())
        a = _u(rng, 0, 2 * math.pi)
        return np.array([z, cy + r * math.cos(a), cx + r * math.sin(a)])

    def paint(self, cv: _Canvas, mu_tube: float, de_tube: float, mu_med: float, de_med: float) -> None:
        """Paint wall and medium with anti-aliased (one fine voxel wide) wall surfaces."""
        Zf, Yf, Xf = cv.fshape
        os_ = cv.os
        step = max(1, 2_000_000 // (Yf * Xf))  # z slabs bound the temporaries
        for z0 in range(0, Zf, step):
            sl = slice(z0, min(z0 + step, Zf))
            z, y, x = cv.coords((sl, slice(0, Yf), slice(0, Xf)))
            r2, rho2 = self._r2(z, y, x)
            rho = np.sqrt(np.broadcast_to(rho2, (sl.stop - sl.start, Yf, Xf)), dtype=np.float32)
            occ_out = np.clip((self.r_out - rho) * os_ + 0.5, 0, 1)
            occ_in = np.clip((self.r_in - rho) * os_ + 0.5, 0, 1)
            wet = occ_in
            if self.meniscus is not None:
                men = self.meniscus
                wet = occ_in * (((z - men["z"]) * men["up"] - men["h"] * r2 / self.r_in**2) < 0)
            wall = occ_out - occ_in
            cv.mu[sl] = wall * np.float32(mu_tube) + wet * np.float32(mu_med)
            cv.de[sl] = wall * np.float32(de_tube) + wet * np.float32(de_med)
            cv.mat[sl][wall >= 0.5] = _WALL
            cv.mat[sl][wet >= 0.5] = _MEDIUM

    def params(self) -> dict[str, Any]:
        return {
            "material": self.material, "mu_rel_water": self.rel_mu, "electron_density_rel_water": self.rel_e,
            "r_inner": self.r_in, "r_outer": self.r_out, "centre_yx_at_mid_z": [self.cy, self.cx],
            "slope_yx_per_z": [self.sy, self.sx], "tilt_deg": self.tilt_deg, "up": self.up,
            "bottom": self.bottom, "meniscus": self.meniscus,
        }


# --------------------------------------------------------------------------------- fish
def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Fish:
    """A fish in its own frame: arc length ``s`` from the snout, ``u`` dorsal, ``v`` lateral.

    The centre line is straight or a circular arc bent sideways (curvature ``kappa``).
    """

    kind = "fish"

    def __init__(self, rng: np.random.Generator, tube: _Tube, shape: tuple[int, int, int], shrink: float,
                 n_samples: int, mu: dict[str, float]):
        Z = shape[0]
        R = tube.r_in
        g = rng
        self.morph = "larva" if g.uniform() < 0.55 else "adult"
        crowd = 1.0 / math.sqrt(n_samples)
        self.h_max = R * _u(g, 0.42, 0.78) * shrink * crowd
        self.w_max = self.h_max * _u(g, 0.5, 0.8)
        self.aspect = _u(g, 5.5, 9.0) if self.morph == "larva" else _u(g, 3.8, 5.5)
        self.L = 2 * self.h_max * self.aspect
        self.x_h = _u(g, 0.05, 0.11)
        self.x_m = _u(g, 0.25, 0.45)
        self.x_p = _u(g, 0.78, 0.88)
        self.head_r, self.w_head_r = _u(g, 0.8, 1.0), _u(g, 1.0, 1.25)
        self.pr, self.w_pr = _u(g, 0.2, 0.38), _u(g, 0.15, 0.3)
        self.t_fin = _u(g, 0.2, 0.45)  # half thickness, coarse voxels
        if self.morph == "larva":
            fh = _u(g, 0.15, 0.35)
            self.fins = {"dorsal": [_u(g, 0.3, 0.45), 1.0, fh], "ventral": [_u(g, 0.5, 0.6), 1.0, fh * _u(g, 0.8, 1.1)]}
        else:
            d0, a0 = _u(g, 0.42, 0.55), _u(g, 0.55, 0.68)
            self.fins = {"dorsal": [d0, d0 + _u(g, 0.1, 0.2), _u(g, 0.3, 0.7)],
                         "ventral": [a0, a0 + _u(g, 0.1, 0.2), _u(g, 0.3, 0.6)]}
        self.c_len = self.L * _u(g, 0.07, 0.15)
        self.c_h = self.h_max * _u(g, 0.7, 1.5)
        self.fork = _u(g, 0.0, 0.45)
        # eyes, lens
        self.x_e = self.x_h * _u(g, 0.9, 1.6)
        self.r_e_rel = _u(g, 0.3, 0.45)
        self.eye_u_rel = _u(g, 0.0, 0.2)
        self.eye_out = _u(g, 0.2, 0.5)
        self.lens_rel = _u(g, 0.33, 0.45)
        # skeleton
        self.ossification = _u(g, 0.0, 0.4) if self.morph == "larva" else _u(g, 0.6, 1.0)
        self.n_vert = int(g.integers(26, 37))
        self.r_sp = self.h_max * _u(g, 0.06, 0.11)
        self.u_sp_rel = _u(g, 0.0, 0.2)
        self.x_skull = self.x_e + _u(g, 0.05, 0.1)
        self.plate_phase = _u(g, 0, 2 * math.pi)
        self.x_oto = self.x_e + _u(g, 0.04, 0.08)
        self.r_oto = max(0.3, self.h_max * _u(g, 0.03, 0.06))
        # organs (local ellipsoids: centre (x, u_rel, v_rel), semi-axes (x, u_rel, v_rel))
        self.organs = {
            "brain": [self.x_e + _u(g, 0.01, 0.04), 0.3, 0.0, _u(g, 0.05, 0.08), 0.45, 0.55],
            "liver": [_u(g, 0.17, 0.27), -0.3, _u(g, -0.2, 0.2), _u(g, 0.05, 0.08), 0.35, 0.45],
            "gut": [_u(g, 0.3, 0.5), -0.35, 0.0, _u(g, 0.1, 0.2), 0.25, 0.3],
            "heart": [self.x_e + _u(g, 0.04, 0.08), -0.55, 0.0, 0.035, 0.2, 0.25],
            "swim bladder": [_u(g, 0.25, 0.35), _u(g, 0.0, 0.15), 0.0, _u(g, 0.06, 0.1), _u(g, 0.22, 0.35), 0.3],
        }
        self.bladder_gas = bool(g.uniform() < 0.5)
        self.yolk = bool(self.morph == "larva" and g.uniform() < 0.35)
        if self.yolk:
            self.organs["yolk sac"] = [_u(g, 0.15, 0.25), -0.55, 0.0, _u(g, 0.08, 0.14), 0.5, 0.6]
        # texture
        self.myo_amp = _u(g, 0.01, 0.05)
        self.stain_grad = _u(g, -0.05, 0.25)
        # pose
        self.heading = 1 if g.uniform() < 0.5 else -1
        big_tilt = g.uniform() < 0.15
        tilt_sd = (12.0 if big_tilt else 4.0) * shrink
        self.tilt = min(abs(g.normal(0, tilt_sd)), 30.0) * math.pi / 180
        self.tilt_az = _u(g, 0, 2 * math.pi)
        self.roll = _u(g, 0, 2 * math.pi)
        self.kappa = 0.0
        if g.uniform() < 0.25:
            self.kappa = (1 if g.uniform() < 0.5 else -1) * _u(g, 0.15, 0.9) * shrink / self.L
        t0 = np.array([math.cos(self.tilt), math.sin(self.tilt) * math.cos(self.tilt_az),
                       math.sin(self.tilt) * math.sin(self.tilt_az)]) * self.heading
        self.t0 = t0
        self.n0, self.b0 = _perp_frame(t0, self.roll)
        # placement: the fish's mid point; at least 60 % of min(length, Z) inside the volume
        lz = self.L * abs(math.cos(self.tilt)) + self.c_len
        m = min(lz, Z)
        zc = _u(g, 0.6 * m - lz / 2, Z - 0.6 * m + lz / 2) - 0.5
        ext = self.h_max * (1 + max(self.fins["dorsal"][2], self.fins["ventral"][2]))
        room = max(0.0, R - ext)
        r, a = room * math.sqrt(g.uniform()), _u(g, 0, 2 * math.pi)
        cy, cx = tube.centre(zc)
        mid = np.array([zc, cy + r * math.cos(a), cx + r * math.sin(a)])
        am, vm = self._arc(np.array(self.L / 2), np.array(0.0))
        self.c0 = mid - float(am) * self.t0 - float(vm) * self.b0
        # materials
        self._materials(g, mu)
        self._tables()

    # -- geometry
    def _arc(self, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.kappa == 0.0:
            return s, v
        rc = 1.0 / self.kappa
        ang = s * self.kappa
        return (rc - v) * np.sin(ang), rc - (rc - v) * np.cos(ang)

    def to_world(self, s: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, vv = self._arc(s, v)
        return self.c0 + a[:, None] * self.t0 + u[:, None] * self.n0 + vv[:, None] * self.b0

    def to_local(self, a: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(along, dorsal, lateral) in the straight frame -> (s, u, v) in the bent frame."""
        if self.kappa == 0.0:
            return a, u, v
        rc = 1.0 / self.kappa
        sg = 1.0 if rc > 0 else -1.0
        q = rc - v
        s = rc * np.arctan2(a * sg, q * sg)
        return s, u, rc - sg * np.sqrt(a * a + q * q)

    def _tables(self) -> None:
        xs = np.linspace(0.0, 1.0, 513)
        hb = np.where(xs < self.x_h, np.sqrt(np.clip(1 - (1 - xs / self.x_h) ** 2, 0, 1)), 1.0)

        def shape(head: float, pr: float) -> np.ndarray:
            out = np.empty_like(xs)
            a = xs <= self.x_m
            out[a] = head + (1 - head) * _smoothstep((xs[a] - self.x_h) / (self.x_m - self.x_h))
            b = (xs > self.x_m) & (xs <= self.x_p)
            out[b] = 1 - (1 - pr) * (1 - np.cos(math.pi * (xs[b] - self.x_m) / (self.x_p - self.x_m))) / 2
            c = xs > self.x_p
            out[c] = pr
            end = xs > 0.97
            out[end] *= 1 - 0.6 * (xs[end] - 0.97) / 0.03
            return out

        self.xs = xs
        self.H = np.maximum(hb * shape(self.head_r, self.pr), 0.02).astype(np.float32)
        self.W = np.maximum(hb * shape(self.w_head_r, self.w_pr), 0.02).astype(np.float32)
        fins = []
        for name in ("dorsal", "ventral"):
            f0, f1, fh = self.fins[name]
            if self.morph == "larva":
                prof = fh * _smoothstep((xs - f0) / 0.08) * np.where(xs <= 1.0, 1.0, 0.0)
            else:
                t = (xs - f0) / (f1 - f0)
                prof = np.where((t >= 0) & (t <= 1), fh * np.sqrt(np.clip(t, 0, 1) * 8) * (1 - t) / 1.3, 0.0)
                prof = np.minimum(prof, fh)
            fins.append(prof)
        self.Fd, self.Fv = (f.astype(np.float32) for f in fins)

    def _profile(self, s: np.ndarray) -> tuple[np.ndarray, ...]:
        x = s / self.L
        h = np.interp(x, self.xs, self.H).astype(np.float32) * self.h_max
        w = np.interp(x, self.xs, self.W).astype(np.float32) * self.w_max
        fd = np.interp(x, self.xs, self.Fd).astype(np.float32) * self.h_max
        fv = np.interp(x, self.xs, self.Fv).astype(np.float32) * self.h_max
        return h, w, fd, fv

    def _eyes(self) -> list[tuple[float, float, float, float]]:
        s_e = self.x_e * self.L
        h, w, _, _ = self._profile(np.array([s_e], np.float32))
        r_e = self.r_e_rel * float(h[0])
        u_e = self.eye_u_rel * float(h[0])
        v_e = float(w[0]) - self.eye_out * r_e
        return [(s_e, u_e, sgn * v_e, r_e) for sgn in (1.0, -1.0)]

    def cloud(self, fins: bool = True) -> np.ndarray:
        """Points on the outline (world coordinates); ``fins=False``: body, eyes, yolk only."""
        s = np.linspace(0.0, self.L, 96)
        h, w, fd, fv = self._profile(s.astype(np.float32))
        ang = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        us = [(h[:, None] * np.sin(ang)).ravel()]
        vs = [(w[:, None] * np.cos(ang)).ravel()]
        ss = [np.repeat(s, ang.size)]
        if fins:
            sc = self.L + np.linspace(0, self.c_len, 12)
            hc = self._caudal_h(sc)
            us += [h + fd, -(h + fv), hc, -hc]
            vs += [0 * h, 0 * h, 0 * hc, 0 * hc]
            ss += [s, s, sc, sc]
        d = _sphere_dirs()
        for se, ue, ve, re in self._eyes():
            ss.append(se + re * d[:, 0])
            us.append(ue + re * d[:, 1])
            vs.append(ve + re * d[:, 2])
        if self.yolk:
            xo, uo, vo, ax, au, av = self.organs["yolk sac"]
            sy = xo * self.L
            hy, wy, _, _ = self._profile(np.array([sy], np.float32))
            ss.append(sy + ax * self.L * d[:, 0])
            us.append(uo * hy[0] + au * hy[0] * d[:, 1])
            vs.append(vo * wy[0] + av * wy[0] * d[:, 2])
        S, U, V = (np.concatenate(a).astype(np.float64) for a in (ss, us, vs))
        return self.to_world(S, U, V)

    def _caudal_h(self, sc: np.ndarray) -> np.ndarray:
        xc = np.clip((sc - self.L) / self.c_len, 0, 1)
        base = self.pr * 0.4 * self.h_max
        return (base + (self.c_h - base) * np.sin(0.5 * math.pi * np.sqrt(xc))) * np.sqrt(np.clip(1 - xc**6, 0, 1))

    def inside(self, pts: np.ndarray, margin: float) -> np.ndarray:
        d = pts - self.c0
        s, u, v = self.to_local(d @ self.t0, d @ self.n0, d @ self.b0)
        h, w, fd, fv = self._profile(np.clip(s, 0, self.L).astype(np.float32))
        hh = np.where(u > 0, h + fd, h + fv) + margin
        body = ((u / hh) ** 2 + (v / (w + margin)) ** 2 <= 1) & (s >= -margin) & (s <= self.L + self.c_len + margin)
        for se, ue, ve, re in self._eyes():
            body |= (s - se) ** 2 + (u - ue) ** 2 + (v - ve) ** 2 <= (re + margin) ** 2
        return body

    # -- materials
    def _materials(self, g: np.random.Generator, mu: dict[str, float]) -> None:
        self.stain = str(g.choice(["none", "iodine", "PTA"], p=[0.25, 0.4, 0.35]))
        cs = {"none": 0.0, "iodine": _u(g, 0.3, 1.2), "PTA": _u(g, 0.4, 2.0)}[self.stain]
        c0 = _u(g, 0.03, 0.09)
        o = self.ossification
        w, med = mu["water"], mu["medium"]
        dw, dmed = mu["delta_water"], mu["delta_medium"]

        def m(c_abs: float, c_e: float) -> tuple[float, float]:
            return med + w * c_abs, dmed + dw * c_e

        self.c_tis, self.cs = c0, cs
        self.mat = {
            "body": m(c0 + cs, c0),
            "fin": m(0.6 * c0 + cs * _u(g, 0.3, 0.7), 0.6 * c0),
            "brain": m(0.8 * c0 + cs * _u(g, 0.5, 0.85), 0.8 * c0),
            "liver": m(1.2 * c0 + cs * _u(g, 0.9, 1.4), 1.2 * c0),
            "gut": m(c0 + cs * _u(g, 0.8, 1.3), c0),
            "lumen": m(0.3 * c0 + cs * _u(g, 0.2, 0.6), 0.3 * c0),
            "heart": m(c0 * _u(g, 0.9, 1.1) + cs * _u(g, 0.8, 1.2), c0),
            "yolk sac": m(2.0 * c0 + cs * _u(g, 0.6, 1.2), 2.0 * c0),
            "retina": m(1.2 * c0 + cs * _u(g, 1.0, 1.5), 1.2 * c0),
            "pigment": m(1.5 * c0 + cs * _u(g, 1.5, 2.5) + _u(g, 0.1, 0.5), 1.5 * c0),
            "lens": m(_u(g, 0.15, 0.35) + cs * _u(g, 0.3, 0.8), 0.25),
            "notochord": m(0.5 * c0 + 0.4 * cs, 0.5 * c0),
            "bone": m(c0 + 0.5 * cs + o * _u(g, 1.0, 4.0), c0 + o * _u(g, 0.5, 0.9)),
            "otolith": (w * _u(g, 6.0, 14.0), dw * _u(g, 2.4, 2.9)),
        }
        if self.bladder_gas:
            self.mat["swim bladder"] = (0.0, 0.0)
        else:
            self.mat["swim bladder"] = m(0.2 * c0, 0.2 * c0)

    def rasterise(self, cv: _Canvas) -> None:
        box = _fine_box(self.cloud(), 1.5, cv.fshape, cv.os)
        if box is None:
            return
        z, y, x = cv.coords(box)
        dz, dy, dx = z - self.c0[0], y - self.c0[1], x - self.c0[2]
        t, n, b = (v.astype(np.float32) for v in (self.t0, self.n0, self.b0))
        a = dz * t[0] + dy * t[1] + dx * t[2]
        u = dz * n[0] + dy * n[1] + dx * n[2]
        v = dz * b[0] + dy * b[1] + dx * b[2]
        hmax = self.h_max * (1 + max(self.fins["dorsal"][2], self.fins["ventral"][2], 0.0)) + 1.0
        hmax = max(hmax, self.c_h + 1.0)
        vmax = max(self.w_max * self.w_head_r, self.h_max * 0.9) + 2.0
        pre = (np.abs(u) <= hmax)
        if self.kappa == 0.0:
            pre &= (a >= -1) & (a <= self.L + self.c_len + 1) & (np.abs(v) <= vmax)
        idx = np.flatnonzero(pre)
        a, u, v = a.reshape(-1)[idx], u.reshape(-1)[idx], v.reshape(-1)[idx]
        s, u, v = self.to_local(a, u, v)
        s, u, v = (np.asarray(q, np.float32) for q in (s, u, v))
        keep = (s >= -1) & (s <= self.L + self.c_len + 1) & (np.abs(v) <= vmax)
        idx, s, u, v = idx[keep], s[keep], u[keep], v[keep]
        M = self.mat
        L = self.L
        h, w, fd, fv = self._profile(np.clip(s, 0, L))
        inb = (s >= 0) & (s <= L)
        rn2 = (u / h) ** 2 + (v / w) ** 2
        body = inb & (rn2 <= 1)
        # fins (outside the body only): median fin folds / dorsal+anal, caudal, pectoral
        thin = np.abs(v) <= self.t_fin
        fin = inb & thin & ~body & (((u > 0) & (u <= h + fd)) | ((u < 0) & (-u <= h + fv)))
        sc = (s > L) & (s <= L + self.c_len) & thin
        hc = self._caudal_h(s[sc]).astype(np.float32)
        xc = (s[sc] - L) / self.c_len
        uc = np.abs(u[sc])
        notch = (xc > 1 - self.fork) & (uc < 0.6 * hc * (xc - (1 - self.fork)) / max(self.fork, 1e-3))
        fin[np.flatnonzero(sc)[(uc <= hc) & ~notch]] = True
        s_pf = (self.x_e + 0.1) * L
        lp = 0.05 * L
        hpf, wpf, _, _ = self._profile(np.array([s_pf], np.float32))
        hpf, wpf = float(hpf[0]), float(wpf[0])
        pect = (((s - s_pf - lp) / lp) ** 2 + ((u + 0.3 * hpf) / (2 * self.t_fin)) ** 2
                + ((np.abs(v) - 1.2 * wpf) / (0.45 * wpf)) ** 2) <= 1
        fin |= pect & ~body
        # structures that may lie outside the body outline: eyes, yolk sac
        eyes = self._eyes()
        outside_ok = np.zeros(s.size, bool)
        for se, ue, ve, re in eyes:
            outside_ok |= (s - se) ** 2 + (u - ue) ** 2 + (v - ve) ** 2 <= re * re
        if self.yolk:
            xo, uo, vo, ax, au, av = self.organs["yolk sac"]
            ho, wo, _, _ = self._profile(np.array([xo * L], np.float32))
            outside_ok |= (((s - xo * L) / (ax * L)) ** 2 + ((u - uo * ho[0]) / (au * ho[0])) ** 2
                           + ((v - vo * wo[0]) / (av * wo[0])) ** 2) <= 1
        # from here on, work on voxels that belong to the fish only
        k = np.flatnonzero(body | fin | outside_ok)
        idx, s, u, v, h, w, rn2 = idx[k], s[k], u[k], v[k], h[k], w[k], rn2[k]
        body, fin = body[k], fin[k]
        lab = np.zeros(idx.size, np.uint8)
        mu = np.zeros(idx.size, np.float32)
        de = np.zeros(idx.size, np.float32)

        def put(ii: np.ndarray, name: str, label: int, scale: Any = None) -> None:
            mm, dd = M[name]
            lab[ii] = label
            mu[ii] = mm if scale is None else mm * scale
            de[ii] = dd

        def window(lo: float, hi: float) -> np.ndarray:
            return np.flatnonzero((s >= lo) & (s <= hi))

        # body with muscle chevrons and a stain-penetration gradient
        period = L / self.n_vert
        bi = np.flatnonzero(body)
        tex = 1 + self.myo_amp * np.cos(2 * math.pi * (s[bi] + 0.6 * np.abs(u[bi])) / period) * (s[bi] > 0.2 * L)
        if self.cs > 0:
            tex = tex * (1 + self.stain_grad * (rn2[bi] - 0.5))
        put(bi, "body", 1, tex.astype(np.float32))
        put(np.flatnonzero(fin), "fin", 5)
        # organs, inside the body (the yolk sac may bulge out)
        for name, (xo, uo, vo, ax, au, av) in self.organs.items():
            so = xo * L
            ho, wo, _, _ = self._profile(np.array([so], np.float32))
            ho, wo = float(ho[0]), float(wo[0])
            ii = window(so - ax * L, so + ax * L)
            ss, uu, vv = s[ii], u[ii], v[ii]
            e = ((ss - so) / (ax * L)) ** 2 + ((uu - uo * ho) / (au * ho)) ** 2 + ((vv - vo * wo) / (av * wo)) ** 2 <= 1
            put(ii[e if name == "yolk sac" else e & body[ii]], name, 4)
            if name == "gut":  # lumen
                lum = (((ss - so) / (ax * L * 0.7)) ** 2 + ((uu - uo * ho) / (au * ho * 0.4)) ** 2
                       + (vv / (av * wo * 0.4)) ** 2) <= 1
                put(ii[lum & body[ii]], "lumen", 4)
        # skeleton: vertebral column (or notochord), ribs, arches, skull plates, otoliths
        o = self.ossification
        ii = window(self.x_skull * L, 0.98 * L)
        usp = self.u_sp_rel * h[ii]
        spine = (u[ii] - usp) ** 2 + v[ii] ** 2 <= self.r_sp**2
        if o > 0.25:
            centrum = spine & (np.cos(2 * math.pi * s[ii] / period) > -0.3)
            put(ii[spine & ~centrum], "notochord", 2)
            put(ii[centrum], "bone", 2)
            ii = window(0.0, 0.97 * L)
            ss, uu, vv, hh, ww, rr = s[ii], u[ii], v[ii], h[ii], w[ii], rn2[ii]
            usp = self.u_sp_rel * hh
            x = ss / L
            seg = (np.mod(ss / period, 1.0) < 0.16) & body[ii]
            ribs = seg & (x > 0.2) & (x < 0.5) & (rr >= 0.5) & (rr <= 0.62) & (uu < usp) & (np.abs(vv) > 0.15 * ww)
            arches = seg & (x >= self.x_skull) & (np.abs(vv) < 0.5 * self.r_sp) & (np.abs(uu - usp) < 0.8 * hh)
            put(ii[ribs | arches], "bone", 2)
            # braincase (dorsal plates over the brain) and lower jaw; not a closed shell
            ii = window(0.3 * self.x_h * L, self.x_skull * L)
            ss, uu, vv, hh, ww, rr = s[ii], u[ii], v[ii], h[ii], w[ii], rn2[ii]
            x = ss / L
            ang = np.arctan2(uu / hh, vv / ww)
            plates = np.cos(5 * ang + 3 * x / max(self.x_skull, 1e-3) + self.plate_phase) > -0.2
            shell = (rr >= 0.6) & (rr <= 0.78) & body[ii] & plates
            skull = shell & (uu > 0.15 * hh)
            skull |= shell & (x < self.x_e) & (uu < -0.35 * hh)
            put(ii[skull], "bone", 2)
        else:
            put(ii[spine], "notochord", 2)
        s_o = self.x_oto * L
        _, wo, _, _ = self._profile(np.array([s_o], np.float32))
        ii = window(s_o - self.r_oto, s_o + self.r_oto)
        for sgn in (1.0, -1.0):
            oto = (s[ii] - s_o) ** 2 + u[ii] ** 2 + (v[ii] - sgn * 0.4 * float(wo[0])) ** 2 <= self.r_oto**2
            put(ii[oto], "otolith", 2)
        # eyes: eyeball (retina), pigment shell, lens
        for se, ue, ve, re in eyes:
            ii = window(se - re, se + re)
            ss, uu, vv = s[ii], u[ii], v[ii]
            d2 = (ss - se) ** 2 + (uu - ue) ** 2 + (vv - ve) ** 2
            eye = d2 <= re * re
            put(ii[eye], "retina", 3)
            put(ii[eye & (d2 >= (0.82 * re) ** 2)], "pigment", 3)
            rl = self.lens_rel * re
            lens = (ss - se + 0.15 * re) ** 2 + (uu - ue) ** 2 + (vv - ve - np.sign(ve) * 0.5 * re) ** 2 <= rl * rl
            put(ii[lens & eye], "lens", 3)
        sel = lab > 0
        gidx = cv.flat_index(box, idx[sel])
        cv.paint(gidx, mu[sel], de[sel], lab[sel], _SAMPLE)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "fish", "morph": self.morph, "length": self.L, "half_height": self.h_max, "half_width": self.w_max,
            "snout_zyx": self.c0, "direction_zyx": self.t0, "dorsal_zyx": self.n0, "tilt_deg": math.degrees(self.tilt),
            "roll_deg": math.degrees(self.roll), "curvature": self.kappa, "caudal_fin_length": self.c_len,
            "fins": self.fins, "eye": {"x": self.x_e, "radius_rel": self.r_e_rel},
            "ossification": self.ossification, "vertebrae": self.n_vert, "organs": self.organs,
            "swim_bladder_gas": self.bladder_gas, "yolk_sac": self.yolk, "stain": self.stain,
            "contrast_tissue": self.c_tis, "contrast_stain": self.cs,
            "mu_per_cm": {k: v[0] for k, v in self.mat.items()},
        }


# ------------------------------------------------------------------------------- embryo
class _Embryo:
    """A frog-like embryo: an ellipsoid of Voronoi cells, a yolky vegetal half, an optional
    blastocoel and a pigmented outer layer on the animal half."""

    kind = "embryo"

    def __init__(self, rng: np.random.Generator, tube: _Tube, shape: tuple[int, int, int], shrink: float,
                 n_samples: int, mu: dict[str, float]):
        Z = shape[0]
        g = rng
        r = tube.r_in * _u(g, 0.5, 0.88) * shrink / (n_samples ** (1 / 3) if n_samples > 1 else 1.0)
        r = min(r, 0.47 * Z * shrink)
        self.r = r
        self.axes = r * (1 + g.uniform(-0.08, 0.08, 3))
        self.rot = _random_rotation(g)  # columns: animal-vegetal axis, two others
        rmax = float(self.axes.max())
        zc = _u(g, rmax, Z - 1 - rmax) if Z - 1 - 2 * rmax > 0 else (Z - 1) / 2
        cy, cx = tube.centre(zc)
        room = max(0.0, tube.r_in - rmax - 0.5)
        rr, a = room * math.sqrt(g.uniform()), _u(g, 0, 2 * math.pi)
        self.centre = np.array([zc, cy + rr * math.cos(a), cx + rr * math.sin(a)])
        self.n_cells = int(g.integers(40, 320))
        self.gradient = _u(g, 0.5, 3.0)
        pts = []
        while sum(len(p) for p in pts) < self.n_cells:
            q = g.uniform(-1, 1, (4 * self.n_cells, 3))
            q = q[(q**2).sum(1) <= 1]
            acc = g.uniform(size=len(q)) < 0.25 + 0.75 * ((q[:, 0] + 1) / 2) ** self.gradient
            pts.append(q[acc])
        self.seeds_unit = np.concatenate(pts)[: self.n_cells]
        self.yolk_level = _u(g, -0.45, 0.1)
        self.cavity = None
        if g.uniform() < 0.6:
            self.cavity = [_u(g, 0.2, 0.45), _u(g, 0.25, 0.45)]  # centre on AV axis, radius (unit)
        self.membrane = _u(g, 0.25, 0.6)  # coarse voxels
        self.outer = _u(g, 0.5, 1.4)
        self.stain = "iodine" if g.uniform() < 0.2 else "none"
        cs = _u(g, 0.2, 0.8) if self.stain == "iodine" else 0.0
        c_cell = _u(g, 0.04, 0.14)
        c_yolk = c_cell + _u(g, 0.05, 0.25)
        c_mem = c_cell + _u(g, -0.05, 0.03)
        c_pig = c_cell + _u(g, 0.05, 0.3)
        c_cav = _u(g, -0.01, 0.01)
        self.cell_sd = _u(g, 0.002, 0.012)
        self.cell_var = g.normal(0, 1, self.n_cells).astype(np.float32)
        w, med, dw, dmed = mu["water"], mu["medium"], mu["delta_water"], mu["delta_medium"]
        self.mat = {
            "cells": (med + w * (c_cell + cs), dmed + dw * c_cell),
            "yolk": (med + w * (c_yolk + 1.3 * cs), dmed + dw * c_yolk),
            "membrane": (med + w * (c_mem + 0.5 * cs), dmed + dw * c_mem),
            "pigment": (med + w * (c_pig + cs), dmed + dw * c_cell),
            "cavity": (med * (1 + c_cav), dmed * (1 + c_cav)),
        }
        self.contrast = {"cells": c_cell, "yolk": c_yolk, "membrane": c_mem, "pigment": c_pig, "cavity": c_cav,
                         "stain": cs}

    def _to_unit(self, pts: np.ndarray) -> np.ndarray:
        return ((pts - self.centre) @ self.rot) / self.axes

    def cloud(self) -> np.ndarray:
        d = _sphere_dirs(200)
        return self.centre + (d * self.axes) @ self.rot.T

    def inside(self, pts: np.ndarray, margin: float) -> np.ndarray:
        q = ((pts - self.centre) @ self.rot) / (self.axes + margin)
        return (q**2).sum(1) <= 1

    def rasterise(self, cv: _Canvas) -> None:
        box = _fine_box(self.cloud(), 1.0, cv.fshape, cv.os)
        if box is None:
            return
        z, y, x = cv.coords(box)
        R = self.rot.astype(np.float32)
        d = [z - self.centre[0], y - self.centre[1], x - self.centre[2]]
        q = [(d[0] * R[0, k] + d[1] * R[1, k] + d[2] * R[2, k]) / self.axes[k] for k in range(3)]
        rn2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
        idx = np.flatnonzero(rn2 <= 1)
        q0 = q[0].reshape(-1)[idx]
        rn = np.sqrt(rn2.reshape(-1)[idx])
        cell, gap = self._voronoi(box, rn2.shape, idx, cv.os)
        mem = gap < 2 * self.membrane
        lab = np.full(idx.size, 7, np.uint8)
        M = self.mat
        var = 1 + self.cell_sd * self.cell_var[cell]
        mu = (M["cells"][0] * var).astype(np.float32)
        de = np.full(idx.size, M["cells"][1], np.float32)
        yolk = q0 < self.yolk_level + 0.08 * np.sin(7 * q0)
        lab[yolk] = 6
        mu[yolk] = M["yolk"][0] * var[yolk]
        de[yolk] = M["yolk"][1]
        lab[mem] = 1
        mu[mem] = M["membrane"][0]
        de[mem] = M["membrane"][1]
        if self.cavity is not None:
            c, rc = self.cavity
            q1 = q[1].reshape(-1)[idx]
            q2 = q[2].reshape(-1)[idx]
            cav = (q0 - c) ** 2 + q1**2 + q2**2 <= rc * rc
            lab[cav] = 8
            mu[cav] = M["cavity"][0]
            de[cav] = M["cavity"][1]
        outer = rn >= 1 - self.outer / self.r
        lab[outer] = 1
        mu[outer] = np.where(q0[outer] > -0.1, M["pigment"][0], M["membrane"][0])
        de[outer] = M["membrane"][1]
        cv.paint(cv.flat_index(box, idx), mu, de, lab, _SAMPLE)

    def _voronoi(self, box: tuple[slice, ...], sub: tuple[int, ...], idx: np.ndarray, os_: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest cell seed and (second-nearest - nearest) seed distance for fine voxels
        ``idx`` of the sub-box (coarse units)."""
        seeds = self.centre + (self.seeds_unit * self.axes) @ self.rot.T
        kz, ky, kx = np.unravel_index(idx, sub)
        pts = np.empty((idx.size, 3), np.float64)
        for ax, (kk, b) in enumerate(zip((kz, ky, kx), box)):
            pts[:, ax] = (kk + b.start + 0.5) / os_ - 0.5
        dist, nn = cKDTree(seeds).query(pts, k=2)
        return nn[:, 0], dist[:, 1] - dist[:, 0]

    def params(self) -> dict[str, Any]:
        return {
            "kind": "embryo", "centre_zyx": self.centre, "semi_axes": self.axes, "rotation": self.rot,
            "n_cells": self.n_cells, "animal_cell_gradient": self.gradient, "yolk_level": self.yolk_level,
            "blastocoel": self.cavity, "membrane_half_thickness": self.membrane, "outer_layer": self.outer,
            "stain": self.stain, "contrast": self.contrast, "cell_sd": self.cell_sd,
            "mu_per_cm": {k: v[0] for k, v in self.mat.items()},
        }


# ------------------------------------------------------------------ projector / FBP
def _default_n_angles(n: int) -> int:
    return max(8, int(round(n * math.pi / 2)))


#: Sparse projector entries kept in memory (8 bytes each); larger geometries are rebuilt
#: chunk by chunk on every call instead of cached (slower, bounded memory).
_CACHE_ENTRIES = 48_000_000
_CHUNK_ENTRIES = 12_000_000


def _fov_pixels(Y: int, X: int, os_: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices and centre offsets (coarse units) of the grid pixels inside the FOV circle."""
    n = min(Y, X)
    yc = _fine_coords(0, Y * os_, os_) - (Y - 1) / 2
    xc = _fine_coords(0, X * os_, os_) - (X - 1) / 2
    inside = (yc[:, None] ** 2 + xc[None, :] ** 2) <= (n / 2) ** 2
    ys = np.broadcast_to(yc[:, None], inside.shape)[inside]
    xs = np.broadcast_to(xc[None, :], inside.shape)[inside]
    return np.flatnonzero(inside).astype(np.int64), ys, xs


def _interp_entries(ys: np.ndarray, xs: np.ndarray, theta: np.ndarray, n: int, os_: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation footprint of pixels on the detector: for every (pixel, angle) two
    bin indices (angle-major, over ``n * os_`` bins) and weights, shaped (npix, nangles, 2)."""
    nd = n * os_
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    t = xs[:, None] * cos[None, :] + ys[:, None] * sin[None, :]
    pos = (t + n / 2) * os_ - 0.5
    k0 = np.floor(pos).astype(np.int32)
    w1 = (pos - k0).astype(np.float32)
    w0 = 1 - w1
    w0[k0 < 0] = 0
    w1[k0 + 1 >= nd] = 0
    k0 = np.clip(k0, 0, nd - 2)
    k0 += (np.arange(theta.size, dtype=np.int32) * nd)[None, :]
    return np.stack([k0, k0 + 1], axis=2), np.stack([w0, w1], axis=2)


class _Projector:
    """Pixel-driven parallel-beam projector on the fine grid and back-projector on the coarse
    grid, as sparse matrices over chunks of angles (cached when small enough)."""

    def __init__(self, Y: int, X: int, os_: int, n_angles: int):
        self.Y, self.X, self.os, self.na = Y, X, os_, n_angles
        self.n = min(Y, X)
        self.theta = np.arange(n_angles) * (math.pi / n_angles)
        self.fine_idx, self._fys, self._fxs = _fov_pixels(Y, X, os_)
        self.coarse_idx, self._cys, self._cxs = _fov_pixels(Y, X, 1)
        per_angle = 2 * max(self.fine_idx.size, self.coarse_idx.size)
        step = max(1, _CHUNK_ENTRIES // per_angle)
        self.chunks = [(a, min(a + step, n_angles)) for a in range(0, n_angles, step)]
        self.cached = 2 * n_angles * (self.fine_idx.size + self.coarse_idx.size) <= _CACHE_ENTRIES
        self._fwd: dict[int, Any] = {}
        self._bwd: dict[int, Any] = {}

    def _forward(self, c: int) -> Any:
        if c in self._fwd:
            return self._fwd[c]
        a0, a1 = self.chunks[c]
        rows, w = _interp_entries(self._fys, self._fxs, self.theta[a0:a1], self.n, self.os)
        npix = self.fine_idx.size
        indptr = np.arange(npix + 1, dtype=np.int64) * (2 * (a1 - a0))
        A = sp.csc_matrix((w.reshape(-1) / np.float32(self.os), rows.reshape(-1), indptr),
                          shape=((a1 - a0) * self.n * self.os, npix))
        if self.cached:
            self._fwd[c] = A
        return A

    def _backward(self, c: int) -> Any:
        if c in self._bwd:
            return self._bwd[c]
        a0, a1 = self.chunks[c]
        cols, w = _interp_entries(self._cys, self._cxs, self.theta[a0:a1], self.n, 1)
        npix = self.coarse_idx.size
        indptr = np.arange(npix + 1, dtype=np.int64) * (2 * (a1 - a0))
        B = sp.csr_matrix((w.reshape(-1), cols.reshape(-1), indptr), shape=(npix, (a1 - a0) * self.n))
        if self.cached:
            self._bwd[c] = B
        return B

    def project(self, cols: np.ndarray) -> np.ndarray:
        """Line integrals (pixel units) of ``cols`` (n_fine_pixels, Z) -> (n_angles, n*os, Z)."""
        out = np.empty((self.na, self.n * self.os, cols.shape[1]), np.float32)
        for c, (a0, a1) in enumerate(self.chunks):
            out[a0:a1] = (self._forward(c) @ cols).reshape(a1 - a0, self.n * self.os, -1)
        return out

    def backproject(self, q: np.ndarray) -> np.ndarray:
        """Sum over angles of ``q`` (n_angles, n, Z) interpolated at coarse pixels -> (npix, Z)."""
        out = np.zeros((self.coarse_idx.size, q.shape[2]), np.float32)
        for c, (a0, a1) in enumerate(self.chunks):
            out += self._backward(c) @ q[a0:a1].reshape((a1 - a0) * self.n, -1)
        return out


@functools.lru_cache(maxsize=2)
def _projector(Y: int, X: int, os_: int, n_angles: int) -> _Projector:
    return _Projector(Y, X, os_, n_angles)


def _fourier_filter(size: int, name: str) -> np.ndarray:
    """Ramp filter built in real space (no DC offset) times a window, as in skimage.iradon."""
    nn = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * nn) ** 2
    filt = 2 * np.real(np.fft.fft(f))
    if name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        filt[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        filt *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif name == "hann":
        filt *= np.fft.fftshift(np.hanning(size))
    elif name != "ramp":
        raise ValueError(f"unknown filter {name!r}; use one of {', '.join(_FILTERS)}")
    return filt[: size // 2 + 1]


def _fbp(sino: np.ndarray, Y: int, X: int, n_angles: int, os_: int, filt: str, cor_shift: float) -> np.ndarray:
    """Filtered back-projection of ``sino`` (n_angles, n_det, Z) -> (Z, n_pix_in_fov)."""
    n = sino.shape[1]
    size = max(64, int(2 ** math.ceil(math.log2(2 * n))))
    H = _fourier_filter(size, filt)
    if cor_shift:
        H = H * np.exp(-2j * np.pi * np.fft.rfftfreq(size) * cor_shift)
    F = np.fft.rfft(sino, n=size, axis=1)
    F *= H[None, :, None]
    q = np.fft.irfft(F, n=size, axis=1)[:, :n, :].astype(np.float32)
    out = _projector(Y, X, os_, n_angles).backproject(q)  # (npix, Z)
    out *= np.float32(math.pi / (2 * n_angles))
    return out


# ------------------------------------------------------------------------- make_phantom
def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        s = tuple(int(v) for v in shape)
    except TypeError:
        raise ValueError(f"shape must be 3 integers (Z, Y, X), got {shape!r}") from None
    if len(s) != 3 or min(s) < 8:
        raise ValueError(f"shape must be 3 integers (Z, Y, X), each at least 8, got {tuple(shape)}")
    return s  # type: ignore[return-value]


def _block_sum(a: np.ndarray, os_: int) -> np.ndarray:
    """Sum of a boolean array over ``os_``-cubed blocks."""
    if os_ == 1:
        return a.astype(np.int32)
    Z, Y, X = (s // os_ for s in a.shape)
    dt = np.uint8 if os_**3 < 256 else np.int32
    return a.reshape(Z, os_, Y, os_, X, os_).sum(axis=(1, 3, 5), dtype=dt).astype(np.int32)


def make_phantom(
    shape: Sequence[int] = (64, 96, 96),
    kind: str = "fish",
    seed: int = 0,
    *,
    n_samples: int = 1,
    dose: float | None = None,
    phase_contrast: bool | float | None = None,
    rings: bool | float = True,
    oversample: int = 2,
    n_angles: int | None = None,
    noise: bool = True,
    clutter: bool = True,
    recon_filter: str | None = None,
    fov_fill: float = 0.0,
) -> Phantom:
    """Generate one synthetic reconstructed CT volume of a tube holding sample(s).

    Parameters
    ----------
    shape : (Z, Y, X)
        Output shape, each side >= 8; axis 0 is the rotation axis (the tube runs along it).
        The field of view is the circle of diameter ``min(Y, X)`` centred in the slice.
    kind : {"fish", "embryo"}
    seed : int
        Non-negative seed; the same arguments give a bit-identical phantom.
    n_samples : int
        Samples in the tube (non-overlapping; sizes shrink to fit). Mask and box cover all.
    dose : float, optional
        Incident photons per detector pixel and projection (``I0``); lower dose, more noise.
        Default: the exposure that makes the reconstruction's noise std at the tube centre a
        random 3-30 % (log-uniform) of the medium's attenuation, as an experimenter would set
        it (recorded as ``params["acquisition"]["dose_photons"]`` and ``"noise_target"``).
    phase_contrast : bool or float, optional
        Propagation phase contrast (edge fringes). A float is the propagation distance in cm.
        Default: on for embryos, on for half of the fish (random), off otherwise.
    rings : bool or float
        Per-detector-pixel gain errors (ring artefacts); a float scales their strength.
        The random draws are the same whether on or off, so only the rings differ.
    oversample : int
        Fine-grid factor per axis for the analytic attenuation map and the mask (>= 1).
    n_angles : int, optional
        Projections over [0, 180); default ``round(pi/2 * min(Y, X))``.
    noise : bool
        Poisson noise, beam flicker and zingers; False gives the noise-free measurement.
    clutter : bool
        Air bubbles and dense debris in the medium.
    recon_filter : {"ramp", "shepp-logan", "cosine", "hann"}, optional
        FBP filter; default random.
    fov_fill : float
        Value of voxels outside the circular field of view.

    Returns
    -------
    Phantom
    """
    shape = _check_shape(shape)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    os_ = int(oversample)
    if os_ < 1 or os_ != oversample:
        raise ValueError(f"oversample must be a positive integer, got {oversample!r}")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples!r}")
    if dose is not None and not dose > 0:
        raise ValueError(f"dose must be positive, got {dose!r}")
    if recon_filter is not None and recon_filter not in _FILTERS:
        raise ValueError(f"recon_filter must be one of {', '.join(_FILTERS)}, got {recon_filter!r}")
    Z, Y, X = shape
    N = min(Y, X)
    na = int(n_angles) if n_angles is not None else _default_n_angles(N)
    if na < 2:
        raise ValueError(f"n_angles must be >= 2, got {n_angles!r}")

    rng_geo, rng_smp, rng_clut, rng_acq, rng_noise, rng_ring = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6))

    # --- energy, materials
    energy = _u(rng_geo, 15.0, 35.0)
    mu_w = _mu_water(energy)
    de_w = _DELTA_WATER_20KEV * (20.0 / energy) ** 2
    names, probs = _MEDIA_FOR[kind]
    medium = str(rng_geo.choice(names, p=probs))
    (mlo, mhi), med_e = _MEDIA[medium]
    mu_med = mu_w * _u(rng_geo, mlo, mhi)
    de_med = de_w * med_e
    mus = {"water": mu_w, "medium": mu_med, "delta_water": de_w, "delta_medium": de_med}
    # --- tube and samples: rejection sampling on the analytic geometry. A few tubes are tried;
    # within a tube, samples shrink slowly after repeated failures. A placement must fit the
    # medium (not the wall, air or meniscus), not overlap other samples and (while possible)
    # give a sample box of 8-45 % of the volume.
    cls = _Fish if kind == "fish" else _Embryo
    lo_edge = np.array([-0.5, -0.5, -0.5])
    hi_edge = np.array([Z - 0.5, Y - 0.5, X - 0.5])
    found = None
    fallback = None
    n_attempts = 0
    for _tube_try in range(4):
        tube = _Tube(rng_geo, shape)
        for attempt in range(40):
            n_attempts += 1
            shrink = 0.93 ** (attempt // 8) if n_samples == 1 else 0.9 ** (attempt // 3)
            cand = [cls(rng_smp, tube, shape, shrink, int(n_samples), mus) for _ in range(int(n_samples))]
            clouds = [c.cloud() for c in cand]
            if any(tube.medium_margin(p).min() < 0.75 for p in clouds):
                continue
            if kind == "embryo" and any((p[:, 0].min() < 0.0) or (p[:, 0].max() > Z - 1.0) for p in clouds):
                continue
            if any(cand[i].inside(clouds[j], 1.0).any() or cand[j].inside(clouds[i], 1.0).any()
                   for i in range(len(cand)) for j in range(i + 1, len(cand))):
                continue
            allp = np.concatenate([c.cloud(fins=False) if kind == "fish" else p for c, p in zip(cand, clouds)])
            allp = allp[np.all((allp >= lo_edge) & (allp <= hi_edge), axis=1)]
            if len(allp) < 8 or np.any(allp.max(0) - allp.min(0) < 1.0):
                continue
            frac = float(np.prod(allp.max(0) - allp.min(0)) / (Z * Y * X))
            if 0.08 <= frac <= 0.45:
                found = (tube, cand, frac)
                break
            if fallback is None or abs(math.log(frac / 0.2)) < abs(math.log(fallback[2] / 0.2)):
                fallback = (tube, cand, frac)
        if found is not None:
            break
    if found is None:
        found = fallback
    if found is None:
        raise ValueError(f"could not place {n_samples} {kind}(s) in a {shape} volume; try fewer samples")
    tube, samples, frac = found

    # --- fine maps
    fshape = (Z * os_, Y * os_, X * os_)
    cv = _Canvas(fshape, os_)
    tube.paint(cv, mu_w * tube.rel_mu, de_w * tube.rel_e, mu_med, de_med)
    for smp in samples:
        smp.rasterise(cv)
    bubbles: list[dict[str, Any]] = []
    debris: list[dict[str, Any]] = []
    n_bub = int(rng_clut.poisson(_u(rng_clut, 0.0, 3.0))) if rng_clut.uniform() < 0.6 else 0
    n_deb = int(rng_clut.poisson(_u(rng_clut, 1.0, 12.0))) if rng_clut.uniform() < 0.8 else 0
    settle = rng_clut.uniform() < 0.5
    if clutter:
        for _ in range(n_bub):
            r = N * _logu(rng_clut, 0.012, 0.07)
            ax = r * (1 + rng_clut.uniform(-0.2, 0.2, 3))
            for _try in range(12):
                c = tube.random_medium_point(rng_clut, Z, tube.r_in - r)
                if _place_blob(cv, c, ax, 0.0, 0.0, _BUBBLE):
                    bubbles.append({"centre_zyx": c, "semi_axes": ax})
                    break
        for _ in range(n_deb):
            r = _u(rng_clut, 0.3, 1.6)
            ax = r * (1 + rng_clut.uniform(-0.35, 0.35, 3))
            m, e = mu_w * _logu(rng_clut, 3.0, 40.0), de_w * _u(rng_clut, 2.0, 7.0)
            for _try in range(12):
                c = tube.random_medium_point(rng_clut, Z, tube.r_in - r)
                if settle and tube.bottom is not None:
                    c[0] = tube.bottom["z"] + tube.bottom["down"] * _u(rng_clut, 0, tube.bottom["k"] * tube.r_in)
                    cy, cx = tube.centre(c[0])
                    rr, aa = (tube.r_in - r) * math.sqrt(rng_clut.uniform()), _u(rng_clut, 0, 2 * math.pi)
                    c[1], c[2] = cy + rr * math.cos(aa), cx + rr * math.sin(aa)
                if _place_blob(cv, c, ax, m, e, _DEBRIS):
                    debris.append({"centre_zyx": c, "semi_axes": ax, "mu_per_cm": m})
                    break

    # --- ground truth on the coarse grid
    mask = _block_sum(cv.lab > 0, os_) * 2 >= os_**3
    labels = np.zeros(shape, np.uint8)
    bbox = bbox_from_mask(mask)
    if bbox is not None:  # majority structure id per voxel, within the sample box only
        cb = tuple(slice(lo, hi) for lo, hi in bbox)
        fb = tuple(slice(lo * os_, hi * os_) for lo, hi in bbox)
        sub = cv.lab[fb]
        best = np.zeros(mask[cb].shape, np.int32)
        out = np.zeros(mask[cb].shape, np.uint8)
        for i in sorted(LABELS[kind]):
            c = _block_sum(sub == i, os_)
            better = c > best
            best[better] = c[better]
            out[better] = i
        out[~mask[cb]] = 0
        labels[cb] = out
    if bbox is None:
        raise ValueError(f"seed {seed}: the sample is smaller than half a voxel everywhere; use a larger shape")

    # --- acquisition
    vox_um = _sample_voxel_size(samples[0], tube, rng_acq)
    acq = _acquisition_params(rng_acq, kind, dose, phase_contrast, rings, noise, recon_filter, fov_fill, na, os_)
    if acq["dose_photons"] is None:
        # Exposure chosen for a target noise level: std(recon) ~ noise_target * mu_medium at the
        # tube centre, given the central ray's transmission.
        vox_cm = vox_um * 1e-4
        p_c = (mu_med * 2 * tube.r_in + mu_w * tube.rel_mu * 2 * (tube.r_out - tube.r_in)) * vox_cm
        gain = _fbp_noise_gain(N, na, acq["recon_filter"])
        i0 = (gain / (acq["noise_target"] * mu_med * vox_cm)) ** 2 * math.exp(p_c)
        acq["dose_photons"] = float(np.clip(i0, 100.0, 1e8))
    vol = _measure_and_reconstruct(cv, shape, os_, na, vox_um * 1e-4, acq, rng_noise, rng_ring)
    del cv

    params = {
        "kind": kind, "shape": list(shape), "oversample": os_, "n_samples": int(n_samples),
        "energy_keV": energy, "voxel_size_um": vox_um, "mu_water_per_cm": mu_w, "delta_water": de_w,
        "medium": {"name": medium, "mu_per_cm": mu_med, "delta": de_med},
        "tube": tube.params(),
        "samples": [s.params() for s in samples],
        "box_fraction_estimate": frac, "placement_attempts": n_attempts,
        "box_fraction": float(np.prod([b - a for a, b in bbox]) / (Z * Y * X)),
        "bubbles": bubbles if clutter else [], "debris": debris if clutter else [],
        "acquisition": acq,
    }
    return Phantom(volume=vol, mask=mask, labels=labels, bbox=bbox, kind=kind, seed=int(seed),
                   params=_jsonable(params))


def _place_blob(cv: _Canvas, c: np.ndarray, ax: np.ndarray, mu: float, de: float, mat: int) -> bool:
    """Paint an ellipsoid if it lies wholly in the medium and keeps a voxel away from samples."""
    pts = np.stack([c - ax - 1.0, c + ax + 1.0])
    box = _fine_box(pts, 0.0, cv.fshape, cv.os)
    if box is None:
        return False
    z, y, x = cv.coords(box)
    e = ((z - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((x - c[2]) / ax[2]) ** 2
    inner = e <= 1
    if not inner.any():
        return False
    near = ((z - c[0]) / (ax[0] + 1)) ** 2 + ((y - c[1]) / (ax[1] + 1)) ** 2 + ((x - c[2]) / (ax[2] + 1)) ** 2 <= 1
    sub = cv.mat[box]
    if np.any(sub[inner] != _MEDIUM) or np.any(sub[near] == _SAMPLE):
        return False
    idx = cv.flat_index(box, np.flatnonzero(inner))
    cv.paint(idx, mu, de, 0, mat)
    return True


def _sample_voxel_size(smp: Any, tube: _Tube, rng: np.random.Generator) -> float:
    """Physical voxel size (um) from a plausible physical size of the first sample."""
    if smp.kind == "fish":
        depth_mm = _logu(rng, 0.3, 4.0) if smp.morph == "larva" else _logu(rng, 2.0, 8.0)
        return depth_mm * 1000 / (2 * smp.h_max)
    diam_mm = _u(rng, 1.1, 1.5)
    return diam_mm * 1000 / (2 * smp.r)


def _acquisition_params(rng: np.random.Generator, kind: str, dose: float | None, phase: Any, rings: Any,
                        noise: bool, filt: str | None, fov_fill: float, na: int, os_: int) -> dict[str, Any]:
    g = rng
    noise_r = _logu(g, 0.03, 0.3)
    phase_on_r = kind == "embryo" or g.uniform() < 0.5
    dist_r = _logu(g, 10.0, 150.0) if kind == "embryo" else _logu(g, 5.0, 80.0)
    filt_r = str(g.choice(_FILTERS, p=(0.2, 0.5, 0.15, 0.15)))
    a = {
        "n_angles": na, "oversample": os_,
        "dose_photons": float(dose) if dose is not None else None,  # None: set from the noise target
        "noise_target": noise_r if dose is None else None,
        "noise": bool(noise),
        "detector_blur_px": _u(g, 0.4, 1.0),
        "beam_flicker": _u(g, 0.0, 0.004),
        "zinger_rate": _logu(g, 1e-7, 3e-6) if g.uniform() < 0.3 else 0.0,
        "ring_pixel_sd": _logu(g, 1e-4, 1e-3),
        "ring_defect_fraction": _u(g, 0.001, 0.005),
        "ring_defect_sd": _u(g, 0.002, 0.01),
        "ring_column_sd": _u(g, 0.0, 5e-4),
        "ring_blobs": int(g.poisson(3)),
        "ring_scale": float(rings) if not isinstance(rings, bool) else (1.0 if rings else 0.0),
        "cor_shift_px": float(np.clip(g.normal(0, 0.15), -0.5, 0.5)),
        "recon_filter": filt if filt is not None else filt_r,
        "fov_fill": float(fov_fill),
    }
    if phase is None:
        a["phase_contrast"] = bool(phase_on_r)
        a["propagation_cm"] = dist_r if phase_on_r else 0.0
    elif isinstance(phase, bool):
        a["phase_contrast"] = phase
        a["propagation_cm"] = dist_r if phase else 0.0
    else:
        a["phase_contrast"] = float(phase) > 0
        a["propagation_cm"] = float(phase)
    return a


def _fbp_noise_gain(n: int, n_angles: int, filt: str) -> float:
    """Std of the FBP output (per voxel units) for unit-variance white noise in the sinogram."""
    size = max(64, int(2 ** math.ceil(math.log2(2 * n))))
    H = _fourier_filter(size, filt)
    full = np.concatenate([H, H[1:-1][::-1]])
    var_q = float(np.mean(full**2))
    return math.sqrt(var_q * n_angles * (2.0 / 3.0)) * math.pi / (2 * n_angles)


def _measure_and_reconstruct(cv: _Canvas, shape: tuple[int, int, int], os_: int, na: int, vox_cm: float,
                             acq: dict[str, Any], rng_noise: np.random.Generator,
                             rng_ring: np.random.Generator) -> np.ndarray:
    Z, Y, X = shape
    N = min(Y, X)
    proj = _projector(Y, X, os_, na)

    def project(m: np.ndarray) -> np.ndarray:
        mz = m.reshape(Z, os_, -1).mean(axis=1) if os_ > 1 else m.reshape(Z, -1)
        cols = np.ascontiguousarray(mz[:, proj.fine_idx].T)  # (npix, Z)
        return proj.project(cols)  # line integrals, (mu unit) x coarse voxels

    P = project(cv.mu)
    P *= np.float32(vox_cm)
    I = np.exp(-P)
    if os_ > 1:  # detector pixels integrate intensity (non-linear partial volume)
        I = I.reshape(na, N, os_, Z).mean(axis=2)
    d = acq["propagation_cm"]
    if acq["phase_contrast"] and d > 0:
        # TIE edge term at detector resolution, linear in the log domain:
        # -log I = P - d * laplacian(integral of delta), laplacian over (column, row).
        phi = project(cv.de)
        if os_ > 1:
            phi = phi.reshape(na, N, os_, Z).mean(axis=2)
        pad = np.pad(phi, ((0, 0), (1, 1), (1, 1)), mode="edge")
        lap = pad[:, 2:, 1:-1] + pad[:, :-2, 1:-1] - 2 * phi
        if Z > 1:
            lap += pad[:, 1:-1, 2:] + pad[:, 1:-1, :-2] - 2 * phi
        I *= np.exp(np.float32(d / vox_cm) * lap)
    I = ndimage.gaussian_filter(I, (0, acq["detector_blur_px"], acq["detector_blur_px"]), mode="nearest")
    I0 = acq["dose_photons"]
    # gains: always drawn, so rings on/off leaves everything else identical
    g = rng_ring
    eps = g.normal(0, acq["ring_pixel_sd"], (N, Z))
    defect = g.uniform(size=(N, Z)) < acq["ring_defect_fraction"]
    eps += defect * g.normal(0, acq["ring_defect_sd"], (N, Z))
    eps += g.normal(0, acq["ring_column_sd"], (N, 1))
    for _ in range(acq["ring_blobs"]):
        c0, z0 = g.uniform(0, N), g.uniform(0, Z)
        wc, wz, amp = g.uniform(0.5, 2.0), g.uniform(1.0, 8.0), g.normal(0, 0.005)
        cc = np.arange(N)[:, None]
        zz = np.arange(Z)[None, :]
        eps += amp * np.exp(-0.5 * (((cc - c0) / wc) ** 2 + ((zz - z0) / wz) ** 2))
    gain = (1 + acq["ring_scale"] * eps).astype(np.float32)
    # noise stream: flicker, Poisson, zingers (also always drawn)
    h = rng_noise
    flick = (1 + h.normal(0, acq["beam_flicker"], (na, 1, 1))).astype(np.float32)
    counts = h.poisson(np.maximum(I * (I0 * flick), 0).astype(np.float64)).astype(np.float32)
    n_z = h.poisson(acq["zinger_rate"] * I.size)
    zi = h.integers(0, I.size, n_z)
    zv = h.uniform(1.3, 4.0, n_z).astype(np.float32)
    if acq["noise"]:
        meas = counts / np.float32(I0)
        meas.reshape(-1)[zi] *= zv
    else:
        meas = I * flick
    meas *= gain[None, :, :]
    sino = -np.log(np.maximum(meas, np.float32(1e-3)))
    rec = _fbp(sino, Y, X, na, os_, acq["recon_filter"], acq["cor_shift_px"])  # (npix, Z), per coarse voxel
    rec *= np.float32(1.0 / vox_cm)
    vol = np.full((Z, Y * X), acq["fov_fill"], np.float32)
    vol[:, proj.coarse_idx] = rec.T
    return vol.reshape(Z, Y, X)


# ------------------------------------------------------------------------------- batch
def volume_seed(seed: int, index: int) -> int:
    """The seed of volume ``index`` of a batch made with ``seed`` (independent of batch size)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(index),))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(11))  # 53 bits: exact in JSON doubles


def _batch_kind(kind: str, seed: int, index: int) -> str:
    if kind in KINDS:
        return kind
    if kind != "mixed":
        raise ValueError(f"kind must be one of fish, embryo, mixed; got {kind!r}")
    start = int(np.random.SeedSequence(int(seed), spawn_key=(2**31,)).generate_state(1)[0] & 1)
    return KINDS[(index + start) % 2]


def write_batch(
    out_dir: str | os.PathLike,
    n: int = 16,
    kind: str = "fish",
    shape: Sequence[int] = (64, 96, 96),
    seed: int = 0,
    format: str = "npy",
    overwrite: bool = False,
    **phantom_kwargs: Any,
) -> Path:
    """Write ``n`` phantoms with masks, labels and ``ground_truth.json``; return the JSON path.

    Files: ``vol_000<suffix>`` (float32 volume), ``vol_000_mask<suffix>`` (uint8 0/1) and
    ``vol_000_labels<suffix>`` (uint8 structure ids, see :data:`LABELS`), where the suffix
    comes from :func:`tomoloc.io.format_suffix`. ``ground_truth.json`` (``tomoloc-boxes/1``)
    holds one ``method="truth"`` record per volume, with file names relative to the JSON file
    and extra keys ``mask``, ``labels``, ``kind``, ``seed`` (reproduces the volume with
    :func:`make_phantom`) and ``params``. ``kind="mixed"`` alternates fish and embryo from a
    seed-chosen start. Volume ``i`` depends only on ``(seed, i)`` and the arguments, not on
    ``n``. Every file is written atomically; existing files of the same names are an error
    (checked before anything is written) unless ``overwrite=True``.
    """
    from tomoloc import io as tio

    shape = _check_shape(shape)
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if kind not in (*KINDS, "mixed"):
        raise ValueError(f"kind must be one of fish, embryo, mixed; got {kind!r}")
    suffix = tio.format_suffix(format)
    out = Path(out_dir)
    targets = [out / "ground_truth.json"] + [
        out / f"vol_{i:03d}{part}{suffix}" for i in range(int(n)) for part in ("", "_mask", "_labels")
    ]
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None and not overwrite:
        raise FileExistsError(f"{clash}: already exists (pass overwrite=True / --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(int(n)):
        k = _batch_kind(kind, seed, i)
        s = volume_seed(seed, i)
        ph = make_phantom(shape, k, s, **phantom_kwargs)
        names = {}
        for part, arr in (("", ph.volume), ("_mask", ph.mask.astype(np.uint8)), ("_labels", ph.labels)):
            name = f"vol_{i:03d}{part}{suffix}"
            tio.save_volume(out / name, arr, format=format, overwrite=overwrite)
            names[part] = name
        records.append(BoxRecord(
            volume=names[""], shape=shape, bbox=ph.bbox, method="truth",
            extra={"mask": names["_mask"], "labels": names["_labels"], "kind": k, "seed": s,
                   "label_names": {str(a): b for a, b in LABELS[k].items()}, "params": ph.params},
        ))
    config = {"command": "synth", "n": int(n), "kind": kind, "shape": list(shape), "seed": int(seed),
              "format": format, "phantom_kwargs": _jsonable(phantom_kwargs)}
    return write_boxes(out / "ground_truth.json", records, config=config)
