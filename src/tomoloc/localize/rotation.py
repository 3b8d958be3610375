"""Localization from a rotation-pretext model's certainty (paper section 2.2).

For every slice along each axis, the slice and its unrotated neighbour go through the
siamese rotation network; the probability it gives to "relative angle 0" is the certainty
that the slice holds something orientable — the sample. Background (medium, air, a centred
tube) looks the same at every angle, so the network cannot be sure there. Along each axis
the smoothed certainty profile is split into background and sample levels, and the longest
run of sample slices is that axis' interval; three intervals make the box.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from skimage.filters import threshold_otsu

from tomoloc.localize.base import Localization, TrainedModel
from tomoloc.preprocess import network_view, working_copy


@dataclass
class Interval:
    """A sample interval found on a 1D certainty profile (half-open, profile indices)."""

    lo: int
    hi: int
    threshold: float
    contrast: float  # sample level minus background level, in probability units
    found: bool


def profile_interval(
    profile: np.ndarray, sigma: float = 1.0, min_contrast: float = 0.1, max_gap: float = 0.05,
    extend: float = 0.5, keep: float = 0.0, floor: float | None = None,
) -> Interval:
    """The sample's interval on a certainty profile ``(n,)``.

    The profile is smoothed (Gaussian, ``sigma`` slices); Otsu's threshold on its values
    splits background from sample levels; runs above the threshold separated by gaps of
    at most ``max_gap * n`` slices are merged (a sample can have a weak middle, e.g. a
    fish's thin body between head and tail), and the interval spans every merged run with at
    least ``keep`` of the largest run's mass above the threshold (``keep=0``, the default:
    every run; 1: the strongest alone). The interval then grows outwards while the profile
    stays above a lower level, ``extend`` of the way from the threshold down to the
    background level (10th percentile): hysteresis, so a sample whose edge slices are only
    half certain is not cut (0 disables). When the profile's contrast (90th minus 10th percentile) is below
    ``min_contrast`` there is no background/sample split to trust, and the whole axis is
    returned with ``found=False``: a crop must err on the side of too big.

    ``floor``, when given, is the certainty a slice without features gets
    (:func:`featureless_certainty`). The background level is then at most the floor, and the
    threshold at most midway between it and the 90th percentile. Without it, a profile with
    no background slices (a sample through the whole axis, more certain at one end) is
    split in two by Otsu's threshold, and the less certain end is cut.
    """
    p = np.asarray(profile, dtype=np.float64)
    n = p.size
    if n == 0:
        raise ValueError("empty profile")
    if sigma > 0 and n > 1:
        p = gaussian_filter1d(p, sigma, mode="nearest")
    lo_level, hi_level = np.percentile(p, [10, 90])
    if floor is not None:
        lo_level = min(lo_level, float(floor))
    contrast = float(hi_level - lo_level)
    if n < 3 or contrast < min_contrast:
        return Interval(0, n, float("nan"), contrast, False)
    thr = float(threshold_otsu(p))
    if floor is not None:
        thr = min(thr, float(lo_level + hi_level) / 2)
    above = p > thr
    gap = max(1, int(round(max_gap * n)))
    runs = _runs(above)
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    mass = [float(np.clip(p[a:b] - thr, 0, None).sum()) for a, b in merged]
    kept = [r for r, m in zip(merged, mass) if m >= keep * max(mass)]
    lo, hi = kept[0][0], kept[-1][1]
    low = thr - extend * (thr - lo_level)
    while lo > 0 and p[lo - 1] > low:
        lo -= 1
    while hi < n and p[hi] > low:
        hi += 1
    return Interval(int(lo), int(hi), thr, contrast, True)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open runs of True in a 1D boolean array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


@torch.no_grad()
def certainty_profile(
    net: torch.nn.Module,
    volume: np.ndarray,
    axis: int,
    input_size: int,
    stride: int = 1,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """p(relative angle 0) for every slice along ``axis`` of a normalised volume, ``(n,)``.

    Every ``stride``-th slice is evaluated with its neighbour; the others are linearly
    interpolated. ``net`` must be in eval mode (no dropout).
    """
    from tomoloc.sampling import unrotated_pairs

    ref, twin = unrotated_pairs(volume, axis, input_size, k=1, stride=stride)
    probs = []
    for i in range(0, len(ref), batch_size):
        logits = net(ref[i:i + batch_size].to(device), twin[i:i + batch_size].to(device))
        probs.append(torch.softmax(logits.float(), dim=1)[:, 0].cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    n = volume.shape[axis]
    idx = np.arange(0, n, stride)
    return np.interp(np.arange(n), idx, p) if stride > 1 else p


@torch.no_grad()
def featureless_certainty(
    net: torch.nn.Module, like: np.ndarray, input_size: int, n: int = 16, seed: int = 0,
    batch_size: int = 128, device: str | torch.device = "cpu",
) -> float:
    """The certainty the network gives a slice with nothing in it, measured on ``like``'s level.

    ``n`` axial slices of white noise at the median and pixel noise (from neighbour
    differences along axis 2) of ``like`` ``(Z, Y, X)``, a normalised network view, go through
    :func:`certainty_profile` along axis 0; the median is returned. For a model that has
    learnt nothing but the task it is near chance (``1 / classes``); measured, it also holds
    for a model that is biased on featureless input.
    """
    from tomoloc.holder import pixel_noise

    noise = pixel_noise(np.asarray(like, dtype=np.float32))
    rng = np.random.default_rng(seed)
    flat = float(np.median(like)) + noise * rng.standard_normal((n + 1, *like.shape[1:]))
    p = certainty_profile(net, flat.astype(np.float32), 0, input_size, batch_size=batch_size, device=device)
    return float(np.median(p[:n]))


@dataclass
class RotationLocalizer(TrainedModel):
    """Box the sample from a trained rotation model's per-slice certainty.

    Parameters
    ----------
    model_dir : path
        A run directory written by ``tomoloc train --task rotation``.
    axes : sequence of int
        Axes whose certainty profile sets the interval; the others keep the whole extent
        (of the holder's interior, for a model trained with ``holder="interior"``).
    stride : int
        Evaluate every ``stride``-th slice (others interpolated).
    floor_axes : sequence of int
        Axes whose interval uses the certainty of a featureless slice
        (:func:`featureless_certainty`) as the ``floor`` of :func:`profile_interval`. Axis 0
        by default: along the rotation axis the holder's interior view leaves background
        slices with nothing but the medium, and their certainty is that of noise. Along axes
        1 and 2 what repeats along axis 0 (ring artefacts are stripes there) makes background
        slices more certain than noise, and the floor would let the interval run into them.
        On the batch it was chosen on the floor on axis 0 took the MAE from 8.00 to 7.13 voxels
        and the mean recall from 0.890 to 0.945 (on all three axes: MAE 8.88); elsewhere it was
        neutral (BENCHMARKS.md, "Reading the localization results").
    sigma, min_contrast, max_gap, extend, keep : float
        See :func:`profile_interval`. ``keep`` 0 (every run above the threshold, not only
        the strongest): a sample whose middle is less certain than its ends shows as two
        runs; on our tube batches the strongest run alone cut samples (mean recall 0.52
        and 0.55 against 0.89 and 0.88; BENCHMARKS.md).
    which : str
        Checkpoint: ``"best"`` (lowest validation loss) or ``"last"``.
    device : str
        ``"auto"`` (GPU when available), ``"cpu"``, ``"cuda"``...
    batch_size : int, optional
        Pairs per forward pass; default 32 on a CPU, 128 on a GPU. On 2 cores 32 ran as fast as
        128 (1.09-1.11 against 1.17-1.19 s per 96x128x128 volume) and the process peaked 126 MiB
        lower (837 against 963 MiB with the model loaded); 16 took 1.17 s.
    precision : str
        ``"32"`` (default) or ``"bf16"`` (bfloat16 autocast; see ``TrainedModel._autocast``).
    """

    model_dir: str | os.PathLike
    axes: Sequence[int] = (0, 1, 2)
    floor_axes: Sequence[int] = (0,)
    stride: int = 1
    sigma: float = 1.0
    min_contrast: float = 0.1
    max_gap: float = 0.05
    extend: float = 0.5
    keep: float = 0.0
    which: str = "best"
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "32"
    name: str = "rotation"
    _net: Any = field(default=None, init=False, repr=False)
    _config: Any = field(default=None, init=False, repr=False)

    def _batch(self) -> int:
        return self._batch_size(cpu=32)

    def localize(self, volume: Any) -> Localization:
        self._load()
        cfg = self._config
        work = working_copy(volume, cfg.max_voxels)
        projections = work.projections()
        view = network_view(work.data, cfg.holder)
        data = view.data
        box, profiles, intervals, floors = [], {}, {}, {}
        for axis in range(3):
            n = data.shape[axis]
            if axis not in self.axes:
                box.append((0, n))
                continue
            with self._autocast():
                prof = certainty_profile(self._net, data, axis, cfg.input_size, self.stride,
                                         self._batch(), self._dev)
                if axis in self.floor_axes:
                    floors[axis] = featureless_certainty(self._net, data, cfg.input_size,
                                                         batch_size=self._batch(), device=self._dev)
            iv = profile_interval(prof, self.sigma, self.min_contrast, self.max_gap, self.extend, self.keep,
                                  floors.get(axis))
            profiles[axis], intervals[axis] = prof, iv
            box.append((iv.lo, iv.hi))
        found = [iv.found for iv in intervals.values()]
        contrast = min((iv.contrast for iv in intervals.values()), default=0.0)
        confidence = float(np.clip(contrast / 0.5, 0, 1)) if all(found) else 0.0
        bbox = work.to_original(view.to_working(tuple(box), work.data.shape))  # type: ignore[arg-type]
        return Localization(
            bbox, self.name, confidence,
            {"factor": list(work.factor), "offset": list(view.offset),
             "profiles": {a: p.tolist() for a, p in profiles.items()},
             "intervals": {a: [iv.lo, iv.hi, iv.threshold, iv.contrast, iv.found] for a, iv in intervals.items()},
             "floors": floors, "min_contrast": contrast, "found": all(found), "projections": projections},
        )
