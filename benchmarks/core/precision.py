"""The precision policy for training, and the one ``Accelerator`` of the process.

Policy. Trainable weights are float32 ("master weights") and the forward/backward passes run
under bf16 autocast when ``--mixed-precision bf16`` is asked for: the matmuls get bf16 speed,
while AdamW's updates and SAM's perturbation are applied to float32 numbers. This is the
default to train 1B-7B models on GPUs. Weights loaded in bfloat16 (``--dtype bfloat16``) are
accepted for training only when nothing trainable is in bf16 (LoRA keeps its adapters in
float32), because in bf16 the updates these methods make vanish: bf16 keeps 8 bits of
mantissa, so a weight of size 0.02 moves only by steps of about 1e-4, while an lr-1e-5 AdamW
update is about 1e-5 per entry and SAM's ε (‖ε‖ = 0.01 over 7e9 entries) about 1e-7 — both
round back to the old weight and NPO+SAM would silently become NPO, or nothing. Rather than
train such a model, :func:`check_trainable` refuses with the fix. Evaluation-only work may
load bf16 weights freely.

One ``Accelerator`` per process. accelerate keeps its state (device, processes, mixed
precision) in a per-process singleton, so a second ``Accelerator`` with another precision
raises. The process therefore builds one (:func:`process_accelerator`) with accelerate's own
mixed precision off, and each training applies its precision itself, through
:class:`PrecisionView` (plain ``torch.autocast``; bf16 needs no loss scaling). A run's
trainings can so share one accelerator even where the cached world is built in float32 and
the attack runs in bf16.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from typing import Any, Iterable

import torch

from benchmarks.core.errors import UsageError

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16")

_ACCELERATOR = None


class PrecisionError(UsageError):
    """Training was asked for in a precision where its updates would be lost."""


def check_mixed_precision(name: str) -> str:
    if name not in MIXED_PRECISION:
        raise UsageError(f"unknown mixed precision {name!r}; valid: {', '.join(MIXED_PRECISION)}")
    return name


def process_accelerator():
    """The process's ``Accelerator`` (CPU, one GPU, or what ``accelerate launch`` set up),
    built on first use and shared by every training, evaluation and cache of the process."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from benchmarks.core.processes import WAIT_TIMEOUT

        # Precision is applied per training by PrecisionView; accelerate's own mixed
        # precision would be fixed for the whole process and patch every prepared model.
        # Under accelerate launch the other processes wait in collectives while the main
        # process evaluates alone (benchmarks.core.processes), hence the longer timeout.
        _ACCELERATOR = Accelerator(mixed_precision="no",
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=WAIT_TIMEOUT)])
        if _ACCELERATOR.num_processes > 1:
            from benchmarks.core.processes import close_process_group

            # Left to interpreter shutdown, gloo's worker threads can be torn down after
            # Python is gone, and the process aborts (SIGABRT, "terminate called without an
            # active exception") after its work is done and written: a failed exit status
            # for a run that succeeded. atexit runs while the interpreter is still whole.
            atexit.register(close_process_group)
        fallback = fsdp_fallback(_ACCELERATOR.distributed_type)
        if fallback:
            logger.warning("%s", fallback)
    return _ACCELERATOR


def fsdp_fallback(distributed_type, environ=None) -> str | None:
    """Why the run is not sharded although ``accelerate launch --use_fsdp`` asked for it, or
    ``None``. accelerate 1.15 reads the FSDP request only on accelerators: with CPU processes
    (``ACCELERATE_USE_CPU=1``) it starts plain data parallelism (``MULTI_CPU``), and each process
    then holds the whole model, its gradients and AdamW's moments -- the memory plan's FSDP line
    does not apply. The result file records the distributed type the run really had."""
    from benchmarks.core.env import env_flag

    asked = env_flag("ACCELERATE_USE_FSDP", environ)
    kind = str(getattr(distributed_type, "value", distributed_type))
    if not asked or kind == "FSDP":
        return None
    return (f"FSDP was asked for (ACCELERATE_USE_FSDP), but accelerate started {kind}: every process "
            "holds the whole model; FSDP needs GPU processes (accelerate does not shard CPU processes)")


def autocast(device: torch.device | str, mixed_precision: str):
    """bf16 autocast on ``device`` for ``mixed_precision == "bf16"``, else nothing."""
    check_mixed_precision(mixed_precision)
    if mixed_precision == "no":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class PrecisionView:
    """The accelerator as one training sees it: everything of ``accelerator`` (``backward``,
    ``no_sync``, ``gather``, ``num_processes``, ...), with ``autocast()`` in this training's
    precision."""

    def __init__(self, accelerator, mixed_precision: str) -> None:
        self._accelerator = accelerator
        self.mixed_precision = check_mixed_precision(mixed_precision)

    def autocast(self):
        return autocast(self._accelerator.device, self.mixed_precision)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def low_precision(params: Iterable[torch.nn.Parameter]) -> dict[torch.dtype, int]:
    """Number of trainable entries per dtype other than float32."""
    counts: dict[torch.dtype, int] = {}
    for p in params:
        if p.requires_grad and p.dtype != torch.float32:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return counts


def low_precision_reason(counts: dict[torch.dtype, int], what: str = "training") -> str:
    kinds = ", ".join(f"{n:,} {str(dtype).removeprefix('torch.')}" for dtype, n in counts.items())
    return (
        f"{what} would update {kinds} trainable weights in place, where AdamW's and SAM's small steps "
        "round away; load the model in float32 (--dtype float32) and train with --mixed-precision bf16 "
        "(float32 master weights, bf16 compute), or use --attack lora"
    )


def check_trainable(params: Iterable[torch.nn.Parameter], what: str = "training") -> None:
    """Refuse to train weights that are not float32 (see the module docstring)."""
    counts = low_precision(params)
    if counts:
        raise PrecisionError(low_precision_reason(counts, what))


def check_training_dtype(dtype: str, trains_full_weights: bool, what: str) -> None:
    """The same refusal at planning time, before any model loads: bf16/fp16 weights cannot be
    trained in full (a LoRA attack, whose adapters are float32, may use them)."""
    if trains_full_weights and dtype != "float32":
        raise PrecisionError(
            f"{what} trains every weight, and --dtype {dtype} would make its updates round away; "
            "keep --dtype float32 and add --mixed-precision bf16 (float32 master weights, bf16 compute)"
            + ("" if what.startswith("defense") else ", or use --attack lora")
        )


def precision_record(dtype: str, mixed_precision: str) -> dict[str, str]:
    """How a run's numbers were computed, for its result file."""
    return {
        "weights_dtype": dtype,
        "mixed_precision": mixed_precision,
        "trained_weights": "float32 (master weights; bf16 weights are never trained)",
        "compute": "bf16 autocast" if mixed_precision == "bf16" else dtype,
    }
