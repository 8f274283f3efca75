"""NPO with a gradient-norm penalty on the forget loss (Fan et al., ICML 2025, "Towards LLM
Unlearning Resilient to Relearning Attacks", §5, "gradient penalty"; the first-order view of
SAM: max_{‖ε‖≤ρ} L(θ + ε) ≈ L(θ) + ρ‖∇L(θ)‖).

    L_forget(θ) = L_NPO(θ) + λ · ‖∇_θ L_NPO(θ)‖₂²,     λ = ``gp_weight``

Penalising the gradient's size drives the unlearned weights to where the forget loss is flat,
so a relearning step along its gradient moves the model little. The penalty's own gradient is
``2 λ · H ∇L_NPO``; it is computed exactly by double backward
(:func:`benchmarks.core.smoothing.gradient_norm_penalty`: the first gradient is taken with
``create_graph=True`` and the penalty is backpropagated with the loss), so the penalty really
steers the update -- a penalty added as a Python number (``.item()``) would leave the gradient
that of plain NPO.

The norm is that of each micro-batch's forget gradient (with gradient accumulation the penalty is
the mean over micro-batches, not the penalty of the step's whole batch). Double backward needs
the composite attention kernel (chosen automatically for ``sdpa``/``eager`` models) and one
process: DDP does not reduce gradients taken by ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.core.errors import UsageError
from benchmarks.core.sam import trainable_parameters
from benchmarks.core.smoothing import gradient_norm_penalty, penalty_loss, single_process
from benchmarks.core.training import plain_step
from defenses.base import register_defense
from defenses.npo import NPO, NPOConfig


@dataclass
class NPOGPConfig(NPOConfig):
    gp_weight: float = field(
        default=0.01,
        metadata={"help": "Weight λ >= 0 of the squared forget-gradient norm ‖∇L_NPO‖² (0 gives plain NPO)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.gp_weight) and self.gp_weight >= 0):
            raise UsageError(f"gp_weight must be a finite number >= 0, got {self.gp_weight}; e.g. --gp-weight 0.01")


@register_defense("npo_gp")
class NPOGP(NPO):
    """NPO plus λ‖∇L_NPO‖², differentiated through by double backward."""

    config_class = NPOGPConfig
    # The embedded world: at λ = 0.01 the penalty outweighed the NPO loss (mean forget term 60
    # in epoch 1) and KnowMem-retain fell below the bar before the facts were gone (kept epoch
    # 2 at KnowMem-forget 66); λ = 1e-3 still lost utility first; at 1e-4 epochs 4-5 meet both.
    world_settings = {**NPO.world_settings, "gp_weight": 1e-4}

    def penalty(self, model, batch, loss):
        """R(θ) = ‖∇L_NPO(θ)‖² on the autograd graph."""
        return gradient_norm_penalty(loss, trainable_parameters(model))

    def forget_term(self, model, batch):
        return penalty_loss(super().forget_term, self.penalty, self.config.gp_weight)(model, batch)

    def step_fn(self):
        return single_process(plain_step(self.total_loss), self.name)
