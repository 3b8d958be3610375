"""Networks for the self-supervised pretext tasks: ResNet encoders and the task heads.

Every image tensor is ``(B, 1, H, W)``: one grey-level channel, a 2D slice of a volume.
Encoders are torchvision ResNets with untouched module names (``conv1``, ``bn1``,
``layer1`` ... ``layer4``), so their state dict loads into
``segmentation_models_pytorch`` ResNet encoders (``encoder_weights=None, in_channels=1``)
for fine-tuning a segmentation model. Nothing is ever downloaded: ``weights=None``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import ResNet

__all__ = [
    "ENCODERS",
    "MoCoV3Net",
    "SimCLRNet",
    "RotationNet",
    "SortingNet",
    "dilate",
    "encoder_dim",
    "encoder_features",
    "make_encoder",
]

_BUILDERS = {
    "resnet18": (tvm.resnet18, 512),
    "resnet34": (tvm.resnet34, 512),
    "resnet50": (tvm.resnet50, 2048),
}

#: Backbone names understood by :func:`make_encoder`.
ENCODERS: tuple[str, ...] = tuple(_BUILDERS)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(ENCODERS)}")


def encoder_dim(name: str) -> int:
    """Channels ``C`` of the encoder's last feature map: 512 (resnet18/34) or 2048 (resnet50)."""
    _check_name(name)
    return _BUILDERS[name][1]


def make_encoder(name: str = "resnet18", in_channels: int = 1) -> ResNet:
    """A randomly initialised torchvision ResNet taking ``in_channels``-channel images.

    ``conv1`` is replaced by an ``in_channels``-channel convolution with the same kernel,
    stride and padding (no bias, like the original) and ``fc`` by :class:`torch.nn.Identity`,
    so ``encoder(x)`` maps ``(B, in_channels, H, W)`` to globally pooled features
    ``(B, C)`` with ``C = encoder_dim(name)``.
    """
    _check_name(name)
    builder, _ = _BUILDERS[name]
    net = builder(weights=None)
    old = net.conv1
    net.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                          padding=old.padding, bias=False)
    # Same initialisation torchvision gives every conv in ResNet.__init__.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


def encoder_features(encoder: ResNet, x: Tensor) -> Tensor:
    """The last feature map of ``encoder`` for ``x`` ``(B, C_in, H, W)``: ``(B, C, h, w)``.

    No global pooling and no ``fc``: each of the ``h x w`` positions (``h = ceil(H / 32)``)
    is the embedding of one "superpixel" of the input, as used by the sorting-task localizer.
    """
    x = encoder.conv1(x)
    x = encoder.bn1(x)
    x = encoder.relu(x)
    x = encoder.maxpool(x)
    x = encoder.layer1(x)
    x = encoder.layer2(x)
    x = encoder.layer3(x)
    return encoder.layer4(x)


