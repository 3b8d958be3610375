import numpy as np
import pytest

from tomoloc.preprocess import network_input, normalize, robust_range, suppress_holder, working_copy


def test_suppress_holder_removes_what_runs_along_axis_0():
    z, y, x = np.mgrid[:20, :16, :16]
    tube = ((y - 9) ** 2 + (x - 6) ** 2 < 30).astype(np.float32) * 2.0  # off-centre, same in every slice
    blob = ((z - 10) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 < 9).astype(np.float32)  # in slices 8..12 only
    out = suppress_holder(tube + blob)
    np.testing.assert_array_equal(out[:7], 0.0)  # background slices: nothing left to orient by
    np.testing.assert_array_equal(out[10], blob[10])  # the sample is untouched where it is
    assert out.dtype == np.float32


def test_normalize_maps_percentiles():
    a = np.arange(101, dtype=np.float32)
    assert robust_range(a, 1, 99) == pytest.approx((1.0, 99.0))
    n = normalize(a)
    assert n[1] == pytest.approx(0.0) and n[99] == pytest.approx(1.0)


def test_network_input_modes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 6, 6)).astype(np.float32) + np.arange(6, dtype=np.float32)
    np.testing.assert_allclose(network_input(a, "none"), normalize(a))
    np.testing.assert_allclose(network_input(a, "zmedian"), normalize(suppress_holder(a)))
    with pytest.raises(ValueError, match="holder"):
        network_input(a, "ring")


def test_fill_value_detection_and_normalisation():
    from tomoloc.preprocess import fill_value, measured_values

    a = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert fill_value(a) is None  # a unique minimum is data, not fill
    a[0] = -2000.0
    assert fill_value(a) == -2000.0
    assert measured_values(a).min() > -1
    n = normalize(a)
    np.testing.assert_array_equal(n[0], 0.0)  # the fill sits at the 1st-percentile level
    assert -0.05 < n.min() and n.max() < 1.05  # not -2000 / (range) far below the data


