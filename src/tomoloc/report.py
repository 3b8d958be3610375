"""Figures and the self-contained HTML report a person checks before anything is deleted."""

from __future__ import annotations

import base64
import html
import io as _io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: beamline nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from tomoloc._fsutil import atomic_path, write_text_atomic  # noqa: E402
from tomoloc.boxes import Bbox  # noqa: E402

#: Views as (title, axis sliced, (row axis, column axis)) of a (Z, Y, X) volume.
VIEWS = (("axial (Y, X)", 0, (1, 2)), ("coronal (Z, X)", 1, (0, 2)), ("sagittal (Z, Y)", 2, (0, 1)))


@dataclass
class BoxStyle:
    """A box to draw: label for the legend, matplotlib colour and line style."""

    bbox: Bbox
    label: str
    color: str = "#ff3b30"
    linestyle: str = "-"


#: Pixels a view needs at most: a panel of the 80-dpi figures is about 280 pixels wide.
VIEW_PIXELS = 384


def _read_view(volume: Any, axis: int, index: int) -> tuple[np.ndarray, tuple[int, int], tuple[float, ...]]:
    """``volume``'s slice ``index`` along ``axis`` as shown in a figure: ``(image, steps, extent)``.

    Every ``n // VIEW_PIXELS``-th voxel of an in-plane side of ``n`` is read (a 1440-voxel
    side every 3rd voxel): on a large volume a full-resolution coronal or sagittal slice
    touches every page of the file, and matplotlib's resampling of it held 150 MB, while a
    panel shows about 280 pixels. ``steps`` are the (row, column) read steps; ``extent`` is
    the imshow extent that puts pixel ``(i, j)`` on voxel ``(i * steps[0], j * steps[1])``, so
    boxes drawn in voxel coordinates land where they are.
    """
    sr, sc = (max(1, int(volume.shape[a]) // VIEW_PIXELS) for a in range(3) if a != axis)
    key: list[Any] = [slice(None, None, sr), slice(None, None, sc)]
    key.insert(axis, index)
    img = np.asarray(volume[tuple(key)], dtype=np.float32)
    rows, cols = img.shape
    return img, (sr, sc), (-sc / 2, cols * sc - sc / 2, rows * sr - sr / 2, -sr / 2)


def orthoviews(
    volume: Any, boxes: Sequence[BoxStyle], title: str = "", center: Sequence[int] | None = None,
    projections: dict[str, Any] | None = None,
) -> plt.Figure:
    """Three orthogonal slices through ``center`` (default: the first box's centre) with boxes,
    and below them, when given, the volume's maximum-intensity ``projections`` with the same boxes.

    ``volume`` is a 3D array-like (Z, Y, X); axis 0, the rotation axis, runs downwards in
    the coronal and sagittal views. ``projections`` is
    :meth:`tomoloc.preprocess.WorkingCopy.projections`' result.
    """
    rows = 1 if projections is None else 2
    fig, axes = plt.subplots(rows, 3, figsize=(10.5, 3.9 * rows), dpi=80, layout="constrained", squeeze=False)
    draw_orthoviews(axes[0], volume, boxes, center)
    if projections is not None:
        draw_projections(axes[1], projections, boxes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw_projections(axes: Sequence[Any], projections: dict[str, Any], boxes: Sequence[BoxStyle]) -> None:
    """Draw the three maximum-intensity projections (along Z, Y, X) onto three matplotlib axes.

    Pixel ``(i, j)`` of a projection on the working grid covers original voxels
    ``i * f .. (i + 1) * f - 1``; the extent puts it there, so the boxes, in original voxel
    coordinates, are drawn as on the slices.
    """
    shape = projections["shape"]
    f = projections["factor"]
    for ax, (name, axis, (ra, ca)), img in zip(axes, VIEWS, projections["max"]):
        rows, cols = img.shape
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest",
                  extent=(-0.5, cols * f[ca] - 0.5, rows * f[ra] - 0.5, -0.5))
        _draw_boxes(ax, boxes, ra, ca)
        ax.set_xlim(-0.5, shape[ca] - 0.5)
        ax.set_ylim(shape[ra] - 0.5, -0.5)
        ax.set_title(f"{name.split()[0]}: maximum along axis {axis}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])


def _draw_boxes(ax: Any, boxes: Sequence[BoxStyle], ra: int, ca: int) -> None:
    for b in boxes:
        (r0, r1), (c0, c1) = b.bbox[ra], b.bbox[ca]
        # Half-open voxel intervals: the edge of voxel r0 is at r0 - 0.5 in imshow pixels.
        ax.add_patch(
            Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                      edgecolor=b.color, linestyle=b.linestyle, linewidth=1.4, label=b.label)
        )


def draw_orthoviews(
    axes: Sequence[Any], volume: Any, boxes: Sequence[BoxStyle], center: Sequence[int] | None = None
) -> None:
    """Draw the three views of :func:`orthoviews` onto three existing matplotlib axes."""
    shape = tuple(int(s) for s in volume.shape)
    if center is None:
        center = (
            [(lo + hi) // 2 for lo, hi in boxes[0].bbox] if boxes else [s // 2 for s in shape]
        )
    for ax, (name, axis, (ra, ca)) in zip(axes, VIEWS):
        img, _, extent = _read_view(volume, axis, int(np.clip(center[axis], 0, shape[axis] - 1)))
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest",
                  extent=extent)
        _draw_boxes(ax, boxes, ra, ca)
        ax.set_title(f"{name} @ {center[axis]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if boxes:
        axes[0].legend(loc="lower left", fontsize=7, framealpha=0.7)


def figure_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(figure_png(fig))
    return Path(path)


@dataclass
class ReportEntry:
    """One volume's section of the report."""

    name: str
    images: list[bytes] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}section{border-top:1px solid #ddd;
padding:.6em 0}.flag{color:#b00;font-weight:bold}img{max-width:100%}
"""


def write_report(
    path: str | os.PathLike,
    title: str,
    entries: Sequence[ReportEntry],
    summary: Sequence[dict[str, Any]] = (),
    intro: str = "",
) -> Path:
    """Write one self-contained HTML page (images inlined as base64 PNG), atomically.

    Volumes with flags are listed first so the ones a human must look at are on top.
    """
    flagged = [e for e in entries if e.flags]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro)}</p>" if intro else "",
        _table(summary),
        f"<p class='flag'>{len(flagged)} volume(s) need a look: "
        + ", ".join(html.escape(e.name) for e in flagged) + "</p>" if flagged else
        "<p>No volume flagged.</p>",
    ]
    for e in sorted(entries, key=lambda e: (not e.flags, e.name)):
        parts.append(f"<section><h2>{html.escape(e.name)}</h2>")
        for f in e.flags:
            parts.append(f"<p class='flag'>&#9888; {html.escape(f)}</p>")
        parts.append(_table([e.facts]))
        for img in e.images:
            parts.append(f"<img alt='{html.escape(e.name)}' src='data:image/png;base64,"
                         f"{base64.b64encode(img).decode()}'>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return write_text_atomic(path, "".join(parts))


def profile_figure(
    volume: Any,
    profiles: dict[int, Sequence[float]],
    intervals: dict[int, Sequence[float]],
    factor: Sequence[int],
    bbox: Bbox,
    truth: Bbox | None = None,
    title: str = "",
    offset: Sequence[int] = (0, 0, 0),
    floors: dict[int, float] | None = None,
    projections: dict[str, Any] | None = None,
) -> plt.Figure:
    """Certainty profiles per axis with the chosen interval, above the orthogonal views
    (and, when given, the volume's maximum-intensity ``projections``, as in :func:`orthoviews`).

    ``profiles[a]`` is the per-slice certainty along axis ``a`` on the network's view of the
    working copy (downsampled by ``factor[a]``; the view starts at ``offset[a]`` of the
    working copy, 0 unless it was cut to the holder's interior); it is drawn against
    original voxel coordinates. ``intervals[a]`` is ``[lo, hi, threshold, contrast, found]``
    on that view; ``floors[a]``, where given, the certainty of a featureless slice (drawn dotted).
    """
    ratios = [1, 1.3] + ([1.3] if projections is not None else [])
    fig = plt.figure(figsize=(10.5, 2.9 + 3.7 * (len(ratios) - 1)), dpi=80, layout="constrained")
    top, bottom, *rest = fig.subfigures(len(ratios), 1, height_ratios=ratios)
    axes = top.subplots(1, 3)
    for a, ax in enumerate(axes):
        if a not in profiles:
            ax.set_axis_off()
            continue
        p = np.asarray(profiles[a])
        x = (np.arange(p.size) + offset[a] + 0.5) * factor[a]
        ax.plot(x, p, color="k", lw=1)
        lo, hi, thr, contrast, found = intervals[a]
        ax.axvspan(bbox[a][0], bbox[a][1], color="#ff3b30", alpha=0.15, label="found")
        if truth is not None:
            ax.axvline(truth[a][0], color="#34c759", ls="--", lw=1.2, label="truth")
            ax.axvline(truth[a][1], color="#34c759", ls="--", lw=1.2)
        if found:
            ax.axhline(thr, color="#ff9500", lw=0.8, label="threshold")
        if floors and a in floors:
            ax.axhline(floors[a], color="#8e8e93", lw=0.8, ls=":", label="featureless slice")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"axis {a} (voxels)", fontsize=8)
        ax.set_title(f"p(angle 0) along axis {a}" + ("" if found else " (no contrast)"), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="lower right")
    _draw_views(bottom, rest, volume, bbox, truth, projections)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _draw_views(sub: Any, rest: Sequence[Any], volume: Any, bbox: Bbox, truth: Bbox | None,
                projections: dict[str, Any] | None) -> None:
    """The found (and true) box on the orthogonal views in ``sub``, and on the projections in ``rest[0]``."""
    boxes = [BoxStyle(bbox, "found")] + ([BoxStyle(truth, "truth", "#34c759", "--")] if truth else [])
    draw_orthoviews(sub.subplots(1, 3), volume, boxes)
    if projections is not None:
        draw_projections(rest[0].subplots(1, 3), projections, boxes)


def write_profile_details(out_dir: str | os.PathLike, record: Any, truth: Bbox | None = None,
                          stem: str | None = None) -> None:
    """Save one volume's certainty profiles (``<name>_profiles.npz``) and figure (``<name>.png``).

    ``record`` is a :class:`tomoloc.boxes.BoxRecord` holding ``extra["details"]`` from a
    profile-based localizer.
    """
    from tomoloc import io

    d = record.extra["details"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(record.name).stem
    arrays = {f"axis{a}": np.asarray(p, dtype=np.float32) for a, p in d["profiles"].items()}
    arrays["factor"] = np.asarray(d["factor"])
    arrays["offset"] = np.asarray(d.get("offset", (0, 0, 0)))
    arrays["bbox"] = np.asarray(record.bbox)
    floors = {int(a): float(f) for a, f in d.get("floors", {}).items()}
    arrays.update({f"floor{a}": np.float32(f) for a, f in floors.items()})
    with atomic_path(out / f"{stem}_profiles.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    with io.open_volume(record.volume) as vol:
        fig = profile_figure(vol, d["profiles"], d["intervals"], d["factor"], record.bbox, truth, record.name,
                             d.get("offset", (0, 0, 0)), floors, d.get("projections"))
        save_figure(fig, out / f"{stem}.png")


def _grid_slice(score: np.ndarray, factor: Sequence[int], shape: Sequence[int], axis: int, index: int) -> np.ndarray:
    """The slice ``index`` (original voxels) of a working-copy map, blown up to the original grid."""
    sl = np.take(score, min(index // factor[axis], score.shape[axis] - 1), axis=axis)
    (ra, ca) = [a for a in range(3) if a != axis]
    sl = np.repeat(np.repeat(sl, factor[ra], axis=0), factor[ca], axis=1)
    out = np.zeros((shape[ra], shape[ca]), sl.dtype)
    h, w = min(sl.shape[0], shape[ra]), min(sl.shape[1], shape[ca])
    out[:h, :w] = sl[:h, :w]
    # Voxels past the last whole block (cut off by the block mean) take the edge value.
    out[h:, :] = out[h - 1:h, :] if h else 0
    out[:, w:] = out[:, w - 1:w] if w else 0
    return out


def variance_figure(
    volume: Any,
    score: np.ndarray,
    factor: Sequence[int],
    bbox: Bbox,
    threshold: float,
    truth: Bbox | None = None,
    title: str = "",
    mirrored: bool = False,
    projections: dict[str, Any] | None = None,
) -> plt.Figure:
    """MC-dropout variance over the three orthogonal views (top) and the views with boxes (below),
    and, when given, the volume's maximum-intensity ``projections`` with the boxes (bottom).

    ``score`` is the variance on the working copy ``(Z', Y', X')``, block size ``factor``;
    superpixels above ``threshold`` (the top fraction) are outlined. ``mirrored``: the
    localizer turned the score (:func:`tomoloc.localize.sorting.orient_to_sample`), so the
    least variable superpixels are the brightest; the titles say so.
    """
    shape = tuple(int(s) for s in volume.shape)
    center = [(lo + hi) // 2 for lo, hi in bbox]
    rows = 2 if projections is None else 3
    fig = plt.figure(figsize=(10.5, 3.7 * rows), dpi=80, layout="constrained")
    top, bottom, *rest = fig.subfigures(rows, 1)
    vmax = float(np.max(score)) if np.size(score) else 1.0
    for ax, (name, axis, _) in zip(top.subplots(1, 3), VIEWS):
        img, steps, extent = _read_view(volume, axis, center[axis])
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest",
                  extent=extent)
        s = _grid_slice(np.asarray(score), factor, shape, axis, center[axis])[::steps[0], ::steps[1]]
        ax.imshow(s, cmap="magma", alpha=0.55, vmin=0, vmax=vmax if vmax > 0 else 1, interpolation="nearest",
                  extent=extent)
        if np.any(s >= threshold):
            ax.contour(np.arange(s.shape[1]) * steps[1], np.arange(s.shape[0]) * steps[0], s >= threshold,
                       levels=[0.5], colors="#00e5ff", linewidths=0.8)
        ax.set_title(f"{'low ' if mirrored else ''}variance, {name} @ {center[axis]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _draw_views(bottom, rest, volume, bbox, truth, projections)
    if title:
        fig.suptitle(title + " (cyan: top superpixels)", fontsize=10)
    return fig


def write_variance_details(out_dir: str | os.PathLike, record: Any, truth: Bbox | None = None,
                           stem: str | None = None) -> None:
    """Save one volume's variance maps (``<name>_variance.npz``) and figure (``<name>.png``).

    The ``.npz`` holds ``score`` (working-copy grid, float32), ``axis<a>`` (raw per-slice
    superpixel maps along each axis), ``factor`` and ``bbox``.
    """
    from tomoloc import io

    d = record.extra["details"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(record.name).stem
    arrays = {f"axis{a}": np.asarray(m, dtype=np.float32) for a, m in d["maps"].items()}
    arrays.update(score=np.asarray(d["score"], dtype=np.float32), factor=np.asarray(d["factor"]),
                  bbox=np.asarray(record.bbox))
    with atomic_path(out / f"{stem}_variance.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    with io.open_volume(record.volume) as vol:
        fig = variance_figure(vol, d["score"], d["factor"], record.bbox, d["threshold"], truth, record.name,
                              bool(d.get("mirrored", False)), d.get("projections"))
        save_figure(fig, out / f"{stem}.png")


def write_details(out_dir: str | os.PathLike, record: Any, truth: Bbox | None = None,
                  stem: str | None = None) -> Path | None:
    """Save a self-supervised localizer's diagnostics for one volume; return the figure's path.

    Profiles (rotation) or variance maps (sorting), whichever ``record.extra["details"]``
    holds; ``None`` when it holds neither (thresholding methods). Files are named
    ``<stem>.png`` (default: the volume's file name without suffix; pass a unique one when
    volumes share a name).
    """
    d = record.extra.get("details") or {}
    stem = stem or Path(record.name).stem
    if "profiles" in d:
        write_profile_details(out_dir, record, truth, stem)
    elif "score" in d:
        write_variance_details(out_dir, record, truth, stem)
    else:
        return None
    return Path(out_dir) / f"{stem}.png"
