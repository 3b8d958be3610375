"""Sorting pretext task: batches, the dilated superpixel encoder, variance maps, training."""

import numpy as np
import pytest
import torch

from tomoloc.localize.sorting import (
    cell_index,
    orient_to_sample,
    remove_slice_level,
    superpixels_to_grid,
    top_region,
    variance_maps,
)
from tomoloc.losses import mean_displacement
from tomoloc.models import SortingNet, dilate
from tomoloc.sampling import SortingBatchDataset, generalized_gaussian_weights
from tomoloc.training import TrainConfig, train


def cone_volume(seed, n=32, noise=0.1):
    """A cone along axis 0 (radius grows with z) in the middle 3/4 of the slices, in noise.

    The slice's position is readable from the disc's radius: sortable in a few dozen steps.
    """
    rng = np.random.default_rng(seed)
    z0, z1 = n // 8, n - n // 8
    cy, cx = n / 2 + rng.integers(-2, 3), n / 2 + rng.integers(-2, 3)
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - cy, xx - cx)
    vol = np.zeros((n, n, n), np.float32)
    for z in range(z0, z1):
        vol[z] = r <= 2 + (z - z0) * (n / 2 - 4) / (z1 - z0)
    return vol + rng.normal(0, noise, vol.shape).astype(np.float32)


def test_random_order_displacement_matches_formula():
    # E|rank - true rank| for a uniform permutation of n is (n^2 - 1) / (3 n).
    n, rng = 32, np.random.default_rng(0)
    pos = torch.arange(n)
    md = np.mean([mean_displacement(torch.from_numpy(rng.permutation(n)).float(), pos).item() for _ in range(2000)])
    assert md == pytest.approx((n * n - 1) / (3 * n), rel=0.02)


def test_sorting_batches_one_volume_one_axis_seeded():
    vols = [np.random.default_rng(i).random((20, 12, 16), dtype=np.float32) for i in range(3)]
    ds = SortingBatchDataset(vols, axes=(0, 1, 2), n_slices=8, input_size=16, length=30, seed=5, augment=False)
    seen = set()
    for i in range(30):
        x, pos, meta = ds[(0, i)]
        n = vols[meta["volume"]].shape[meta["axis"]]
        m = min(8, n)
        assert x.shape == (m, 1, 16, 16) and pos.shape == (m,)
        assert len(set(pos.tolist())) == m and 0 <= pos.min() and pos.max() < n  # distinct, in range
        # every slice is the resized slice of THAT volume at THAT position
        stack = ds.stack(meta["volume"], meta["axis"])
        np.testing.assert_array_equal(x[:, 0].numpy(), stack[pos.numpy()])
        seen.add((meta["volume"], meta["axis"]))
    assert len(seen) > 4
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[(1, 3)][1], a[1]) or ds[(1, 3)][2] != a[2]


def test_augmentation_is_an_exact_dihedral_transform_of_each_slice():
    vol = np.random.default_rng(0).random((10, 8, 8), dtype=np.float32)
    ds = SortingBatchDataset([vol], n_slices=10, input_size=8, length=4, seed=0, augment=True)
    x, pos, _ = ds[0]
    changed = 0
    for img, p in zip(x[:, 0].numpy(), pos.numpy()):
        variants = [np.rot90(s, t) for s in (vol[p], vol[p][:, ::-1]) for t in range(4)]
        assert any(np.array_equal(img, v) for v in variants)
        changed += not np.array_equal(img, vol[p])
    assert changed >= 5


