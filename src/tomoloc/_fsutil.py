"""Atomic output: write to a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, create: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary lives in the same directory so the final ``os.replace`` is atomic on
    POSIX file systems. On any exception the temporary is removed and ``path`` is left
    untouched, so a failed run leaves no partial output.

    Parameters
    ----------
    path : path-like
        Final destination (file, or directory when ``directory=True``).
    directory : bool
        Create the temporary as an empty directory (for TIFF-slice folders and Zarr stores).
    create : bool
        Create the temporary file (empty). ``False`` only reserves a unique name: the writer
        creates the file itself, exclusively (``open(tmp, "xb")``). On ext4, opening an
        existing file for writing truncates it, and a file truncated to zero is flushed to
        disk on close (``auto_da_alloc``): writing a 3.5 GB crop that way took 2.0-2.5 s plus
        0.8-1.1 s at close, against 1.1 s creating the file anew.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        if not create:
            tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # A directory cannot be replaced atomically; move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
