"""A second phantom generator, written apart from `tomoloc.synth`, to test the localizers on data
they were not built on.

It knows nothing of `tomoloc.synth`'s physics: no projection or reconstruction, just shapes,
blur and noise, with choices `tomoloc.synth` does not make: a square cuvette or no holder at
all, media as dense as the sample, samples of 1-4 ellipsoids some barely above the medium,
scanner tables, rings around the rotation axis, correlated noise up to a quarter of the
sample's contrast, and a fill outside the field of view.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def simple_phantom(seed: int, shape: tuple[int, int, int] = (64, 96, 96)) -> tuple[np.ndarray, np.ndarray, str]:
    """One phantom: ``(volume float32 (Z, Y, X), sample mask bool, holder kind)``."""
    g = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.mgrid[:nz, :ny, :nx].astype(np.float32)
    cy, cx = ny / 2 + g.uniform(-3, 3), nx / 2 + g.uniform(-3, 3)
    air = g.uniform(-0.1, 0.1)
    vol = np.full(shape, air, np.float32)
    holder = str(g.choice(["tube", "cuvette", "none"], p=[0.5, 0.25, 0.25]))
    radius, wall_t = g.uniform(0.3, 0.45) * min(ny, nx), g.uniform(1.5, 5)
    medium, wall = g.uniform(0.0, 0.7), g.uniform(0.3, 1.6)
    if holder == "tube":
        r = np.hypot(y - cy, x - cx)
        inside, wall_m = r < radius, (r >= radius) & (r < radius + wall_t)
    elif holder == "cuvette":
        inside = (np.abs(y - cy) < radius) & (np.abs(x - cx) < radius)
        wall_m = (np.abs(y - cy) < radius + wall_t) & (np.abs(x - cx) < radius + wall_t) & ~inside
    else:
        inside = wall_m = np.zeros(shape, bool)
    top = int(g.uniform(0, 0.3) * nz) if g.random() < 0.4 else 0  # air above the medium
    vol[inside & (z >= top)] = medium
    vol[wall_m] = wall
    mask = np.zeros(shape, bool)
    lim = radius * 0.8 if holder != "none" else min(ny, nx) * 0.35
    c0 = np.array([g.uniform(nz * 0.3, nz * 0.7), cy + g.uniform(-lim / 3, lim / 3), cx + g.uniform(-lim / 3, lim / 3)])
    for _ in range(g.integers(1, 5)):
        c = c0 + g.normal(0, [nz * 0.1, lim * 0.2, lim * 0.2])
        a = g.uniform([4, 4, 4], [nz * 0.3, lim * 0.5, lim * 0.5])
        part = ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2 < 1
        level = g.choice([g.uniform(0.8, 1.4), g.uniform(medium + 0.05, medium + 0.4)])  # dense, or barely above
        vol[part] = level * (1 + 0.1 * g.standard_normal(int(part.sum())))
        mask |= part
    for _ in range(g.integers(0, 6)):  # bubbles (air) and debris (dense)
        c = np.array([g.uniform(0, nz), cy + g.uniform(-radius, radius), cx + g.uniform(-radius, radius)])
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < g.uniform(1, 4) ** 2) & ~mask
        vol[blob] = air if g.random() < 0.6 else g.uniform(1.5, 4)
    if g.random() < 0.3:  # a scanner table under everything
        th = int(g.uniform(3, 15))
        vol[:, ny - 2 - th:ny - 2, :] = g.uniform(0.5, 3)
    vol = ndimage.gaussian_filter(vol, g.uniform(0.5, 1.5))
    vol += g.uniform(0.02, 0.25) * 2 * ndimage.gaussian_filter(g.standard_normal(shape).astype(np.float32), 0.7)
    if g.random() < 0.5:  # rings around the rotation axis
        vol += g.uniform(0.02, 0.15) * np.sin(np.hypot(y - ny / 2, x - nx / 2) * g.uniform(0.5, 2))
    if g.random() < 0.3:  # the reconstruction's fill outside the field of view
        out = np.hypot(y - ny / 2, x - nx / 2) > min(ny, nx) / 2
        vol[out] = -1.0
        mask &= ~out  # a sample beyond the field of view is not in the volume
    return vol.astype(np.float32), mask, holder
