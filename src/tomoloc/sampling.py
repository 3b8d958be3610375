"""Training samples for the pretext tasks (paper section 2.1): rotation pairs, sorting batches.

A sample is a pair of nearby slices of one volume along one axis, each turned by a random
multiple of ``step`` degrees and cut to its inscribed circle; the label is the rotation
that turns the reference slice's orientation into the twin's. Adjacent slices rather than
two copies of one slice act as a natural augmentation: the network cannot solve the task
by matching pixel noise.

Slices along axis ``a`` of a ``(Z, Y, X)`` volume are 2D images: axis 0 gives ``(Y, X)``
images, axis 1 gives ``(Z, X)`` and axis 2 gives ``(Z, Y)`` (rows, columns). Every slice
is resized (stretched) to ``size x size``.

Angles are in degrees, counter-clockwise as the image is displayed (row 0 at the top),
the direction of :func:`numpy.rot90`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

__all__ = [
    "RotationPairDataset",
    "SORTING_SAMPLERS",
    "SortingBatchDataset",
    "TwoViewSliceDataset",
    "extract_slice",
    "generalized_gaussian_weights",
    "inscribed_circle_mask",
    "n_angle_classes",
    "prepare_volume",
    "relative_angle_class",
    "rotate",
    "square_slices",
    "unrotated_pairs",
]

#: Default working-copy size for training and inference volumes.
DEFAULT_MAX_VOXELS = 128**3


def prepare_volume(volume: Any, max_voxels: int = DEFAULT_MAX_VOXELS, name: str | None = None,
                   holder: str = "none") -> np.ndarray:
    """Load ``volume`` as the network sees it: block-mean downsampled, optionally holder
    suppressed (``holder="zmedian"``, :func:`tomoloc.preprocess.suppress_holder`), and
    percentile-normalised.

    Parameters
    ----------
    volume : path-like or array-like
        A path readable by :func:`tomoloc.io.open_volume`, or a 3D ``(Z, Y, X)`` array-like.
    max_voxels : int
        Voxel budget of the working copy (:func:`tomoloc.preprocess.working_copy`).
    name : str, optional
        How to name an in-memory volume in error messages.

    Returns
    -------
    np.ndarray
        float32 ``(Z', Y', X')`` with the 1st/99th percentiles at 0/1.

    Raises
    ------
    tomoloc.io.VolumeError
        If the file cannot be read, or the values are unusable (NaN/inf, constant).
    """
    from tomoloc import io  # late: io imports the format libraries
    from tomoloc.preprocess import BadValuesError, network_input, working_copy

    if isinstance(volume, (str, os.PathLike)):
        with io.open_volume(volume) as vol:
            try:
                wc = working_copy(vol, max_voxels=max_voxels)
            except BadValuesError as exc:
                raise io.VolumeError(f"{volume}: {exc}") from exc
    else:
        try:
            wc = working_copy(volume, max_voxels=max_voxels)
        except BadValuesError as exc:
            raise io.VolumeError(f"{name or 'in-memory volume'}: {exc}") from exc
    return network_input(wc.data, holder)


def n_angle_classes(step: int) -> int:
    """Number of rotation classes ``360 // step``; ``step`` must divide 360."""
    if not isinstance(step, (int, np.integer)) or step <= 0 or 360 % step:
        raise ValueError(f"angle step must be a positive integer dividing 360, got {step!r}")
    return 360 // int(step)


def relative_angle_class(a_ref: float, a_twin: float, step: int = 90) -> int:
    """Class of the rotation that turns a slice rotated by ``a_ref`` into one rotated by ``a_twin``.

    ``((a_twin - a_ref) mod 360) / step``, in ``[0, 360 // step)``; class 0 means "same
    orientation". The default step of 90 degrees gives 4 classes whose rotations are exact
    pixel permutations (:func:`numpy.rot90`): no interpolation blur or aliasing pattern
    exists that the network could read the angle from instead of the sample's shape. Finer
    steps (45, 30, ...) are allowed; their interpolation artefacts are only partly hidden by
    the inscribed-circle mask.

    Raises
    ------
    ValueError
        If ``step`` does not divide 360 or the angle difference is not a multiple of it.
    """
    n = n_angle_classes(step)
    diff = (a_twin - a_ref) % 360
    cls, rest = divmod(diff, step)
    if rest:
        raise ValueError(f"angle difference {diff} is not a multiple of the step {step}")
    return int(cls) % n


def inscribed_circle_mask(h: int, w: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of the largest circle inside the image.

    Centre ``((h - 1) / 2, (w - 1) / 2)`` (the image centre, in pixel-centre coordinates),
    radius ``min(h, w) / 2``; a pixel is inside when its centre is within the radius. The
    mask is symmetric under flips, and under 90-degree rotations when ``h == w``, so masking
    leaks no orientation cue.
    """
    yy, xx = np.ogrid[:h, :w]
    r = min(h, w) / 2
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= r * r


def rotate(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a 2D image ``(H, W)`` counter-clockwise by ``angle_deg`` about its centre.

    Multiples of 90 degrees are exact (:func:`numpy.rot90`; the shape becomes ``(W, H)`` for
    odd quarter turns). Other angles use bilinear interpolation with the shape kept and
    edge values repeated outside; the corners then hold artefacts that
    :func:`inscribed_circle_mask` removes.
    """
    if angle_deg % 90 == 0:
        return np.ascontiguousarray(np.rot90(img, int(angle_deg // 90) % 4))
    # 'nearest' so that pixels inside the inscribed circle never blend in a fill value.
    return ndimage.rotate(img, angle_deg, reshape=False, order=1, mode="nearest")


def square_slices(volume: Any, axis: int, size: int, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Slices of ``volume`` along ``axis``, each resized to a ``size x size`` square.

    Parameters
    ----------
    volume : array-like
        ``(Z, Y, X)`` in-memory volume (normalised, for network input).
    axis : int
        0 gives ``(Y, X)`` images, 1 gives ``(Z, X)``, 2 gives ``(Z, Y)``.
    size : int
        Output side ``S``.
    indices : sequence of int, optional
        Slice indices along ``axis``; all slices when omitted.

    Returns
    -------
    np.ndarray
        float32 ``(N, S, S)``. A non-square slice is stretched (bilinear, anti-aliased),
        not padded: a padded band would tell the network the slice's orientation (modulo
        180 degrees) in every slice, sample or not.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    stack = np.moveaxis(vol, axis, 0)
    if indices is not None:
        stack = stack[np.asarray(indices, dtype=np.intp)]
    stack = np.asarray(stack, dtype=np.float32)
    n, h, w = stack.shape
    if (h, w) != (size, size) and n:
        t = torch.from_numpy(np.ascontiguousarray(stack))[:, None]
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        stack = t[:, 0].numpy()
    return np.ascontiguousarray(stack, dtype=np.float32)


def extract_slice(volume: Any, axis: int, index: int, size: int) -> np.ndarray:
    """One slice of a normalised in-memory 3D volume, resized to a square, ``(S, S)``.

    Axis 0 slices are ``(Y, X)`` images, axis 1 slices ``(Z, X)``, axis 2 slices ``(Z, Y)``;
    see :func:`square_slices`.
    """
    n = np.shape(volume)[axis]
    if not -n <= index < n:
        raise IndexError(f"slice {index} out of range for axis {axis} of length {n}")
    return square_slices(volume, axis, size, [index % n])[0]


def generalized_gaussian_weights(n: int, scale: float = 0.3, beta: float = 4.0) -> np.ndarray:
    """Sampling weights ``(n,)`` for slice indices, peaked at the centre, summing to 1.

    ``exp(-(|i - c| / (scale * n)) ** beta)`` with ``c = (n - 1) / 2``: flat over the middle
    and falling towards the borders (more steeply for larger ``beta``), for samples known to
    keep a margin to the volume's borders, so fewer empty slices are drawn.
    """
    x = np.abs(np.arange(n) - (n - 1) / 2) / max(scale * n, 1e-9)
    w = np.exp(-(x**beta))
    return w / w.sum()


class _SliceDataset(Dataset):
    """What the pretext datasets share: cached square slice stacks and ``(epoch, index)`` keys.

    Subclasses set ``volumes``, ``axes``, ``input_size``, ``length``, ``epoch`` and an empty
    ``_stacks`` dict.
    """

    volumes: list[np.ndarray]
    axes: tuple[int, ...]
    input_size: int
    length: int
    epoch: int
    _stacks: dict[tuple[int, int], np.ndarray]

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw integer keys of the given epoch from now on."""
        self.epoch = int(epoch)

    def stack(self, volume: int, axis: int) -> np.ndarray:
        """Square-resized slices ``(N, S, S)`` of one volume along one axis (cached)."""
        key = (volume, axis)
        if key not in self._stacks:
            self._stacks[key] = square_slices(self.volumes[volume], axis, self.input_size)
        return self._stacks[key]

    def precompute(self) -> Any:
        """Fill the slice cache now, e.g. before worker processes fork and share it."""
        for v in range(len(self.volumes)):
            for a in self.axes:
                self.stack(v, a)
        return self

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """``(epoch, index)`` of an item key: an index (current epoch) or an explicit pair."""
        if isinstance(key, tuple):
            epoch, idx = (int(x) for x in key)
        else:
            epoch, idx = self.epoch, int(key)
        if not 0 <= idx < self.length:
            raise IndexError(f"index {idx} out of range for {self.length} items")
        return epoch, idx

    def _draw(self, key: int | tuple[int, int]) -> tuple[int, int, np.random.Generator, int, int]:
        """``(epoch, index, rng, volume, axis)`` of an item: the generator is seeded by
        ``(seed, epoch, index)`` and has already drawn the volume and the axis."""
        epoch, idx = self._key(key)
        rng = np.random.default_rng([self.seed, epoch, idx])
        v = int(rng.integers(len(self.volumes)))
        return epoch, idx, rng, v, self.axes[int(rng.integers(len(self.axes)))]


#: Slice-index distributions of the sorting task.
SORTING_SAMPLERS = ("uniform", "gengauss")


class SortingBatchDataset(_SliceDataset):
    """Sorting batches: item ``idx`` is ``n_slices`` slices of ONE volume along ONE axis.

    Item ``idx`` is drawn with ``np.random.default_rng([seed, epoch, idx])``: a volume and
    an axis uniformly, then ``n_slices`` distinct slice indices (all of them when the axis
    is shorter), uniformly or from :func:`generalized_gaussian_weights` (``sampling=
    "gengauss"``, for samples known to keep a margin to the borders: fewer empty slices).
    The slices are returned in the drawn (random) order: the network must not learn the
    order from the batch layout. With ``augment``, each slice gets an independent random
    90-degree rotation and flip (exact pixel permutations), which leaves its position along
    the sorting axis unchanged but takes away cues tied to one fixed in-plane orientation.

    Parameters
    ----------
    volumes : sequence of np.ndarray
        float32 ``(Z, Y, X)`` normalised volumes (:func:`prepare_volume`).
    axes : sequence of int
        Axes to sort along; each batch uses one.
    n_slices : int
        Slices per batch.
    input_size : int
        Side ``S`` of the network input.
    length : int
        Batches per epoch.
    seed : int
        Base seed.
    sampling : str
        ``"uniform"`` or ``"gengauss"``.
    gg_scale, gg_beta : float
        Generalized-Gaussian scale (fraction of the axis length) and shape.
    augment : bool
        Random 90-degree rotations and flips per slice.

    Returns (``__getitem__``)
    -------------------------
    slices : Tensor
        float32 ``(N, 1, S, S)``.
    positions : Tensor
        int64 ``(N,)`` slice indices along the axis, in the working copy's coordinates.
    meta : dict
        ``volume, axis, epoch`` (ints).
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        axes: Sequence[int] = (0,),
        n_slices: int = 32,
        input_size: int = 64,
        length: int = 100,
        seed: int = 0,
        sampling: str = "uniform",
        gg_scale: float = 0.3,
        gg_beta: float = 4.0,
        augment: bool = True,
    ):
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        if not self.volumes:
            raise ValueError("SortingBatchDataset needs at least one volume")
        for v in self.volumes:
            if v.ndim != 3 or min(v.shape) < 2:
                raise ValueError(f"expected 3D volumes with at least 2 slices per axis, got shape {v.shape}")
        self.axes = tuple(int(a) for a in axes)
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes!r}")
        if sampling not in SORTING_SAMPLERS:
            raise ValueError(f"sampling must be one of {', '.join(SORTING_SAMPLERS)}, got {sampling!r}")
        if n_slices < 2:
            raise ValueError(f"a sorting batch needs at least 2 slices, got {n_slices}")
        if gg_scale <= 0 or gg_beta <= 0:
            raise ValueError("gg_scale and gg_beta must be > 0")
        self.n_slices = int(n_slices)
        self.input_size = int(input_size)
        self.length = int(length)
        self.seed = int(seed)
        self.sampling = sampling
        self.gg_scale, self.gg_beta = float(gg_scale), float(gg_beta)
        self.augment = bool(augment)
        self.epoch = 0
        self._stacks: dict[tuple[int, int], np.ndarray] = {}

    def indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``min(n_slices, n)`` distinct indices in ``[0, n)``, in random order."""
        m = min(self.n_slices, n)
        p = generalized_gaussian_weights(n, self.gg_scale, self.gg_beta) if self.sampling == "gengauss" else None
        if p is not None and np.count_nonzero(p > 0) < m:  # too peaked to draw m distinct slices
            p = None
        return rng.choice(n, size=m, replace=False, p=p)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        epoch, idx, rng, v, axis = self._draw(key)
        stack = self.stack(v, axis)
        pos = self.indices(rng, stack.shape[0])
        imgs = stack[pos]
        if self.augment:
            turns = rng.integers(4, size=len(pos))
            flips = rng.integers(2, size=len(pos))
            imgs = np.stack([np.rot90(im[:, ::-1] if f else im, t) for im, t, f in zip(imgs, turns, flips)])
        imgs = np.ascontiguousarray(imgs, dtype=np.float32)[:, None]
        return (torch.from_numpy(imgs), torch.from_numpy(pos.astype(np.int64)),
                {"volume": v, "axis": axis, "epoch": epoch})


class TwoViewSliceDataset(_SliceDataset):
    """Contrastive samples: item ``idx`` is two augmented views of ONE random slice.

    Item ``idx`` is drawn with ``np.random.default_rng([seed, epoch, idx])``: a volume, an
    axis and a slice index uniformly; the two views come from
    :func:`tomoloc.transforms.two_views` with the method's view recipes
    (:data:`tomoloc.transforms.SIMCLR_VIEWS` or :data:`~tomoloc.transforms.MOCOV3_VIEWS`),
    seeded by the same key. The other items of a batch are the negatives, so each item
    must be a different slice; a batch of ``B`` items encodes ``2 B`` images.

    Parameters
    ----------
    volumes : sequence of np.ndarray
        float32 ``(Z, Y, X)`` normalised volumes (:func:`prepare_volume`).
    recipes : pair of tomoloc.transforms.ViewRecipe
        Augmentations of the first and the second view.
    axes : sequence of int
        Axes to slice along.
    input_size : int
        Side ``S`` of the slices and of the views.
    length : int
        Items per epoch.
    seed : int
        Base seed.

    Returns (``__getitem__``)
    -------------------------
    view_a, view_b : Tensor
        float32 ``(1, S, S)``.
    meta : dict
        ``volume, axis, index, epoch`` (ints).
    """

    def __init__(self, volumes: Sequence[np.ndarray], recipes: Sequence[Any], axes: Sequence[int] = (0, 1, 2),
                 input_size: int = 64, length: int = 100, seed: int = 0):
        from tomoloc.transforms import make_view

        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        if not self.volumes or any(v.ndim != 3 for v in self.volumes):
            raise ValueError("TwoViewSliceDataset needs at least one 3D volume")
        self.axes = tuple(int(a) for a in axes)
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes!r}")
        if len(recipes) != 2:
            raise ValueError("two view recipes are needed")
        self.input_size = int(input_size)
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        self.views = (make_view(recipes[0], self.input_size), make_view(recipes[1], self.input_size))
        self._stacks: dict[tuple[int, int], np.ndarray] = {}

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from tomoloc.transforms import two_views

        epoch, idx, rng, v, axis = self._draw(key)
        stack = self.stack(v, axis)
        i = int(rng.integers(stack.shape[0]))
        a, b = two_views(torch.from_numpy(stack[i][None]), self.views, [self.seed, epoch, idx])
        return a, b, {"volume": v, "axis": axis, "index": i, "epoch": epoch}


def _twin_index(rng: np.random.Generator, i: int, n: int, k: int) -> int:
    """Uniform in ``[i - k, i + k]`` without ``i``, restricted to ``[0, n)``."""
    lo, hi = max(0, i - k), min(n - 1, i + k)
    choices = hi - lo  # candidates in [lo, hi] minus i itself
    if choices <= 0:
        return i
    j = lo + int(rng.integers(choices))
    return j + 1 if j >= i else j


class RotationPairDataset(_SliceDataset):
    """Random rotation pairs from in-memory volumes; each item is a fixed function of its key.

    Item ``idx`` is drawn with ``np.random.default_rng([seed, epoch, idx])``: a volume and
    an axis uniformly, a reference slice ``i`` (uniformly, or by ``slice_weights``), a twin
    slice uniformly in ``[i - k, i + k]`` without ``i`` (clipped to the volume), and an
    angle class for each slice. Both slices are rotated by their class angle and set to 0
    outside the inscribed circle. The label is ``(class_twin - class_ref) mod n_classes``
    (:func:`relative_angle_class`).

    ``epoch`` comes from :meth:`set_epoch`, or with the key itself: ``dataset[(epoch, idx)]``,
    which a sampler can use so that worker processes need no epoch state.

    Parameters
    ----------
    volumes : sequence of np.ndarray
        float32 ``(Z, Y, X)`` volumes, normalised (see :func:`prepare_volume`).
    axes : sequence of int
        Axes to slice along.
    k : int
        Twin range; 0 pairs a slice with itself.
    step : int
        Angle step in degrees (must divide 360); ``360 // step`` classes.
    input_size : int
        Side ``S`` of the network input.
    length : int
        Items per epoch.
    seed : int
        Base seed.
    slice_weights : callable, optional
        ``f(n) -> (n,)`` non-negative weights for the reference index along an axis of
        ``n`` slices (e.g. :func:`generalized_gaussian_weights`); uniform when omitted.
    max_shift : float
        Before rotating, shift each slice by an independent random offset of up to
        ``max_shift * S`` pixels per direction (edge values repeated). Where a tube sits
        off the rotation axis, its position would tell the angle in every slice; random
        offsets make position useless, so only the shape of what is in the slice can tell.

    Returns (``__getitem__``)
    -------------------------
    ref, twin : Tensor
        float32 ``(1, S, S)``.
    label : Tensor
        int64 0-dim, in ``[0, 360 // step)``.
    meta : dict
        ``volume, axis, ref_index, twin_index, ref_angle, twin_angle, epoch`` (ints).
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        axes: Sequence[int] = (0, 1, 2),
        k: int = 2,
        step: int = 90,
        input_size: int = 64,
        length: int = 1024,
        seed: int = 0,
        slice_weights: Callable[[int], np.ndarray] | None = None,
        max_shift: float = 0.0,
    ):
        if not 0.0 <= max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {max_shift!r}")
        self.max_shift = float(max_shift)
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        if not self.volumes:
            raise ValueError("RotationPairDataset needs at least one volume")
        for v in self.volumes:
            if v.ndim != 3 or 0 in v.shape:
                raise ValueError(f"expected non-empty 3D volumes, got shape {v.shape}")
        self.axes = tuple(int(a) for a in axes)
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes!r}")
        if k < 0:
            raise ValueError(f"twin range k must be >= 0, got {k}")
        self.k = int(k)
        self.step = int(step)
        self.n_classes = n_angle_classes(step)
        self.input_size = int(input_size)
        self.length = int(length)
        self.seed = int(seed)
        self.slice_weights = slice_weights
        self.epoch = 0
        self.mask = inscribed_circle_mask(self.input_size, self.input_size)
        self._stacks: dict[tuple[int, int], np.ndarray] = {}
        self._probs: dict[tuple[int, int], np.ndarray] = {}

    def _ref_index(self, rng: np.random.Generator, v: int, axis: int) -> int:
        n = self.volumes[v].shape[axis]
        if self.slice_weights is None:
            return int(rng.integers(n))
        key = (v, axis)
        if key not in self._probs:
            w = np.asarray(self.slice_weights(n), dtype=np.float64)
            if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"slice_weights({n}) must give {n} non-negative weights with a positive sum")
            self._probs[key] = w / w.sum()
        return int(rng.choice(n, p=self._probs[key]))

    def view(self, volume: int, axis: int, index: int, angle: float,
             shift: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Slice ``index`` shifted by ``shift``, rotated by ``angle``, zeroed outside the circle."""
        img = self.stack(volume, axis)[index]
        if shift != (0, 0):
            img = _shift(img, shift)
        img = rotate(img, angle)
        return np.where(self.mask, img, np.float32(0)).astype(np.float32, copy=False)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        epoch, idx, rng, v, axis = self._draw(key)
        n = self.volumes[v].shape[axis]
        i = self._ref_index(rng, v, axis)
        j = _twin_index(rng, i, n, self.k)
        c_ref, c_twin = (int(c) for c in rng.integers(self.n_classes, size=2))
        a_ref, a_twin = c_ref * self.step, c_twin * self.step
        m = int(round(self.max_shift * self.input_size))
        s_ref, s_twin = ((0, 0), (0, 0)) if m == 0 else (
            tuple(int(d) for d in rng.integers(-m, m + 1, size=2)) for _ in range(2))
        ref = self.view(v, axis, i, a_ref, s_ref)
        twin = self.view(v, axis, j, a_twin, s_twin)
        label = relative_angle_class(a_ref, a_twin, self.step)
        meta = {"volume": v, "axis": axis, "ref_index": i, "twin_index": j, "ref_angle": a_ref,
                "twin_angle": a_twin, "epoch": epoch}
        return torch.from_numpy(ref[None]), torch.from_numpy(twin[None]), torch.tensor(label, dtype=torch.int64), meta


def _shift(img: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """Translate a 2D image by integer ``(dy, dx)``, repeating edge values into the gap."""
    dy, dx = shift
    h, w = img.shape
    p = max(abs(dy), abs(dx))
    padded = np.pad(img, p, mode="edge")
    return np.ascontiguousarray(padded[p - dy:p - dy + h, p - dx:p - dx + w])


def unrotated_pairs(volume: Any, axis: int, size: int, k: int = 1, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrotated, circle-masked pairs for every ``stride``-th slice along ``axis``.

    Slice ``i`` (for ``i`` in ``range(0, n, stride)``) is paired with slice ``i + k``, or
    ``i - k`` where ``i + k`` is past the end (clipped to the volume). The true class of
    every pair is 0, so the network's ``p(class 0)`` is its certainty about the slice.

    Parameters
    ----------
    volume : path-like or np.ndarray
        A normalised ``(Z, Y, X)`` array, or a path, prepared with :func:`prepare_volume`
        (default ``max_voxels``).
    axis : int
        Slicing axis.
    size : int
        Network input side ``S``.
    k : int
        Distance to the twin slice.
    stride : int
        Take every ``stride``-th slice.

    Returns
    -------
    ref, twin : Tensor
        float32 ``(N, 1, S, S)`` with ``N = ceil(n / stride)``; row ``r`` is slice
        ``r * stride``.
    """
    if isinstance(volume, (str, os.PathLike)):
        volume = prepare_volume(volume)
    if stride < 1 or k < 0:
        raise ValueError(f"need stride >= 1 and k >= 0, got stride={stride}, k={k}")
    stack = square_slices(volume, axis, size)
    n = stack.shape[0]
    ref_idx = np.arange(0, n, stride)
    twin_idx = np.where(ref_idx + k < n, ref_idx + k, np.maximum(ref_idx - k, 0))
    stack = np.where(inscribed_circle_mask(size, size), stack, np.float32(0)).astype(np.float32, copy=False)
    return torch.from_numpy(stack[ref_idx][:, None]), torch.from_numpy(stack[twin_idx][:, None])
