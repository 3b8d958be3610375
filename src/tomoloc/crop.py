"""Crop volumes to their boxes, chunk by chunk, never over an input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tomoloc import io
from tomoloc.boxes import Bbox, expand_bbox, normalize_bbox


@dataclass
class CropResult:
    """What one crop did.

    ``bbox`` is the box actually written (the localizer's box grown by the margin and
    clipped to the volume), half-open, array order (Z, Y, X).
    """

    source: str
    output: Path
    bbox: Bbox
    shape_before: tuple[int, int, int]
    shape_after: tuple[int, int, int]
    bytes_before: int
    bytes_after: int

    @property
    def reduction(self) -> float:
        """Bytes before / bytes after (on disk)."""
        return self.bytes_before / max(1, self.bytes_after)


class BoxView:
    """A lazy read-only window ``volume[bbox]`` that reads only what is asked of it.

    Lets :func:`tomoloc.io.save_volume` copy slab by slab from source to target without
    the whole crop in memory.
    """

    def __init__(self, volume: Any, bbox: Bbox):
        self.volume = volume
        self.bbox = bbox
        self.shape = tuple(hi - lo for lo, hi in bbox)
        self.dtype = np.dtype(volume.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        mapped = []
        for k, (lo, _hi), n in zip(key, self.bbox, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                mapped.append(slice(lo + start, lo + stop, step))
            else:
                k = int(k)
                if not -n <= k < n:
                    raise IndexError(f"index {k} out of range for size {n}")
                mapped.append(lo + (k % n))
        return np.asarray(self.volume[tuple(mapped)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:, :, :]
        return a if dtype is None else a.astype(dtype)


def output_path(source: str | os.PathLike, out_dir: str | os.PathLike, fmt: str) -> Path:
    """Where the crop of ``source`` goes in ``out_dir``: same stem, ``fmt``'s suffix."""
    name = Path(io.split_dataset_path(str(source))[0].rstrip("/\\")).name
    stem = name
    for suffix in (".tiff", ".tif", ".npy", ".hdf5", ".h5", ".nxs", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return Path(out_dir) / (stem + io.format_suffix(fmt))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def crop_volume(
    source: str | os.PathLike,
    bbox: Sequence[Sequence[int]],
    out_dir: str | os.PathLike,
    *,
    margin: int | Sequence[int] = 0,
    fmt: str | None = None,
    overwrite: bool = False,
) -> CropResult:
    """Crop one volume to ``bbox`` grown by ``margin`` and write it to ``out_dir``.

    Parameters
    ----------
    source : path
        Any volume :func:`tomoloc.io.open_volume` reads (``file.h5:/dataset`` included).
    bbox : [[z0, z1], [y0, y1], [x0, x1]]
        Half-open box in the source's voxel coordinates.
    out_dir : path
        Output folder; the crop keeps the source's name (and format unless ``fmt``).
    margin : int or (mz, my, mx)
        Voxels added on BOTH sides of each axis, then clipped to the volume: a margin of
        4 on a box [10, 20) gives [6, 24) exactly.
    fmt : str, optional
        Output format (``io.FORMATS``); default: the source's.
    overwrite : bool
        Replace an existing output (never the source itself).

    Returns
    -------
    CropResult
    """
    with io.open_volume(source) as vol:
        shape = tuple(int(s) for s in vol.shape)
        box = expand_bbox(normalize_bbox(bbox, shape), margin, shape)
        fmt = fmt or vol.format
        out = output_path(source, out_dir, fmt)
        src_file = Path(io.split_dataset_path(str(source))[0])
        if out.resolve() == src_file.resolve() or _same_file(out, src_file):
            raise FileExistsError(f"{out}: refusing to write a crop over its own input volume")
        io.save_volume(out, BoxView(vol, box), fmt, overwrite=overwrite)
        before = io.volume_nbytes_on_disk(source)
    return CropResult(
        source=str(source),
        output=out,
        bbox=box,
        shape_before=shape,  # type: ignore[arg-type]
        shape_after=tuple(hi - lo for lo, hi in box),  # type: ignore[arg-type]
        bytes_before=before,
        bytes_after=io.volume_nbytes_on_disk(out),
    )
