"""Volume preprocessing shared by localizers and training: working copies and normalisation."""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tomoloc.boxes import Bbox


class BadValuesError(ValueError):
    """The volume's values cannot be localized (NaN/inf, or constant)."""


@dataclass
class WorkingCopy:
    """A float32 copy of a volume, block-mean downsampled by integer ``factor`` per axis.

    ``data[i, j, k]`` is the mean of the original block starting at
    ``(i * factor[0], j * factor[1], k * factor[2])``; partial blocks at the far edges are
    averaged over the voxels they have.
    """

    data: np.ndarray
    factor: tuple[int, int, int]
    shape: tuple[int, int, int]  # of the original volume

    def to_original(self, bbox: Bbox) -> Bbox:
        """Map a box on ``data`` back to the original grid, erring on the side of too big.

        When downsampled, a block only partly covered by the sample can average below a
        threshold, so the box grows by one block on each side before mapping back.
        """
        out = []
        for (lo, hi), f, n in zip(bbox, self.factor, self.shape):
            pad = 1 if f > 1 else 0
            out.append((max(0, (lo - pad) * f), min(n, (hi + pad) * f)))
        return (out[0], out[1], out[2])

    def projections(self) -> dict[str, Any]:
        """Maximum-intensity projections of ``data`` along each axis, for the report's figure.

        A slice through the box's centre cannot show a part of the sample that lies outside
        the box in another plane; a projection of the whole volume can. Returns ``{"max":
        [P0, P1, P2], "factor": factor, "shape": shape}``: ``Pa`` is ``data.max(axis=a)``
        (float32; P0 is (Y', X'), P1 (Z', X'), P2 (Z', Y') on the working grid) and
        ``factor`` maps its pixels to original voxels.
        """
        return {"max": [np.ascontiguousarray(self.data.max(axis=a)) for a in range(3)],
                "factor": tuple(int(f) for f in self.factor), "shape": tuple(int(n) for n in self.shape)}


