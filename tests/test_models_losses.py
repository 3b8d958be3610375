import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tomoloc.losses import mean_displacement, rotation_loss, sorting_loss
from tomoloc.models import RotationNet, SortingNet, encoder_dim, encoder_features, make_encoder


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_encoder_shapes_single_channel(name, dim):
    torch.manual_seed(0)
    enc = make_encoder(name, in_channels=1).eval()
    assert encoder_dim(name) == dim
    assert enc.conv1.in_channels == 1 and enc.conv1.bias is None
    assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2) and enc.conv1.padding == (3, 3)
    assert isinstance(enc.fc, nn.Identity)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        pooled = enc(x)
        fmap = encoder_features(enc, x)
    assert pooled.shape == (2, dim)
    assert fmap.shape == (2, dim, 2, 2)
    # The pooled output is the global average of the feature map (same computation path).
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), pooled)


def test_encoder_rejects_unknown_backbone_and_keeps_in_channels():
    with pytest.raises(ValueError, match="resnet18"):
        make_encoder("vgg16")
    assert make_encoder("resnet18", in_channels=3).conv1.weight.shape == (64, 3, 7, 7)


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_encoder_state_dict_loads_into_smp_encoder(arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    ours = make_encoder("resnet18", in_channels=1)
    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
    # smp's ResNetEncoder.load_state_dict drops fc keys and returns None; the plain
    # nn.Module method reports what did not match.
    result = nn.Module.load_state_dict(model.encoder, ours.state_dict(), strict=False)
    assert [k for k in result.unexpected_keys if not k.startswith("fc.")] == []
    assert [k for k in result.missing_keys if not k.startswith("fc.")] == []
    # The way a fine-tuning run will call it: strict, through smp's own override.
    model.encoder.load_state_dict(ours.state_dict())
    torch.testing.assert_close(model.encoder.conv1.weight, ours.conv1.weight)
    torch.testing.assert_close(model.encoder.layer4[1].bn2.weight, ours.layer4[1].bn2.weight)


def test_rotation_net_shapes_single_encoder_pass_and_dropout():
    torch.manual_seed(0)
    net = RotationNet("resnet18", n_classes=8, dropout=0.1)
    calls = []
    net.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    ref, twin = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    logits = net(ref, twin)
    assert logits.shape == (3, 8)
    assert calls == [6]  # one pass over ref and twin together
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.1]
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(ref, twin), net(ref, twin))
        # Eval-mode output of a pair depends on the pair only, not on the rest of the batch.
        torch.testing.assert_close(net(ref[:1], twin[:1]), net(ref, twin)[:1])
        # Swapping ref and twin changes the logits: the head sees an ordered concatenation.
        assert not torch.allclose(net(ref, twin), net(twin, ref))


def test_sorting_net_gives_one_score_per_slice():
    net = SortingNet("resnet18", dropout=0.1).eval()
    with torch.no_grad():
        assert net(torch.randn(5, 1, 32, 32)).shape == (5,)
    assert any(isinstance(m, nn.Dropout) for m in net.modules())


def test_rotation_loss_is_nll_of_log_softmax():
    assert rotation_loss(torch.zeros(2, 4), torch.tensor([0, 3])).item() == pytest.approx(math.log(4))
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    expected = (-(2 - math.log(math.e**2 + 3)) - (0 - math.log(math.e + 3))) / 2
    assert rotation_loss(logits, target).item() == pytest.approx(expected)
    torch.testing.assert_close(rotation_loss(logits, target), F.cross_entropy(logits, target))


def test_sorting_loss_hand_computed():
    pos = torch.tensor([0, 1, 2])
    assert sorting_loss(torch.tensor([0.0, 1.0, 3.0]), pos, margin=1.0).item() == 0.0
    # Reversed: gaps -2, -3, -1 -> hinges 3, 4, 2 -> mean 3.
    assert sorting_loss(torch.tensor([3.0, 1.0, 0.0]), pos, margin=1.0).item() == pytest.approx(3.0)
    # Correct order but gaps below the margin: gaps 1, 3, 2 with margin 2 -> hinges 1, 0, 0.
    assert sorting_loss(torch.tensor([0.0, 1.0, 3.0]), pos, margin=2.0).item() == pytest.approx(1 / 3)
    # Equal positions are ignored: only (0, 2) and (1, 2) count: hinges 5 and 0.
    assert sorting_loss(torch.tensor([5.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), margin=1.0).item() == pytest.approx(2.5)


def test_sorting_loss_ignores_batch_order_and_has_gradients():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    pos = torch.tensor([3, 0, 7, 1])
    loss = sorting_loss(scores, pos, margin=1.0)
    perm = torch.tensor([2, 0, 3, 1])
    assert sorting_loss(scores[perm], pos[perm], margin=1.0).item() == pytest.approx(loss.item())
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # No ordered pair at all: zero, still differentiable.
    s = torch.tensor([1.0, 2.0], requires_grad=True)
    zero = sorting_loss(s, torch.tensor([4, 4]))
    zero.backward()
    assert zero.item() == 0.0 and s.grad is not None


def test_mean_displacement_hand_computed():
    pos = torch.tensor([0, 1, 2])
    assert mean_displacement(torch.tensor([0.0, 1.0, 3.0]), pos).item() == 0.0
    assert mean_displacement(torch.tensor([3.0, 1.0, 0.0]), pos).item() == pytest.approx(4 / 3)
    # One swap of neighbours: ranks [0, 2, 1, 3] vs [0, 1, 2, 3].
    assert mean_displacement(torch.tensor([0.0, 2.0, 1.0, 3.0]), torch.arange(4)).item() == pytest.approx(0.5)
    # Positions need not be contiguous or sorted: only their order counts.
    assert mean_displacement(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([10, 40, 25])).item() == 0.0
