"""The peak-memory budget (``--max-memory``) and how it splits into slab sizes.

A volume is never held whole: localization reads it in blocks into a working copy of at most
256^3 float32 voxels, and cropping copies it slab by slab. What the budget has to cover is
therefore fixed by the working copy, not by the volume:

- localization: the working copy (64 MiB), the localizer's temporaries on it (labels,
  masks, normalised copies, network batches) and one read block (at most 64 MiB).
  Measured with ``tracemalloc``: Otsu on a 256^3 float32 working copy peaks at 281 MiB
  including the copy, so with the read block :data:`LOCALIZE_RESERVE` = 384 MiB covers it;
  the self-supervised localizers work on the model's smaller working copy (128^3 by default);
- cropping: one slab as read, its cast copy, the writer's buffer and the previous slab (still
  being hashed on a background thread), so a slab is at most a quarter of what is left.

The interpreter and the libraries come on top: about 50 MiB for NumPy alone (Otsu), about
770 MiB once torch (500 MiB resident for the CUDA build, even on a CPU), torchvision and a
model are loaded for the self-supervised methods (localizing never imports Lightning). With Dask, every worker process has its own budget.
"""

from __future__ import annotations

import re

from tomoloc.io import SLAB_BYTES

__all__ = ["DEFAULT_MAX_MEMORY", "LOCALIZE_RESERVE", "MIN_MAX_MEMORY", "crop_slab_bytes", "parse_size"]

#: Default ``--max-memory``: 1 GiB.
DEFAULT_MAX_MEMORY = 2**30
#: Bytes kept for localization (see the module docstring).
LOCALIZE_RESERVE = 384 * 2**20
_MIN_SLAB = 4 * 2**20
#: The smallest budget accepted: the reserve plus four minimal slabs.
MIN_MAX_MEMORY = LOCALIZE_RESERVE + 4 * _MIN_SLAB

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"1G"``, ``"512M"``, ``"1.5GiB"`` or ``1073741824`` (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if m is None:
        raise ValueError(f"{text!r}: not a size (examples: 1G, 512M, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def crop_slab_bytes(max_memory: int) -> int:
    """Bytes of one copying slab under a budget of ``max_memory`` bytes.

    At most :data:`tomoloc.io.SLAB_BYTES` (larger slabs copy no faster), at most a quarter
    of what the localization reserve leaves.

    Raises
    ------
    ValueError
        ``max_memory`` below :data:`MIN_MAX_MEMORY`.
    """
    if max_memory < MIN_MAX_MEMORY:
        raise ValueError(f"--max-memory {max_memory / 2**20:.0f}M: below the minimum of "
                         f"{MIN_MAX_MEMORY // 2**20}M (the working copy and one slab must fit)")
    return int(min(SLAB_BYTES, (max_memory - LOCALIZE_RESERVE) // 4))