def test_generalized_gaussian_sampling_statistics():
    n = 100
    w = generalized_gaussian_weights(n, scale=0.3, beta=4.0)
    assert w.sum() == pytest.approx(1.0) and np.allclose(w, w[::-1])
    # hand-computed: exp(-(|i - 49.5| / 30)^4); at the centre ~1, at the border exp(-(49.5/30)^4)
    assert w[0] / w[49] == pytest.approx(np.exp(-((49.5 / 30) ** 4)) / np.exp(-((0.5 / 30) ** 4)), rel=1e-9)
    vol = np.zeros((n, 4, 4), np.float32)
    ds = SortingBatchDataset([vol], n_slices=4, input_size=4, length=3000, seed=1, sampling="gengauss", augment=False)
    draws = np.concatenate([ds[i][1].numpy() for i in range(3000)])
    uni = SortingBatchDataset([vol], n_slices=4, input_size=4, length=3000, seed=1, augment=False)
    draws_u = np.concatenate([uni[i][1].numpy() for i in range(3000)])
    border = lambda d: np.mean((d < 10) | (d >= 90))  # noqa: E731
    central = lambda d: np.mean((d >= 25) & (d < 75))  # noqa: E731
    assert border(draws_u) == pytest.approx(0.2, abs=0.02) and central(draws_u) == pytest.approx(0.5, abs=0.03)
    # 4 draws of 100 without replacement are close to independent draws from w.
    assert border(draws) == pytest.approx(w[:10].sum() * 2, rel=0.4)  # ~0.4%
    assert central(draws) == pytest.approx(w[25:75].sum(), abs=0.03)  # ~80%
    assert np.std(draws) < np.std(draws_u)


