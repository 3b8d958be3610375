"""What every localizer shares: the result type, the working copy, and component boxes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
from scipy import ndimage

from tomoloc.boxes import Bbox, BoxRecord
from tomoloc.preprocess import BadValuesError, WorkingCopy, working_copy  # noqa: F401 (re-exported)


@dataclass
class Localization:
    """A localizer's answer for one volume.

    Attributes
    ----------
    bbox : Bbox
        Half-open box in the ORIGINAL volume's voxel coordinates, array order (Z, Y, X).
    method : str
        The localizer's name.
    confidence : float
        In [0, 1]; low values mean a human should look (e.g. nothing was found and the
        box fell back to the whole volume).
    details : dict
        Method-specific diagnostics for the report (threshold used, profiles, maps...).
    """

    bbox: Bbox
    method: str
    confidence: float = 1.0
    details: dict[str, Any] = field(default_factory=dict)


class Localizer(Protocol):
    """The one interface of every localization method."""

    name: str

    def localize(self, volume: Any) -> Localization:
        """Box the sample in a 3D array-like ``volume`` of shape (Z, Y, X)."""
        ...


def largest_component_bbox(binary: np.ndarray) -> Bbox | None:
    """Box of the largest 6-connected component of a 3D boolean array (of all of them, if
    several are as large), or ``None`` if empty."""
    return components_bbox(binary, 1.0)


def kept_components(binary: np.ndarray, min_fraction: float,
                    min_share: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The 6-connected components of ``binary`` and which to keep: those of at least
    ``min_fraction`` of the largest's size, or of at least ``min_share`` of all voxels.

    Returns ``(labels, keep)``, ``keep[label]`` True for a kept component (``keep[labels]`` is
    their mask), or ``None`` if ``binary`` is empty.
    """
    labels, n = ndimage.label(binary)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()
    if min_share > 0:
        keep |= sizes >= min_share * binary.size
    keep[0] = False
    return labels, keep


def components_bbox(binary: np.ndarray, min_fraction: float, min_share: float = 0.0) -> Bbox | None:
    """Box around every 6-connected component of at least ``min_fraction`` of the largest's
    size, or of at least ``min_share`` of all voxels.

    ``min_fraction=1`` (and ``min_share=0``) keeps only the largest (ties: all of them). A
    sample in pieces (fins cut off by the threshold, several embryos) stays whole, and a
    stray object larger than the sample (a scanner table, a lump of debris) makes the box
    too big, not wrong; ``min_share`` keeps a sample that is small beside such an object.
    ``None`` if ``binary`` is empty.
    """
    kept = kept_components(binary, min_fraction, min_share)
    if kept is None:
        return None
    labels, keep = kept
    objects = ndimage.find_objects(labels)
    sl = [objects[i - 1] for i in np.flatnonzero(keep)]
    return tuple((min(s[a].start for s in sl), max(s[a].stop for s in sl)) for a in range(3))  # type: ignore[return-value]


def resolve_device(device: str) -> Any:
    """``torch.device`` for ``"auto"`` (the GPU when there is one, else the CPU) or a device name."""
    import torch  # late: the thresholding localizers do not need torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: Arithmetic of the self-supervised localizers' network passes (``precision=``).
PRECISIONS = ("32", "bf16")


class TrainedModel:
    """Lazy loading of a training run's network for the self-supervised localizers.

    The host class provides ``model_dir``, ``which``, ``device`` and ``precision``; the
    network (eval mode), its :class:`~tomoloc.config.TrainConfig` and the device are loaded
    on first use.
    """

    _net: Any
    _config: Any
    _dev: Any

    def _autocast(self) -> Any:
        """The context the network passes run in: bfloat16 autocast for ``precision="bf16"``.

        On a CPU with AMX the sorting localizer ran twice as fast in bf16, its variance maps
        correlated at 0.99999 with float32's (BENCHMARKS.md); CPUs without AMX or AVX512-BF16
        emulate it. Float32 stays the default, so boxes do not depend on which CPU ran them.
        """
        import contextlib

        import torch

        if getattr(self, "precision", "32") == "32":  # validated by _load
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self._dev).type, dtype=torch.bfloat16)

    def _batch_size(self, cpu: int, gpu: int = 128) -> int:
        """The host's ``batch_size``, or when it is ``None`` ``cpu`` on a CPU and ``gpu`` on a
        GPU (the network passes' activations are what a CPU job's memory budget feels)."""
        size = getattr(self, "batch_size", None)
        if size is not None:
            return int(size)
        import torch

        return cpu if torch.device(self._dev).type == "cpu" else gpu

    def _load(self) -> None:
        precision = getattr(self, "precision", "32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if self._net is None:
            from pathlib import Path

            from tomoloc.checkpoints import load_model

            dev = resolve_device(self.device)  # type: ignore[attr-defined]
            self._net, self._config = load_model(Path(self.model_dir), which=self.which,  # type: ignore[attr-defined]
                                                 map_location=dev)
            self._dev = dev

    @property
    def config(self) -> Any:
        """The training config of the model (loads it)."""
        self._load()
        return self._config


def whole_volume(shape: Sequence[int]) -> Bbox:
    """The box covering the whole volume: the safe answer when nothing was found."""
    return ((0, int(shape[0])), (0, int(shape[1])), (0, int(shape[2])))


def localize_file(path: str, localizer: Localizer, keep_details: bool = False) -> BoxRecord:
    """:func:`localize_files` for one volume (the unit of work mapped over Dask workers)."""
    return localize_files([path], localizer, keep_details=keep_details)[0]


def localize_files(
    paths: Sequence[str], localizer: Localizer, on_done: Any = None, keep_details: bool = False
) -> list[BoxRecord]:
    """Run ``localizer`` on each volume file and return one box record per file, in order.

    ``on_done(path)`` is called after each volume (progress bars). Scalar details go into
    the record's extra keys; with ``keep_details`` the whole details dict is kept under
    ``extra["details"]`` (profiles for figures; remove it before writing a box file).
    Bad values are raised as :class:`tomoloc.io.VolumeError` naming the file.
    """
    from tomoloc import io  # late: io imports heavy format libraries

    records = []
    for p in paths:
        with io.open_volume(p) as vol:
            try:
                loc = localizer.localize(vol)
            except BadValuesError as exc:
                raise io.VolumeError(f"{p}: {exc}") from None
            extra = {"confidence": loc.confidence}
            extra.update({k: v for k, v in loc.details.items()
                          if isinstance(v, (int, float, str, bool, type(None)))})
            if keep_details:
                extra["details"] = loc.details
            records.append(BoxRecord(str(p), tuple(int(s) for s in vol.shape), loc.bbox, loc.method, extra))  # type: ignore[arg-type]
        if on_done is not None:
            on_done(p)
    return records
