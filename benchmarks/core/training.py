"""The one training loop: defenses and attacks both run through :func:`train`.

The loop is flat and short on purpose (in the spirit of torchtune and nanochat): seed, build
AdamW and a schedule, let ``accelerate`` place everything (so ``accelerate launch`` spreads a
run over processes or GPUs unchanged), then for each optimizer step hand the step's
micro-batches to a *step function*, clip, step, and call the evaluation hook.

The step function owns the forward/backward passes. That keeps method-specific mechanics out
of the loop: a plain step (:func:`plain_step`) backpropagates one loss; the SAM step
(``benchmarks.core.sam``) needs two forget passes around a weight perturbation and so must
see all micro-batches of a step at once.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from benchmarks.core.errors import TrainingDiverged, UsageError
from benchmarks.core.precision import MIXED_PRECISION, PrecisionView, check_trainable, process_accelerator

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")

StepFn = Callable[[torch.nn.Module, list, Any], dict]
Hook = Callable[[int, torch.nn.Module], None]
EpochHook = Callable[[int, int, torch.nn.Module], None]
StateHook = Callable[[int, dict], None]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every defense and attack."""

    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate (peak, after warmup)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the data; ignored when max_steps is set."})
    max_steps: int | None = field(default=None, metadata={"help": "Number of optimizer steps; cycles the data as needed."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str = field(default="no", metadata={"help": "'no' (fp32) or 'bf16' autocast."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Global gradient-norm clip; None disables."})
    schedule: str = field(default="constant", metadata={"help": "Learning-rate schedule: constant, linear or cosine."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps before the schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for torch, numpy and python RNGs."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar when stderr is a terminal."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each layer's activations in the backward pass instead of keeping them "
                          "(less memory, about a third more compute; the same numbers)."},
    )

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate must be > 0, got lr={self.lr}; pass e.g. --lr 1e-5")
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.max_steps}")
        if self.grad_accum < 1:
            raise UsageError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(
                f"unknown mixed precision {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UsageError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)


def make_accelerator(config: TrainConfig | None = None):
    """The process's one ``Accelerator`` (see :mod:`benchmarks.core.precision`); a training's
    precision is its ``TrainConfig.mixed_precision``, applied by :func:`train`."""
    return process_accelerator()


def plain_step(loss_fn: Callable) -> StepFn:
    """Step function for one differentiable loss: ``loss_fn(model, batch)`` returns a scalar
    tensor or ``(tensor, {name: float})``. Each micro-batch loss is divided by the number of
    micro-batches, so accumulating k equal micro-batches equals one k-times batch."""

    def step(model: torch.nn.Module, micro_batches: list, accelerator) -> dict:
        total = 0.0
        extra: dict[str, float] = {}
        for batch in micro_batches:
            with accelerator.autocast():
                out = loss_fn(model, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            accelerator.backward(loss / len(micro_batches))
            total += loss.detach().float().item() / len(micro_batches)
            for name, value in metrics.items():
                extra[name] = extra.get(name, 0.0) + float(value) / len(micro_batches)
        return {"loss": total, **extra}

    return step


def _make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


def _groups(loader: Iterable, size: int, max_steps: int | None, epochs: int):
    """Yield ``(epoch, is_last_group_of_epoch, micro_batches)`` until the budget is spent."""
    steps = 0
    epoch = 0
    while True:
        group: list = []
        # A dataset that pairs examples per epoch (unlearning's forget/retain pairs) learns
        # which epoch this is; accelerate's prepared loaders keep the dataset as ``.dataset``.
        set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        iterator = iter(loader)
        batch = next(iterator, None)
        while batch is not None:
            group.append(batch)
            nxt = next(iterator, None)
            if len(group) == size or nxt is None:
                yield epoch, nxt is None, group
                steps += 1
                group = []
                if max_steps is not None and steps >= max_steps:
                    return
            batch = nxt
        if steps == 0:
            raise UsageError("the training data is empty; check the split and --max-length")
        epoch += 1
        if max_steps is None and epoch >= epochs:
            return


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    return math.ceil(num_micro_batches / grad_accum)


def rng_state() -> dict:
    """Every random state a step can draw from (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    model: torch.nn.Module,
    batches,
    step_fn: StepFn,
    config: TrainConfig,
    *,
    hook: Hook | None = None,
    hook_steps: Sequence[int] = (),
    epoch_hook: EpochHook | None = None,
    accelerator=None,
    params: Iterable[torch.nn.Parameter] | None = None,
    state_hook: StateHook | None = None,
    resume_state: dict | None = None,
) -> TrainResult:
    """Optimise ``model`` with AdamW over ``batches`` (a DataLoader of micro-batches).

    ``hook(step, model)`` runs at step 0 (before any update) when 0 is in ``hook_steps`` and
    after every optimizer step whose count is in ``hook_steps``; ``epoch_hook(epoch, step,
    model)`` runs after the last step of every epoch. Hooks get the unwrapped model and the
    model is back in train mode after them. A non-finite loss raises
    :class:`TrainingDiverged` naming the step.

    Under ``accelerate launch`` the loop runs on every process (DDP) and so do the hooks:
    those that measure or write wrap themselves in
    :func:`benchmarks.core.processes.main_only` (the weights are the same on every process).
    Step metrics are averaged over the processes before they are checked and recorded. A
    training started by the main process alone while the others wait (inside
    :func:`benchmarks.core.processes.from_main`: the world built on first use) runs as one
    process: nothing is prepared for DDP and nothing is reduced, as no other process listens.

    Resuming: ``state_hook(step, state)`` runs last at every step in ``hook_steps`` with the
    loop's state (step count, optimizer, scheduler, RNG states, history); passing such a
    ``state`` back as ``resume_state`` (with the model's weights restored by the caller)
    continues from that step exactly as the uninterrupted run would have: the consumed
    micro-batches are skipped without computing anything, which presumes ``batches`` yields
    the same order on every pass (no sampler drawing from the global RNG).
    """
    from accelerate.utils import set_seed

    accelerator = accelerator or process_accelerator()
    # Under accelerate launch each process draws its own dropout masks (seed + process index,
    # as one process drawing for more examples would); with one process this is set_seed(seed).
    set_seed(config.seed + accelerator.process_index)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise UsageError("the model has no trainable parameters")
    check_trainable(trainable)  # float32 master weights, or a one-line refusal
    checkpointing = config.gradient_checkpointing and bool(getattr(model, "supports_gradient_checkpointing", False))
    if config.gradient_checkpointing and not checkpointing:
        raise UsageError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
    if checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA's frozen
        # embeddings) and composes with autocast and SAM's two passes.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    from benchmarks.core.processes import running_alone

    try:
        return _train(model, batches, step_fn, config, trainable, PrecisionView(accelerator, config.mixed_precision),
                      hook=hook, hook_steps=hook_steps, epoch_hook=epoch_hook, state_hook=state_hook,
                      resume_state=resume_state, alone=running_alone())
    finally:
        # The accelerator outlives this training: drop its references to what was prepared
        # here, or every model a run trains would stay in memory.
        accelerator.free_memory()
        if checkpointing:
            model.activation_checkpointing_disable()


def _mean_over_processes(metrics: dict, accelerator) -> dict:
    """A step's metrics averaged over the processes of ``accelerate launch``: the loss of the
    global batch (what one process with all of it would report, when the per-process batches
    weigh the same), and one value on every process, so that a non-finite loss anywhere stops
    all of them at the same step rather than leaving the others waiting in an all-reduce."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    names = [name for name, value in metrics.items() if isinstance(value, (int, float))]
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=accelerator.device)
    averaged = accelerator.reduce(values, reduction="mean").tolist()
    return {**metrics, **dict(zip(names, averaged))}


def _train(model, batches, step_fn, config, trainable, accelerator, *, hook, hook_steps, epoch_hook, state_hook,
           resume_state, alone: bool = False) -> TrainResult:
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if alone:
        model.to(accelerator.device)  # one process on its own: no DDP, whose set-up is collective
    else:
        model, optimizer, batches = accelerator.prepare(model, optimizer, batches)
        # FSDP2 replaces every parameter by a sharded DTensor one (and accelerate points the
        # optimizer at those): the clip below must see the new ones, not the list taken before.
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if config.max_steps is not None:
        total_steps = config.max_steps
    else:
        total_steps = config.epochs * steps_per_epoch(len(batches), config.grad_accum)
    scheduler = _make_scheduler(optimizer, config, total_steps)
    start = 0
    if resume_state is not None:
        start = int(resume_state["step"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    wanted = set(hook_steps)
    unwrapped = accelerator.unwrap_model(model)

    def call_hook(step: int) -> None:
        if hook is not None and step in wanted:
            unwrapped.eval()
            with torch.no_grad():
                hook(step, unwrapped)
            unwrapped.train()

    show = config.progress and sys.stderr.isatty() and accelerator.is_main_process
    bar = tqdm(total=total_steps, initial=start, disable=not show, desc="train", leave=False)
    result = TrainResult(steps=start, history=list(resume_state["history"]) if resume_state else [])
    model.train()
    if resume_state is None:
        call_hook(0)
    groups = _groups(batches, config.grad_accum, config.max_steps, config.epochs)
    for _ in range(start):  # a resumed run skips what it already consumed
        next(groups)
    if resume_state is not None:
        set_rng_state(resume_state["rng"])
    for epoch, epoch_done, micro_batches in groups:
        if alone:  # what a prepared loader would have done
            from accelerate.utils import send_to_device

            micro_batches = [send_to_device(batch, accelerator.device) for batch in micro_batches]
        metrics = step_fn(model, micro_batches, accelerator)
        if not alone:
            metrics = _mean_over_processes(metrics, accelerator)
        loss = metrics.get("loss")
        if loss is None or not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {result.steps + 1} (epoch {epoch + 1}); "
                "lower --lr, or use --mixed-precision no"
            )
        if config.max_grad_norm is not None:
            metrics["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps += 1
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["step"] = result.steps
        metrics["epoch"] = epoch + 1
        result.history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        logger.debug("step %d: %s", result.steps, metrics)
        call_hook(result.steps)
        if epoch_done and epoch_hook is not None:
            unwrapped.eval()
            with torch.no_grad():
                epoch_hook(epoch + 1, result.steps, unwrapped)
            unwrapped.train()
        if state_hook is not None and result.steps in wanted:
            state_hook(result.steps, {
                "step": result.steps,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "history": list(result.history),
            })
    bar.close()
    model.eval()
    return result
