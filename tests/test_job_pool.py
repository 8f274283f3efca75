"""Jobs in worker processes (``--jobs``): how many, with how many threads, results and errors
back in the main process."""

from __future__ import annotations

import math

import pytest

from benchmarks.core.errors import UsageError
from benchmarks.core.job_pool import MAX_DEFAULT_JOBS, JobPool, default_jobs, threads_per_job


def test_threads_are_shared_among_the_jobs():
    assert threads_per_job(2, 2) == 1
    assert threads_per_job(8, 3) == 2
    assert threads_per_job(1, 4) == 1  # never none
    with pytest.raises(UsageError, match="jobs=0"):
        threads_per_job(2, 0)


def test_workers_by_default_only_for_small_models_on_a_cpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_jobs(cpu=True, small_models=True, trajectories=12) == MAX_DEFAULT_JOBS
    assert default_jobs(cpu=True, small_models=True, trajectories=3) == 3
    assert default_jobs(cpu=False, small_models=True, trajectories=12) == 1
    assert default_jobs(cpu=True, small_models=False, trajectories=12) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs(cpu=True, small_models=True, trajectories=12) == 2


@pytest.mark.slow
def test_a_pool_returns_each_result_with_its_key_and_raises_a_jobs_error():
    with JobPool(2, threads=1) as pool:
        for n in (5, 6, 7):
            pool.submit(f"{n}!", math.factorial, n)
        results = dict(pool.next_done() for _ in range(3))
        assert results == {"5!": 120, "6!": 720, "7!": 5040}
        pool.submit("bad", math.factorial, -1)
        with pytest.raises(ValueError, match="negative"):
            pool.next_done()
    with pytest.raises(UsageError, match="at least 2 jobs"):
        JobPool(1, threads=1)


@pytest.mark.slow
def test_an_error_in_the_main_process_ends_the_running_workers():
    import time

    with pytest.raises(KeyboardInterrupt):
        with JobPool(2, threads=1) as pool:
            pool.submit("long", time.sleep, 120)
            workers = list(pool._executor._processes.values())  # started by the first submit
            raise KeyboardInterrupt
    # The executor's own thread may reap a worker at the same moment, which can leave is_alive()
    # a moment behind: wait a little (a worker that was not ended would sleep on for minutes).
    deadline = time.monotonic() + 10
    while any(worker.is_alive() for worker in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not any(worker.is_alive() for worker in workers)
