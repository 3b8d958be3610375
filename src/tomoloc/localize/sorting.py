"""Localization from a sorting-pretext model's Monte-Carlo-dropout variance (paper section 2.2).

A network that learnt to order the slices of a volume relies on the structures that change
from slice to slice: the sample. Dropping features of those structures (train-time dropout
kept on at inference) makes their superpixel embeddings vary; background that looks the
same in every slice carries no position information and varies little. So: for every slice
along each trained axis, T stochastic passes give T embeddings per superpixel (the last
feature map, without global pooling and the linear layer); their variance, averaged over
channels, is the superpixel's uncertainty. The top ``top_fraction`` superpixels, mapped to
voxels, and the largest 3D connected region of them make the box.

Superpixels: the model trains at output stride 32 (a 64-pixel slice gives 2 x 2 cells, too
coarse for a box), and localizes through :func:`tomoloc.models.dilate`, the same weights at
output stride 8 (8 x 8 cells), exact at the stride-32 positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from tomoloc.localize.base import Localization, TrainedModel, largest_component_bbox
from tomoloc.memory import release_freed
from tomoloc.preprocess import network_view, working_copy

STATISTICS = ("embedding", "score")
#: What :func:`remove_slice_level` takes out of each slice's map (``"none"``: nothing).
SLICE_LEVELS = ("median", "none")

__all__ = ["SortingLocalizer", "cell_index", "orient_to_sample", "remove_slice_level", "superpixels_to_grid",
           "top_region", "variance_maps"]


def cell_index(n: int, size: int, output_stride: int) -> np.ndarray:
    """Superpixel row (or column) of each of ``n`` voxels along one in-plane axis, ``(n,)``.

    The ``n`` voxels are stretched to ``size`` input pixels (pixel centres aligned, like
    bilinear resizing with ``align_corners=False``); superpixel ``q`` of a ResNet feature map
    at stride ``s`` is centred on input pixel ``s * q`` (every strided layer of a ResNet
    centres its output ``p`` on input ``2 p``), so it covers pixels ``[s q - s/2, s q + s/2)``.
    """
    h = -(-size // output_stride)
    pix = (np.arange(n) + 0.5) * size / n - 0.5
    return np.clip(np.floor((pix + output_stride / 2) / output_stride), 0, h - 1).astype(np.intp)


def superpixels_to_grid(maps: np.ndarray, axis: int, shape: Sequence[int], size: int,
                        output_stride: int) -> np.ndarray:
    """Spread per-slice superpixel maps over the voxel grid of the volume they came from.

    Parameters
    ----------
    maps : np.ndarray
        ``(shape[axis], h, w)``: one ``h x w`` map per slice along ``axis``; rows and
        columns are the slice's in-plane axes in increasing order (axis 0 slices: (Y, X),
        axis 1: (Z, X), axis 2: (Z, Y)).
    axis : int
        The slicing axis.
    shape : (Z, Y, X)
        The volume's shape.
    size, output_stride : int
        Network input side and the feature map's stride (:func:`cell_index`).

    Returns
    -------
    np.ndarray
        ``shape``: each voxel holds the value of the superpixel that covers it.
    """
    maps = np.asarray(maps)
    rows, cols = [a for a in range(3) if a != axis]
    if maps.shape[0] != shape[axis]:
        raise ValueError(f"{maps.shape[0]} maps for {shape[axis]} slices along axis {axis}")
    r = cell_index(shape[rows], size, output_stride)
    c = cell_index(shape[cols], size, output_stride)
    grid = maps[:, r][:, :, c]  # (n_axis, n_rows, n_cols)
    return np.moveaxis(grid, 0, axis)


@torch.no_grad()
def variance_maps(
    net: torch.nn.Module,
    volume: np.ndarray,
    axis: int,
    input_size: int,
    mc_samples: int = 10,
    output_stride: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    statistic: str = "embedding",
) -> np.ndarray:
    """MC-dropout variance of the superpixel embeddings of every slice along ``axis``.

    Parameters
    ----------
    net : tomoloc.models.SortingNet
        Trained model; it is used in eval mode (batch-norm running statistics) with only its
        dropout switched to training behaviour.
    volume : np.ndarray
        Normalised ``(Z, Y, X)`` working copy.
    axis : int
        Slicing axis.
    input_size : int
        The model's input side ``S``.
    mc_samples : int
        Stochastic passes ``T``.
    output_stride : int
        8, 16 or 32 (:func:`tomoloc.models.dilate`).
    seed : int
        Seeds the dropout masks (results are reproducible).
    statistic : str
        ``"embedding"`` (the paper's): variance of the embedding, averaged over channels.
        ``"score"``: variance of the superpixel's contribution to the slice's position score
        (the embedding projected on the linear head's weights), i.e. only the uncertainty
        that bears on the sorting.

    Returns
    -------
    np.ndarray
        float32 ``(n, h, w)``, ``h = w = ceil(S / output_stride)``: per slice and superpixel,
        the variance over the ``T`` passes averaged over the embedding channels.
    """
    from tomoloc.models import dilate
    from tomoloc.sampling import square_slices

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if mc_samples < 2:
        raise ValueError(f"mc_samples must be >= 2 to estimate a variance, got {mc_samples}")
    enc = dilate(net.encoder, output_stride).to(device).eval()
    p = float(net.dropout.p)
    w = net.head.weight.detach().to(device).double().reshape(1, -1, 1, 1)
    stack = square_slices(volume, axis, input_size)
    out = []
    for i in range(0, len(stack), batch_size):
        x = torch.from_numpy(stack[i:i + batch_size][:, None]).to(device)
        f = enc.layer3(enc.layer2(enc.layer1(enc.maxpool(enc.relu(enc.bn1(enc.conv1(x)))))))
        total = sq = None
        for t in range(mc_samples):
            keep = _dropout_masks(seed, range(i, i + len(x)), t, f.shape[1:], p).to(device=device, dtype=f.dtype)
            e = enc.layer4(f * keep / (1 - p)).double()
            if statistic == "score":
                e = (e * w).sum(dim=1, keepdim=True)
            total = e if total is None else total + e
            sq = e * e if sq is None else sq + e * e
        mean = total / mc_samples
        var = (sq / mc_samples - mean * mean).clamp_min(0) * mc_samples / (mc_samples - 1)
        out.append(var.mean(dim=1).float().cpu().numpy())
    return np.concatenate(out)


def _dropout_masks(seed: int, slices: Sequence[int], t: int, shape: Sequence[int], p: float) -> torch.Tensor:
    """Keep-masks ``(len(slices), *shape)`` of pass ``t``: slice ``s``'s mask is drawn on the CPU
    from a generator seeded by ``(seed, s, t)``, so it is the same whatever the batch size or
    device (a CPU batch of 16 and a GPU batch of 128 give the same variance maps)."""
    masks = []
    for s in slices:
        state = int(np.random.SeedSequence([seed, s, t]).generate_state(1, np.uint64)[0]) >> 1
        gen = torch.Generator(device="cpu").manual_seed(state)
        masks.append(torch.rand(tuple(shape), generator=gen) >= p)
    return torch.stack(masks)


def remove_slice_level(maps: np.ndarray) -> np.ndarray:
    """Each slice's variance map less its own median, ``(n, h, w)`` float32.

    A slice's variance also rises and falls as a whole, with how hard that slice is to place
    as a whole: a slice through air beside the tube, where the network has nothing to go by,
    can vary more in every superpixel than a slice through the sample. Averaged over three
    axes those slices become bands of high score, and on our mixed benchmark the top region
    twice lay in such a band outside the tube (recall 0). The sample is what stands out from
    the rest of its own slice; a slice of nothing but background stands out nowhere and is
    about 0 everywhere after this.
    """
    maps = np.asarray(maps, dtype=np.float32)
    return maps - np.median(maps.reshape(len(maps), -1), axis=1)[:, None, None]


def orient_to_sample(score: np.ndarray, fraction: float, band: float = 0.1) -> tuple[np.ndarray, bool]:
    """``score`` ``(Z, Y, X)`` turned, if need be, so that its top region is the sample.

    The paper takes the sample to be where the MC-dropout variance is highest. Trained models
    do not agree on the sign: of four sorting models trained by the same recipe on other
    batches, one made the sample the least variable part of most of its 24 volumes, as
    clearly as another made it the most in all of its 8 (BENCHMARKS.md). What does hold in a
    tube scan is that the in-plane border of the volume, the outer ``band`` of Y and of X (air
    beside the tube, the corners of the field of view), is background. So of the two candidate
    regions, the :func:`top_region` of ``fraction`` of the score and that of the mirrored
    score (``max + min - score``: same range, order reversed), the one with the smaller share
    of its voxels in that band is taken; on a tie the score is kept. The second value says
    whether it was mirrored.
    """
    score = np.asarray(score)
    _, Y, X = score.shape
    by, bx = max(1, int(band * Y)), max(1, int(band * X))
    edge = np.zeros(score.shape, bool)
    edge[:, :by] = edge[:, -by:] = True
    edge[:, :, :bx] = edge[:, :, -bx:] = True
    mirrored = score.max() + score.min() - score
    shares = []
    for s in (score, mirrored):
        region, _ = top_region(s, fraction)
        shares.append(np.count_nonzero(region & edge) / max(1, np.count_nonzero(region)))
    return (mirrored, True) if shares[1] < shares[0] else (score, False)


def top_region(score: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """The largest 6-connected region of the ``fraction`` highest-scoring voxels.

    Returns the region as a boolean array of ``score``'s shape and the threshold used: the
    ``ceil(fraction * size)``-th highest value (ties at it are kept).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    flat = np.asarray(score).ravel()
    k = max(1, int(np.ceil(fraction * flat.size)))
    thr = float(np.partition(flat, flat.size - k)[flat.size - k])  # the k-th highest value
    top = score >= thr
    labels, n = ndimage.label(top)
    if n == 0:
        return top, thr
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax()), thr


def _ranks(a: np.ndarray) -> np.ndarray:
    """Values replaced by their rank in ``[0, 1]`` (so maps of different scale can be averaged)."""
    flat = a.ravel()
    r = np.empty(flat.size, np.float32)
    r[np.argsort(flat, kind="stable")] = np.linspace(0, 1, flat.size, dtype=np.float32)
    return r.reshape(a.shape)


@dataclass
class SortingLocalizer(TrainedModel):
    """Box the sample from a trained sorting model's MC-dropout embedding variance.

    Parameters
    ----------
    model_dir : path
        A run directory written by ``tomoloc train --task sorting``.
    mc_samples : int
        Stochastic passes per slice (the variance of ``T`` samples has a relative standard
        error of about ``sqrt(2 / (T - 1))``: 47% per superpixel and channel at 10, which the
        averaging over 512 channels and the top-fraction threshold absorb).
    top_fraction : float
        Share of superpixels kept. The paper's 3% boxes only the core of the sample (mean
        recall 0.17 on our mixed benchmark); 10% stays below the 20-30% of a volume that a
        sample typically fills, so the region still lies within the sample. On our mixed
        benchmark it kept 0.93 of the sample voxels against 0.80 for 5%, at a similar box
        error (6.56 against 6.08 voxels, BENCHMARKS.md).
    output_stride : int
        Superpixel stride at inference (:func:`tomoloc.models.dilate`).
    axes : sequence of int, optional
        Slicing axes; default: the axes the model was trained on. With several axes the
        per-axis maps are rank-normalised and averaged before the top fraction is taken.
    which, device : see :class:`tomoloc.localize.rotation.RotationLocalizer`.
    batch_size : int, optional
        Slices per forward pass; default 16 on a CPU, 128 on a GPU. On 2 cores, 16 and 32 ran
        at the same speed and 8 took 13% longer, while the dilated encoder's activations added
        about 160 MB to the peak memory at 32, 100 MB at 16 and 50 MB at 8.
    seed : int
        Seeds the dropout masks.
    statistic : str
        See :func:`variance_maps`.
    precision : str
        ``"32"`` (default) or ``"bf16"``: the network passes under bfloat16 autocast, for
        CPUs with AMX/AVX512-BF16 and GPUs (see ``TrainedModel._autocast``).
    slice_level : str
        ``"median"``: each slice's map less its median before the axes are combined
        (:func:`remove_slice_level`); ``"none"``: the raw variance (the paper's).
    orient : bool
        Mirror the score when its top region lies more on the volume's in-plane border than
        the mirrored score's does (:func:`orient_to_sample`); False: high variance is taken
        as the sample, as in the paper.
    """

    model_dir: str | os.PathLike
    mc_samples: int = 10
    top_fraction: float = 0.1
    output_stride: int = 8
    axes: Sequence[int] | None = None
    which: str = "best"
    device: str = "auto"
    batch_size: int | None = None
    seed: int = 0
    statistic: str = "embedding"
    precision: str = "32"
    slice_level: str = "median"
    orient: bool = True
    name: str = "sorting"
    _net: Any = field(default=None, init=False, repr=False)
    _config: Any = field(default=None, init=False, repr=False)

    def _batch(self) -> int:
        return self._batch_size(cpu=16)

    def score_volume(self, data: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Uncertainty on the working-copy grid ``data.shape``, and the raw per-axis maps."""
        self._load()
        cfg = self._config
        if self.slice_level not in SLICE_LEVELS:
            raise ValueError(f"slice_level must be one of {', '.join(SLICE_LEVELS)}, got {self.slice_level!r}")
        axes = tuple(self.axes) if self.axes is not None else tuple(cfg.axes)
        raw, grids = {}, []
        for a in axes:
            with self._autocast():
                m = variance_maps(self._net, data, a, cfg.input_size, self.mc_samples, self.output_stride,
                                  self._batch(), self.seed + a, self._dev, self.statistic)
            raw[a] = m
            release_freed()  # so that the next axis's activations reuse these pages
            if self.slice_level == "median":
                m = remove_slice_level(m)
            g = superpixels_to_grid(m, a, data.shape, cfg.input_size, self.output_stride)
            grids.append(g if len(axes) == 1 else _ranks(g))
        return np.mean(grids, axis=0) if len(grids) > 1 else grids[0], raw

    def localize(self, volume: Any) -> Localization:
        self._load()
        cfg = self._config
        work = working_copy(volume, cfg.max_voxels)
        projections = work.projections()
        view = network_view(work.data, cfg.holder)
        data, offset = view.data, view.offset
        score, raw = self.score_volume(data)
        mirrored = False
        if self.orient:
            score, mirrored = orient_to_sample(score, self.top_fraction)
        region, thr = top_region(score, self.top_fraction)
        box = largest_component_bbox(region)
        kept = float(region.sum()) / max(1, int((score >= thr).sum()))
        # A coherent region (most top superpixels in one component) is a confident answer;
        # scattered top superpixels (noise, several bright things) are not.
        confidence = kept
        if box is None:
            box = tuple((0, n) for n in data.shape)
            confidence = 0.0
        box = view.to_working(box, work.data.shape)  # type: ignore[arg-type]
        if data.shape != work.data.shape:
            # The view was the holder's interior: the score map goes back on the working
            # copy's grid (lowest score outside) for the figure.
            full = np.full(work.data.shape, float(score.min()), dtype=score.dtype)
            full[tuple(slice(o, o + n) for o, n in zip(offset, data.shape))] = score
            score = full
        bbox = work.to_original(box)  # type: ignore[arg-type]
        return Localization(
            bbox, self.name, confidence,
            {"factor": list(work.factor), "threshold": thr, "top_fraction": self.top_fraction,
             "region_share": kept, "mirrored": mirrored, "score": score, "maps": raw,
             "offset": list(offset), "projections": projections},
        )
