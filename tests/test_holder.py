"""The holder's interior: found on hand-made tubes, and the network's view cut to it."""

import numpy as np
import pytest

from tomoloc.holder import find_interior, interior_view
from tomoloc.preprocess import network_input, network_view, normalize

SHAPE = (40, 64, 64)
CY, CX = 30, 35  # off centre, as tubes usually sit
INNER, WALL = 18, 3  # inner radius and wall thickness (voxels)


def _tube(seed: int = 0, sample: bool = True, medium: float = 0.4,
          noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    r = np.hypot(y - CY, x - CX)
    vol = np.zeros(SHAPE, np.float32)
    vol[r < INNER] = medium
    vol[(r >= INNER) & (r < INNER + WALL)] = 1.0
    blob = np.zeros(SHAPE, bool)
    if sample:
        blob = (z - 20) ** 2 / 100 + (y - CY - 4) ** 2 / 36 + (x - CX + 3) ** 2 / 49 < 1
        vol[blob] = 0.7
    vol += noise * np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    return vol, blob


def test_the_interior_of_an_off_centre_tube_is_inside_its_wall():
    vol, blob = _tube()
    inner = find_interior(vol)
    assert inner.found
    assert WALL <= inner.wall <= WALL + 3  # the 1-voxel smoothing and the edge's partial volume
    # The window: inside the wall's outer edge, and at most three voxels short of its inner
    # edge (the 1-voxel smoothing blurs the wall inwards).
    assert CY - INNER - 1 <= inner.y[0] <= CY - INNER + 3 and CY + INNER - 3 <= inner.y[1] <= CY + INNER + 1
    assert CX - INNER - 1 <= inner.x[0] <= CX - INNER + 3 and CX + INNER - 3 <= inner.x[1] <= CX + INNER + 1
    assert inner.mask.shape == (SHAPE[0], inner.y[1] - inner.y[0], inner.x[1] - inner.x[0])
    assert inner.offset == (0, inner.y[0], inner.x[0])
    # The whole sample is in the interior, and no wall voxel is.
    full = np.zeros(SHAPE, bool)
    full[:, inner.y[0]:inner.y[1], inner.x[0]:inner.x[1]] = inner.mask
    assert full[blob].all()
    r = np.hypot(*np.mgrid[:SHAPE[1], :SHAPE[2]] - np.array([CY, CX])[:, None, None])
    assert not full[:, r >= INNER].any()


def test_a_sample_in_air_boxed_on_the_view_is_not_cut():
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    blob = (z - 20) ** 2 / 225 + (y - CY) ** 2 / 196 + (x - CX) ** 2 / 256 < 1
    vol = np.where(blob, 0.7, 0.0) + 0.02 * np.random.default_rng(1).standard_normal(SHAPE)
    vol = vol.astype(np.float32)
    inner = find_interior(vol)
    ys, xs = np.flatnonzero(blob.any((0, 2))), np.flatnonzero(blob.any((0, 1)))
    # No holder: the filled foreground is the sample itself, and its blurred edge reads as a
    # "wall" that the view leaves out; a box reaching the view's edge gets it back.
    assert inner.found and inner.wall >= 1
    assert inner.y[0] >= ys[0] and inner.y[1] <= ys[-1] + 1
    view = network_view(vol, "interior")
    assert view.wall == inner.wall and view.offset == inner.offset
    whole = tuple((0, n) for n in view.data.shape)
    box = view.to_working(whole, vol.shape)
    assert box[0] == (0, SHAPE[0])
    assert box[1][0] <= ys[0] and box[1][1] >= ys[-1] + 1 and box[2][0] <= xs[0] and box[2][1] >= xs[-1] + 1
    assert box[1][0] >= ys[0] - 3 and box[1][1] <= ys[-1] + 4
    # A box inside the view only moves by the offset.
    assert view.to_working(((1, 5), (1, 5), (2, 6)), vol.shape) == ((1, 5), (1 + inner.y[0], 5 + inner.y[0]),
                                                                      (2 + inner.x[0], 6 + inner.x[0]))


def test_a_table_below_the_tube_does_not_move_the_window_off_the_sample():
    vol, blob = _tube()
    vol[:, 58:62, :] = 2.0  # a slab below the tube, denser than anything else
    inner = find_interior(vol)
    full = np.zeros(SHAPE, bool)
    full[:, inner.y[0]:inner.y[1], inner.x[0]:inner.x[1]] = inner.mask
    assert full[blob].all()
    # The slab is all "wall" (no depth of it is at the medium's level), so it is left out.
    assert inner.y[1] <= CY + INNER + 1


def test_the_view_keeps_the_interior_and_makes_the_rest_featureless():
    vol, _ = _tube(noise=0.05)
    view, offset, wall = interior_view(vol)
    inner = find_interior(vol)
    assert wall == inner.wall
    assert offset == inner.offset
    window = vol[:, inner.y[0]:inner.y[1], inner.x[0]:inner.x[1]]
    assert view.shape == window.shape
    np.testing.assert_array_equal(view[inner.mask], window[inner.mask])
    outside = view[~inner.mask]
    assert outside.size > 0
    # The medium's level (0.4; its median) and the scan's own noise (0.05), not the wall's 1.0.
    assert abs(float(np.mean(outside)) - 0.4) < 0.01
    assert 0.04 < float(np.std(outside)) < 0.06
    np.testing.assert_array_equal(interior_view(vol)[0], view)  # seeded: the same view every time


def test_network_view_offsets_and_modes():
    vol, _ = _tube()
    view = network_view(vol, "interior")
    raw, offset, wall = interior_view(vol)
    np.testing.assert_allclose(view.data, normalize(raw))
    assert view.offset == offset == find_interior(vol).offset and view.wall == wall
    np.testing.assert_array_equal(network_input(vol, "interior"), view.data)
    plain = network_view(vol, "none")
    assert plain.offset == (0, 0, 0) and plain.wall == 0 and plain.data.shape == vol.shape
    assert plain.to_working(((0, 40), (0, 64), (3, 9)), vol.shape) == ((0, 40), (0, 64), (3, 9))
    with pytest.raises(ValueError, match="holder"):
        network_view(vol, "tube")


def test_a_thin_sample_in_air_is_not_taken_for_a_container():
    vol = np.zeros(SHAPE, np.float32)
    vol[8:32, 20:44, 30:34] = 1.0  # a 4-voxel plate: its own edge would read as wall
    vol[8:32, 20:24, 30:50] = 1.0
    vol += 0.05 * np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    inner = find_interior(vol)
    assert not inner.found and (inner.y, inner.x) == ((0, SHAPE[1]), (0, SHAPE[2]))
    view = network_view(vol, "interior")
    assert view.data.shape == SHAPE and view.offset == (0, 0, 0) and view.wall == 0


def test_a_phase_contrast_wall_around_a_medium_as_grey_as_the_air_is_found():
    # Phase contrast: the medium reads as the air outside (0); the wall shows as a bright
    # fringe with a dark one on each side. The lowest threshold then splits off the dark
    # fringes alone and everything else fills the slice; what differs from 0 either way is
    # the wall (and the sample).
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    r = np.hypot(y - CY, x - CX)
    vol = np.zeros(SHAPE, np.float32)
    vol[(r >= INNER) & (r < INNER + WALL)] = 1.0
    vol[((r >= INNER - 2) & (r < INNER)) | ((r >= INNER + WALL) & (r < INNER + WALL + 2))] = -0.8
    blob = (z - 20) ** 2 / 100 + (y - CY - 4) ** 2 / 36 + (x - CX + 3) ** 2 / 49 < 1
    vol[blob] = 0.15  # faint: a fifth of the wall's fringe
    vol += 0.02 * np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    inner = find_interior(vol)
    assert inner.found and 1 <= inner.wall <= WALL + 6  # the fringes are part of the wall
    assert CY - INNER - 1 <= inner.y[0] and inner.y[1] <= CY + INNER + 1
    assert CX - INNER - 1 <= inner.x[0] and inner.x[1] <= CX + INNER + 1
    full = np.zeros(SHAPE, bool)
    full[:, inner.y[0]:inner.y[1], inner.x[0]:inner.x[1]] = inner.mask
    # The bright wall is left out (less its inner half voxel: the smoothing blurs the fringes).
    assert full[blob].all() and not full[:, r[0] >= INNER + 0.5].any()
    # Without the two-sided fallback the window was the whole slice.
    assert find_interior(vol, max_filled=1.0).y == (0, SHAPE[1])
