import numpy as np
import pytest

from tomoloc.localize import (
    BadValuesError,
    MultiOtsuLocalizer,
    OtsuLocalizer,
    ThresholdLocalizer,
    calibrate_threshold,
    working_copy,
)
from skimage.filters import threshold_otsu

from tomoloc.localize.base import components_bbox, largest_component_bbox
from tomoloc.localize.threshold import multiotsu_threshold


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


def table_volume(seed=0):
    """Air 0, a soft sample at 1 (6x8x10 = 480 voxels), a much denser slab (a scanner table) at 4."""
    vol, box = easy_volume(seed=seed, box=((8, 14), (6, 14), (12, 22)))
    vol[:, 28:31, :] += 4.0  # 24 x 3 x 40 = 2,880 voxels: larger and brighter than the sample
    return vol, box


def test_otsu_loses_the_sample_to_a_denser_slab():
    # The failure MultiOtsuLocalizer exists for: Otsu splits the slab from everything else.
    vol, _ = table_volume()
    assert OtsuLocalizer().localize(vol).bbox == ((0, 24), (28, 31), (0, 40))


def test_multiotsu_keeps_the_sample_beside_a_denser_slab():
    vol, box = table_volume()
    loc = MultiOtsuLocalizer().localize(vol)
    assert loc.method == "multiotsu" and loc.confidence == 1.0
    assert 0.1 < loc.details["threshold"] < 0.9  # between air and the sample, not below the slab
    assert loc.details["threshold_rule"] == "multiotsu"
    # Both objects are kept (the slab is the largest): too big, never cut. The 1-voxel
    # smoothing moves edges by at most a voxel.
    assert loc.bbox[0] == (0, 24) and loc.bbox[2] == (0, 40)
    assert box[1][0] - 1 <= loc.bbox[1][0] <= box[1][0] and 31 <= loc.bbox[1][1] <= 32
    # With stricter size rules only the slab would be left: the rules are what save the sample.
    strict = MultiOtsuLocalizer(min_fraction=0.5, min_share=0.0, min_voxels=0).localize(vol).bbox
    assert strict[1][0] >= 27 and strict[1][1] <= 32


def test_multiotsu_keeps_a_sample_much_smaller_than_a_dense_slab():
    # After smoothing, the sample's component is about 5% of the slab's: under min_fraction,
    # over min_share (0.02% of the voxels) and min_voxels.
    vol, box = table_volume()
    smoothed_only = MultiOtsuLocalizer(min_share=0.0, min_voxels=0).localize(vol).bbox
    assert smoothed_only[1][0] >= 27  # the sample is lost without min_share
    kept = MultiOtsuLocalizer().localize(vol).bbox
    assert all(lo <= t0 and hi >= t1 for (lo, hi), (t0, t1) in zip(kept, box))


def test_multiotsu_keeps_a_small_piece_of_the_sample_apart_from_the_rest():
    # A body, a piece of 5x5x5 voxels apart from it (81 voxels above the threshold once
    # smoothed: 0.04% of the 196,608 voxels) and a table far larger than both. The piece is
    # under a tenth of the table and under the old 0.1% (197 voxels), over 0.02% (39) and
    # the 64-voxel floor: it is kept, and the box reaches out to it (y 2-7, 1 with the blur).
    rng = np.random.default_rng(0)
    vol = rng.normal(0.0, 0.05, (48, 64, 64)).astype(np.float32)
    vol[10:20, 20:36, 10:26] += 1.0
    vol[34:39, 2:7, 44:49] += 1.0
    vol[:, 58:62, :] += 4.0
    assert MultiOtsuLocalizer().localize(vol).bbox == ((0, 48), (1, 64), (0, 64))
    # Either size rule alone at the old size drops it, and the box starts at the body (y 20).
    assert MultiOtsuLocalizer(min_share=0.001).localize(vol).bbox[1] == (19, 64)
    assert MultiOtsuLocalizer(min_voxels=100).localize(vol).bbox[1] == (19, 64)


