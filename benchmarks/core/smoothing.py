"""Smoothness optimisation of the forget loss beyond SAM (Fan et al., ICML 2025, "Towards LLM
Unlearning Resilient to Relearning Attacks: A Sharpness-Aware Minimization Perspective and
Beyond", §5): the shared mechanics of the ``npo_rs``, ``npo_gp``, ``npo_cr`` and ``npo_wa``
defenses. Each piece is a pure function or a small class over a model's trainable parameters;
the defenses (``defenses/``) only choose and combine them.

* :func:`smoothed_step` -- randomized smoothing: the forget gradient averaged over ``k``
  Gaussian weight perturbations, ``(1/k) Σ_i ∇L_f(θ + δ_i)``, ``δ_i ~ N(0, σ² I)``: an
  unbiased estimate of ``∇ E_δ[L_f(θ + δ)]``.
* :func:`gradient_norm_penalty` -- ``‖∇L_f(θ)‖₂²`` as a differentiable tensor (double backward).
* :func:`curvature_penalty` -- CURE's finite-difference curvature penalty
  ``‖∇L_f(θ + h·z) − ∇L_f(θ)‖₂²`` in weight space, differentiable in θ.
* :class:`WeightAverage` -- the running mean of the weights along the trajectory.

The two penalties take gradients of gradients. PyTorch's fused CPU/flash attention kernels have
no second derivative, so the forward passes behind them run under
:func:`twice_differentiable_attention`, which selects the composite ("math") implementation of
``scaled_dot_product_attention``; a model loaded with another attention implementation
(e.g. flash-attention-2) must be loaded with ``sdpa`` or ``eager`` for these defenses.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch

from benchmarks.core.sam import Perturbation, accumulate_gradients, restore, trainable_parameters

LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


# --------------------------------------------------------------------------- randomized smoothing


@torch.no_grad()
def gaussian_perturb(params: Sequence[torch.nn.Parameter], sigma: float) -> Perturbation:
    """Save θ and move to θ + δ, δ ~ N(0, σ² I) drawn from the global torch RNG (seeded by the
    training loop, so every process of a run draws the same δ). With σ = 0 the weights are left
    exactly as they are (nothing is drawn)."""
    saved = [p.detach().clone() for p in params]
    if sigma > 0:
        for p in params:
            # Drawn in float32 and added in the parameter's own dtype, as SAM's ε is.
            noise = torch.randn(p.shape, device=p.device, dtype=torch.float32) * sigma
            p.add_(noise.to(p.dtype))
    return Perturbation(saved=saved, grad_norm=0.0, scale=sigma)


def smoothed_step(
    forget_loss_fn: LossFn,
    retain_loss_fn: LossFn | None = None,
    *,
    sigma: float,
    samples: int,
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
):
    """Step function (``benchmarks.core.training.train``) for randomized smoothing of the forget
    loss: for each of ``samples`` draws, θ → θ + δ_i, backpropagate ``(w_f / k) · L_f`` over all
    micro-batches of the step, restore θ exactly; then the retain gradient at θ.

    That is ``k`` forget passes and one retain pass per step. The reported ``forget_loss`` is the
    mean of the perturbed losses, the Monte-Carlo value of the smoothed objective
    ``E_δ[L_f(θ + δ)]`` that this step descends.
    """
    if samples < 1:
        raise ValueError(f"randomized smoothing needs samples >= 1, got {samples}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"randomized smoothing needs a finite sigma >= 0, got {sigma}")

    def step(model: torch.nn.Module, micro_batches: list[Any], accelerator) -> dict[str, float]:
        params = trainable_parameters(model)
        forget_loss = 0.0
        metrics: dict[str, float] = {}
        for _ in range(samples):
            perturbation = gaussian_perturb(params, sigma)
            try:
                # Gradients add up in .grad across the k draws: the mean needs weight w_f / k.
                loss, extra = accumulate_gradients(
                    model, micro_batches, forget_loss_fn, accelerator, weight=forget_weight / samples
                )
            finally:
                restore(params, perturbation)
            forget_loss += loss / samples
            for name, value in extra.items():
                metrics[name] = metrics.get(name, 0.0) + value / samples
        result = {"forget_loss": forget_loss, **metrics}
        total = forget_weight * forget_loss
        if retain_loss_fn is not None and retain_weight != 0:
            retain_loss, retain_metrics = accumulate_gradients(
                model, micro_batches, retain_loss_fn, accelerator, weight=retain_weight
            )
            result["retain_loss"] = retain_loss
            result.update(retain_metrics)
            total += retain_weight * retain_loss
        result["loss"] = total
        return result

    return step


# --------------------------------------------------------------------------- gradient penalties


def twice_differentiable_attention():
    """Context in which ``scaled_dot_product_attention`` uses its composite implementation,
    whose backward is itself differentiable (the fused kernels raise "derivative ... is not
    implemented" on a second backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.core.logprobs import twice_differentiable_logps

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    stack.enter_context(twice_differentiable_logps())  # and token log-probabilities likewise
    return stack


def gradient_norm_penalty(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖∇_θ loss‖₂²`` over ``params`` as a tensor that stays on the autograd graph, so that
    backpropagating it gives ``2 · H · ∇loss`` (Hessian-vector product by double backward).

    Unused parameters contribute zero. The sum is accumulated in float32 (float64 for float64 gradients).
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    return _squared_norm(grads)


def _squared_norm(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    terms = [t.to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum() for t in tensors if t is not None]
    if not terms:
        raise ValueError("no gradient reaches the parameters; nothing to penalise")
    return torch.stack(terms).sum()


def curvature_penalty(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    h: float,
    loss: torch.Tensor | None = None,
    direction: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CURE's curvature penalty (Moosavi-Dezfooli et al., CVPR 2019, "Robustness via Curvature
    Regularization, and Vice Versa", Eq. 6) applied to the weights, as Fan et al. (2025, §5) use
    it on the forget loss:

        R(θ) = ‖∇L(θ + h·z) − ∇L(θ)‖₂²,    z = sign(∇L(θ)) / ‖sign(∇L(θ))‖₂

    a finite-difference estimate of ``h² · ‖H z‖²``: large where the loss curves sharply along
    its own ascent direction. As in CURE, ``z`` is a constant (no gradient flows through the sign);
    both gradients are taken with ``create_graph=True``, so ``∂R/∂θ`` flows through each of them.
    The shifted point is evaluated functionally (``torch.func.functional_call`` with θ + h·z as
    the weights), so the parameters themselves are never modified in place.

    ``loss_fn(module)`` computes the loss with the given module; ``loss`` may pass its value at
    θ if already computed; ``direction`` may fix z (one unit-norm tensor per trainable
    parameter) instead of taking it from the gradient's sign. Returns ``(R, loss at θ)``.
    """
    from torch.func import functional_call

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if loss is None:
        loss = loss_fn(model)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    if direction is None:
        signs = [torch.sign(g.detach()) for g in grads]
        count = sum(float(s.abs().sum()) for s in signs)
        if count == 0:  # a zero gradient has no direction: no curvature to measure along it
            return loss.new_zeros(()), loss
        direction = [s / math.sqrt(count) for s in signs]
    shifted = {name: p + h * z.to(p.dtype) for (name, p), z in zip(named, direction, strict=True)}
    # Buffers and frozen parameters keep their values; only the trainable ones move.
    shifted_loss = loss_fn(_Functional(model, shifted, functional_call))
    shifted_grads = torch.autograd.grad(shifted_loss, list(shifted.values()), create_graph=True, allow_unused=True)
    diffs = [
        (gs if gs is not None else torch.zeros_like(g)) - g for gs, g in zip(shifted_grads, grads)
    ]
    return _squared_norm(diffs), loss


class _Functional(torch.nn.Module):
    """``model`` called with some parameters replaced by tensors (keeps the autograd graph)."""

    def __init__(self, model: torch.nn.Module, replaced: dict[str, torch.Tensor], functional_call) -> None:
        super().__init__()
        self._model = [model]  # a list, so the model is not registered as a submodule
        self._replaced = replaced
        self._call = functional_call

    def forward(self, *args, **kwargs):
        return self._call(self._model[0], self._replaced, args, kwargs, strict=False)


def _split(output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, tuple):
        return output[0], dict(output[1])
    return output, {}


def penalty_loss(forget_loss_fn: LossFn, penalty: Callable, weight: float) -> LossFn:
    """A forget loss with a differentiable penalty added: ``L_f + weight · R``, where
    ``penalty(model, batch, loss_value) -> R`` builds R on the autograd graph. Metrics carry the
    plain forget loss and the penalty."""

    def loss_fn(model, batch):
        if weight == 0:  # no penalty: the plain loss, without the second-order graph
            return forget_loss_fn(model, batch)
        with twice_differentiable_attention():
            loss, metrics = _split(forget_loss_fn(model, batch))
            value = penalty(model, batch, loss)
        metrics = {**metrics, "forget_loss_plain": float(loss.detach()), "penalty": float(value.detach())}
        return loss + weight * value, metrics

    return loss_fn


def single_process(step, name: str):
    """``step`` that refuses to run under several processes: DDP reduces gradients in its
    backward hooks, which ``torch.autograd.grad`` (the penalties' first gradient) bypasses."""

    def checked(model, micro_batches, accelerator):
        if getattr(accelerator, "num_processes", 1) > 1:
            from benchmarks.core.errors import UsageError

            raise UsageError(f"{name} differentiates gradients (double backward), which DDP does not support; "
                             "run it in one process")
        return step(model, micro_batches, accelerator)

    return checked


# --------------------------------------------------------------------------- weight averaging


class WeightAverage:
    """The running mean of the trainable weights at chosen points of a trajectory.

    ``θ̄ = (1/n) Σ_j θ_{s_j}`` over the steps ``s_j = start, start + every, ...`` reached so far,
    where ``θ_s`` are the weights after ``s`` optimizer steps (``θ_0``: before any). The mean is
    kept in float32 (one extra copy of the trainable weights, as SWA keeps). Before ``start``
    there is nothing to average and the model's own weights stand.
    """

    def __init__(self, start: int, every: int) -> None:
        if start < 0 or every < 1:
            raise ValueError(f"weight averaging needs start >= 0 and every >= 1, got {start}, {every}")
        self.start = start
        self.every = every
        self.count = 0
        self.mean: list[torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def add(self, params: Sequence[torch.Tensor]) -> None:
        """Fold the current weights into the mean (incremental: θ̄ += (θ − θ̄)/n)."""
        self.count += 1
        if self.mean is None:
            self.mean = [p.detach().float().clone() for p in params]
            return
        for mean, p in zip(self.mean, params, strict=True):
            mean.add_((p.detach().float() - mean) / self.count)

    @torch.no_grad()
    def including(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The mean as it would be with the current weights folded in (without folding them)."""
        if self.mean is None:
            return [p.detach().float().clone() for p in params]
        n = self.count + 1
        return [mean + (p.detach().float() - mean) / n for mean, p in zip(self.mean, params, strict=True)]


@contextlib.contextmanager
def swapped_weights(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor] | None):
    """Temporarily give ``params`` the ``values`` (None: leave them), restoring them exactly."""
    if values is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
