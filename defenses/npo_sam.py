"""NPO+SAM (Fan et al., ICML 2025, "Towards LLM Unlearning Resilient to Relearning Attacks:
A Sharpness-Aware Minimization Perspective and Beyond").

The forget loss is NPO's (:mod:`defenses.npo`), minimised at its worst point within radius
ρ: each step takes the forget gradient at θ + ε, ε = ρ · g/‖g‖₂ with g = ∇L_f(θ), then
restores θ and adds the retain gradient at θ (``benchmarks.core.sam``). Flat forget loss
around the unlearned weights is what makes a few relearning steps less able to bring the
knowledge back. With ρ = 0 this is exactly NPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.core.errors import UsageError
from benchmarks.core.sam import sam_step
from defenses.base import register_defense
from defenses.npo import NPO, NPOConfig


@dataclass
class NPOSAMConfig(NPOConfig):
    sam_rho: float = field(
        default=0.01,
        metadata={"help": "SAM radius ρ >= 0 of the forget-loss perturbation (Fan et al. 2025 use 0.01; "
                          "0 gives plain NPO)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.sam_rho) and self.sam_rho >= 0):
            raise UsageError(f"sam_rho must be a finite number >= 0, got {self.sam_rho}; the paper uses 0.01")


@register_defense("npo_sam")
class NPOSAM(NPO):
    """NPO with a sharpness-aware forget step (two forget passes, one retain pass per step)."""

    config_class = NPOSAMConfig

    def step_fn(self):
        return sam_step(
            self.forget_term,
            self.retain_term_loss if self.uses_retain else None,
            rho=self.config.sam_rho,
            forget_weight=self.config.forget_weight,
            retain_weight=self.config.retain_weight,
        )
