import numpy as np
import pytest
import torch

from tomoloc.sampling import (
    RotationPairDataset,
    extract_slice,
    generalized_gaussian_weights,
    inscribed_circle_mask,
    prepare_volume,
    relative_angle_class,
    rotate,
    unrotated_pairs,
)


def f_pattern(n=16):
    """An 'F': no rotational symmetry, so each of the 4 quarter turns looks different."""
    img = np.zeros((n, n), np.float32)
    img[3:13, 4:7] = 1.0
    img[3:6, 4:12] = 1.0
    img[7:9, 4:10] = 1.0
    return img


@pytest.mark.parametrize("step", [90, 45, 30])
def test_relative_angle_class_every_pair(step):
    angles = range(0, 360, step)
    n = 360 // step
    for a in angles:
        for b in angles:
            c = relative_angle_class(a, b, step)
            assert 0 <= c < n
            # Class c: turning the reference by c steps gives the twin's orientation.
            assert (a + c * step) % 360 == b
    assert relative_angle_class(0, 0, step) == 0
    assert relative_angle_class(step, 0, step) == n - 1
    assert relative_angle_class(350, 350 + step, step) == 1  # wraps past 360


def test_relative_angle_class_rejects_bad_steps():
    with pytest.raises(ValueError):
        relative_angle_class(0, 90, step=7)
    with pytest.raises(ValueError):
        relative_angle_class(0, 45, step=90)


def test_label_turns_ref_into_twin():
    img = f_pattern()
    for a in range(0, 360, 90):
        for b in range(0, 360, 90):
            c = relative_angle_class(a, b, 90)
            np.testing.assert_array_equal(rotate(rotate(img, a), c * 90), rotate(img, b))


def test_inscribed_circle_mask_hand_checked():
    T, F = True, False
    np.testing.assert_array_equal(inscribed_circle_mask(4, 4), [[F, T, T, F], [T, T, T, T], [T, T, T, T], [F, T, T, F]])
    np.testing.assert_array_equal(
        inscribed_circle_mask(5, 5),
        [[F, T, T, T, F], [T] * 5, [T] * 5, [T] * 5, [F, T, T, T, F]],
    )
    # Non-square: radius from the short side, centred.
    np.testing.assert_array_equal(
        inscribed_circle_mask(4, 6),
        [[F, F, T, T, F, F], [F, T, T, T, T, F], [F, T, T, T, T, F], [F, F, T, T, F, F]],
    )


