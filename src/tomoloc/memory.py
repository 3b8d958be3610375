"""The peak-memory budget (``--max-memory``) and how it splits into slab sizes.

A volume is never held whole: localization reads it in blocks into a working copy of at most
256^3 float32 voxels, and cropping copies it slab by slab. What the budget has to cover is
therefore fixed by the working copy and the libraries, not by the volume:

- localization: the working copy (64 MiB), the localizer's temporaries on it (labels,
  masks, normalised copies, network batches) and one read block per thread (64 MiB shared).
  Measured with ``tracemalloc``: Otsu on a 256^3 float32 working copy peaks at 281 MiB
  including the copy, so with the read blocks :data:`LOCALIZE_RESERVE` = 384 MiB covers it;
  the self-supervised localizers work on the model's smaller working copy (128^3 by default);
- cropping, once localization is over: a slab's file pages while they are mapped, the slab as
  read, the writer's copy and the allocator's slack. On a 4 GiB volume the copy peaked about
  three slabs above where it started, so a slab is a sixth of what the process does not
  already hold (:func:`crop_slab_bytes` with :func:`resident_bytes`).

The interpreter and the libraries are part of the peak: about 50 MiB for NumPy alone (Otsu),
about 730 MiB once torch (480 MiB resident for the CUDA build, even on a CPU), torchvision
(160 MiB: it imports torch._dynamo, sympy and triton) and a model are loaded for the
self-supervised methods (localizing never imports Lightning). Between stages
:func:`release_freed` hands freed heap back, so the stages' peaks do not stack up. With Dask,
every worker process has its own budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re

from tomoloc.io import SLAB_BYTES

__all__ = ["DEFAULT_MAX_MEMORY", "LOCALIZE_RESERVE", "MIN_MAX_MEMORY", "crop_slab_bytes", "parse_size",
           "release_freed", "resident_bytes"]

#: Default ``--max-memory``: 1 GiB.
DEFAULT_MAX_MEMORY = 2**30
#: Bytes kept for localization (see the module docstring).
LOCALIZE_RESERVE = 384 * 2**20
_MIN_SLAB = 4 * 2**20
_SLAB_SHARE = 6  # a slab is this fraction of what is left (see the module docstring)
#: The smallest budget accepted: the reserve plus the minimal slabs.
MIN_MAX_MEMORY = LOCALIZE_RESERVE + _SLAB_SHARE * _MIN_SLAB

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"1G"``, ``"512M"``, ``"1.5GiB"`` or ``1073741824`` (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if m is None:
        raise ValueError(f"{text!r}: not a size (examples: 1G, 512M, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), or ``None`` elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def crop_slab_bytes(max_memory: int, in_use: int | None = None) -> int:
    """Bytes of one copying slab under a budget of ``max_memory`` bytes.

    A sixth of what the process may still take: ``max_memory`` minus ``in_use``, the
    bytes it already holds (:func:`resident_bytes` once localization is over: interpreter,
    libraries, model, figure caches), or minus :data:`LOCALIZE_RESERVE` when unknown. At most
    :data:`tomoloc.io.SLAB_BYTES` (larger slabs copy no faster), at least 4 MiB (when the
    libraries alone fill the budget, the slabs cannot make up for them).

    Raises
    ------
    ValueError
        ``max_memory`` below :data:`MIN_MAX_MEMORY`.
    """
    if max_memory < MIN_MAX_MEMORY:
        raise ValueError(f"--max-memory {max_memory / 2**20:.0f}M: below the minimum of "
                         f"{MIN_MAX_MEMORY // 2**20}M (the working copy and one slab must fit)")
    held = LOCALIZE_RESERVE if in_use is None else int(in_use)
    return int(max(_MIN_SLAB, min(SLAB_BYTES, (max_memory - held) // _SLAB_SHARE)))


def release_freed() -> None:
    """Hand memory that was freed back to the operating system (glibc's ``malloc_trim``).

    glibc keeps freed blocks in per-thread arenas, so stages that peak one after another
    (the working copy on two threads, the network's activations, the figures) stack up in
    the resident set instead of reusing one budget: on a 4 GiB volume with the sorting model
    the job held 1090 MB after localizing where 806 MB were live. A no-op without glibc.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None
