import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomoloc.boxes import (
    BOX_FORMAT,
    BoxFileError,
    BoxRecord,
    bbox_from_mask,
    expand_bbox,
    read_boxes,
    volume_key,
    write_boxes,
)
from tomoloc.metrics import box_mae, intersection, iou, recall, reduction, relative_error


# ----------------------------------------------------------------------------- metrics
def test_mae_hand_computed():
    pred = ((10, 20), (0, 50), (5, 15))
    true = ((12, 20), (3, 47), (5, 25))
    # |10-12| + 0 + |0-3| + |50-47| + 0 + |15-25| = 2+3+3+10 = 18 over 6 coordinates
    assert box_mae(pred, true) == pytest.approx(3.0)
    # mean side of a (60, 90, 120) volume is 90 -> 3/90 = 3.333%
    assert relative_error(pred, true, (60, 90, 120)) == pytest.approx(100 * 3 / 90)


def test_iou_hand_computed():
    a = ((0, 10), (0, 10), (0, 10))  # 1000 voxels
    b = ((5, 15), (0, 10), (0, 10))  # 1000 voxels, overlap 5*10*10 = 500
    assert intersection(a, b) == ((5, 10), (0, 10), (0, 10))
    assert iou(a, b) == pytest.approx(500 / 1500)
    assert iou(a, a) == 1.0
    # touching faces share no voxel with half-open intervals
    assert iou(a, ((10, 20), (0, 10), (0, 10))) == 0.0


def test_recall_and_reduction():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:6, 2:6, 2:6] = True  # 64 voxels
    assert recall(((2, 6), (2, 6), (2, 6)), mask) == 1.0
    # cutting one z-plane of four loses a quarter of the voxels
    assert recall(((3, 6), (0, 10), (0, 10)), mask) == pytest.approx(0.75)
    assert math.isnan(recall(((0, 1), (0, 1), (0, 1)), np.zeros((2, 2, 2), bool)))
    assert reduction(((0, 5), (0, 10), (0, 10)), (10, 10, 10)) == pytest.approx(2.0)


# ------------------------------------------------------------------------------- boxes
def test_bbox_from_mask_is_half_open_and_tight():
    mask = np.zeros((8, 9, 10), bool)
    mask[1, 2, 3] = True
    mask[4, 7, 9] = True
    assert bbox_from_mask(mask) == ((1, 5), (2, 8), (3, 10))
    assert bbox_from_mask(np.zeros((3, 3, 3), bool)) is None


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(*[st.integers(1, 12)] * 3).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.tuples(*[st.tuples(st.integers(0, n - 1), st.integers(1, n)) for n in shape]),
        )
    )
)
def test_bbox_from_mask_roundtrip(args):
    shape, ivs = args
    box = tuple((min(a, b - 1), max(a + 1, b)) for a, b in ivs)
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, hi) for lo, hi in box)] = True
    assert bbox_from_mask(mask) == box


def test_expand_bbox_margin_exact_and_clipped():
    box = ((10, 20), (5, 6), (0, 30))
    assert expand_bbox(box, 4, (100, 100, 32)) == ((6, 24), (1, 10), (0, 32))
    assert expand_bbox(box, (0, 1, 2), (100, 100, 100)) == ((10, 20), (4, 7), (0, 32))
    with pytest.raises(ValueError):
        expand_bbox(box, -1, (100, 100, 100))


def test_volume_key():
    assert volume_key("/a/b/vol_000.npy") == "vol_000.npy"
    assert volume_key("scan.h5:/exchange/data") == "scan.h5"
    assert volume_key("slices/") == "slices"


def test_box_file_roundtrip(tmp_path):
    recs = [BoxRecord("a/vol_000.npy", (4, 5, 6), ((0, 4), (1, 3), (2, 6)), "otsu", {"confidence": 0.5})]
    p = write_boxes(tmp_path / "b.json", recs, config={"method": "otsu"})
    doc = json.loads(p.read_text())
    assert doc["format"] == BOX_FORMAT
    assert doc["boxes"][0] == {"volume": "a/vol_000.npy", "shape": [4, 5, 6],
                               "bbox": [[0, 4], [1, 3], [2, 6]], "method": "otsu", "confidence": 0.5}
    back = read_boxes(p)
    assert back == recs
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "content, needle",
    [
        ("not json", "not a readable JSON"),
        ('{"format": "other/1", "boxes": []}', "not a tomoloc-boxes/1"),
        ('{"format": "tomoloc-boxes/1", "boxes": [{"volume": "v", "shape": [4, 4, 4], "bbox": [[0, 5], [0, 4], [0, 4]]}]}',
         "exceeds"),
        ('{"format": "tomoloc-boxes/1", "boxes": [{"volume": "v", "shape": [4, 4, 4], "bbox": [[3, 2], [0, 4], [0, 4]]}]}',
         "lo < hi"),
    ],
)
def test_bad_box_files(tmp_path, content, needle):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(BoxFileError) as e:
        read_boxes(p)
    assert str(p) in str(e.value) and needle in str(e.value)
    with pytest.raises(BoxFileError, match="no such box file"):
        read_boxes(tmp_path / "missing.json")
