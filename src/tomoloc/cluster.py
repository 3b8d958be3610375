"""Mapping per-volume work over this process or a Dask distributed cluster.

``--scheduler local`` starts a :class:`distributed.LocalCluster` of worker *processes* with
one Dask thread each; NumPy and torch inside a worker get ``cores // workers`` threads
(several processes also give several budgets of ``--max-memory``). ``--scheduler HOST:PORT`` (or
``tcp://HOST:PORT``) joins a running scheduler: its workers must see the volumes and the
output folder under the same paths and have tomoloc installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

__all__ = ["attempt_twice", "dask_client", "default_workers", "local_threads", "map_unordered"]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_ENV_VARS = (*_THREAD_VARS, "MALLOC_TRIM_THRESHOLD_")


def default_workers() -> int:
    """Worker processes of ``--scheduler local`` when ``--workers`` is not given: the CPU count."""
    return max(1, os.cpu_count() or 1)


def local_threads(cap: int = 4) -> int:
    """Threads this process may use for its own NumPy work (at most ``cap``).

    ``OMP_NUM_THREADS`` when set: a local Dask worker's share of the cores (see
    :func:`dask_client`), or the user's own limit. Otherwise the CPU count. The cap: past a
    few threads, reading and averaging slabs is bound by memory bandwidth.
    """
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        n = default_workers()
    return max(1, min(cap, n))


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int | None = None) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler`` (``"local"`` or an address), closed on exit.

    ``workers`` sizes a local cluster (default :func:`default_workers`); it must not be given
    with an address, whose cluster has the workers it has.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler == "local":
        n = workers or default_workers()
        # Dask starts workers with OMP_NUM_THREADS=1, which leaves torch one thread: with one
        # worker on 2 cores the sorting localizer took 36 s a volume instead of 14 s. Share
        # the cores among the workers instead (a value the user exported wins).
        # Dask also sets MALLOC_TRIM_THRESHOLD_=65536, which made glibc map and unmap every
        # large NumPy array afresh: the same sorting job took 25.7 s instead of 18.6 s (for
        # 0.1 GB less peak memory); tomoloc bounds its memory itself, so glibc's default is kept.
        threads = str(max(1, default_workers() // n))
        saved = {k: os.environ.get(k) for k in _ENV_VARS}
        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
                   **{k: v or threads for k, v in saved.items() if k in _THREAD_VARS},
                   "MALLOC_TRIM_THRESHOLD_": saved["MALLOC_TRIM_THRESHOLD_"]}
        try:
            # No dashboard: a second job on the same machine must not fight over port 8787.
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
                    LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                 silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                yield client
        finally:
            # The nanny writes these into this process's environment before spawning; put
            # them back so that they do not pass for the user's own settings next time.
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        if workers is not None:
            raise ValueError("--workers sizes a local cluster; a running scheduler has its own workers")
        with Client(scheduler, timeout="30s") as client:
            yield client


def map_unordered(fn: Callable[..., Any], items: Sequence[Any], *args: Any, client: Any = None,
                  **kwargs: Any) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(items[index], *args, **kwargs))`` as each call finishes.

    With ``client`` None the calls run here, in order; otherwise they are submitted to the
    Dask ``client`` and come back in completion order. A call that raises (or whose worker
    died, after Dask's own re-scheduling) yields its exception instead of a result, so one
    bad volume never stops the others.
    """
    if client is None:
        for i, item in enumerate(items):
            try:
                yield i, fn(item, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported per volume by the caller
                yield i, exc
        return
    from distributed import as_completed

    # pure=False: a rerun of the same volume is new work, never a cached result.
    futures = {client.submit(fn, item, *args, pure=False, **kwargs): i for i, item in enumerate(items)}
    for fut in as_completed(futures):
        i = futures[fut]
        try:
            yield i, fut.result()
        except Exception as exc:  # noqa: BLE001
            yield i, exc
        finally:
            fut.release()


def attempt_twice(item: Any, fn: Callable[..., Any], *args: Any,
                  permanent: tuple[type[BaseException], ...] = (), **kwargs: Any) -> tuple[Any, int]:
    """``(fn(item, *args, **kwargs), attempts)``, tried a second time after an error.

    ``item`` comes first, as :func:`map_unordered` passes it. Never raises an ``Exception``: after a second failure, or a first one of a type in
    ``permanent`` (bad values that a second read would find again), the exception is
    returned in place of the result. Runs where ``fn`` runs (in a Dask worker, the retry
    happens there, on the worker's own copy of the inputs).
    """
    for attempt in (1, 2):
        try:
            return fn(item, *args, **kwargs), attempt
        except permanent as exc:
            return exc, attempt
        except Exception as exc:  # noqa: BLE001 - reported per volume by the caller
            if attempt == 2:
                return exc, attempt
    raise AssertionError("unreachable")
