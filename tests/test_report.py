"""The report's figure: slices through the box and maximum-intensity projections of the volume."""

import struct

import numpy as np

from tomoloc.localize.threshold import MultiOtsuLocalizer, OtsuLocalizer
from tomoloc.preprocess import working_copy
from tomoloc.report import BoxStyle, figure_png, orthoviews


def _cube_volume():
    vol = np.zeros((20, 40, 40), np.float32)
    vol[4:8, 10:14, 30:34] = 10.0  # a bright cube away from the centre
    vol[12:16, 20:26, 6:12] = 3.0
    return vol


def test_projections_are_the_maxima_of_the_working_copy_along_each_axis():
    vol = _cube_volume()
    work = working_copy(vol, max_voxels=20 * 40 * 40 // 8)  # factor 2
    assert work.factor == (2, 2, 2)
    p = work.projections()
    assert p["factor"] == (2, 2, 2) and p["shape"] == (20, 40, 40)
    assert [m.shape for m in p["max"]] == [(20, 20), (10, 20), (10, 20)]
    for a in range(3):
        np.testing.assert_array_equal(p["max"][a], work.data.max(axis=a))
    # the cube's 2x2x2 blocks are wholly inside it: their mean is its value
    assert p["max"][0][5, 15] == 10.0 and p["max"][1][2, 15] == 10.0 and p["max"][2][2, 5] == 10.0


def _pixel_centre(ax, i, j):
    img = ax.images[0]
    left, right, bottom, top = img.get_extent()
    rows, cols = img.get_array().shape
    return top + (i + 0.5) * (bottom - top) / rows, left + (j + 0.5) * (right - left) / cols


def test_projection_pixels_land_on_their_original_voxels():
    vol = _cube_volume()
    work = working_copy(vol, max_voxels=20 * 40 * 40 // 8)
    fig = orthoviews(vol, [BoxStyle(((4, 8), (10, 14), (30, 34)), "cube")], projections=work.projections())
    axes = fig.axes
    assert len(axes) == 6
    # axial projection: block (5, 15) covers y 10-11, x 30-31; its centre is at voxel (10.5, 30.5)
    assert _pixel_centre(axes[3], 5, 15) == (10.5, 30.5)
    # coronal (Z, X) and sagittal (Z, Y): block (2, 15) and (2, 5) -> z 4.5
    assert _pixel_centre(axes[4], 2, 15) == (4.5, 30.5)
    assert _pixel_centre(axes[5], 2, 5) == (4.5, 10.5)
    # the view spans the volume (voxel edges at -0.5 and n - 0.5), not the padded working grid
    assert axes[3].get_xlim() == (-0.5, 39.5) and axes[4].get_ylim() == (19.5, -0.5)
    # the box drawn on the projection is the cube's: corner at its first voxel's edge
    rect = axes[3].patches[0]
    assert rect.get_xy() == (29.5, 9.5) and (rect.get_width(), rect.get_height()) == (4, 4)
    png = figure_png(fig)
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
    assert height > 0.6 * width  # two rows of views
    single = figure_png(orthoviews(vol, []))
    assert struct.unpack(">II", single[16:24])[1] < 0.5 * width


def test_thresholdings_return_the_projections_of_what_they_read():
    vol = _cube_volume() + np.random.default_rng(0).normal(0, 0.1, (20, 40, 40)).astype(np.float32)
    for loc in (OtsuLocalizer(), MultiOtsuLocalizer()):
        p = loc.localize(vol).details["projections"]
        assert p["factor"] == (1, 1, 1)
        # not the smoothed copy multi-Otsu thresholds: the maxima are the volume's own
        for a in range(3):
            np.testing.assert_allclose(p["max"][a], vol.max(axis=a), rtol=1e-6)


def test_localizer_figures_draw_the_projections_below_the_views():
    from tomoloc.report import profile_figure, variance_figure

    vol = _cube_volume()
    work = working_copy(vol, max_voxels=20 * 40 * 40 // 8)
    proj = work.projections()
    box = ((4, 8), (10, 14), (30, 34))
    profiles = {a: np.linspace(0, 1, n) for a, n in enumerate(work.data.shape)}
    intervals = {a: [1, 3, 0.5, 0.4, True] for a in range(3)}
    score = np.zeros(work.data.shape, np.float32)
    score[2:4, 5:7, 15:17] = 1.0
    figs = {
        "profile": (profile_figure(vol, profiles, intervals, work.factor, box),
                    profile_figure(vol, profiles, intervals, work.factor, box, projections=proj)),
        "variance": (variance_figure(vol, score, work.factor, box, 0.5),
                     variance_figure(vol, score, work.factor, box, 0.5, projections=proj)),
    }
    for kind, (plain, with_proj) in figs.items():
        assert len(with_proj.axes) == len(plain.axes) + 3, kind
        last = with_proj.axes[-3:]
        assert [ax.get_title() for ax in last] == [f"{v}: maximum along axis {a}"
                                                   for a, v in enumerate(("axial", "coronal", "sagittal"))]
        # the found box on the axial projection, at its voxels' edges
        rect = last[0].patches[0]
        assert rect.get_xy() == (29.5, 9.5) and (rect.get_width(), rect.get_height()) == (4, 4)
        np.testing.assert_array_equal(last[0].images[0].get_array(), proj["max"][0])
        h_plain = struct.unpack(">II", figure_png(plain)[16:24])[1]
        assert struct.unpack(">II", figure_png(with_proj)[16:24])[1] > 1.3 * h_plain, kind
