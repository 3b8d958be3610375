"""Pretext-task losses and control metrics (paper section 2.1).

``rotation_loss``: classification of the relative rotation between two slices.
``sorting_loss``: pairwise margin ranking of the slices of one volume, with
``mean_displacement`` as its control metric.
``mocov3_loss``: the symmetric contrastive loss of MoCo v3 on lightly's NT-Xent
(SimCLR uses ``lightly.loss.NTXentLoss`` directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mean_displacement", "mocov3_loss", "rotation_loss", "sorting_loss"]


def rotation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the true rotation class (mean over the batch).

    Parameters
    ----------
    logits : Tensor
        ``(B, n_classes)`` unnormalised scores.
    target : Tensor
        ``(B,)`` int64 class indices in ``[0, n_classes)``.

    Returns
    -------
    Tensor
        0-dim loss; the paper's NLL of the log-softmax, equal to cross entropy.
    """
    return F.nll_loss(F.log_softmax(logits, dim=1), target)


def sorting_loss(scores: Tensor, positions: Tensor, margin: float = 1.0) -> Tensor:
    """Pairwise margin ranking loss over every pair of slices of ONE volume.

    For each pair ``(i, j)`` with ``positions[i] < positions[j]`` the later slice should
    score at least ``margin`` higher: the loss is the mean over those pairs of
    ``max(0, margin - (scores[j] - scores[i]))``. Pairs with equal positions carry no
    order and are ignored; with no ordered pair the loss is 0 (still differentiable).

    Parameters
    ----------
    scores : Tensor
        ``(N,)`` predicted scores, one per slice.
    positions : Tensor
        ``(N,)`` true slice indices along the sampled axis.
    margin : float
        Required score gap; keeps the scores from collapsing to zero.
    """
    # later[i, j] is True when slice j lies after slice i: each unordered pair of distinct
    # positions appears exactly once.
    later = positions[None, :] > positions[:, None]
    gap = scores[None, :] - scores[:, None]
    hinge = torch.clamp(margin - gap[later], min=0)
    if hinge.numel() == 0:
        return scores.sum() * 0.0
    return hinge.mean()


def mean_displacement(scores: Tensor, positions: Tensor) -> Tensor:
    """Mean absolute difference between predicted and true ranks of the slices.

    Ranks are ``argsort(argsort(.))`` (0 = first) of ``scores`` and of ``positions``,
    both ``(N,)``; 0 means the batch is perfectly ordered, ``N / 2`` roughly random. Returns
    a 0-dim float tensor.
    """
    pred = torch.argsort(torch.argsort(scores.detach(), stable=True), stable=True)
    true = torch.argsort(torch.argsort(positions.detach(), stable=True), stable=True)
    return (pred - true).abs().float().mean()


def mocov3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, criterion: torch.nn.Module) -> Tensor:
    """Symmetric MoCo v3 loss: each view's query must find the other view's key.

    ``(criterion(q1, k2) + criterion(q2, k1)) / 2`` with ``criterion`` a
    ``lightly.loss.NTXentLoss`` (its temperature is MoCo v3's). Queries ``q1, q2`` come
    from the prediction head ``(B, D)``, keys ``k1, k2`` from the momentum branch
    ``(B, D)`` and carry no gradient; the other images of the batch are the negatives.
    The mean rather than MoCo v3's sum (scaled by ``2 T``) only rescales the gradient,
    which AdamW does not see.
    """
    return 0.5 * (criterion(q1, k2.detach()) + criterion(q2, k1.detach()))
