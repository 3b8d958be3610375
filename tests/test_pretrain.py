"""Pre-training for segmentation: contrastive views, pretext steps, encoder export and import."""

import math

import numpy as np
import pytest
import torch

from tomoloc.losses import mocov3_loss
from tomoloc.models import make_encoder
from tomoloc.pretrain import ENCODER_FILE, METHODS, export_encoder, load_encoder, load_into, pretrain
from tomoloc.sampling import SortingBatchDataset, TwoViewSliceDataset
from tomoloc.training import TrainConfig, _make_module, load_model
from tomoloc.transforms import SIMCLR_VIEWS, ViewRecipe, make_view, two_views


def blob_volume(seed: int, shape=(16, 24, 24)) -> np.ndarray:
    """Noise with a bright ellipsoid whose centre moves with the seed, float32 (Z, Y, X)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    c = np.array(shape, np.float32) / 2 + rng.uniform(-3, 3, 3)
    r = ((z - c[0]) / 5) ** 2 + ((y - c[1]) / 7) ** 2 + ((x - c[2]) / 4) ** 2
    return (rng.normal(0, 0.2, shape) + 2.0 * (r <= 1)).astype(np.float32)


def test_views_keep_one_channel_and_unclipped_values():
    img = torch.full((1, 40, 40), 1.5)  # above the [0, 1] range that 8-bit/PIL paths clip to
    plain = make_view(ViewRecipe(min_scale=1.0, jitter_prob=0.0, blur_prob=0.0), 32)
    a, b = two_views(img, (plain, plain), seed=3)
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert torch.allclose(a, torch.full_like(a, 1.5)) and torch.allclose(b, a)
    # Values between 8-bit levels survive (no PIL round trip).
    ramp = torch.linspace(0, 1, 40 * 40).reshape(1, 40, 40) * 0.001 + 0.5
    v, _ = two_views(ramp, (make_view(SIMCLR_VIEWS[0], 32),) * 2, seed=0)
    assert len(torch.unique(v)) > 40


def test_two_view_dataset_is_a_function_of_its_key():
    vols = [blob_volume(0), blob_volume(1)]
    ds = TwoViewSliceDataset(vols, SIMCLR_VIEWS, axes=(0, 1, 2), input_size=32, length=4, seed=5)
    a1, b1, m1 = ds[(0, 2)]
    a2, b2, m2 = ds[(0, 2)]
    assert a1.shape == b1.shape == (1, 32, 32)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and m1 == m2
    assert not torch.equal(a1, b1)  # two different augmentations of one slice
    assert not torch.equal(ds[(1, 2)][0], a1)  # another epoch, another draw


def test_mocov3_loss_matches_hand_computation():
    # Orthonormal queries equal to their keys: each row has the positive at cos 1 and two
    # negatives (the other key, the other query) at cos 0, so with T = 1 the NT-Xent loss
    # is -log(e / (e + 2)).
    from lightly.loss import NTXentLoss

    q = torch.eye(2, 4)
    loss = mocov3_loss(q, q, q, q, NTXentLoss(temperature=1.0))
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-5)


def _toy_batch(task: str):
    vols = [blob_volume(s) for s in range(3)]
    if task == "sorting":
        return SortingBatchDataset(vols, axes=(0,), n_slices=8, input_size=32, length=1, seed=0)[0]
    ds = TwoViewSliceDataset(vols, SIMCLR_VIEWS, input_size=32, length=8, seed=0)
    items = [ds[i] for i in range(8)]
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), {}


@pytest.mark.parametrize("task", METHODS)
def test_pretext_step_lowers_its_loss_on_a_toy_batch(task):
    torch.manual_seed(0)
    module = _make_module(TrainConfig(task=task, input_size=32, batch_size=8))
    batch = _toy_batch(task)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    losses = []
    for _ in range(12):
        if task == "mocov3":
            module.net.update_momentum(0.99)
        loss, metrics, n = module._step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert n == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


@pytest.fixture(scope="module", params=METHODS)
def pretrained(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"pre_{request.param}")
    cfg = TrainConfig(task=request.param, input_size=32, batch_size=4, epochs=1, steps_per_epoch=2, val_samples=4)
    path = pretrain([blob_volume(s) for s in range(3)], d, cfg)
    return d, path, request.param


def test_export_round_trip_into_torchvision_and_smp(pretrained):
    import segmentation_models_pytorch as smp

    run, path, method = pretrained
    assert path == run / ENCODER_FILE
    state, meta = load_encoder(run)
    assert meta["backbone"] == "resnet18" and meta["method"] == method and meta["in_channels"] == 1
    assert not any(k.startswith("fc.") for k in state)
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    net, _ = load_model(run, "last")
    for k, v in net.encoder.state_dict().items():  # the export is the trained encoder, exactly
        assert torch.equal(state[k], v), k
    tv = make_encoder("resnet18")
    tv.load_state_dict(state, strict=True)
    seg = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
    load_into(seg.encoder, state)
    for k, v in seg.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():  # same weights, same features (up to layer3: smp dilates layer4 for stride 16)
        x = torch.randn(2, 1, 32, 32)
        tv.eval(), seg.eval()
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        assert torch.allclose(seg.encoder(x)[-2], ref, atol=1e-5)


def test_export_refuses_a_three_channel_or_other_backbone(pretrained):
    import segmentation_models_pytorch as smp

    state, _ = load_encoder(pretrained[0])
    rgb = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=2)
    with pytest.raises(ValueError, match="conv1.weight"):
        load_into(rgb.encoder, state)
    other = smp.DeepLabV3Plus(encoder_name="resnet34", encoder_weights=None, in_channels=1, classes=2)
    with pytest.raises(ValueError, match="keys differ"):
        load_into(other.encoder, state)


def test_load_encoder_names_a_missing_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        load_encoder(tmp_path)


def test_export_best_checkpoint_differs_only_by_choice(pretrained):
    run = pretrained[0]
    export_encoder(run, "best")
    state, meta = load_encoder(run)
    assert meta["checkpoint"] == "best"
    net, _ = load_model(run, "best")
    assert all(torch.equal(state[k], v) for k, v in net.encoder.state_dict().items())
    export_encoder(run, "last")
