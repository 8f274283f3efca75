"""Independent jobs at once, each in a process of its own (``benchmarks.relearn --jobs``).

A relearning run is a set of trajectories -- one model under one attack seed -- that share
nothing but their inputs. On a CPU, a small model's greedy decoding is bound by per-operation
overhead, not arithmetic, so one process keeps about one core busy whatever its thread count:
on a 2-core machine the default world run took 134.5 s warm in one process of two threads and
104.5-117.3 s as two workers of one thread each (README, "Time on 2 cores").

:class:`JobPool` runs jobs in ``spawn``-ed worker processes with a set number of torch threads
each (:func:`torch_threads` gives a job run in the main process the same); the caller decides
what may run when (a job that reuses another's step-0 measurement waits for it) and records each
result as it arrives, so an interrupted run keeps every finished job.

Workers ignore Ctrl-C: the main process handles it, stops the workers, and the run resumes
with ``--resume`` from what was recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Callable, Iterator

from benchmarks.core.errors import UsageError

logger = logging.getLogger(__name__)


def threads_per_job(total_threads: int, jobs: int) -> int:
    """The torch threads of each of ``jobs`` workers when they share ``total_threads``."""
    if jobs < 1 or total_threads < 1:
        raise UsageError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={total_threads}")
    return max(1, total_threads // jobs)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """This process's torch threads set to ``threads`` inside the block (None: unchanged), so a
    job run here computes as it would in a worker with that many threads."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker(threads: int, verbose: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    import torch

    from benchmarks.core.errors import setup_logging

    torch.set_num_threads(threads)
    setup_logging(verbose)


class JobPool:
    """``jobs`` worker processes with ``threads`` torch threads each.

    ``submit(key, fn, *args)`` starts ``fn(*args)`` in a worker (``fn`` must be importable by
    name: a module-level function); ``next_done()`` waits for any running job and returns
    ``(key, result)``, re-raising a job's exception in the main process (or returning it, for the
    classes the caller expects).
    """

    def __init__(self, jobs: int, threads: int, verbose: bool = False) -> None:
        if jobs < 2:
            raise UsageError(f"a pool needs at least 2 jobs, got {jobs}; run one job in the main process")
        self.jobs, self.threads = jobs, threads
        self._executor = ProcessPoolExecutor(
            max_workers=jobs, mp_context=get_context("spawn"),  # forking a process with torch threads is unsafe
            initializer=_start_worker, initargs=(threads, verbose),
        )
        self._running: dict[Future, Any] = {}

    def __enter__(self) -> "JobPool":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self._executor.shutdown(wait=True)
        else:
            self.stop()

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, key: Any, fn: Callable, *args) -> None:
        self._running[self._executor.submit(fn, *args)] = key

    def next_done(self, expected: tuple[type[BaseException], ...] = ()) -> tuple[Any, Any]:
        """``(key, result)`` of the next job to end; a job's error of a class in ``expected`` is
        returned as its result, any other is raised."""
        if not self._running:
            raise RuntimeError("no job is running")
        done, _ = wait(self._running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        key = self._running.pop(future)
        error = future.exception()
        if error is not None and not isinstance(error, expected):
            raise error
        return key, error if error is not None else future.result()

    def stop(self) -> None:
        """Drop queued jobs and end the workers now (what they were computing is lost; what
        the caller recorded is not)."""
        # The executor has no public way to end running workers before Python 3.14, and it
        # forgets them on shutdown: take them first.
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)


#: At most this many workers unless asked for: each is a Python process with torch and
#: transformers imported (a few hundred MB before any model), which a laptop must hold too.
MAX_DEFAULT_JOBS = 4


def default_jobs(cpu: bool, small_models: bool, trajectories: int) -> int:
    """How many jobs ``--jobs`` means when not given: on a CPU, for models small enough that a
    copy per worker fits anywhere (the embedded world's), one per core up to the number of
    trajectories and :data:`MAX_DEFAULT_JOBS`; else 1 (a GPU is one device, and copies of a
    real checkpoint could exhaust memory)."""
    if not cpu or not small_models:
        return 1
    return max(1, min(os.cpu_count() or 1, trajectories, MAX_DEFAULT_JOBS))
