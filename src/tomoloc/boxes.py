"""The box file format ``tomoloc-boxes/1``: read, write, and boxes from masks.

A box file is JSON::

    {"format": "tomoloc-boxes/1",
     "boxes": [{"volume": "vol_000.npy", "shape": [96, 128, 128],
                "bbox": [[z0, z1], [y0, y1], [x0, x1]], "method": "otsu"}]}

``bbox`` holds half-open voxel intervals in the volume's own array order (axis 0 = slice /
rotation axis). ``volume`` is the path as given; evaluation matches boxes by file name.
Extra keys are kept in :attr:`BoxRecord.extra` and written back unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tomoloc._fsutil import write_text_atomic

BOX_FORMAT = "tomoloc-boxes/1"

#: ``((z0, z1), (y0, y1), (x0, x1))``, half-open, in array order.
Bbox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class BoxFileError(ValueError):
    """A box file is missing, not JSON, or not ``tomoloc-boxes/1``; the message names the file."""


@dataclass
class BoxRecord:
    """One volume's box.

    Attributes
    ----------
    volume : str
        The volume's path as given by the user.
    shape : tuple of 3 ints
        The volume's shape ``(Z, Y, X)``.
    bbox : Bbox
        Half-open intervals per axis, in array order.
    method : str
        Which localizer made the box (``"otsu"``, ``"truth"``, ...).
    extra : dict
        Any other keys (e.g. ``"mask"`` for ground truth); kept on round trips.
    """

    volume: str
    shape: tuple[int, int, int]
    bbox: Bbox
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The volume's file name, the key used to match boxes to ground truth."""
        return volume_key(self.volume)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "volume": self.volume,
            "shape": [int(s) for s in self.shape],
            "bbox": [[int(a), int(b)] for a, b in self.bbox],
            "method": self.method,
        }
        out.update(self.extra)
        return out


def _file_part(volume: str | os.PathLike) -> str:
    s = str(volume).rstrip("/\\")
    # "scan.h5:/exchange/data" -> "scan.h5"
    head, sep, tail = s.rpartition(":/")
    if sep and head and not tail.startswith("/"):
        s = head
    return s


def volume_key(volume: str | os.PathLike) -> str:
    """File name of a volume path, ignoring an HDF5 ``:/dataset`` suffix and trailing slashes."""
    return Path(_file_part(volume)).name


def normalize_bbox(bbox: Sequence[Sequence[int]], shape: Sequence[int] | None = None) -> Bbox:
    """Validate a box and return it as a tuple of int pairs.

    Raises ``ValueError`` when it does not have three ``[lo, hi)`` intervals with
    ``0 <= lo < hi <= shape[axis]``.
    """
    if len(bbox) != 3:
        raise ValueError(f"bbox must have 3 intervals, got {len(bbox)}")
    out = []
    for axis, iv in enumerate(bbox):
        if len(iv) != 2:
            raise ValueError(f"bbox interval {axis} must be [lo, hi], got {list(iv)}")
        lo, hi = int(iv[0]), int(iv[1])
        if lo != iv[0] or hi != iv[1]:
            raise ValueError(f"bbox interval {axis} must hold integers, got {list(iv)}")
        if not 0 <= lo < hi:
            raise ValueError(f"bbox interval {axis} must satisfy 0 <= lo < hi, got [{lo}, {hi}]")
        if shape is not None and hi > shape[axis]:
            raise ValueError(f"bbox interval {axis} [{lo}, {hi}] exceeds the volume size {shape[axis]}")
        out.append((lo, hi))
    return (out[0], out[1], out[2])


