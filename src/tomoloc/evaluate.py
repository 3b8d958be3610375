"""Score a box file against ground truth, volume by volume."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tomoloc import io, metrics
from tomoloc.boxes import BoxFileError, BoxRecord, index_by_name

#: Column name -> (description, lower is better?)
COLUMNS = {
    "mae": ("MAE of the six box coordinates, voxels", True),
    "rel_err_pct": ("MAE / mean side of the volume, %", True),
    "iou": ("3D IoU with the true box", False),
    "recall": ("fraction of sample voxels inside the box (needs masks)", False),
    "reduction": ("volume voxels / box voxels", False),
}


def evaluate(
    pred: Sequence[BoxRecord], truth: Sequence[BoxRecord], truth_dir: str | os.PathLike = "."
) -> list[dict[str, Any]]:
    """One row of metrics per predicted box that has a true box of the same file name.

    Parameters
    ----------
    pred, truth : sequences of BoxRecord
        Matched by file name (:attr:`BoxRecord.name`).
    truth_dir : path
        Folder that relative ``mask`` paths in the truth records are relative to.

    Returns
    -------
    list of dict
        Keys ``volume``, ``method`` and every key of :data:`COLUMNS` (``recall`` is NaN
        when the truth has no mask).
    """
    by_name = index_by_name(truth, "ground truth")
    rows = []
    for p in pred:
        t = by_name.get(p.name)
        if t is None:
            continue
        if tuple(p.shape) != tuple(t.shape):
            raise BoxFileError(
                f"{p.volume}: box shape {list(p.shape)} differs from the ground truth's {list(t.shape)}"
            )
        row = {
            "volume": p.name,
            "method": p.method,
            "mae": metrics.box_mae(p.bbox, t.bbox),
            "rel_err_pct": metrics.relative_error(p.bbox, t.bbox, t.shape),
            "iou": metrics.iou(p.bbox, t.bbox),
            "recall": math.nan,
            "reduction": metrics.reduction(p.bbox, t.shape),
        }
        mask = t.extra.get("mask")
        if mask:
            mpath = Path(mask) if Path(mask).is_absolute() else Path(truth_dir) / mask
            with io.open_volume(mpath) as m:
                row["recall"] = metrics.recall(p.bbox, m)
        rows.append(row)
    return rows


def mean_row(rows: Sequence[dict[str, Any]], label: str = "mean") -> dict[str, Any]:
    """Column means over rows (NaN recall ignored), as a row labelled ``label``."""
    out: dict[str, Any] = {"volume": label, "method": ",".join(sorted({r["method"] for r in rows}))}
    for c in COLUMNS:
        vals = np.array([r[c] for r in rows], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[c] = float(vals.mean()) if vals.size else math.nan
    return out