def test_dilated_encoder_is_exact_at_the_original_positions():
    net = SortingNet("resnet18").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        coarse = net.superpixels(x)
        for stride, k in [(16, 2), (8, 4)]:
            e = dilate(net.encoder, stride)
            fine = e.layer4(e.layer3(e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x))))))))
            assert fine.shape == (2, 512, 64 // stride, 64 // stride)
            torch.testing.assert_close(fine[:, :, ::k, ::k], coarse, rtol=1e-5, atol=1e-5)
    assert net.encoder.layer4[0].conv1.stride == (2, 2)  # the original is untouched
    assert e.layer4[0].conv1.weight is net.encoder.layer4[0].conv1.weight  # its weights are shared, not copied
    with pytest.raises(ValueError):
        dilate(net.encoder, 4)


def test_superpixel_to_voxel_mapping():
    # 64 voxels stretched to 64 pixels, stride 8: cell q centred on pixel 8q covers [8q-4, 8q+4)
    idx = cell_index(64, 64, 8)
    assert idx[:4].tolist() == [0] * 4 and idx[4:12].tolist() == [1] * 8 and idx[-4:].tolist() == [7] * 4
    # 32 voxels stretched to 64 pixels: voxel v covers pixels 2v, 2v+1 -> centre 2v + 0.5
    assert cell_index(32, 64, 8)[:6].tolist() == [0, 0, 1, 1, 1, 1]
    maps = np.zeros((5, 8, 8), np.float32)
    maps[2, 3, 6] = 1  # slice 2 along axis 1: row 3 -> Z, column 6 -> X
    grid = superpixels_to_grid(maps, 1, (64, 5, 64), 64, 8)
    assert grid.shape == (64, 5, 64)
    z, y, x = np.nonzero(grid)
    assert set(y) == {2} and (z.min(), z.max() + 1) == (20, 28) and (x.min(), x.max() + 1) == (44, 52)
    with pytest.raises(ValueError):
        superpixels_to_grid(maps, 0, (64, 5, 64), 64, 8)


def test_top_region_keeps_the_largest_connected_part():
    score = np.zeros((10, 10, 10))
    score[1:3, 1:3, 1:3] = 5  # 8 voxels, highest
    score[5:9, 5:9, 5:7] = 4  # 32 voxels, connected
    region, thr = top_region(score, 0.04)  # 40 voxels
    assert thr == 4 and region.sum() == 32 and region[5:9, 5:9, 5:7].all()
    with pytest.raises(ValueError):
        top_region(score, 0)


def test_remove_slice_level_takes_out_each_slices_median():
    maps = np.zeros((3, 3, 3), np.float32)
    maps[0] = 7.0  # a slice that varies everywhere alike: nothing in it stands out
    maps[1, 1, 1] = 2.0  # one superpixel above a zero slice
    maps[2] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # median 5
    out = remove_slice_level(maps)
    assert out.dtype == np.float32 and out.shape == maps.shape
    np.testing.assert_array_equal(out[0], 0)
    assert out[1, 1, 1] == 2 and np.count_nonzero(out[1]) == 1
    np.testing.assert_array_equal(out[2], np.arange(-4, 5).reshape(3, 3))
    # the band of slice 0 no longer outranks the superpixel of slice 1
    assert np.unravel_index(out.argmax(), out.shape)[0] == 2 and out[1, 1, 1] > out[0].max()


def test_orient_to_sample_takes_the_candidate_region_off_the_border():
    score = np.zeros((4, 20, 20), np.float32)
    score[:, 8:12, 8:12] = 3.0  # a sample in the middle scores high: kept as it is
    same, mirrored = orient_to_sample(score, 0.04)
    assert not mirrored and same is score
    low = np.full((4, 20, 20), 1.0, np.float32)
    low[:, :2] = 2.0  # the border band (outer 2 of 20 in Y) varies most
    low[:, 8:12, 8:12] = 0.5  # the sample least
    out, mirrored = orient_to_sample(low, 64 / low.size)
    assert mirrored and out.min() == 0.5 and out.max() == 2.0  # same range, order reversed
    np.testing.assert_array_equal(out[:, 8:12, 8:12], 2.0)
    region, _ = top_region(out, 64 / out.size)
    assert region[:, 8:12, 8:12].all() and region.sum() == 64
    # only Y and X have a border band: a high first and last slice along Z is no reason to mirror
    zends = score.copy()
    zends[[0, -1]] = 5.0
    assert not orient_to_sample(zends, 0.04)[1]


def test_variance_maps_shape_seeded_and_zero_without_dropout():
    net = SortingNet("resnet18", dropout=0.2).eval()
    vol = np.random.default_rng(0).random((6, 32, 40), dtype=np.float32)
    a = variance_maps(net, vol, 0, 32, mc_samples=3, output_stride=8, batch_size=4, seed=1)
    b = variance_maps(net, vol, 0, 32, mc_samples=3, output_stride=8, batch_size=4, seed=1)
    assert a.shape == (6, 4, 4) and (a > 0).all()
    np.testing.assert_array_equal(a, b)
    assert not net.dropout.training  # the model itself stays in eval mode
    net0 = SortingNet("resnet18", dropout=0.0).eval()
    assert np.abs(variance_maps(net0, vol, 2, 32, mc_samples=3)).max() < 1e-6


def test_sorting_training_beats_random_order(tmp_path):
    vols = [cone_volume(s) for s in range(6)]
    cfg = TrainConfig(task="sorting", input_size=32, batch_size=16, epochs=3, steps_per_epoch=25,
                      val_samples=64, seed=0, sampling="gengauss", axes=(0,))
    run = train(vols, tmp_path / "run", cfg, progress=False)
    import csv

    rows = [r for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("val_md")]
    assert {"train_md", "val_md", "train_loss", "val_loss"} <= set(rows[0])
    random_md = (16 * 16 - 1) / (3 * 16)  # 5.3
    assert float(rows[-1]["val_md"]) < 0.5 * random_md
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])


def test_variance_maps_do_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    net = SortingNet("resnet18", dropout=0.2).eval()
    vol = np.random.default_rng(0).random((9, 20, 24)).astype(np.float32)
    maps = [variance_maps(net, vol, 1, 32, mc_samples=3, batch_size=b, seed=5) for b in (1, 4, 64)]
    assert maps[0].shape == (20, 4, 4) and (maps[0] > 0).all()
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], rtol=1e-5, atol=1e-9)
    other = variance_maps(net, vol, 1, 32, mc_samples=3, batch_size=4, seed=6)
    assert not np.allclose(other, maps[0])  # the seed does change the masks