def bbox_from_mask(mask: np.ndarray) -> Bbox | None:
    """Tightest half-open box around the nonzero voxels of a 3D mask, or ``None`` if empty."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        out.append((int(nz[0]), int(nz[-1]) + 1))
    return (out[0], out[1], out[2])


def bbox_volume(bbox: Bbox) -> int:
    """Number of voxels inside a box."""
    return int(np.prod([hi - lo for lo, hi in bbox]))


def bbox_slices(bbox: Bbox) -> tuple[slice, slice, slice]:
    """The box as a tuple of slices, for indexing a ``(Z, Y, X)`` array."""
    return tuple(slice(lo, hi) for lo, hi in bbox)  # type: ignore[return-value]


def expand_bbox(box: Bbox, margin: int | Sequence[int], shape: Sequence[int]) -> Bbox:
    """Grow ``box`` by ``margin`` voxels on both sides of each axis, clipped to the volume.

    ``margin`` is one int for all axes or one per axis ``(mz, my, mx)``; negative margins
    are refused because a crop must never cut more than the localizer found.
    """
    values = [margin] * 3 if np.ndim(margin) == 0 else list(np.ravel(margin))  # type: ignore[arg-type]
    # A margin is a whole number of voxels: 1.7 must not quietly become 1.
    if len(values) != 3 or any(isinstance(v, (bool, np.bool_)) or not float(v).is_integer() for v in values):
        raise ValueError(f"margin must be whole voxels >= 0 (one value or three), got {margin}")
    m = [int(v) for v in values]
    if min(m) < 0:
        raise ValueError(f"margin must be >= 0 (one value or three), got {margin}")
    out = [(max(0, lo - mi), min(int(n), hi + mi)) for (lo, hi), mi, n in zip(box, m, shape)]
    return (out[0], out[1], out[2])


def write_boxes(
    path: str | os.PathLike, records: Iterable[BoxRecord], config: dict[str, Any] | None = None
) -> Path:
    """Write records as a ``tomoloc-boxes/1`` file, atomically.

    ``config`` (how the boxes were made) is stored under a top-level ``"config"`` key,
    which readers of the format ignore, so the run can be reproduced from its output.
    """
    doc: dict[str, Any] = {"format": BOX_FORMAT, "boxes": [r.to_json() for r in records]}
    if config:
        doc["config"] = config
    return write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def read_boxes(path: str | os.PathLike) -> list[BoxRecord]:
    """Read a ``tomoloc-boxes/1`` file.

    Raises
    ------
    BoxFileError
        One line naming the file and what is wrong with it.
    """
    p = Path(path)
    if not p.exists():
        raise BoxFileError(f"{p}: no such box file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BoxFileError(f"{p}: not a readable JSON box file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != BOX_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BoxFileError(f"{p}: not a {BOX_FORMAT} file (format is {got!r})")
    boxes = doc.get("boxes")
    if not isinstance(boxes, list):
        raise BoxFileError(f"{p}: 'boxes' must be a list")
    records = []
    for i, b in enumerate(boxes):
        try:
            extra = {k: v for k, v in b.items() if k not in ("volume", "shape", "bbox", "method")}
            shape = tuple(int(s) for s in b["shape"])
            if len(shape) != 3:
                raise ValueError(f"shape must have 3 entries, got {list(shape)}")
            records.append(
                BoxRecord(
                    volume=str(b["volume"]),
                    shape=shape,  # type: ignore[arg-type]
                    bbox=normalize_bbox(b["bbox"], shape),
                    method=str(b.get("method", "")),
                    extra=extra,
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BoxFileError(f"{p}: box {i} is invalid ({exc})") from None
    return records


def index_by_name(records: Iterable[BoxRecord], source: str | os.PathLike = "") -> dict[str, BoxRecord]:
    """Map file name -> record; two records with the same file name are an error."""
    out: dict[str, BoxRecord] = {}
    for r in records:
        if r.name in out:
            raise BoxFileError(f"{source}: two boxes for volumes named {r.name!r}; names must be unique")
        out[r.name] = r
    return out


def match_box(records: Sequence[BoxRecord], volume: str | os.PathLike,
              source: str | os.PathLike = "") -> BoxRecord | None:
    """The record of ``volume`` among ``records`` (a box file's), or ``None``.

    Matched by file name; where several records share the name (``a/volume.npy``,
    ``b/volume.npy``), by path: the record's path as written, or relative to the box file
    ``source``'s folder, must resolve to ``volume``'s.

    Raises
    ------
    BoxFileError
        Several records share the name and none, or more than one, is ``volume``'s path.
    """
    key = volume_key(volume)
    same = [r for r in records if r.name == key]
    if len(same) <= 1:
        return same[0] if same else None
    target = Path(_file_part(volume)).resolve()
    base = Path(source).parent
    hits = [r for r in same
            if target in (Path(_file_part(r.volume)).resolve(), (base / _file_part(r.volume)).resolve())]
    if len(hits) != 1:
        raise BoxFileError(f"{source}: {len(same)} boxes for volumes named {key!r} and "
                           f"{'none' if not hits else len(hits)} for the path {volume}")
    return hits[0]
