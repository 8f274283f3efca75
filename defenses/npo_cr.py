"""NPO with curvature regularisation of the forget loss (Fan et al., ICML 2025, "Towards LLM
Unlearning Resilient to Relearning Attacks", §5, "curvature regularization", which takes the
penalty of CURE: Moosavi-Dezfooli et al., CVPR 2019, "Robustness via Curvature Regularization,
and Vice Versa", Eq. 6, from input space to weight space):

    L_forget(θ) = L_NPO(θ) + γ · ‖∇L_NPO(θ + h·z) − ∇L_NPO(θ)‖₂²,
    z = sign(∇L_NPO(θ)) / ‖sign(∇L_NPO(θ))‖₂,      γ = ``cr_weight``, h = ``cr_h``

The difference of gradients a step h apart is a finite-difference Hessian-vector product
(≈ h·H z), so the penalty measures the curvature of the forget loss along its ascent direction;
keeping it small keeps the unlearned weights in a flat region. ``z`` is held constant, as in
CURE; both gradients are taken with ``create_graph=True`` so the penalty's gradient flows
through each (:func:`benchmarks.core.smoothing.curvature_penalty`). Cost: two forget passes
with second-order graphs per micro-batch. The same one-process and attention-kernel notes as
``npo_gp`` apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import sequence_logps
from benchmarks.core.smoothing import curvature_penalty, penalty_loss, single_process
from benchmarks.core.training import plain_step
from defenses.base import register_defense
from defenses.npo import NPO, NPOConfig, npo_loss


@dataclass
class NPOCRConfig(NPOConfig):
    cr_weight: float = field(
        default=0.01,
        metadata={"help": "Weight γ >= 0 of the curvature penalty ‖∇L(θ+h z) − ∇L(θ)‖² (0 gives plain NPO)."},
    )
    cr_h: float = field(
        default=1e-3,
        metadata={"help": "Finite-difference step h > 0 of the curvature penalty, along the unit sign direction z."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.cr_weight) and self.cr_weight >= 0):
            raise UsageError(f"cr_weight must be a finite number >= 0, got {self.cr_weight}; e.g. --cr-weight 0.01")
        if not (math.isfinite(self.cr_h) and self.cr_h > 0):
            raise UsageError(f"cr_h must be a finite number > 0, got {self.cr_h}; e.g. --cr-h 0.001")


@register_defense("npo_cr")
class NPOCR(NPO):
    """NPO plus γ‖∇L(θ + h z) − ∇L(θ)‖², differentiated through both gradients."""

    config_class = NPOCRConfig

    def penalty(self, model, batch, loss, direction=None):
        """R(θ) on the autograd graph; ``loss`` is L_NPO(θ) already computed on ``batch``;
        ``direction`` fixes z (default: the unit sign direction of the forget gradient)."""
        forget = batch["forget"]
        ref = self.reference_logps.lookup(forget["index"])

        def loss_at(module):
            policy = sequence_logps(module, forget["input_ids"], forget["attention_mask"])
            return npo_loss(policy, ref, self.config.beta)

        value, _ = curvature_penalty(model, loss_at, self.config.cr_h, loss=loss, direction=direction)
        return value

    def forget_term(self, model, batch):
        return penalty_loss(super().forget_term, self.penalty, self.config.cr_weight)(model, batch)

    def step_fn(self):
        return single_process(plain_step(self.total_loss), self.name)
