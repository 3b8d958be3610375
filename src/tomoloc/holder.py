"""The sample holder's interior: what a network should see of a tube scan.

A rotation network orients any slice that shows the tube wall off centre, and a sorting
network places slices by the tube's bottom or meniscus: the holder answers both pretext
tasks as well as the sample does, and the certainty or variance then marks the holder. The
network input can therefore be cut to the holder's interior (``holder="interior"`` in
:class:`tomoloc.config.TrainConfig`): the smallest Y/X window around what lies inside the
wall, everything outside the interior replaced by featureless noise at the medium's level.

The interior is found by thresholding, built like :class:`tomoloc.localize.MultiOtsuLocalizer`
not to lose the sample: every large component above the lowest multi-Otsu threshold (the
tube with its medium and sample, a table, debris), the holes of each axial slice filled,
less the wall: the outer layers whose mean differs from the medium's level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Interior", "find_interior", "interior_view", "pixel_noise"]


@dataclass
class Interior:
    """Where a holder's interior lies in a working copy ``(Z, Y, X)``.

    Attributes
    ----------
    y, x : tuple of 2 ints
        Half-open bounds of the interior along axes 1 and 2 (axis 0 is kept whole).
    mask : ndarray of bool, ``(Z, y[1] - y[0], x[1] - x[0])``
        The interior within those bounds.
    wall : int
        Layers (voxels, in-plane) taken off the filled foreground as the wall (its
        blurred inner edge included).
    found : bool
        False when nothing stood out from the background, or what did is no thin-walled
        container (:func:`find_interior`): the bounds are then the whole slice and the mask
        all True.
    """

    y: tuple[int, int]
    x: tuple[int, int]
    mask: np.ndarray
    wall: int
    found: bool

    @property
    def offset(self) -> tuple[int, int, int]:
        """Where the interior's window starts in the working copy, ``(0, y0, x0)``."""
        return (0, self.y[0], self.x[0])


def _peak(values: np.ndarray) -> tuple[float, float]:
    """The histogram's highest peak and its width as a standard deviation.

    The width is the narrower flank's half width at half maximum: the other flank may carry
    the sample (denser) or bubbles (lighter) beside the medium's peak.
    """
    from tomoloc.localize.threshold import half_max_crossing, peak_sigma

    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return float(lo), 0.0
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=256, range=(lo, hi))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    centres = (edges[:-1] + edges[1:]) / 2
    p = int(hist.argmax())
    width = centres[1] - centres[0]
    dark = p - half_max_crossing(hist, p, -1, interpolate=False)
    bright = half_max_crossing(hist, p, +1, interpolate=False) - p
    return float(centres[p]), peak_sigma(min(dark, bright) * width, width)


def _filled(foreground: np.ndarray) -> np.ndarray | None:
    """The components of ``foreground`` ``(Z, Y, X)`` of at least a tenth of the largest or 1%
    of the voxels, each axial slice's holes filled; ``None`` when there is none."""
    from tomoloc.localize.base import kept_components

    kept = kept_components(foreground, 0.1, 0.01)
    if kept is None:
        return None
    labels, keep = kept
    return np.stack([ndimage.binary_fill_holes(s) for s in keep[labels]])


