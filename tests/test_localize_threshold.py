import numpy as np
import pytest

from tomoloc.localize import (
    BadValuesError,
    OtsuLocalizer,
    ThresholdLocalizer,
    calibrate_threshold,
    working_copy,
)
from tomoloc.localize.base import largest_component_bbox


def easy_volume(seed=0, shape=(24, 32, 40), box=((5, 15), (8, 20), (10, 31))):
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 0.05, shape).astype(np.float32)
    vol[tuple(slice(a, b) for a, b in box)] += 1.0
    return vol, box


def test_otsu_on_easy_volume_finds_the_cube():
    vol, box = easy_volume()
    loc = OtsuLocalizer().localize(vol)
    assert loc.bbox == box
    assert loc.method == "otsu" and loc.confidence == 1.0
    assert 0.1 < loc.details["threshold"] < 0.9  # between background and sample levels


def test_otsu_keeps_largest_component_not_a_bright_speck():
    vol, box = easy_volume()
    vol[0, 0, 0] = 5.0  # a single dense particle (debris) far from the sample
    assert OtsuLocalizer().localize(vol).bbox == box


def test_threshold_nothing_found_keeps_whole_volume():
    vol, _ = easy_volume()
    loc = ThresholdLocalizer(100.0).localize(vol)
    assert loc.bbox == ((0, 24), (0, 32), (0, 40))
    assert loc.confidence == 0.0 and loc.details["found"] is False


def test_working_copy_block_mean_hand_computed():
    vol = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    w = working_copy(vol, max_voxels=2 * 2 * 3)  # factor 2: ceil -> (2, 2, 3)
    assert w.factor == (2, 2, 2) and w.data.shape == (2, 2, 3)
    assert w.data[0, 0, 0] == pytest.approx(vol[0:2, 0:2, 0:2].mean())
    # partial blocks at the far edges average only the voxels they have
    assert w.data[1, 1, 2] == pytest.approx(vol[2:3, 2:4, 4:5].mean())
    # boxes map back outwards, one block of slack per side, clipped to the original shape
    assert w.to_original(((1, 2), (0, 1), (1, 2))) == ((0, 3), (0, 4), (0, 5))
    w1 = working_copy(vol)
    assert w1.factor == (1, 1, 1) and w1.to_original(((1, 2), (0, 1), (1, 2))) == ((1, 2), (0, 1), (1, 2))


def test_downsampled_localization_contains_the_sample():
    vol, box = easy_volume(shape=(30, 40, 50))
    loc = OtsuLocalizer(max_voxels=3000).localize(vol)
    for (plo, phi), (tlo, thi) in zip(loc.bbox, box):
        assert plo <= tlo and phi >= thi  # coarse grid errs on the side of too big
        assert (phi - plo) - (thi - tlo) <= 4 * 4  # but by at most two blocks per side


@pytest.mark.parametrize("bad, needle", [("nan", "NaN"), ("const", "constant")])
def test_bad_values(bad, needle):
    vol = np.ones((4, 5, 6), np.float32)
    if bad == "nan":
        vol[:] = np.arange(vol.size).reshape(vol.shape)
        vol[2, 3, 4] = np.nan
    with pytest.raises(BadValuesError, match=needle):
        OtsuLocalizer().localize(vol)


def test_largest_component_is_6_connected():
    b = np.zeros((5, 5, 5), bool)
    b[0, 0, 0] = b[1, 1, 1] = True  # diagonal neighbours: two components of one voxel
    b[3:5, 3:5, 3:5] = True
    assert largest_component_bbox(b) == ((3, 5), (3, 5), (3, 5))


def test_calibration_picks_a_value_that_recovers_the_boxes():
    vols, boxes = zip(*(easy_volume(seed=s, box=((2 + s, 14), (4, 20 + s), (6, 30))) for s in range(3)))
    value, mae = calibrate_threshold(list(vols), list(boxes))
    assert mae == 0.0
    for v, b in zip(vols, boxes):
        assert ThresholdLocalizer(value).localize(v).bbox == b


def test_otsu_ignores_the_fill_outside_the_field_of_view():
    vol, box = easy_volume(shape=(20, 40, 40), box=((5, 15), (12, 25), (14, 27)))
    _, y, x = np.mgrid[:20, :40, :40]
    outside = (y - 19.5) ** 2 + (x - 19.5) ** 2 > 20**2
    vol[outside] = -2000.0  # a clinical scanner's padding value
    # Without the fill rule Otsu splits padding from everything else: the whole field of view.
    assert OtsuLocalizer().localize(vol).bbox == box