@pytest.mark.parametrize("n", [4, 5, 8, 17, 64])
def test_inscribed_circle_mask_symmetric_corners_out(n):
    m = inscribed_circle_mask(n, n)
    assert m.dtype == bool and m.shape == (n, n)
    for other in (m[::-1], m[:, ::-1], m.T, np.rot90(m)):
        np.testing.assert_array_equal(m, other)
    assert not m[0, 0] and not m[0, -1] and not m[-1, 0] and not m[-1, -1]
    assert m[n // 2, 0] and m[0, n // 2]  # touches the edges' midpoints


def test_inscribed_circle_area():
    assert inscribed_circle_mask(200, 200).sum() == pytest.approx(np.pi * 100**2, rel=0.01)


def test_rotate_exact_for_quarter_turns():
    img = np.random.default_rng(0).normal(size=(7, 7)).astype(np.float32)
    for angle, k in [(0, 0), (90, 1), (180, 2), (270, 3), (360, 0), (-90, 3), (450, 1)]:
        np.testing.assert_array_equal(rotate(img, angle), np.rot90(img, k))
    assert rotate(np.zeros((3, 5)), 90).shape == (5, 3)


def test_rotate_is_counter_clockwise_for_any_angle():
    img = np.zeros((41, 41), np.float32)
    img[10, 20] = 1.0  # 10 pixels above the centre (row 0 is the top)
    y, x = np.unravel_index(np.argmax(rotate(img, 90)), img.shape)
    assert (y, x) == (20, 10)  # now left of the centre
    out = rotate(img, 45)
    assert out.shape == img.shape
    y, x = np.unravel_index(np.argmax(out), img.shape)
    # Up and to the left: (20 - 10 cos 45, 20 - 10 sin 45) ~ (12.9, 12.9).
    assert abs(y - 12.9) <= 1 and abs(x - 12.9) <= 1
    # Inside the inscribed circle interpolation never mixes in a fill value.
    const = np.full((16, 16), 3.0, np.float32)
    np.testing.assert_allclose(rotate(const, 30)[inscribed_circle_mask(16, 16)], 3.0, rtol=1e-6)


def test_extract_slice_orientation_and_stretching():
    vol = np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32)
    # Square slices pass through unchanged: axis 2 of a (6, 8, 8) volume is (Z, Y) = (6, 8)...
    sq = np.random.default_rng(2).normal(size=(8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(extract_slice(sq, 0, 2, 8), sq[2])
    np.testing.assert_array_equal(extract_slice(sq, 1, 3, 8), sq[:, 3, :])
    np.testing.assert_array_equal(extract_slice(sq, 2, 5, 8), sq[:, :, 5])
    # ...non-square ones are stretched to the square (no padded band marks their orientation).
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (6, 8, 10)).copy()
    s = extract_slice(ramp, 1, 3, 10)  # (Z, X) = (6, 10): every row is the 0..9 ramp
    assert s.shape == (10, 10) and s.dtype == np.float32
    np.testing.assert_allclose(s, np.broadcast_to(np.arange(10.0), (10, 10)), atol=1e-5)
    # Resizing: shape, and a constant slice stays constant (no edge darkening).
    assert extract_slice(vol, 0, 0, 5).shape == (5, 5)
    np.testing.assert_allclose(extract_slice(np.full((4, 9, 6), 2.0), 0, 1, 32), 2.0, rtol=1e-6)
    with pytest.raises(IndexError):
        extract_slice(vol, 0, 6, 8)


def test_extract_slice_downsampling_is_antialiased():
    # A one-pixel checkerboard averages to grey instead of aliasing to black/white.
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    s = extract_slice(np.stack([board] * 3), 0, 1, 16)
    np.testing.assert_allclose(s, 0.5, atol=0.05)


def smooth_volumes(n=3, shape=(20, 24, 28)):
    rng = np.random.default_rng(0)
    return [rng.random(shape, dtype=np.float32) for _ in range(n)]


def same_item(a, b):
    return (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and int(a[2]) == int(b[2]) and a[3] == b[3])


def test_dataset_is_a_function_of_seed_epoch_index():
    vols = smooth_volumes()
    ds = RotationPairDataset(vols, input_size=16, length=50, seed=3)
    again = RotationPairDataset(vols, input_size=16, length=50, seed=3)
    assert same_item(ds[7], again[7])
    assert same_item(ds[7], ds[7])
    assert not same_item(ds[7], ds[8])
    assert not same_item(ds[7], RotationPairDataset(vols, input_size=16, length=50, seed=4)[7])
    first = ds[7]
    ds.set_epoch(1)
    assert not same_item(first, ds[7])
    assert same_item(ds[7], again[(1, 7)])  # the key can carry the epoch
    assert ds[7][3]["epoch"] == 1
    with pytest.raises(IndexError):
        ds[50]


@pytest.mark.parametrize("step", [90, 45])
def test_dataset_items_shapes_labels_and_twins(step):
    vols = smooth_volumes()
    k = 2
    ds = RotationPairDataset(vols, axes=(0, 1, 2), k=k, step=step, input_size=16, length=300, seed=0)
    n_classes = 360 // step
    mask = torch.from_numpy(inscribed_circle_mask(16, 16))
    labels, axes = [], set()
    for i in range(len(ds)):
        ref, twin, label, meta = ds[i]
        assert ref.shape == twin.shape == (1, 16, 16) and ref.dtype == torch.float32
        assert label.dtype == torch.int64 and 0 <= int(label) < n_classes
        assert int(label) == relative_angle_class(meta["ref_angle"], meta["twin_angle"], step)
        assert (ref[0][~mask] == 0).all() and (twin[0][~mask] == 0).all()
        n = vols[meta["volume"]].shape[meta["axis"]]
        i_ref, i_twin = meta["ref_index"], meta["twin_index"]
        assert 0 <= i_ref < n and 0 <= i_twin < n
        assert i_twin != i_ref and abs(i_twin - i_ref) <= k
        labels.append(int(label))
        axes.add(meta["axis"])
    assert set(labels) == set(range(n_classes))
    assert axes == {0, 1, 2}


def test_dataset_rotated_and_masked_pattern():
    img = f_pattern(16)
    vol = np.stack([img] * 6)  # every axis-0 slice is the same F: twins equal refs up to rotation
    ds = RotationPairDataset([vol], axes=(0,), k=1, step=90, input_size=16, length=100, seed=0)
    mask = inscribed_circle_mask(16, 16)
    seen, class_1_from_upright = set(), 0
    for i in range(len(ds)):
        ref, twin, label, meta = ds[i]
        ref, twin, c = ref[0].numpy(), twin[0].numpy(), int(label)
        np.testing.assert_array_equal(ref, np.where(mask, np.rot90(img, meta["ref_angle"] // 90), 0))
        np.testing.assert_array_equal(twin, np.where(mask, np.rot90(img, meta["twin_angle"] // 90), 0))
        # The label's rotation turns ref into twin (the mask is rotation invariant).
        np.testing.assert_array_equal(np.rot90(ref, c), twin)
        if c == 1 and meta["ref_angle"] == 0:
            # Known image: the twin is the F turned a quarter counter-clockwise, inside the circle.
            np.testing.assert_array_equal(twin, np.where(mask, np.rot90(img), 0))
            class_1_from_upright += 1
        seen.add(c)
    assert seen == {0, 1, 2, 3} and class_1_from_upright > 0
    # Finer steps: a 45-degree item is the bilinear rotation, masked.
    ds45 = RotationPairDataset([vol], axes=(0,), k=1, step=45, input_size=16, length=20, seed=0)
    for i in range(20):
        ref, _, _, meta = ds45[i]
        np.testing.assert_allclose(ref[0].numpy(), np.where(mask, rotate(img, meta["ref_angle"]), 0), atol=1e-6)


def test_dataset_twin_range_clipped_and_k0():
    vol = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    ds = RotationPairDataset([vol], axes=(0,), k=3, input_size=8, length=30)
    for i in range(30):
        meta = ds[i][3]
        assert {meta["ref_index"], meta["twin_index"]} == {0, 1}
    ds0 = RotationPairDataset([vol], axes=(0,), k=0, input_size=8, length=10)
    assert all(ds0[i][3]["ref_index"] == ds0[i][3]["twin_index"] for i in range(10))


def test_dataset_slice_weights():
    vols = smooth_volumes(1)

    def only_4(n):
        w = np.zeros(n)
        w[4] = 1
        return w

    ds = RotationPairDataset(vols, axes=(1,), slice_weights=only_4, input_size=8, length=20)
    assert {ds[i][3]["ref_index"] for i in range(20)} == {4}
    w = generalized_gaussian_weights(21)
    assert w.sum() == pytest.approx(1.0) and w.argmax() == 10
    np.testing.assert_allclose(w, w[::-1])
    assert w[0] < 0.1 * w[10]


def test_dataset_validates_arguments():
    vols = smooth_volumes(1)
    with pytest.raises(ValueError):
        RotationPairDataset(vols, step=50)
    with pytest.raises(ValueError):
        RotationPairDataset(vols, axes=(3,))
    with pytest.raises(ValueError):
        RotationPairDataset([np.zeros((4, 4))])


def test_unrotated_pairs(tmp_path):
    vol = np.random.default_rng(2).random((7, 12, 12), dtype=np.float32)
    mask = inscribed_circle_mask(12, 12)
    ref, twin = unrotated_pairs(vol, 0, 12)
    assert ref.shape == twin.shape == (7, 1, 12, 12) and ref.dtype == torch.float32
    for i in range(7):
        j = i + 1 if i < 6 else 5  # the last slice pairs with the one before
        np.testing.assert_array_equal(ref[i, 0].numpy(), np.where(mask, vol[i], 0))
        np.testing.assert_array_equal(twin[i, 0].numpy(), np.where(mask, vol[j], 0))
    ref, twin = unrotated_pairs(vol, 1, 8, k=2, stride=5)
    assert ref.shape == (3, 1, 8, 8)  # slices 0, 5, 10 of 12
    np.testing.assert_array_equal(ref[1, 0].numpy(), np.where(inscribed_circle_mask(8, 8), extract_slice(vol, 1, 5, 8), 0))
    np.testing.assert_array_equal(twin[2, 0].numpy(), np.where(inscribed_circle_mask(8, 8), extract_slice(vol, 1, 8, 8), 0))
    # A path is read and prepared (working copy + percentile normalisation).
    np.save(tmp_path / "v.npy", vol)
    from_path = unrotated_pairs(tmp_path / "v.npy", 0, 12)
    expected = unrotated_pairs(prepare_volume(vol), 0, 12)
    torch.testing.assert_close(from_path[0], expected[0])


def test_prepare_volume_normalises_and_names_bad_files(tmp_path):
    vol = np.random.default_rng(0).normal(5.0, 2.0, (10, 12, 14)).astype(np.float32)
    out = prepare_volume(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert np.percentile(out, 1) == pytest.approx(0.0, abs=1e-4)
    assert np.percentile(out, 99) == pytest.approx(1.0, abs=1e-4)
    assert prepare_volume(vol, max_voxels=5 * 6 * 7).shape == (5, 6, 7)
    from tomoloc.io import VolumeError

    np.save(tmp_path / "flat.npy", np.ones((4, 4, 4), np.float32))
    with pytest.raises(VolumeError, match="flat.npy"):
        prepare_volume(tmp_path / "flat.npy")


def test_random_shift_is_seeded_translation_before_rotation():
    rng = np.random.default_rng(3)
    vols = [rng.normal(size=(6, 16, 16)).astype(np.float32)]
    plain = RotationPairDataset(vols, axes=(0,), input_size=16, length=8, seed=4)
    shifted = RotationPairDataset(vols, axes=(0,), input_size=16, length=8, seed=4, max_shift=0.25)
    a, b = shifted[0], shifted[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # deterministic per key
    differs = sum(not torch.equal(plain[i][0], shifted[i][0]) for i in range(8))
    assert differs >= 6  # up to 4 px offsets: almost every draw moves the slice
    assert all(int(plain[i][2]) == int(shifted[i][2]) for i in range(8))  # labels unchanged
    with pytest.raises(ValueError, match="max_shift"):
        RotationPairDataset(vols, max_shift=0.6)