class RotationNet(nn.Module):
    """Siamese rotation classifier: which multiple of ``step`` turns ``ref`` into ``twin``.

    One shared encoder embeds both slices (pooled features ``(B, C)``); dropout, then the
    head sees the relational features ``[a, b, a * b, |a - b|]`` ``(B, 4C)`` and a small MLP
    gives logits ``(B, n_classes)``. The dropout sits on the embeddings so that Monte-Carlo
    dropout at inference samples the representation the head sees.

    Why not the plain concatenation ``[a, b]``: on synthetic tube phantoms (resnet18, input
    64, batch 32, 90-degree classes) a concatenation head stayed at chance (25%) for 200
    steps, while the relational head reached 62% validation accuracy in the same 200 steps.
    The product and difference hand the head the comparison it would otherwise have to
    discover from scratch.

    Parameters
    ----------
    backbone : str
        ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    n_classes : int
        Number of rotation classes (``360 // step``).
    dropout : float
        Dropout probability on the embeddings.
    hidden : int
        Width of the head's hidden layer.
    """

    def __init__(self, backbone: str = "resnet18", n_classes: int = 4, dropout: float = 0.1, hidden: int = 256):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.encoder = make_encoder(backbone, in_channels=1)
        dim = encoder_dim(backbone)
        self.dropout = nn.Dropout(p=dropout)
        self.head = nn.Sequential(
            nn.Linear(4 * dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def embed(self, x: Tensor) -> Tensor:
        """Pooled embeddings ``(B, C)`` of slices ``x`` ``(B, 1, H, W)`` (before dropout)."""
        return self.encoder(x)

    def forward(self, ref: Tensor, twin: Tensor) -> Tensor:
        """Logits ``(B, n_classes)`` for pairs ``ref, twin`` ``(B, 1, H, W)``."""
        b = ref.shape[0]
        # One encoder pass over both halves: half the kernel launches, and batch norm sees
        # ref and twin slices in the same batch statistics.
        z = self.dropout(self.encoder(torch.cat([ref, twin], dim=0)))
        a, t = z[:b], z[b:]
        return self.head(torch.cat([a, t, a * t, (a - t).abs()], dim=1))


class SortingNet(nn.Module):
    """Slice-position scorer for the sorting task: one scalar per slice.

    ``forward(x)`` maps slices ``(B, 1, H, W)`` to scores ``(B,)`` that should increase with
    the slice's position along the sampled axis: encoder up to ``layer3`` -> dropout ->
    ``layer4`` (the superpixel embeddings, :meth:`superpixels`) -> global average pool ->
    ``Linear(C, 1)``.

    Why the dropout sits before ``layer4``: the localizer samples the superpixel
    embeddings with train-time dropout (paper section 2.2). Dropout on the ``layer4`` output
    itself would make each embedding's variance ``p / (1 - p) * x**2``, a function of the
    activation alone; dropping ``layer3`` features instead makes the variance measure how
    much a superpixel's embedding depends on which features survive.
    """

    def __init__(self, backbone: str = "resnet18", dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.encoder = make_encoder(backbone, in_channels=1)
        self.dropout = nn.Dropout(p=dropout)
        self.head = nn.Linear(encoder_dim(backbone), 1)

    def trunk(self, x: Tensor) -> Tensor:
        """Deterministic part: ``conv1`` ... ``layer3`` features ``(B, C3, h3, w3)``."""
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        return e.layer3(e.layer2(e.layer1(x)))

    def superpixels(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """Superpixel embeddings ``(B, C, h, w)``: no global pooling, no linear layer.

        Dropout is applied when it is active (``self.dropout.training``): calling this
        repeatedly samples the embeddings' distribution. ``features`` may pass a
        precomputed :meth:`trunk` output to skip the deterministic part.
        """
        f = self.trunk(x) if features is None else features
        return self.encoder.layer4(self.dropout(f))

    def embed(self, x: Tensor) -> Tensor:
        """Pooled embeddings ``(B, C)`` of slices ``x`` ``(B, 1, H, W)``."""
        return self.superpixels(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(B,)`` for slices ``x`` ``(B, 1, H, W)``."""
        return self.head(self.embed(x)).squeeze(-1)


class SimCLRNet(nn.Module):
    """SimCLR (Chen et al. 2020): encoder and lightly's ``SimCLRProjectionHead``.

    ``forward(x)`` maps slices ``(B, 1, H, W)`` to projections ``(B, 128)`` through the
    2-layer head (hidden width = the encoder's ``C``, batch norm), as in lightly's SimCLR
    example for ResNets; the loss is NT-Xent on the projections of two views.
    """

    def __init__(self, backbone: str = "resnet18", out_dim: int = 128):
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.encoder = make_encoder(backbone, in_channels=1)
        dim = encoder_dim(backbone)
        self.projection = SimCLRProjectionHead(dim, dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projections ``(B, out_dim)`` of slices ``(B, 1, H, W)``."""
        return self.projection(self.encoder(x))


class MoCoV3Net(nn.Module):
    """MoCo v3 (Chen, Xie, He 2021) composed from lightly's parts (lightly has no MoCo v3 class).

    Query branch: encoder -> ``MoCoProjectionHead`` (3 layers, batch norm in every layer,
    hidden 4096, output 256) -> ``BYOLPredictionHead`` (2 layers with batch norm, hidden
    4096, output 256). Key branch: a momentum copy of the encoder and projection head
    (no prediction head, no gradients), updated by :meth:`update_momentum`. Widths are the
    paper's ResNet recipe.
    """

    def __init__(self, backbone: str = "resnet18", hidden: int = 4096, out_dim: int = 256):
        from lightly.models.modules.heads import BYOLPredictionHead, MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.encoder = make_encoder(backbone, in_channels=1)
        self.projection = MoCoProjectionHead(encoder_dim(backbone), hidden, out_dim, num_layers=3, batch_norm=True)
        self.prediction = BYOLPredictionHead(out_dim, hidden, out_dim)
        self.encoder_momentum = copy.deepcopy(self.encoder)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_momentum)

    def forward(self, x: Tensor) -> Tensor:
        """Query predictions ``(B, out_dim)`` of slices ``(B, 1, H, W)``."""
        return self.prediction(self.projection(self.encoder(x)))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        """Key projections ``(B, out_dim)`` from the momentum branch (no gradient)."""
        return self.projection_momentum(self.encoder_momentum(x))

    def update_momentum(self, m: float) -> None:
        """Key weights <- ``m * key + (1 - m) * query`` (lightly's ``update_momentum``)."""
        from lightly.models.utils import update_momentum

        update_momentum(self.encoder, self.encoder_momentum, m)
        update_momentum(self.projection, self.projection_momentum, m)


def dilate(encoder: ResNet, output_stride: int = 8) -> ResNet:
    """A copy of ``encoder`` that shares its weights, with a finer last feature map.

    The stride-2 convolutions of ``layer4`` (``output_stride`` 16) or of ``layer3`` and
    ``layer4`` (8) become stride 1, and every later 3x3 convolution is dilated to match
    (the "a trous" algorithm). The result is exact: position ``(i, j)`` of the original
    stride-32 map equals position ``(k i, k j)`` of the new map, ``k = 32 / output_stride``,
    and the positions in between are the embeddings the network would give the input
    shifted by a fraction of a superpixel. So a model trained cheaply at stride 32 yields
    ``k x k`` times more superpixels at inference.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    # New modules (strides and dilations are module attributes) over the same weight tensors:
    # a copy of resnet18's weights was 45 MB of peak memory per localized axis.
    shared = {id(t): t for t in (*encoder.parameters(), *encoder.buffers())}
    net = copy.deepcopy(encoder, memo=shared)
    layers = {32: [], 16: [net.layer4], 8: [net.layer3, net.layer4]}[output_stride]
    dilation = 1
    for layer in layers:
        new = dilation * 2
        for b, block in enumerate(layer):
            # Convolutions up to and including the strided one still see the previous
            # sampling grid; everything after it sees the grid the stride would have made.
            seen_stride = b > 0
            for name, conv in block.named_modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                if name.startswith("downsample"):
                    conv.stride = (1, 1)
                    continue
                d = new if seen_stride else dilation
                if conv.stride != (1, 1):
                    conv.stride = (1, 1)
                    seen_stride = True
                kh, kw = conv.kernel_size
                conv.dilation = (d, d)
                conv.padding = ((kh // 2) * d, (kw // 2) * d)
        dilation = new
    return net
