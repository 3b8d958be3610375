"""Recall and storage reduction of a box file against the phantoms' masks.

Usage: python benchmarks/box_recall.py BOXES.json [BASE_DIR]

Each box's volume path (relative to BASE_DIR, default the current folder) must have a
``<stem>_mask.npy`` beside it, as ``benchmarks/_third_phantoms.py`` writes them. Prints, per
margin (0, 4, 8, 16 voxels), the volumes whose box (grown by the margin, clipped) misses a
sample voxel, the worst recall, and the batch's reduction (all voxels / all cropped voxels);
also how many boxes are the whole volume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tomoloc.boxes import expand_bbox
from tomoloc.metrics import bbox_volume, recall


def main(boxes_file: str, base: str = ".") -> None:
    boxes = json.loads(Path(boxes_file).read_text())["boxes"]
    rows = []
    for b in boxes:
        path = Path(base) / b["volume"]
        mask = np.load(path.with_name(path.stem + "_mask.npy"))
        row = {"full": all(lo == 0 and hi == s for (lo, hi), s in zip(b["bbox"], mask.shape)),
               "size": mask.size}
        for m in (0, 4, 8, 16):
            box = expand_bbox(b["bbox"], m, mask.shape)
            row[m] = (recall(box, mask), bbox_volume(box))
        rows.append(row)
    print(f"{boxes_file}: {len(rows)} volumes, {sum(r['full'] for r in rows)} boxes of the whole volume")
    for m in (0, 4, 8, 16):
        cut = sum(r[m][0] < 1 for r in rows)
        worst = min(r[m][0] for r in rows)
        red = sum(r["size"] for r in rows) / sum(r[m][1] for r in rows)
        print(f"margin {m:2d}: cut {cut} of {len(rows)}, worst recall {worst:.4f}, reduction {red:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
