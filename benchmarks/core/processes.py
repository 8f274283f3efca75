"""Several processes under ``accelerate launch``: who trains, who measures, who writes.

Every command started as ``accelerate launch --num_processes N -m benchmarks.<command> ...``
(on CPUs: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...``; the
``--cpu`` launcher of accelerate 1.15 starts one process whatever N says) follows one rule:

- **Training runs on every process** (DDP through ``accelerator.prepare``): each process draws
  its own micro-batches (``batch_size`` per process per step), gradients are averaged across
  processes, so the optimizer sees ``N x batch_size`` examples per step (the result files
  record both), and every process holds the same weights after each step. Step losses are
  averaged across processes too, so the recorded loss curve is the global batch's and a
  non-finite loss stops every process at the same step. Reference log-likelihoods of the
  forget set are sharded and gathered (:mod:`benchmarks.core.reference`).
- **Measurement runs on the main process only**: evaluation at milestones and epochs, the
  retrain reference's PrivLeak AUC, whole-model evaluation (``benchmarks.evaluate``). Its
  inputs are the same on every process, so nothing is gained by repeating it; sharding it
  would save wall time on N GPUs at the cost of gathering every generation, which the tiny
  world does not need. The other processes wait meanwhile (in their next collective), which is
  why :func:`benchmarks.core.precision.process_accelerator` gives collectives a timeout of
  :data:`WAIT_TIMEOUT` instead of NCCL's 10 minutes.
- **Decisions and files belong to the main process**: run ids, resume state, caches (the world,
  unlearned checkpoints, attribution), result YAML, plots and printed tables. What the others
  must agree on (a run id, whether a trajectory is finished, whether a cached checkpoint
  exists, what was measured) is computed on the main process and sent to all of them
  (:func:`from_main`); a cache the others then read is written first (:func:`main_first`).
  Seeds and T/V draws are functions of the plan, so they are the same everywhere.

With one process every helper here reduces to calling the function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from datetime import timedelta
from typing import Any, Callable, TypeVar

from benchmarks.core.errors import DataError, TrainingDiverged, UsageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How many main-process-only computations (:func:`from_main`, :func:`main_only`) are running on
#: this process: inside one, the other processes are not listening, so a collective would hang.
_alone = 0

#: How long a process waits in a collective (a gradient all-reduce, a broadcast) while the main
#: process evaluates or writes alone: a MUSE-News evaluation of a 7B model at one milestone
#: takes minutes, more than NCCL's default of 10 minutes on slow or shared GPUs.
WAIT_TIMEOUT = timedelta(hours=2)

#: Errors a waiting process re-raises as they were raised on the main process (same class and
#: message, so every process exits with the same status); any other becomes a RuntimeError.
_FORWARDED = {cls.__name__: cls for cls in (UsageError, DataError, TrainingDiverged, KeyboardInterrupt)}


def _accelerator():
    from benchmarks.core.precision import process_accelerator

    return process_accelerator()


def world_size() -> int:
    """Processes of this run (1 without ``accelerate launch``)."""
    return _accelerator().num_processes


def is_main() -> bool:
    """Whether this is the process that measures and writes."""
    return _accelerator().is_main_process


def running_alone() -> bool:
    """Whether this process is computing on its own while the others wait (inside
    :func:`from_main` or :func:`main_only` under ``accelerate launch``): a training started
    here (the world built on first use, say) must then run as one process, without DDP."""
    return _alone > 0


@contextlib.contextmanager
def _on_its_own():
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def quiet_other_processes() -> None:
    """Only the main process logs at INFO; the others keep warnings and errors."""
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` on the main process; its value (or its error) reaches every process.

    The value must pickle. An error on the main process is raised on every process: as its own
    class for usage errors, divergence and interruption (so all exit alike), else as a
    ``RuntimeError`` naming it; the others never wait for a value that will not come.
    """
    accelerator = _accelerator()
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            with _on_its_own():
                box[0] = ("value", compute())
        except BaseException as err:  # noqa: BLE001 -- forwarded, then re-raised below
            error = err
            box[0] = ("error", type(err).__name__, str(err))
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        _, name, message = box[0]
        cls = _FORWARDED.get(name)
        if cls is None:
            raise RuntimeError(f"the main process failed: {name}: {message}")
        raise cls(message)
    return box[0][1]


def main_first(compute: Callable[[], T]) -> T:
    """``compute()`` on the main process first, then on the others (which see what it wrote:
    an installed world, a downloaded data set, a cache); each process returns its own value.
    An error on the main process reaches the others before they start."""
    kept: list[T] = []
    from_main(lambda: kept.append(compute()))  # only "done" (or the error) is sent
    return kept[0] if kept else compute()


def main_only(function: Callable[..., None]) -> Callable[..., None]:
    """``function`` run on the main process only (a training hook that measures or saves);
    elsewhere a no-op."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs) -> None:
        if is_main():
            with _on_its_own() if world_size() > 1 else contextlib.nullcontext():
                function(*args, **kwargs)

    return wrapped


def wait_for_everyone() -> None:
    _accelerator().wait_for_everyone()


def close_process_group() -> bool:
    """Destroy the default process group, if there is one (at exit, on every process; see
    :func:`benchmarks.core.precision.process_accelerator`). Local to this process, not a
    collective, so it is safe on an error path where the others may already be gone.
    Returns whether there was a group to destroy.

    Destroying the group only drops torch's own handle to it: a DDP wrapper (and its gradient
    reducer) keeps the gloo group alive, and a wrapper can sit in a reference cycle (seen: after
    a backward pass in a fresh process, dropping its last name did not free it), which
    interpreter shutdown may leave to the very end. The group would then be torn down with the
    interpreter half gone, when gloo's threads can abort the process (SIGABRT) after its work is
    written. Collecting the cycles first, while Python is whole, lets the destruction below drop
    the group's last reference here instead."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    gc.collect()
    dist.destroy_process_group()
    return True


def processes_record(batch_size: int, micro_batch_size: int | None = None,
                     eval_batch_size: int | None = None) -> dict[str, Any]:
    """How many processes trained and the batch sizes that follow, for a result file: each
    process draws ``batch_size`` examples per optimizer step (in micro-batches of
    ``micro_batch_size``), so the optimizer sees ``world_size`` times as many; evaluation ran
    on the main process alone, in batches of ``eval_batch_size``."""
    accelerator = _accelerator()
    kind = accelerator.distributed_type
    record: dict[str, Any] = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(getattr(kind, "value", kind)),
        "batch_size_per_process": batch_size,
    }
    if micro_batch_size is not None:
        record.update(micro_batch_size=micro_batch_size, gradient_accumulation=batch_size // micro_batch_size)
    record["global_batch_size"] = batch_size * accelerator.num_processes
    if eval_batch_size is not None:
        record["evaluation"] = {"processes": "main process only", "batch_size": eval_batch_size}
    return record
