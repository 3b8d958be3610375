"""Augmentations for the contrastive pretext tasks (SimCLR, MoCo v3), on ONE-channel slices.

A view is made from a float32 ``(1, H, W)`` slice normalised by
:func:`tomoloc.sampling.prepare_volume` (1st/99th percentiles at 0/1, not clipped) and
comes out as float32 ``(1, S, S)``, on the same intensity scale, so the encoder sees what
the sorting task and fine-tuning feed it.

Why not lightly's ``SimCLRTransform``/``BYOLTransform`` as they are: they target RGB
``PIL`` images. Given a tensor they go through 8-bit ``PIL`` for the blur (values
quantised to 1/255 and clipped to [0, 1], which flattens the dense skeleton above the
99th percentile), their default ImageNet normalisation turns one channel into three, and
colour jitter's saturation/hue and random greyscale mean nothing for a grey level. So the
recipe is kept and rebuilt from ``torchvision.transforms.v2`` operations on float tensors:
random resized crop, flips, 90-degree rotations, brightness/contrast jitter (an affine
map, not clipped), Gaussian blur and solarisation, with each method's probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["ViewRecipe", "SIMCLR_VIEWS", "MOCOV3_VIEWS", "make_view", "two_views"]


@dataclass(frozen=True)
class ViewRecipe:
    """Probabilities and strengths of one view's augmentations.

    Attributes
    ----------
    min_scale : float
        Smallest crop area of :class:`torchvision.transforms.v2.RandomResizedCrop`,
        as a fraction of the slice.
    jitter_prob : float
        Probability of the brightness/contrast jitter.
    brightness, contrast : float
        Jitter strengths: factors drawn uniformly from ``[1 - s, 1 + s]``.
    blur_prob : float
        Probability of a Gaussian blur with sigma in ``sigmas`` (pixels at ``S = 224``,
        scaled to the view size like the kernel, which is about 10 % of the side).
    sigmas : tuple of float
    solarize_prob : float
        Probability of inverting the intensities above 0.5.
    """

    min_scale: float = 0.08
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_prob: float = 0.5
    sigmas: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0


#: SimCLR (Chen et al. 2020, lightly ``SimCLRTransform``): colour strength 1.0 gives
#: brightness/contrast 0.8, p = 0.8; blur p = 0.5; the same recipe for both views.
SIMCLR_VIEWS = (ViewRecipe(brightness=0.8, contrast=0.8, blur_prob=0.5),
                ViewRecipe(brightness=0.8, contrast=0.8, blur_prob=0.5))
#: MoCo v3 (Chen et al. 2021; BYOL's asymmetric views, lightly ``BYOLView1/2Transform``):
#: brightness/contrast 0.4, p = 0.8; blur 1.0 / 0.1; solarisation 0.0 / 0.2.
MOCOV3_VIEWS = (ViewRecipe(blur_prob=1.0, solarize_prob=0.0),
                ViewRecipe(blur_prob=0.1, solarize_prob=0.2))


class _IntensityJitter(torch.nn.Module):
    """Brightness then contrast factors, as ``ColorJitter`` but without clipping to [0, 1]."""

    def __init__(self, brightness: float, contrast: float):
        super().__init__()
        self.brightness, self.contrast = brightness, contrast

    def forward(self, x: Tensor) -> Tensor:
        b = 1.0 + (2 * torch.rand(()).item() - 1) * self.brightness
        c = 1.0 + (2 * torch.rand(()).item() - 1) * self.contrast
        x = x * b
        m = x.mean()
        return (x - m) * c + m


class _RandomQuarterTurn(torch.nn.Module):
    """Rotation by a random multiple of 90 degrees (exact, no interpolation)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.rot90(x, int(torch.randint(4, ()).item()), dims=(-2, -1))


class _Solarize(torch.nn.Module):
    """``1 - x`` where ``x >= 0.5`` (float images, no clipping)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0.5, 1.0 - x, x)


def make_view(recipe: ViewRecipe, size: int) -> v2.Compose:
    """The augmentation pipeline of one view: ``(1, H, W)`` float32 -> ``(1, size, size)``."""
    kernel = max(3, int(0.1 * size) | 1)  # odd, about 10 % of the side as in SimCLR
    scale = size / 224  # the sigma range is given for 224-pixel images
    sig = (recipe.sigmas[0] * scale, max(recipe.sigmas[1] * scale, recipe.sigmas[0] * scale + 1e-3))
    ops: list[torch.nn.Module] = [
        v2.RandomResizedCrop(size, scale=(recipe.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
        _RandomQuarterTurn(),
        v2.RandomApply([_IntensityJitter(recipe.brightness, recipe.contrast)], p=recipe.jitter_prob),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=sig)], p=recipe.blur_prob),
    ]
    if recipe.solarize_prob > 0:
        ops.append(v2.RandomApply([_Solarize()], p=recipe.solarize_prob))
    return v2.Compose(ops)


def two_views(img: Tensor, views: tuple[v2.Compose, v2.Compose], seed: int | list[int]) -> tuple[Tensor, Tensor]:
    """Two augmented views ``(1, S, S)`` of one slice ``img`` ``(1, H, W)``, drawn from ``seed``.

    torchvision draws from torch's global generator; it is forked so that a view depends
    on ``seed`` alone and the caller's random state is left as it was.
    """
    s = int(np.random.default_rng(seed).integers(2**62))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        a = views[0](img)
        b = views[1](img)
    return a.contiguous(), b.contiguous()