def test_multiotsu_ignores_a_bright_speck_and_finds_the_cube():
    vol, box = easy_volume()
    vol[0, 0, 0] = 5.0  # one voxel: far below a tenth of the sample's size
    assert MultiOtsuLocalizer(smooth=0.0, grow=1.0).localize(vol).bbox == box
    smoothed = MultiOtsuLocalizer(grow=1.0).localize(vol).bbox  # edges move by at most a voxel
    assert all(t0 - 1 <= lo <= t0 and t1 <= hi <= t1 + 1 for (lo, hi), (t0, t1) in zip(smoothed, box))
    # Growing into the blurred edge's tail (half way down to the background) adds at most
    # two voxels a side, and never takes anything away.
    grown = MultiOtsuLocalizer().localize(vol).bbox
    assert all(t0 - 2 <= lo <= s0 and s1 <= hi <= t1 + 2
               for (lo, hi), (s0, s1), (t0, t1) in zip(grown, smoothed, box))


def legged_volume(seed=0, leg=0.6):
    """Air 0 with noise, a body at 1 (z 8-16, y 10-22, x 10-22) and a leg one voxel thin at
    ``leg`` (partial volume) running from the body's side out to x 36, plus a separate
    blob of 2x2x2 voxels at the same level that touches nothing."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 0.03, (24, 32, 40)).astype(np.float32)
    vol[8:16, 10:22, 10:22] += 1.0
    vol[12, 16, 22:36] += leg
    vol[2:4, 26:28, 2:4] += leg
    return vol


def test_multiotsu_grows_into_a_thin_leg_by_hysteresis():
    vol = legged_volume()
    plain = MultiOtsuLocalizer(grow=1.0).localize(vol)
    assert plain.bbox[2][1] <= 24  # the leg is under the threshold: cut off (smoothing: +1)
    loc = MultiOtsuLocalizer().localize(vol)
    t, bg = loc.details["threshold"], 0.0
    assert loc.details["grow_threshold"] == pytest.approx(bg + 0.5 * (t - bg), abs=0.02)
    # Smoothed over 1 voxel, the leg keeps a sixth of its level (0.6 / (2 pi) = 0.095):
    # under the threshold, over half of it, and attached: the box runs out to its tip. The
    # blob, too small a component to keep and attached to nothing, stays out.
    assert loc.details["grow_threshold"] < 0.6 / (2 * np.pi) < t
    assert 35 <= loc.bbox[2][1] <= 37
    assert loc.bbox[0][0] >= 6 and loc.bbox[1][1] <= 24 and loc.bbox[2][0] >= 8


@pytest.mark.parametrize("grow", [-0.1, 1.5])
def test_multiotsu_rejects_a_grow_outside_0_1(grow):
    with pytest.raises(ValueError, match="grow must be between 0 and 1"):
        MultiOtsuLocalizer(grow=grow)


def test_grown_bbox_takes_only_components_touching_the_core():
    from tomoloc.localize.threshold import grown_bbox

    data = np.zeros((4, 10, 10), np.float32)
    data[1:3, 1:3, 1:3] = 1.0  # the core
    data[1, 2, 3:8] = 0.4  # weak, attached
    data[1, 8, 8] = 0.4  # weak, alone
    core = data > 0.5
    assert grown_bbox(data, core, 0.3) == ((1, 3), (1, 3), (1, 8))
    assert grown_bbox(data, core, 0.5) == ((1, 3), (1, 3), (1, 3))
    assert grown_bbox(data, core, -1.0) == ((0, 4), (0, 10), (0, 10))  # everything is connected


def test_multiotsu_threshold_hand_computed_levels_and_fallback():
    rng = np.random.default_rng(0)
    levels = np.repeat([0.0, 1.0, 4.0], [6000, 1000, 3000])
    values = (levels + rng.normal(0.0, 0.05, levels.size)).astype(np.float32)
    t, rule = multiotsu_threshold(values)
    assert 0.1 < t < 0.9 and rule == "multiotsu"  # background against everything above it
    assert 1.1 < threshold_otsu(values) < 3.9  # plain Otsu puts the sample with the background
    # Two levels only: three classes do not exist, Otsu's single threshold is used.
    two = np.repeat([0.0, 2.0], [50, 50]).astype(np.float32)
    assert multiotsu_threshold(two) == (pytest.approx(threshold_otsu(two)), "otsu")


def test_multiotsu_threshold_does_not_split_a_noise_peak():
    # Air with noise and one object: three classes would cut the air's peak in two, and
    # half the air would become foreground. That threshold is not in a valley, so the
    # threshold separates the air from the object.
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.0, 0.05, 20_000), rng.normal(1.0, 0.05, 4_000)]).astype(np.float32)
    t, rule = multiotsu_threshold(values)
    assert rule in ("background", "otsu") and 0.15 < t < 0.85
    assert (values > t).sum() == pytest.approx(4_000, abs=10)


def test_multiotsu_threshold_background_rule_keeps_a_sample_overlapping_the_medium():
    # No air: a medium that fills the field of view (with a dark tail, as reconstructions
    # have), a sample a little denser that overlaps it, and a large dense table. The
    # lowest three-class threshold falls in the dark tail, not in a valley; Otsu's lies
    # above the sample; the background rule (medium peak + 4 sigma, about 1.4) keeps most
    # of the sample and none of the medium.
    rng = np.random.default_rng(0)
    medium, sample = rng.normal(1.0, 0.1, 60_000), rng.normal(1.6, 0.15, 15_000)
    values = np.concatenate([medium, sample, rng.normal(8.0, 0.4, 25_000), rng.uniform(-3.0, 0.7, 5_000)])
    values = values.astype(np.float32)
    assert (sample > threshold_otsu(values)).mean() < 0.01  # Otsu: the sample is background
    t, rule = multiotsu_threshold(values)
    assert rule == "background" and t == pytest.approx(1.4, abs=0.1)
    assert (sample > t).mean() > 0.8 and (medium > t).mean() < 0.002


def test_components_bbox_keeps_every_large_component():
    b = np.zeros((10, 10, 10), bool)
    b[0:4, 0:4, 0:4] = True  # 64 voxels, the largest
    b[6:9, 6:9, 6:8] = True  # 18 voxels: 28% of the largest
    b[9, 0, 9] = True  # 1 voxel: 1.6%
    assert components_bbox(b, 0.1) == ((0, 9), (0, 9), (0, 8))
    assert components_bbox(b, 0.5) == largest_component_bbox(b) == ((0, 4), (0, 4), (0, 4))
    assert components_bbox(b, 0.0) == ((0, 10), (0, 9), (0, 10))
    assert components_bbox(b, 0.5, min_share=0.018) == ((0, 9), (0, 9), (0, 8))  # 18 of 1000 voxels
    assert components_bbox(np.zeros((3, 3, 3), bool), 0.1) is None


def test_multiotsu_is_not_thrown_by_a_few_extreme_voxels():
    # 27 voxels at 100x the sample: unclipped, the 256 histogram bins would put air and
    # sample in the same bin. Otsu (unclipped, as other tools use it) keeps the metal alone.
    vol, box = easy_volume(shape=(40, 48, 48))
    vol[30:33, 40:43, 40:43] = 100.0
    assert OtsuLocalizer().localize(vol).bbox == ((30, 33), (40, 43), (40, 43))
    loc = MultiOtsuLocalizer().localize(vol)
    assert all(lo <= tlo and hi >= thi for (lo, hi), (tlo, thi) in zip(loc.bbox, box))


def test_multiotsu_keeps_the_soft_layer_of_an_8bit_export_with_saturated_air():
    # uint8 export: air saturated at 0 (most voxels), a soft outer layer around 60, a dense
    # core around 200, edges blurred as a scanner blurs them. Were the zeros taken as
    # field-of-view fill, the histogram would hold only the sample, and the threshold
    # would fall between layer and core: the box would be the core.
    from scipy import ndimage

    rng = np.random.default_rng(0)
    vol = np.zeros((40, 48, 48), np.float32)
    vol[8:32, 10:38, 12:40] = 60.0
    vol[14:26, 18:30, 20:32] = 200.0
    vol = ndimage.gaussian_filter(vol, 1.0) + rng.normal(0.0, 4.0, vol.shape)
    vol = np.clip(np.round(vol - 6.0), 0, 255).astype(np.uint8)  # the export's window saturates the air
    assert (vol == 0).mean() > 0.6
    for loc in (MultiOtsuLocalizer(), OtsuLocalizer()):
        box = loc.localize(vol).bbox
        assert all(lo <= t0 and hi >= t1 and (t0 - lo) + (hi - t1) <= 4
                   for (lo, hi), (t0, t1) in zip(box, ((8, 32), (10, 38), (12, 40)))), (loc.name, box)


def test_an_exact_zero_background_is_data_not_field_of_view_fill():
    # A noise-free phantom (or a volume masked to 0 by an earlier step): background exactly 0,
    # a dim body at 0.3 around a bright core at 1.0. The zeros are the volume's minimum, set
    # apart from the rest like a fill; taken as fill, the histogram would hold only the sample,
    # the threshold would split body from core, and the box would be the core (11 voxels of
    # 19 along axis 0, before the field-of-view shape test).
    z, y, x = np.indices((40, 60, 70))
    r = ((z - 20) / 10) ** 2 + ((y - 30) / 12) ** 2 + ((x - 35) / 12) ** 2
    vol = (np.where(r < 1, 0.3, 0.0) + np.where(r < 0.2, 0.7, 0.0)).astype(np.float32)
    true = ((11, 30), (19, 42), (24, 47))
    assert tuple(tuple(int(v) for v in p) for p in zip(np.argwhere(r < 1).min(0), np.argwhere(r < 1).max(0) + 1)) == true
    for loc in (MultiOtsuLocalizer(), OtsuLocalizer()):
        box = loc.localize(vol).bbox
        assert all(lo <= t0 and hi >= t1 and (t0 - lo) + (hi - t1) <= 2
                   for (lo, hi), (t0, t1) in zip(box, true)), (loc.name, box)
    # A binary mask of the same sample is boxed too (the False voxels are not fill either).
    assert MultiOtsuLocalizer().localize(r < 1).bbox == ((10, 31), (18, 43), (23, 48))


def test_grow_from_the_command_line_localize_and_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from test_cli import one_error_line
    from tomoloc.cli import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    np.save(tmp_path / "legged.npy", legged_volume())
    res = run("localize", tmp_path / "legged.npy", "--out", tmp_path / "off.json", "--grow", 1)
    assert res.exit_code == 0, res.output
    res = run("localize", tmp_path / "legged.npy", "--out", tmp_path / "on.json")
    assert res.exit_code == 0, res.output
    off, on = (json.loads((tmp_path / f).read_text()) for f in ("off.json", "on.json"))
    assert off["boxes"][0]["bbox"][2][1] <= 24 and on["boxes"][0]["bbox"][2][1] >= 35  # the leg
    assert off["config"]["grow"] == 1.0 and on["config"]["grow"] == 0.5  # saved with the boxes
    res = run("run", tmp_path / "legged.npy", "--out", tmp_path / "job", "--grow", 1, "--margin", 0)
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert man["config"]["grow"] == 1.0 and man["volumes"][0]["bbox"] == off["boxes"][0]["bbox"]
    # wrong values and methods: one line, exit 2, nothing written
    one_error_line(run("localize", tmp_path / "legged.npy", "--out", tmp_path / "x.json", "--grow", 1.5), "--grow")
    one_error_line(run("localize", tmp_path / "legged.npy", "--out", tmp_path / "x.json", "--method", "otsu",
                       "--grow", 0.3), "--grow belongs to --method multiotsu")
    one_error_line(run("run", tmp_path / "legged.npy", "--out", tmp_path / "y", "--method", "otsu",
                       "--grow", 0.3), "--grow belongs to --method multiotsu")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y").exists()