def find_interior(data: np.ndarray, k_sigma: float = 4.0, max_wall: int = 10,
                  max_filled: float = 0.95) -> Interior:
    """The holder's interior in a working copy ``data`` ``(Z, Y, X)`` (axis 0 = tube axis).

    1. Smooth (1 voxel), threshold at :func:`tomoloc.localize.threshold.multiotsu_threshold`,
       keep the components of at least a tenth of the largest or 1% of the voxels (0.1%,
       the multi-Otsu localizer's share until 2026-12-03, kept streak fragments outside
       the tube and widened the window of one test volume in eight from 59 to 87 voxels).
    2. Fill the holes of every axial slice: the tube's wall encloses its medium and sample.
       Where that fills more than ``max_filled`` of the volume, nothing was set apart: the
       foreground is then what differs from the histogram's peak by more than ``k_sigma`` of
       its width, either way (a phase-contrast wall: a bright and a dark fringe around a
       medium as grey as the air outside), if that fills less.
    3. The wall: the mean intensity at each in-plane depth from the filled region's edge is
       compared with the medium's level (the peak of the values deeper than 30% of the
       largest depth). The outer ``w`` depths that differ from it by more than ``k_sigma``
       of the peak's width (and a tenth of the wall's contrast) are the wall, its halo and
       its blur, at most ``max_wall``; no difference in the outer two depths means no
       distinct wall (``w = 0``).
    4. The interior: the filled region deeper than ``w + 1`` (``w`` if 0); its Y/X bounds.

    A sample in air, with no holder, gives its own filled silhouette (and its blurred edge
    as the "wall": :meth:`tomoloc.preprocess.NetworkView.to_working` grows boxes back over
    it). When what is left is no deeper than the wall was thick, or less than a quarter of the
    filled region, what was filled is no thin-walled container, and the whole slice is kept
    (``found=False``).
    """
    from tomoloc.localize.threshold import _THRESHOLD_VALUES, _smooth_in_place, multiotsu_threshold
    from tomoloc.preprocess import fill_value, measured_values

    d = np.array(data, dtype=np.float32)
    whole = Interior((0, d.shape[1]), (0, d.shape[2]), np.ones(d.shape, bool), 0, False)
    fill = fill_value(d)
    _smooth_in_place(d, 1.0, fill)
    values = measured_values(d, fill)
    values = values[:: -(-values.size // _THRESHOLD_VALUES)]
    value, _ = multiotsu_threshold(values)
    filled = _filled(d > value)
    if filled is not None and filled.mean() > max_filled:
        # Nothing was set apart from its surroundings: in a phase-contrast scan whose medium
        # matches the air outside, the wall is a bright and a dark fringe around that one
        # level, and the lowest threshold split off the dark fringe alone. What differs from
        # the level either way is the wall (and the sample).
        background, spread = _peak(values)
        if spread > 0:
            two_sided = _filled(np.abs(d - background) > k_sigma * spread)
            if two_sided is not None and two_sided.mean() <= max_filled:
                filled = two_sided
    if filled is None:
        return whole
    depth = np.stack([ndimage.distance_transform_edt(s) for s in filled])
    deepest = float(depth.max())
    core = filled & (depth > 0.3 * deepest)
    level, sigma = _peak(d[core]) if core.any() else _peak(d[filled])
    steps = np.minimum(depth[filled], max_wall + 1).astype(np.int64)
    counts = np.bincount(steps, minlength=max_wall + 2)[1:]
    sums = np.bincount(steps, weights=d[filled], minlength=max_wall + 2)[1:]
    means = np.where(counts > 0, sums / np.maximum(counts, 1), level)
    gap = np.abs(means - level)
    # A tenth of the wall's own contrast at least: in a clean scan the noise is so low that
    # the smoothed wall's faint tail would count as wall for voxels on end.
    differs = gap > max(k_sigma * sigma, 0.1 * float(gap[:3].max()))
    wall = 0
    # The outermost layer is partly air (partial volume): the wall may show from depth 2.
    start = 0 if differs[0] else 1 if differs[1] else -1
    if start >= 0 and not differs[start:].all():  # else never back at the medium: no wall we can tell
        # One layer more than differs: the wall's inner edge is blurred by the scan too.
        wall = start + int(np.argmin(differs[start:])) + 1
    interior = filled & (depth > wall)
    if deepest < 2 * wall + 2 or interior.sum() < 0.25 * filled.sum():
        # Not a container with a thin wall: a thin sample in air (fins, fibres, a plate)
        # whose own edge read as wall. Cutting to it would erase the sample.
        return whole
    ys = np.flatnonzero(interior.any(axis=(0, 2)))
    xs = np.flatnonzero(interior.any(axis=(0, 1)))
    y, x = (int(ys[0]), int(ys[-1]) + 1), (int(xs[0]), int(xs[-1]) + 1)
    return Interior(y, x, interior[:, y[0]:y[1], x[0]:x[1]], wall, True)


def pixel_noise(data: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The pixel noise's standard deviation in ``data`` ``(Z, Y, X)``, from neighbour differences
    along axis 2 (between voxels both in ``mask``, if given): their MAD over sqrt(2), which
    structure larger than a voxel barely moves."""
    diff = data[:, :, 1:] - data[:, :, :-1]
    if mask is not None:
        diff = diff[mask[:, :, 1:] & mask[:, :, :-1]]
    diff = np.asarray(diff, dtype=np.float32).ravel()
    return 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2) if diff.size else 0.0


def interior_view(data: np.ndarray, seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """``data`` ``(Z, Y, X)`` cut to its holder's interior, the rest made featureless.

    Voxels in the window but outside the interior become the interior's median plus white
    noise of the interior's own pixel noise (from neighbour differences): a constant would
    leave an edge, and so a shape, that tells a rotation network the angle.

    Returns
    -------
    view : ndarray, float32 ``(Z, Y', X')``
    offset : tuple of 3 ints
        Where ``view[0, 0, 0]`` lies in ``data``; add it to boxes found on the view.
    wall : int
        :attr:`Interior.wall`.
    """
    inner = find_interior(data)
    view = np.array(data[:, inner.y[0]:inner.y[1], inner.x[0]:inner.x[1]], dtype=np.float32)
    if not inner.found or inner.mask.all():
        return view, inner.offset, inner.wall
    inside = view[inner.mask]
    noise = pixel_noise(view, inner.mask)
    rng = np.random.default_rng(seed)
    outside = ~inner.mask
    view[outside] = float(np.median(inside)) + noise * rng.standard_normal(int(outside.sum())).astype(np.float32)
    return view, inner.offset, inner.wall