def test_saturated_air_is_data_not_fill():
    # An 8-bit export whose air saturated at 0: 40% zeros, and the next values are 1, 2, ...
    # Taken as fill, the air would leave the histogram and thresholds would fall inside the sample.
    from tomoloc.preprocess import fill_value

    rng = np.random.default_rng(0)
    a = np.concatenate([np.zeros(4000), rng.integers(1, 30, 2000), rng.integers(120, 256, 4000)]).astype(np.uint8)
    assert fill_value(a) is None
    b = a.astype(np.int16)
    b[:4000] = -2000  # the same voxels as a padding value far below the data: fill
    assert fill_value(b) == -2000.0
    # 1% of the range is the least gap: 0 below data from 3 to 255 is fill (gap 3 > 2.5)
    c = np.concatenate([np.zeros(500), rng.integers(3, 256, 9500)]).astype(np.uint8)
    assert fill_value(c) == 0.0 and fill_value(np.full(100, 7.0)) is None


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.bool_])
@pytest.mark.parametrize("threads", [1, 3])
def test_working_copy_is_the_exact_block_mean_for_any_threads_and_block_size(dtype, threads):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        a = rng.integers(info.min, info.max, (13, 17, 19), endpoint=True).astype(dtype)
    else:
        a = (rng.random((13, 17, 19)) > 0.5).astype(dtype)
    for max_voxels in (13 * 17 * 19, 400, 60):
        wc = working_copy(a, max_voxels=max_voxels, max_bytes=1, threads=threads)  # one band per block
        f = wc.factor[0]
        want = np.array([[[a[i:i + f, j:j + f, k:k + f].astype(np.float64).mean()
                           for k in range(0, 19, f)] for j in range(0, 17, f)] for i in range(0, 13, f)])
        np.testing.assert_allclose(wc.data, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def test_fill_must_have_the_shape_of_a_field_of_view():
    from tomoloc.preprocess import fill_value

    rng = np.random.default_rng(0)
    z, y, x = np.indices((16, 40, 40))
    data = rng.normal(1.0, 0.05, z.shape).astype(np.float32)
    disc = (y - 19.5) ** 2 + (x - 19.5) ** 2 < 19**2
    fov = np.where(disc, data, np.float32(-2000))
    assert fill_value(fov) == -2000.0  # the same disc measured in every axial slice
    cone = fov.copy()
    cone[:2] = np.where((y[:2] - 19.5) ** 2 + (x[:2] - 19.5) ** 2 < 12**2, data[:2], -2000)
    assert fill_value(cone) == -2000.0  # a cone-beam scan's narrower end slices do not change that
    ball = np.where((z - 8) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 7**2, data, np.float32(0))
    assert fill_value(ball) is None  # a sample in an exact-zero background: its section changes with z
    assert fill_value(ball.ravel()) == 0.0  # without the volume's shape only the value test applies


def _circle_filled_with_zero(z=24, n=48, seed=0, air=-0.3, sample=1.0):
    """Negative noisy air in the inscribed disc, a bright ball in it, 0 outside the disc
    (tomopy's circular mask), and the ball's box."""
    rng = np.random.default_rng(seed)
    zz, y, x = np.indices((z, n, n))
    vol = rng.normal(air, 0.03, zz.shape).astype(np.float32)
    ball = (zz - 12) ** 2 + (y - 20) ** 2 + (x - 26) ** 2 < 6**2
    vol[ball] = sample
    vol[:, (y[0] - (n - 1) / 2) ** 2 + (x[0] - (n - 1) / 2) ** 2 > (n / 2) ** 2] = 0.0
    return vol, ((7, 18), (15, 26), (21, 32))


def test_a_fill_above_the_minimum_is_found_and_moved_below_the_data():
    from tomoloc.preprocess import fill_value, lower_fill, measured_values

    from tomoloc.localize.threshold import thresholding_copy

    vol, _ = _circle_filled_with_zero()
    # Not the minimum (air is at -0.3): data for the networks' inputs, as it always was ...
    assert fill_value(vol) is None and measured_values(vol).size == vol.size
    np.testing.assert_array_equal(working_copy(vol).data, vol)
    work = vol.copy()
    new = lower_fill(work)
    measured = work[vol != 0.0]
    np.testing.assert_array_equal(measured, vol[vol != 0.0])  # the data is untouched
    lo, hi = np.percentile(measured, [0.1, 99.9])
    assert new == pytest.approx(measured.min() - 0.05 * (hi - lo), rel=1e-5)
    np.testing.assert_array_equal(work[vol == 0.0], np.float32(new))
    # ... and for the thresholdings an ordinary fill at the minimum
    assert fill_value(work) == new and lower_fill(work) is None
    np.testing.assert_array_equal(thresholding_copy(vol).data, work)
    assert vol.max() == 1.0 and np.count_nonzero(vol == 0.0) > 0  # the input is not changed


def test_a_fill_above_the_minimum_does_not_make_the_box_the_whole_volume():
    from tomoloc.localize import MultiOtsuLocalizer, OtsuLocalizer

    vol, ball = _circle_filled_with_zero()
    before = vol.copy()
    for loc in (MultiOtsuLocalizer(), OtsuLocalizer()):
        box = loc.localize(vol).bbox
        assert all(lo <= blo and bhi <= hi and blo - lo <= 2 and hi - bhi <= 2
                   for (lo, hi), (blo, bhi) in zip(box, ball)), (loc.name, box)
    np.testing.assert_array_equal(vol, before)
    # Downsampled twice, block means blend the 0 with the air into a bright ring at the
    # field of view's edge; it goes with the fill, and the box still holds the ball alone.
    vol, ball = _circle_filled_with_zero(air=-1.0, sample=-0.5)  # the fill is brighter than all data
    box = MultiOtsuLocalizer(max_voxels=vol.size // 8).localize(vol).bbox
    assert all(lo <= blo and bhi <= hi and hi - lo <= bhi - blo + 12 for (lo, hi), (blo, bhi) in zip(box, ball)), box


def test_a_constant_that_is_not_a_fill_is_left_as_data():
    from tomoloc.preprocess import fill_value, lower_fill

    rng = np.random.default_rng(1)
    noisy = rng.normal(0.0, 1.0, (12, 32, 32)).astype(np.float32)
    assert fill_value(noisy) is None and lower_fill(noisy.copy()) is None  # the corners are never one value
    # Noise-free air at 0.5 around a ball, with a darker speck holding the minimum: the
    # corners are one value, but what is not at that value is a ball, no field of view.
    z, y, x = np.indices((24, 32, 32))
    ball = np.where((z - 12) ** 2 + (y - 16) ** 2 + (x - 16) ** 2 < 8**2, 1.0, 0.5).astype(np.float32)
    ball[3, 3, 3] = 0.0
    assert fill_value(ball) is None
    copy = ball.copy()
    assert lower_fill(copy) is None
    np.testing.assert_array_equal(copy, ball)


def test_constant_air_around_an_off_centre_tube_is_no_fill():
    # A smoothed 8-bit export: the air is one exact value (12, not the minimum: a dark medium
    # is below it), the tube off centre. The corners hold one value and the rest is the same
    # region in every slice, but it is no reconstruction circle: no disc around the axis.
    from tomoloc.preprocess import lower_fill

    rng = np.random.default_rng(2)
    z, y, x = np.indices((16, 48, 48))
    tube = (y - 18) ** 2 + (x - 30) ** 2 < 12**2
    vol = np.where(tube, rng.integers(0, 11, z.shape), 12).astype(np.float32)  # medium darker than the air
    vol[(z - 8) ** 2 + (y - 18) ** 2 + (x - 30) ** 2 < 5**2] = 200.0  # the sample
    copy = vol.copy()
    assert lower_fill(copy) is None
    np.testing.assert_array_equal(copy, vol)
    centred = np.where((y - 23.5) ** 2 + (x - 23.5) ** 2 < 20**2, rng.normal(5, 1, z.shape), 12).astype(np.float32)
    assert lower_fill(centred.copy()) is not None  # the same value around a centred disc is a circle's fill
