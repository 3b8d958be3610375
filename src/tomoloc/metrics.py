"""Box quality metrics: coordinate error, IoU, sample-voxel recall, storage reduction.

All boxes are :data:`tomoloc.boxes.Bbox` values: half-open ``[lo, hi)`` intervals in the
volume's array order ``(Z, Y, X)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tomoloc.boxes import Bbox, bbox_slices, bbox_volume


def box_mae(pred: Bbox, true: Bbox) -> float:
    """Mean absolute error of the six box coordinates, in voxels."""
    p = np.asarray(pred, dtype=float).ravel()
    t = np.asarray(true, dtype=float).ravel()
    return float(np.abs(p - t).mean())


def relative_error(pred: Bbox, true: Bbox, shape: Sequence[int]) -> float:
    """Box MAE as a percentage of the volume's mean side length.

    The paper reports localization error relative to the volume; dividing by the mean
    side of the volume (not of the box) keeps the figure comparable between small and
    large samples in volumes of the same size.
    """
    return 100.0 * box_mae(pred, true) / float(np.mean(shape))


def intersection(a: Bbox, b: Bbox) -> Bbox | None:
    """The overlap of two boxes, or ``None`` when they do not overlap."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b):
        lo, hi = max(a0, b0), min(a1, b1)
        if hi <= lo:
            return None
        out.append((lo, hi))
    return (out[0], out[1], out[2])


def iou(a: Bbox, b: Bbox) -> float:
    """Intersection over union of two 3D boxes (voxel counts)."""
    inter = intersection(a, b)
    if inter is None:
        return 0.0
    i = bbox_volume(inter)
    return i / (bbox_volume(a) + bbox_volume(b) - i)


def recall(box: Bbox, mask: np.ndarray) -> float:
    """Fraction of the mask's sample voxels that lie inside ``box`` (1.0 = nothing cut).

    ``mask`` is any 3D array-like (a lazy :class:`tomoloc.io.Volume` works: only the box
    region is read beside one pass for the total).
    """
    total = int(np.count_nonzero(np.asarray(mask)))
    if total == 0:
        return float("nan")
    kept = int(np.count_nonzero(np.asarray(mask[bbox_slices(box)])))
    return kept / total


def reduction(box: Bbox, shape: Sequence[int]) -> float:
    """Storage reduction factor of cropping to ``box``: voxels before / voxels after."""
    return float(np.prod(shape)) / bbox_volume(box)
