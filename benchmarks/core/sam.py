"""Sharpness-aware step on the forget loss (NPO+SAM: Fan et al., ICML 2025, "Towards LLM
Unlearning Resilient to Relearning Attacks", §4, Algorithm 1).

One optimizer step, from the micro-batches of that step:

1. ``g = ∇L_f(θ)``                          first forget pass (accumulated over all micro-batches)
2. ``ε = ρ · g / ‖g‖₂``                     :func:`perturb` (global norm over trainable parameters)
3. ``g′ = ∇L_f(θ + ε)``                     second forget pass, at the perturbed weights
4. ``θ ← saved θ``                          :func:`restore` (an exact copy, not θ + ε − ε)
5. ``g_r = ∇L_r(θ)``                        retain pass at the restored weights
6. the optimizer then steps on ``w_f · g′ + w_r · g_r`` (the loop clips and steps).

That is two forget passes and one retain pass per step (DESIGN §7) — the same shape as
SAM's ``first_step``/``second_step`` around any optimizer (Foret et al. 2021). With
``ρ = 0`` the perturbation is zero and the update is the plain one.

Gradient accumulation: the perturbation comes from the gradient accumulated over *all*
micro-batches of the step (the gradient of the step's whole batch), and the second pass again
runs over all of them, so k micro-batches behave as one k-times-larger batch (for losses that
average over examples; with equal micro-batches for any loss). Mixed precision: every forward
runs under ``accelerator.autocast()`` (bf16 compute) while the weights stay float32, so ε is
added to float32 numbers; :func:`perturb` refuses weights in bf16, where an ε of about 1e-7 per
entry at 7B would round away and NPO+SAM silently become NPO (see
``benchmarks.core.precision``). Restoration copies the saved parameters back bit for bit. Under several
processes the gradient is all-reduced once per pass, so every process perturbs by the same ε.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from benchmarks.core.precision import check_trainable

LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class Perturbation:
    """What :func:`perturb` changed, so that :func:`restore` can undo it exactly."""

    saved: list[torch.Tensor]
    grad_norm: float
    scale: float  # ε = scale · g  (scale = ρ / ‖g‖₂, or 0)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _split(output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, tuple):
        return output[0], dict(output[1])
    return output, {}


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    accelerator,
    weight: float = 1.0,
) -> tuple[float, dict[str, float]]:
    """Backpropagate ``weight · loss_fn`` over every micro-batch, each scaled by ``1/k``, adding
    into ``.grad``. Returns the mean loss (unweighted) and the mean of the loss_fn's metrics.

    Gradients are synchronised across processes only on the last micro-batch (one all-reduce
    per pass), which gives the same sum as syncing every time.
    """
    k = len(micro_batches)
    total = 0.0
    metrics: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        sync = i == k - 1
        context = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        with context:
            with accelerator.autocast():
                loss, extra = _split(loss_fn(model, batch))
            accelerator.backward(loss * (weight / k))
        total += loss.detach().float().item() / k
        for name, value in extra.items():
            metrics[name] = metrics.get(name, 0.0) + float(value) / k
    return total, metrics


def _sum_of_squares(grads: Sequence[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in grads]).sum()


def _sharded_mesh_dims(grad) -> tuple[int, ...]:
    """The mesh dimensions over which a DTensor gradient is split (FSDP2: ``Shard(0)`` on the
    data-parallel dimension); empty for a replicated one."""
    return tuple(i for i, placement in enumerate(grad.placements) if placement.is_shard())


def squared_gradient_norm(grads: Sequence[torch.Tensor], sharded: bool = False,
                          device: torch.device | None = None) -> torch.Tensor:
    """‖g‖₂² of the whole gradient, the same number on every process.

    Plain tensors are whole gradients, or, with ``sharded`` (FSDP1's flat shards), disjoint
    pieces whose squares are summed over the default process group. FSDP2's gradients are
    DTensors: each process sums the squares of its local shards and one all-reduce per mesh
    dimension they are split over adds the other processes' shards (``dist.all_reduce`` on
    the DTensor itself is not defined, and its replicated parts must not be counted twice).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return _sum_of_squares(grads, device)
    from torch.distributed.tensor import DTensor

    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = _sum_of_squares(plain, device)
    if sharded and plain and len(plain) == len(grads):
        # FSDP1. Beside DTensor shards (FSDP2), a plain gradient is one FSDP left whole.
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    # Grouped by mesh and split dimensions, in parameter order (the same on every process,
    # so the all-reduces pair up).
    groups: dict[tuple[int, tuple[int, ...]], tuple[Any, list[torch.Tensor]]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            key = (id(g.device_mesh), _sharded_mesh_dims(g))
            groups.setdefault(key, (g.device_mesh, []))[1].append(g.to_local())
    for (_, dims), (mesh, local_shards) in groups.items():
        part = _sum_of_squares(local_shards, device).to(total.device)
        for dim in dims:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        total = total + part
    return total


def gradients_are_sharded(accelerator) -> bool:
    """Whether each process holds only a plain-tensor shard of every gradient (FSDP), so that
    ‖g‖ needs a sum over processes; under DDP every process holds the whole all-reduced
    gradient, and a training the main process runs alone (``running_alone``) shards nothing.
    FSDP2's DTensor gradients say so themselves (:func:`squared_gradient_norm`)."""
    from accelerate.utils import DistributedType

    from benchmarks.core.processes import running_alone

    distributed = getattr(accelerator, "distributed_type", DistributedType.NO)
    return (distributed == DistributedType.FSDP and getattr(accelerator, "num_processes", 1) > 1
            and not running_alone())


@torch.no_grad()
def perturb(params: Sequence[torch.nn.Parameter], rho: float, sharded: bool = False) -> Perturbation:
    """SAM's ascent step: save θ, move to θ + ρ·g/‖g‖₂ using the gradient now in ``.grad``,
    and clear ``.grad`` for the second pass.

    ‖g‖₂ is the global norm over all trainable parameters (one vector, as in the paper). With
    ``sharded`` (FSDP1: each process holds a disjoint plain-tensor shard of the gradient), or
    for FSDP2's DTensor gradients, the squared norms of the shards are summed over processes
    first, so every process perturbs its shard by the same ε, the one of the whole gradient
    (:func:`squared_gradient_norm`); the shards are moved in place.
    A zero gradient (or ρ = 0) gives ε = 0 rather than a division by zero. Trainable
    parameters that are not float32 are refused (:class:`~benchmarks.core.precision.PrecisionError`).
    """
    check_trainable(params, "SAM's perturbation")
    grads = [p.grad for p in params if p.grad is not None]
    squares = squared_gradient_norm(grads, sharded, params[0].device if params else None)
    grad_norm = float(squares.sqrt())
    scale = rho / grad_norm if rho > 0 and grad_norm > 0 and math.isfinite(grad_norm) else 0.0
    saved = [p.detach().clone() for p in params]
    for p in params:
        if p.grad is None:
            continue
        if scale:
            p.add_(p.grad.float() * scale)
        p.grad.zero_()
    return Perturbation(saved=saved, grad_norm=grad_norm, scale=scale)


@torch.no_grad()
def restore(params: Sequence[torch.nn.Parameter], perturbation: Perturbation) -> None:
    """Put back the exact parameters saved by :func:`perturb` (no subtraction of ε, which
    would not round-trip in low precision)."""
    for p, saved in zip(params, perturbation.saved, strict=True):
        p.copy_(saved)


def sam_step(
    forget_loss_fn: LossFn,
    retain_loss_fn: LossFn | None = None,
    *,
    rho: float = 0.01,
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
):
    """A step function for the shared training loop (``benchmarks.core.training.train``) that
    makes the forget term sharpness-aware; the retain term is taken at the unperturbed θ.

    ``forget_loss_fn(model, micro_batch)`` and ``retain_loss_fn(model, micro_batch)`` return a
    scalar loss or ``(loss, metrics)``. The reported ``loss`` is
    ``w_f · L_f(θ) + w_r · L_r(θ)``, the objective at the unperturbed weights.
    """
    if rho < 0:
        raise ValueError(f"SAM radius rho must be >= 0, got {rho}")

    def step(model: torch.nn.Module, micro_batches: list[Any], accelerator) -> dict[str, float]:
        params = trainable_parameters(model)
        # 1. g = ∇L_f(θ): only its direction matters, so the weight is left out.
        forget_loss, metrics = accumulate_gradients(model, micro_batches, forget_loss_fn, accelerator)
        # 2. θ → θ + ε
        perturbation = perturb(params, rho, sharded=gradients_are_sharded(accelerator))
        try:
            # 3. g′ = ∇L_f(θ + ε), weighted, into the cleared .grad
            perturbed_loss, _ = accumulate_gradients(
                model, micro_batches, forget_loss_fn, accelerator, weight=forget_weight
            )
        finally:
            # 4. θ restored even if the second pass fails, so no perturbed weights leak out.
            restore(params, perturbation)
        result = {
            "forget_loss": forget_loss,
            "forget_loss_perturbed": perturbed_loss,
            "sam_grad_norm": perturbation.grad_norm,
            **metrics,
        }
        loss = forget_weight * forget_loss
        if retain_loss_fn is not None and retain_weight != 0:
            # 5. g_r = ∇L_r(θ), added to w_f · g′
            retain_loss, retain_metrics = accumulate_gradients(
                model, micro_batches, retain_loss_fn, accelerator, weight=retain_weight
            )
            result["retain_loss"] = retain_loss
            result.update(retain_metrics)
            loss += retain_weight * retain_loss
        result["loss"] = loss
        return result

    return step
