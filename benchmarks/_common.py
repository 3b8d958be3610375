"""Shared by the benchmark scripts: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    """One line: CPU model, cores, OS, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        tv = f", torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        tv = ""
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{tv}")


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], BENCHMARKS_MD.parent), *sys.argv[1:]])


def update_section(title: str, body: str) -> Path:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"## {title}\n\n- machine: {machine()}\n- date: {stamp}\n- command: `{command()}`\n\n"
               f"{body.strip()}\n\n")
    pat = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pat.sub(lambda _m: section, text) if pat.search(text) else text.rstrip() + "\n\n" + section
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS_MD)
    return BENCHMARKS_MD
