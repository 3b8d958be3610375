"""Thresholding: Otsu, a fixed value, a value calibrated on labelled volumes, and multi-Otsu.

The first three are the auto-crop tools users have today: threshold the intensities, keep
the largest 3D connected component, box it. The calibrated variant is the paper's
supervised baseline: the single value that minimises the box MAE over a labelled set.

:class:`MultiOtsuLocalizer` is the one built not to cut the sample when something brighter
than it is in the field of view (a scanner table, metal, dense debris): the lowest of
three-class Otsu thresholds, and every large component kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu

from tomoloc.boxes import Bbox
from tomoloc.localize.base import (
    Localization,
    WorkingCopy,
    kept_components,
    largest_component_bbox,
    whole_volume,
    working_copy,
)
from tomoloc.metrics import box_mae
from tomoloc.preprocess import fill_value, lower_fill, measured_values


def threshold_box(work: WorkingCopy, value: float) -> Bbox | None:
    """Box (original grid) of the largest component of ``work.data > value``; None if empty."""
    box = largest_component_bbox(work.data > value)
    return None if box is None else work.to_original(box)


def thresholding_copy(volume: Any, max_voxels: int = 256**3) -> WorkingCopy:
    """The :func:`~tomoloc.preprocess.working_copy` a thresholding works on, ``(Z, Y, X)``,
    with a field-of-view fill that is not the minimum moved below the data
    (:func:`~tomoloc.preprocess.lower_fill`).

    A circle filled with 0 above an air that reconstructs negative was foreground and
    touched every edge: the box was the whole volume. Downsampled, the blend of the fill's
    edge with the air goes with it (a ring of one block).
    """
    work = working_copy(volume, max_voxels)
    lower_fill(work.data, ring=1 if max(work.factor) > 1 else 0)
    return work


def _result(work: WorkingCopy, value: float, method: str) -> Localization:
    box = threshold_box(work, value)
    details = {"threshold": value, "found": box is not None, "projections": work.projections()}
    if box is None:
        # Nothing above the threshold: keep everything rather than cut the sample.
        return Localization(whole_volume(work.shape), method, 0.0, details)
    return Localization(box, method, 1.0, details)


@dataclass
class OtsuLocalizer:
    """Otsu's threshold on the volume's measured voxels, largest 3D component, its box."""

    max_voxels: int = 256**3
    name: str = "otsu"

    def localize(self, volume: Any) -> Localization:
        work = thresholding_copy(volume, self.max_voxels)
        # Otsu on the measured voxels only: the fill outside the field of view is not data.
        return _result(work, float(threshold_otsu(measured_values(work.data))), self.name)


_THRESHOLD_VALUES = 4_000_000


def multiotsu_threshold(values: np.ndarray, classes: int = 3, max_valley: float = 0.5,
                        clip: tuple[float, float] = (0.1, 99.9), k_sigma: float = 4.0) -> tuple[float, str]:
    """A threshold that keeps the sample: the lowest multi-Otsu threshold where it lies in a valley.

    Plain Otsu splits at the largest gap between two populations. With air or medium,
    soft tissue, and something denser than the sample (a table, metal, bone), that gap can
    be the one above the sample, and the sample falls below the threshold. The lowest of
    the ``classes - 1`` multi-Otsu thresholds separates the background from everything
    above it.

    The values are first clipped to their 0.1st and 99.9th percentiles (``clip``): a few
    extreme voxels (a metal speck, zingers) would otherwise stretch the 256 histogram bins
    so far that everything else falls into the first few.

    The lowest threshold is used only where it lies in a valley: the histogram (256 bins,
    smoothed over 2 bins) there is at most ``max_valley`` times its highest peak below it.
    Otherwise it cuts a population in two (air and one object: the background's noise
    peak; a medium that fills the field of view: its dark tail), and the "foreground"
    would be most of the background. Then the threshold is the lower of Otsu's and
    ``k_sigma`` standard deviations above the histogram's highest peak (the background;
    its deviation from the peak's half width on its dark side, which the sample does not
    reach): Otsu's alone would again lie above the sample when a large dense object is in
    the scan. On our volumes a real boundary gave a valley ratio of at most 0.21 and a
    split peak 0.53 to 1.

    Parameters
    ----------
    values : ndarray
        The measured intensities (any shape; flattened).

    Returns
    -------
    value : float
    rule : str
        ``"multiotsu"``, ``"background"`` (peak + ``k_sigma`` deviations) or ``"otsu"``.
    """
    values = np.asarray(values).ravel()
    values = np.clip(values, *np.percentile(values, clip))
    try:
        low = float(threshold_multiotsu(values, classes=classes)[0])
    except ValueError:  # fewer distinct levels than classes
        return float(threshold_otsu(values)), "otsu"
    hist, edges = _histogram(values)
    i = int(np.clip(np.searchsorted(edges, low) - 1, 0, hist.size - 1))
    if hist[i] <= max_valley * hist[: i + 1].max():
        return low, "multiotsu"
    level, sigma = _highest_peak(hist, edges)
    background = level + k_sigma * sigma
    otsu = float(threshold_otsu(values))
    return (background, "background") if background < otsu else (otsu, "otsu")


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """256-bin histogram of ``values`` (already clipped), smoothed over 2 bins, and its edges."""
    from scipy.ndimage import gaussian_filter1d

    hist, edges = np.histogram(values, bins=256)
    return gaussian_filter1d(hist.astype(np.float64), 2.0), edges


def _highest_peak(hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """The histogram's highest peak (the background: air or medium) and its standard
    deviation, from the half width of its dark flank (the sample does not reach it)."""
    centres = (edges[:-1] + edges[1:]) / 2
    peak = int(hist.argmax())
    width = centres[1] - centres[0]
    return float(centres[peak]), peak_sigma((peak - half_max_crossing(hist, peak, -1)) * width, width)


def background_level(values: np.ndarray, clip: tuple[float, float] = (0.1, 99.9)) -> float:
    """The background's level among ``values``: the highest peak of their histogram (256
    bins, smoothed over 2), the values first clipped to the ``clip`` percentiles as
    :func:`multiotsu_threshold` clips them."""
    values = np.asarray(values).ravel()
    values = np.clip(values, *np.percentile(values, clip))
    return _highest_peak(*_histogram(values))[0]


def grown_bbox(data: np.ndarray, core: np.ndarray, low: float) -> Bbox:
    """Box of ``core`` and of every 6-connected component of ``data > low`` that touches it
    (hysteresis thresholding: the strong voxels are ``core``, the weak ones above ``low``).

    ``core`` must not be empty.
    """
    from scipy import ndimage

    labels, n = ndimage.label((data > low) | core)
    touching = np.unique(labels[core])
    objects = ndimage.find_objects(labels)
    sl = [objects[i - 1] for i in touching if i > 0]
    return tuple((min(s[a].start for s in sl), max(s[a].stop for s in sl)) for a in range(3))  # type: ignore[return-value]


def half_max_crossing(hist: np.ndarray, peak: int, step: int, interpolate: bool = True) -> float:
    """Where a histogram's flank falls to half of ``hist[peak]``, in bins (``step`` -1: the
    dark flank, +1: the bright one), interpolated between the two bins around it."""
    half = hist[peak] / 2
    j = peak
    end = 0 if step < 0 else hist.size - 1
    while j != end and hist[j] > half:
        j += step
    crossing = float(j)
    if interpolate and step < 0 and hist[j] <= half < hist[j + 1]:
        crossing += (half - hist[j]) / (hist[j + 1] - hist[j])
    if interpolate and step > 0 and hist[j] <= half < hist[j - 1]:
        crossing -= (half - hist[j]) / (hist[j - 1] - hist[j])
    return crossing


def peak_sigma(half_width: float, bin_width: float) -> float:
    """A peak's half width at half maximum as a standard deviation, less the 2-bin smoothing
    of the histogram (variances add), and at least one bin."""
    return float(np.sqrt(max((half_width / 1.1774) ** 2 - (2 * bin_width) ** 2, bin_width**2)))


def _smooth_in_place(data: np.ndarray, sigma: float, fill: float | None) -> None:
    """Gaussian-smooth ``data`` (float32, 3D) in place, leaving its field-of-view ``fill`` as it is.

    Noise spreads every population's peak. Where the sample is only a shoulder of the
    background's peak, the threshold must sit close to that peak, and unsmoothed noise
    then crosses it everywhere; a 1-voxel Gaussian narrows the peaks about threefold for
    white noise and moves edges by less than a voxel. The fill is set to the 1st percentile
    of the measured values while smoothing, so its edge does not smear into the data.
    """
    from scipy import ndimage

    outside = None
    if fill is not None:
        outside = data == fill
        data[outside] = np.percentile(data[~outside], 1.0)
    ndimage.gaussian_filter(data, sigma, output=data)
    if outside is not None:
        data[outside] = fill


@dataclass
class MultiOtsuLocalizer:
    """The threshold of :func:`multiotsu_threshold` (lowest three-class Otsu threshold, with
    its guards); every component of at least ``min_fraction`` of the largest's size or
    ``min_share`` of the working copy's voxels (and ``min_voxels``); their box.

    ``min_share`` is 0.02%: a sample in several pieces (two biopsies and an insect, legs
    apart from their body) beside a table or a pin has pieces far under a tenth of the
    largest component. At 0.1% (the default until 2026-12-03) the box lost such a piece in 2
    of 200 phantoms of a third generator and in 1 of 400 held-out ones; at 0.02% in none, for
    crops up to 1% larger (BENCHMARKS.md, "Smaller pieces of a sample"). ``min_voxels`` (64,
    a 4-voxel cube) keeps a hot voxel, spread by the smoothing, out of the box of a small
    volume, where 0.02% is only a few voxels.

    The working copy is first smoothed with a Gaussian of ``smooth`` voxels (its fill left
    out): in noisy scans where the sample is a shoulder of the background's histogram peak,
    the unsmoothed threshold lay above it (2 of 60 phantoms of a second generator).

    Thin parts of a sample (legs, antennae, fins, roots, hairs) are thinner than the scan's
    blur: their voxels are partly sample and partly background, and they fall under a
    threshold that the body clears. So the box also takes, by hysteresis, every voxel at
    least ``grow`` of the way from the background's level (the histogram's highest peak) to
    the threshold that is connected to a kept component; ``grow=1`` turns it off. On held-out
    phantoms of a third generator (insects with 1-2 voxel legs among them) the boxes cut 2
    of 400 samples at the 4-voxel margin with it and 10 without, for crops 1.17x instead of
    1.23x smaller (BENCHMARKS.md, "Stray bright objects").

    The recall-first thresholding method (the default of ``tomoloc run``). On our synthetic
    batches its boxes at margin 0 kept every sample voxel and were smaller than Otsu's at the
    smallest margin that was safe for Otsu; with a slab brighter than the sample in the
    field of view Otsu's box held the slab alone (BENCHMARKS.md, "Stray bright objects").
    """

    classes: int = 3
    min_fraction: float = 0.1
    min_share: float = 0.0002
    min_voxels: int = 64
    smooth: float = 1.0
    grow: float = 0.5
    max_voxels: int = 256**3
    name: str = "multiotsu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.grow <= 1.0:
            raise ValueError(f"grow must be between 0 and 1 (1: no hysteresis), got {self.grow}")

    def localize(self, volume: Any) -> Localization:
        work = thresholding_copy(volume, self.max_voxels)
        projections = work.projections()  # of the data as read, not smoothed
        fill = fill_value(work.data)
        if self.smooth > 0:
            _smooth_in_place(work.data, self.smooth, fill)
        values = measured_values(work.data, fill)
        # Every k-th voxel: a 256-bin histogram needs no more than 4M values, and the
        # percentile and clip copies stay small (the peak is the working copy's labels).
        values = values[:: -(-values.size // _THRESHOLD_VALUES)]
        value, rule = multiotsu_threshold(values, self.classes)
        share = max(self.min_share, self.min_voxels / work.data.size)
        kept = kept_components(work.data > value, self.min_fraction, share)
        details: dict[str, Any] = {"threshold": value, "threshold_rule": rule, "found": kept is not None,
                                   "projections": projections}
        if kept is None:
            return Localization(whole_volume(work.shape), self.name, 0.0, details)
        labels, keep = kept
        core = keep[labels]
        del labels, kept  # the next labelling needs the room
        background = background_level(values)
        # A threshold at or below the background's level has no weaker voxels to grow into.
        low = min(value, background + self.grow * (value - background))
        details["grow_threshold"] = low
        box = grown_bbox(work.data, core, low)
        return Localization(work.to_original(box), self.name, 1.0, details)


@dataclass
class ThresholdLocalizer:
    """A fixed intensity threshold (in the volume's own units), largest component, its box."""

    value: float
    max_voxels: int = 256**3
    name: str = "threshold"

    def localize(self, volume: Any) -> Localization:
        return _result(thresholding_copy(volume, self.max_voxels), float(self.value), self.name)


def calibrate_threshold(
    volumes: Sequence[Any],
    truths: Sequence[Bbox],
    n_candidates: int = 64,
    max_voxels: int = 256**3,
) -> tuple[float, float]:
    """Choose the threshold that minimises the mean box MAE over labelled volumes.

    Candidates are ``n_candidates`` quantiles (0.5%–99.9%) of the pooled measured
    intensities (field-of-view fill left out), so the search adapts to the data's units.

    Parameters
    ----------
    volumes : sequence of 3D array-likes (Z, Y, X)
    truths : sequence of Bbox, the true boxes in the same order

    Returns
    -------
    value, mae : float, float
        The best threshold and its mean box MAE (voxels) on these volumes.
    """
    if len(volumes) == 0 or len(volumes) != len(truths):
        raise ValueError("calibration needs one true box per volume and at least one volume")
    works = [thresholding_copy(v, max_voxels) for v in volumes]
    rng = np.random.default_rng(0)
    pooled = np.concatenate(
        [rng.choice(v, size=min(v.size, 200_000), replace=False)
         for v in (measured_values(w.data) for w in works)]
    )
    candidates = np.unique(np.quantile(pooled, np.linspace(0.005, 0.999, n_candidates)))
    best = (float("inf"), float(candidates[0]))
    for value in candidates:
        errs = []
        for w, t in zip(works, truths):
            box = threshold_box(w, float(value)) or whole_volume(w.shape)
            errs.append(box_mae(box, t))
        mae = float(np.mean(errs))
        if mae < best[0]:
            best = (mae, float(value))
    return best[1], best[0]