def working_copy(volume: Any, max_voxels: int = 256**3, max_bytes: int | None = None,
                 threads: int | None = None) -> WorkingCopy:
    """Read ``volume`` (Z, Y, X) block by block into a float32 block-mean downsampled copy.

    The downsampling factor is the smallest integer ``f`` (same on every axis, so voxels
    stay isotropic) with ``prod(ceil(shape / f)) <= max_voxels``. The volume is read in
    blocks of ``f`` axial slices by a whole number of ``f``-row bands, each at most
    ``max_bytes`` as float32 (default :data:`tomoloc.io.SLAB_BYTES`; at least one band of
    ``f`` rows, counted at float32 or wider), so memory is the result plus one block whatever the volume's size.
    ``threads`` blocks (default :func:`tomoloc.cluster.local_threads`) are read and averaged
    at a time, each within ``max_bytes / threads``. Integer volumes of up to 16 bits are
    summed exactly; the result is the same for any ``threads`` and ``max_bytes``.

    Raises
    ------
    BadValuesError
        If the volume holds NaN/inf or is constant.
    """
    from tomoloc.cluster import local_threads
    from tomoloc.io import SLAB_BYTES
    from tomoloc.memory import release_freed

    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise BadValuesError(f"expected a 3D volume, got shape {shape}")
    f = 1
    while math.prod(math.ceil(s / f) for s in shape) > max_voxels:
        f += 1
    out_shape = tuple(math.ceil(s / f) for s in shape)
    out = np.empty(out_shape, dtype=np.float32)
    acc = _integer_accumulator(np.dtype(volume.dtype), f)
    row_bytes = f * f * shape[2] * max(4, np.dtype(volume.dtype).itemsize)  # f slices x f rows x X
    threads = local_threads() if threads is None else max(1, int(threads))
    # Each of the blocks in flight (one per thread) gets its share of max_bytes.
    bands = max(1, (SLAB_BYTES if max_bytes is None else int(max_bytes)) // threads // row_bytes)

    def fill(i: int, j0: int, j1: int) -> None:
        z0 = i * f
        block = np.asarray(volume[z0 : z0 + f, j0 * f : j1 * f])
        if acc is not None:
            # Small integers: exact sums in 32 bits, three times faster than a float mean.
            total = block[0].astype(acc)
            for plane in block[1:]:
                total += plane
            out[i, j0:j1] = _block_mean_2d(total, f, len(block))
            return
        # Averaged in float32 straight from the stored type (no float copy of the block);
        # NaN/inf anywhere make the mean non-finite, and only then is the block searched.
        with np.errstate(over="ignore", invalid="ignore"):  # checked on the next line
            mean = block.mean(axis=0, dtype=np.float32)
        if not np.isfinite(mean).all():
            if not np.isfinite(block).all():
                raise BadValuesError(f"volume holds NaN or infinite values "
                                     f"(first in slices {z0}-{z0 + len(block) - 1})")
            mean = block.mean(axis=0, dtype=np.float64).astype(np.float32)  # float32 overflow
        out[i, j0:j1] = _block_mean_2d(mean, f)

    blocks = [(i, j0, min(j0 + bands, out_shape[1])) for i in range(out_shape[0])
              for j0 in range(0, out_shape[1], bands)]
    threads = max(1, min(threads, len(blocks)))
    if threads == 1:
        for blk in blocks:
            fill(*blk)
    else:
        # NumPy and the reads release the GIL: two blocks at a time took a 4 GiB uint16
        # volume from 1.5 s to 0.8-1.0 s on 2 cores. In flight: one task per thread, so memory
        # is the result plus `threads` blocks.
        with ThreadPoolExecutor(threads) as pool:
            pending = set()
            try:
                for blk in blocks:
                    if len(pending) >= threads:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            fut.result()
                    pending.add(pool.submit(fill, *blk))
                for fut in pending:
                    fut.result()
            finally:
                for fut in pending:
                    fut.cancel()
    release_freed()  # the blocks' pages, kept in the threads' malloc arenas otherwise
    if float(out.max()) == float(out.min()):
        raise BadValuesError(f"volume is constant (every voxel is {float(out.min()):g})")
    return WorkingCopy(out, (f, f, f), shape)  # type: ignore[arg-type]


def _integer_accumulator(dtype: np.dtype, f: int) -> np.dtype | None:
    """A 32-bit integer type that sums ``f**3`` values of ``dtype`` exactly, or ``None``."""
    if dtype.kind not in "iub" or dtype.itemsize > 2:
        return None
    acc = np.dtype(np.int32 if dtype.kind == "i" else np.uint32)
    largest = max(abs(int(np.iinfo(dtype).min)), int(np.iinfo(dtype).max)) if dtype.kind != "b" else 1
    return acc if f**3 * largest <= np.iinfo(acc).max else None


def _block_mean_2d(img: np.ndarray, f: int, planes: int = 1) -> np.ndarray:
    """float32 means of ``f x f`` blocks of ``img``, itself a sum of ``planes`` slices."""
    if f == 1:
        return (img / planes).astype(np.float32) if planes != 1 else img.astype(np.float32, copy=False)
    h, w = img.shape
    # Integer sums stay in their (exact) type; float ones go to float64 (no float32 overflow).
    # Zero padding to whole blocks, then f strided additions per axis (much faster than a
    # reduction over a reshaped axis); the partial edge blocks are divided by the voxels
    # they really have.
    padded = np.zeros((-(-h // f) * f, -(-w // f) * f), img.dtype if img.dtype.kind in "iu" else np.float64)
    padded[:h, :w] = img
    cols = padded[:, 0::f].copy()
    for k in range(1, f):
        cols += padded[:, k::f]
    sums = cols[0::f].copy()
    for k in range(1, f):
        sums += cols[k::f]
    rows = np.minimum(f, h - np.arange(0, h, f))
    ncols = np.minimum(f, w - np.arange(0, w, f))
    return (sums / (np.outer(rows, ncols) * planes)).astype(np.float32)


def fill_value(data: np.ndarray, min_fraction: float = 0.01, min_gap: float = 0.01) -> float | None:
    """The constant written outside the reconstruction's field of view, or ``None``.

    Reconstructions pad the corners outside the circular field of view with one value
    (0, -1000, -2000 ...). Mostly it is the volume's minimum, no measured region is exactly
    constant, and it lies apart from the measured values. So a minimum held by at least
    ``min_fraction`` of the voxels, with a gap of at least ``min_gap`` of the other values'
    0.1-99.9th percentile range up to the next value, is taken as fill. Thresholds and
    intensity ranges must ignore it: it is not data, and a -2000 border drags Otsu's
    threshold below air. The gap keeps air that an 8-bit export saturated at 0 (next
    value 1 of 255) as data: left out, the thresholds would fall inside the sample. For a
    3D ``data`` ``(Z, Y, X)`` the measured voxels must also have a field of view's shape
    (:func:`_fov_shaped`): the same in-plane region in most axial slices.

    A fill need not be the minimum (tomopy's circular mask writes 0 whatever the air's
    level); :func:`lower_fill` moves such a fill to below the data in a thresholding's
    working copy, where this function then finds it.
    """
    arr = np.asarray(data)
    a = arr.ravel()
    lo = a.min()
    at_min = a == lo
    if np.count_nonzero(at_min) < min_fraction * a.size or at_min.all():
        return None
    rest = a[~at_min]
    p_lo, p_hi = np.percentile(rest[:: max(1, rest.size // 1_000_000)], [0.1, 99.9])  # a range, not exact
    if rest.min() - lo < min_gap * max(float(p_hi - p_lo), 1e-12):
        return None
    if arr.ndim == 3 and not _fov_shaped(~at_min.reshape(arr.shape)):
        return None
    return float(lo)


def _corner_fill(arr: np.ndarray, min_fraction: float = 0.01, min_corners: float = 0.9,
                 min_outside: float = 0.95, min_disc_iou: float = 0.9) -> np.ndarray | None:
    """Where ``arr`` ``(Z, Y, X)`` holds a fill that is not its minimum (boolean, its shape),
    or ``None``.

    The in-plane corners lie outside any circular field of view, so a fill holds them in
    (nearly) every axial slice: their most common value, when it is one exact value in at
    least ``min_corners`` of them, is the candidate. Noise never repeats one float that
    often, so measured data is not taken. It is fill when it holds ``min_fraction`` of the
    voxels, the other voxels have a field of view's shape (:func:`_fov_shaped`), and it
    covers ``min_outside`` of what lies outside that field of view, which is a disc centred
    in the slice (IoU at least ``min_disc_iou`` with the centred disc of its area). The minimum is left
    to :func:`fill_value`'s own test (8-bit air saturated at 0 fills the corners too).
    """
    corners = arr[:, [0, 0, -1, -1], [0, -1, 0, -1]].ravel()
    values, counts = np.unique(corners, return_counts=True)
    if counts.max() < min_corners * corners.size:
        return None
    c = values[counts.argmax()]
    if c == arr.min():
        return None
    at = arr == c
    if np.count_nonzero(at) < min_fraction * arr.size or not _fov_shaped(~at):
        return None
    outside = (~at).mean(axis=0) < 0.5
    if not outside.any() or at[:, outside].mean() < min_outside:
        return None
    # A reconstruction's circle is centred on the rotation axis. Exactly constant air around
    # an off-centre tube (a smoothed 8-bit export) also fills the corners, but taken as fill
    # it would leave the thresholds only the tube's own values to split.
    inside = ~outside
    Y, X = inside.shape
    yy, xx = np.ogrid[:Y, :X]
    disc = (yy - (Y - 1) / 2) ** 2 + (xx - (X - 1) / 2) ** 2 <= inside.sum() / np.pi
    if np.count_nonzero(inside & disc) < min_disc_iou * np.count_nonzero(inside | disc):
        return None
    return at


def lower_fill(data: np.ndarray, ring: int = 0) -> float | None:
    """Move a fill that is not the minimum below every measured value, in place.

    ``data`` is float32 ``(Z, Y, X)``. Thresholds then leave the fill out as they leave a
    fill at the minimum out, wherever they fall: a circle filled with 0 above negative air
    would otherwise be foreground and touch every edge. The ``ring`` in-plane voxels beside
    the fill, and those as near the slice's edge, go with it (a downsampled copy blends the
    fill's edge with the air: a bright ring when the fill is brighter). The new fill
    lies 5% of the measured range below their minimum, apart enough for :func:`fill_value`.

    Only the thresholdings do this. The networks' inputs (:func:`normalize`) keep such a
    fill as data: mapped to the 1st percentile there, it drew the field of view's edge in
    every slice of ``tomoloc.synth``'s volumes (fill 0, air about 0), and the sorting
    localizer's worst recall on the 24-volume benchmark batch at its 16-voxel margin fell
    from 1.0 to 0.86.

    Returns
    -------
    float or None
        The new fill value, or ``None`` when there was none to move (no fill, or a fill
        at the minimum already).
    """
    if data.ndim != 3:
        return None
    at = _corner_fill(data)
    if at is None:
        return None
    if ring:
        from scipy import ndimage

        # border_value=1: where the inscribed circle touches the slice's edge, a run of edge
        # voxels each holds a little fill, and none of them lies beside a voxel of pure fill.
        at = ndimage.binary_dilation(at, np.ones((1, 2 * ring + 1, 2 * ring + 1), bool), border_value=1)
    rest = data[~at]
    if rest.size == 0:
        return None
    p_lo, p_hi = np.percentile(rest[:: max(1, rest.size // 1_000_000)], [0.1, 99.9])
    new = np.float32(float(rest.min()) - 0.05 * max(float(p_hi - p_lo), 1e-6))
    data[at] = new
    return float(new)


def _fov_shaped(measured: np.ndarray, min_area: float = 0.1, min_iou: float = 0.9) -> bool:
    """Whether the non-minimum voxels ``(Z, Y, X)`` form a field of view: the same in-plane
    region (at least ``min_area`` of the slice) in most axial slices.

    A reconstruction's field of view is a cylinder around the rotation axis, so what is
    measured is (nearly) the same region in every axial slice. An exact-zero background
    around a sample (a noise-free phantom, a volume masked by an earlier step, a binary
    mask) is also a constant minimum set apart from the rest, but the sample's
    cross-section changes from slice to slice: taken as fill, the background would leave
    the histogram, the threshold would split the sample's own values, and its dim parts
    would be cut.
    """
    typical = measured.mean(axis=0) >= 0.5
    if typical.mean() < min_area:
        return False
    inter = np.logical_and(measured, typical).sum(axis=(1, 2))
    union = np.logical_or(measured, typical).sum(axis=(1, 2))
    return bool(np.median(inter / union) >= min_iou)


_DETECT = object()


def measured_values(data: np.ndarray, fill: Any = _DETECT) -> np.ndarray:
    """The voxel values of ``data`` without the field-of-view fill (flat, float32).

    ``fill`` is the fill value when the caller already has it (:func:`fill_value`, or
    ``None`` for none); by default it is detected.
    """
    arr = np.asarray(data, dtype=np.float32)
    flat = arr.ravel()
    if fill is _DETECT:
        fill = fill_value(arr)
    return flat if fill is None else flat[flat != fill]


def robust_range(data: np.ndarray, low: float = 1.0, high: float = 99.0, max_samples: int = 1_000_000,
                 seed: int = 0) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of ``data``'s measured values (fill excluded,
    subsampled for speed), ``hi > lo``."""
    flat = measured_values(data)
    if flat.size > max_samples:
        flat = np.random.default_rng(seed).choice(flat, max_samples, replace=False)
    lo, hi = np.percentile(flat, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalize(data: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``data`` to 0/1 (float32, not clipped).

    Percentiles rather than min/max so a few dense debris particles do not squash the
    sample's contrast; the field-of-view fill (:func:`fill_value`) is left out and mapped to 0.
    """
    data = np.asarray(data, dtype=np.float32)
    lo, hi = robust_range(data, low, high)
    fill = fill_value(data)
    if fill is not None:
        data = np.where(data == fill, np.float32(lo), data)  # the fill maps to 0, not far below it
    return ((data - lo) / (hi - lo)).astype(np.float32)


#: Ways to suppress the sample holder before a volume goes into a network: ``"none"``,
#: ``"zmedian"`` (:func:`suppress_holder`) or ``"interior"`` (:func:`tomoloc.holder.interior_view`).
HOLDER_MODES = ("none", "zmedian", "interior")


def suppress_holder(data: np.ndarray) -> np.ndarray:
    """Subtract from every axial slice the per-pixel median over axis 0, ``(Z, Y, X)``.

    The tube wall, the mounting medium, ring artefacts and a scanner table are (nearly) the
    same in every axial slice; a sample is not. The aim is background slices that no
    rotation network can orient, whichever way the tube sits. Measured on synthetic tube
    batches it falls short: a tilted tube, the meniscus and a sample longer than half the
    volume leave orientable residues, so it is an option, not the default.
    """
    data = np.asarray(data, dtype=np.float32)
    return data - np.median(data, axis=0, keepdims=True)


class NetworkView(NamedTuple):
    """A working copy as a network sees it (:func:`network_view`).

    Attributes
    ----------
    data : ndarray, float32 ``(Z', Y', X')``
        Normalised; smaller than the working copy when cut to the holder's interior.
    offset : tuple of 3 ints
        Where ``data[0, 0, 0]`` lies in the working copy.
    wall : int
        Layers taken off inside the holder's edge (0 unless cut to the interior).
    """

    data: np.ndarray
    offset: tuple[int, int, int]
    wall: int = 0

    def to_working(self, box: Bbox, shape: tuple[int, ...]) -> Bbox:
        """A box on ``data`` on the working copy's grid (``shape``).

        Shifted by ``offset``; a side that reaches the edge of a view cut to the holder's
        interior grows by ``wall`` (clipped to ``shape``): with no holder, the layers taken
        off as "wall" are the sample's own edge, and a box must not cut them.
        """
        out = []
        for a, ((lo, hi), o) in enumerate(zip(box, self.offset)):
            lo, hi = lo + o, hi + o
            if self.wall and a > 0:
                if lo == o:
                    lo = max(0, lo - self.wall)
                if hi == o + self.data.shape[a]:
                    hi = min(shape[a], hi + self.wall)
            out.append((int(lo), int(hi)))
        return (out[0], out[1], out[2])


def network_view(data: np.ndarray, holder: str = "none") -> NetworkView:
    """A working copy ``(Z, Y, X)`` as the networks see it, and where that view lies in it.

    ``holder`` ``"zmedian"`` subtracts :func:`suppress_holder`; ``"interior"`` cuts the copy
    to the holder's interior (:func:`tomoloc.holder.interior_view`), so boxes found on the
    view go back through :meth:`NetworkView.to_working`. The view is then
    percentile-normalised (:func:`normalize`).
    """
    if holder not in HOLDER_MODES:
        raise ValueError(f"holder must be one of {', '.join(HOLDER_MODES)}, got {holder!r}")
    if holder == "interior":
        from tomoloc.holder import interior_view  # late: it uses the thresholding localizers

        view, offset, wall = interior_view(data)
        return NetworkView(normalize(view), offset, wall)
    return NetworkView(normalize(suppress_holder(data) if holder == "zmedian" else data), (0, 0, 0))


def network_input(data: np.ndarray, holder: str = "none") -> np.ndarray:
    """The view of :func:`network_view` alone (training needs no offset)."""
    return network_view(data, holder).data
