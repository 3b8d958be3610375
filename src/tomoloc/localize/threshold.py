"""Thresholding baselines: Otsu, a fixed value, and a value calibrated on labelled volumes.

These are the auto-crop tools users have today: threshold the intensities, keep the
largest 3D connected component, box it. The calibrated variant is the paper's supervised
baseline: the single value that minimises the box MAE over a labelled set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from skimage.filters import threshold_otsu

from tomoloc.boxes import Bbox
from tomoloc.localize.base import (
    Localization,
    WorkingCopy,
    largest_component_bbox,
    whole_volume,
    working_copy,
)
from tomoloc.metrics import box_mae
from tomoloc.preprocess import measured_values


def threshold_box(work: WorkingCopy, value: float) -> Bbox | None:
    """Box (original grid) of the largest component of ``work.data > value``; None if empty."""
    box = largest_component_bbox(work.data > value)
    return None if box is None else work.to_original(box)


def _result(work: WorkingCopy, value: float, method: str) -> Localization:
    box = threshold_box(work, value)
    if box is None:
        # Nothing above the threshold: keep everything rather than cut the sample.
        return Localization(whole_volume(work.shape), method, 0.0, {"threshold": value, "found": False})
    return Localization(box, method, 1.0, {"threshold": value, "found": True})


@dataclass
class OtsuLocalizer:
    """Otsu's threshold on the volume's measured voxels, largest 3D component, its box."""

    max_voxels: int = 256**3
    name: str = "otsu"

    def localize(self, volume: Any) -> Localization:
        work = working_copy(volume, self.max_voxels)
        # Otsu on the measured voxels only: the fill outside the field of view is not data.
        return _result(work, float(threshold_otsu(measured_values(work.data))), self.name)


@dataclass
class ThresholdLocalizer:
    """A fixed intensity threshold (in the volume's own units), largest component, its box."""

    value: float
    max_voxels: int = 256**3
    name: str = "threshold"

    def localize(self, volume: Any) -> Localization:
        return _result(working_copy(volume, self.max_voxels), float(self.value), self.name)


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
    works = [working_copy(v, max_voxels) for v in volumes]
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
