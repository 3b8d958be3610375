"""Live acquisition: ``tomoloc watch DIR --model RUN --out OUT`` crops volumes as they arrive.

A volume in ``DIR`` (any format :func:`tomoloc.io.open_volume` reads; not recursive) is
taken once it is complete:

- with ``done_marker=".done"``: once the writer has put ``<name>.done`` next to it (the
  only reliable signal; use it when the writer can make one);
- otherwise: once its size and modification time (summed over a folder for TIFF slices and
  Zarr) have not changed for ``stable_seconds`` and it opens as a valid volume, so a file
  still being written, or a writer that paused half-way, is not taken.

Each complete volume goes through the batch job (:func:`tomoloc.pipeline.run_batch`) into
``OUT``, which is the watcher's whole state: its manifest says which volumes are done, so a
restarted watcher skips them (and retries the ones that failed, once). A volume that fails
is not retried by the same watcher unless its file changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tomoloc import io
from tomoloc.pipeline import RunConfig, VolumeFailures, run_batch, write_report

__all__ = ["Watcher"]


def _signature(path: Path) -> tuple[int, int]:
    """(bytes, latest mtime in ns) of a file or a folder tree."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    size, mtime = 0, path.stat().st_mtime_ns
    for root, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return size, mtime


@dataclass
class Watcher:
    """Poll a folder and crop each new complete volume once (see the module docstring).

    Parameters
    ----------
    directory : path
        Where the acquisition writes volumes.
    out : path
        The job folder (crops, manifest.json, boxes.json, report.html); outside ``directory``
        or skipped there.
    config : RunConfig
        The job's options (a self-supervised method needs ``config.model``).
    stable_seconds : float
        How long a volume's size and time must stay unchanged (without a done-marker).
    done_marker : str, optional
        Suffix of the file a writer creates when a volume is complete, e.g. ``".done"``.
    log : callable
        Receives one line per volume (done or failed) and per volume that cannot be read.
    clock : callable
        Seconds, monotonic; tests drive :meth:`poll` with explicit times instead.
    scheduler, workers : optional
        Crop over Dask (see :func:`tomoloc.pipeline.run_batch`): the volumes that became complete
        in one scan go to the workers together. :meth:`run` keeps one cluster (or connection)
        open for the whole watch.
    """

    directory: Path
    out: Path
    config: RunConfig
    stable_seconds: float = 30.0
    done_marker: str | None = None
    log: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    scheduler: str | None = None
    workers: int | None = None
    processed: int = 0
    _client: Any = field(default=None, repr=False)
    _seen: dict[str, tuple[tuple[int, int], float]] = field(default_factory=dict)
    _given_up: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.out = Path(self.out)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such directory to watch")

    def _done(self) -> set[str]:
        man = self.out / "manifest.json"
        if not man.is_file():
            return set()
        rows = json.loads(man.read_text(encoding="utf-8")).get("volumes", [])
        return {os.path.abspath(r["volume"]) for r in rows if r.get("status") == "done"}

    def candidates(self) -> list[Path]:
        """Volumes in the folder (by suffix or folder content), hidden files and ``out`` left out."""
        found = []
        out = self.out.resolve()
        for p in sorted(self.directory.iterdir()):
            if p.name.startswith(".") or p.resolve() == out:
                continue
            if self.done_marker and p.name.endswith(self.done_marker):
                continue
            try:
                io.detect_format(p)
            except io.VolumeError:
                continue  # not a volume (a log file, a writer's ".part" file)
            found.append(p)
        return found

    def _complete(self, p: Path, now: float) -> bool:
        key = str(p.resolve())
        if self.done_marker:
            if not Path(str(p) + self.done_marker).exists():
                return False
        else:
            sig = _signature(p)
            first = self._seen.get(key)
            if first is None or first[0] != sig:
                self._seen[key] = (sig, now)
                return False
            if now - first[1] < self.stable_seconds:
                return False
        try:
            io.open_volume(p).close()
        except io.VolumeError as exc:
            sig = _signature(p)
            if self._given_up.get(key) != sig:  # one line per state of the file, not per poll
                self._given_up[key] = sig
                self.log(f"{exc} (waiting for it to change)")
            return False
        return True

    def poll(self, now: float | None = None) -> list[str]:
        """One scan: crop the volumes that became complete; return their paths.

        ``now`` replaces :attr:`clock` (tests drive the stability test with it).
        """
        now = self.clock() if now is None else now
        done = self._done()
        ready = []
        for p in self.candidates():
            path = str(p.resolve())
            if path in done:
                continue
            if self._given_up.get(path) == _signature(p):
                continue
            if self._complete(p, now):
                ready.append(path)
        if not ready:
            return []
        try:
            run_batch(ready, self.out, self.config, resume=True, log=self.log, report=False,
                      scheduler=self._client or self.scheduler, workers=None if self._client else self.workers)
        except VolumeFailures as exc:
            for line in exc.lines:
                vol = next((r for r in ready if line.startswith(r)), None)
                if vol is not None:
                    self._given_up[vol] = _signature(Path(vol)) if Path(vol).exists() else (-1, -1)
        except (io.VolumeError, OSError, ValueError) as exc:
            # Found before any work (e.g. a file replaced between the check and the job).
            self.log(f"tomoloc: error: {' '.join(str(exc).split())}")
            return []
        self.processed += len(ready)
        return ready

    def run(self, interval: float = 5.0, max_volumes: int | None = None, timeout: float | None = None,
            sleep: Callable[[float], None] = time.sleep) -> int:
        """Poll every ``interval`` seconds until ``max_volumes`` were taken or ``timeout`` passed.

        Writes ``report.html`` when it stops (also on Ctrl-C). Returns the volumes taken.
        """
        start = self.clock()
        with contextlib.ExitStack() as stack:
            if self.scheduler is not None:
                from tomoloc.cluster import dask_client

                self._client = stack.enter_context(dask_client(self.scheduler, self.workers))
                stack.callback(setattr, self, "_client", None)
            return self._loop(start, interval, max_volumes, timeout, sleep)

    def _loop(self, start: float, interval: float, max_volumes: int | None, timeout: float | None,
              sleep: Callable[[float], None]) -> int:
        try:
            while True:
                self.poll()
                if max_volumes is not None and self.processed >= max_volumes:
                    break
                if timeout is not None and self.clock() - start >= timeout:
                    break
                sleep(interval)
        except KeyboardInterrupt:
            self.log("stopped")
        finally:
            self.write_report()
        return self.processed

    def write_report(self) -> Any:
        """``report.html`` for everything in the manifest so far (nothing before the first volume)."""
        man = self.out / "manifest.json"
        if man.is_file():
            return write_report(self.out, json.loads(man.read_text(encoding="utf-8")))
        return None
