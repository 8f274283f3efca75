"""NPO with randomized smoothing of the forget loss (Fan et al., ICML 2025, "Towards LLM
Unlearning Resilient to Relearning Attacks: A Sharpness-Aware Minimization Perspective and
Beyond", §5, "randomized smoothing").

SAM minimises the forget loss at its *worst* point within radius ρ; randomized smoothing
minimises its *average* over Gaussian weight noise instead:

    min_θ  E_{δ ~ N(0, σ² I)} [ L_NPO(θ + δ) ]  +  (w_r / w_f) · L_retain(θ)

whose gradient is estimated each step by ``k`` draws, ``(1/k) Σ_i ∇L_NPO(θ + δ_i)``
(:func:`benchmarks.core.smoothing.smoothed_step`; Fan et al. use k = 3). A smoothed loss has a
gradient that changes slowly with θ, the flatness that makes a few relearning steps less able
to undo the unlearning. Cost: k forget passes and one retain pass per step. With σ = 0 every
draw is θ itself and the update is plain NPO's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.core.errors import UsageError
from benchmarks.core.smoothing import smoothed_step
from defenses.base import register_defense
from defenses.npo import NPO, NPOConfig


@dataclass
class NPORSConfig(NPOConfig):
    rs_sigma: float = field(
        default=1e-3,
        metadata={"help": "Standard deviation σ >= 0 of the Gaussian weight noise of randomized smoothing "
                          "(0 gives plain NPO; the default is this project's starting point, tune it per model)."},
    )
    rs_samples: int = field(
        default=3,
        metadata={"help": "Noise draws k per step, each one forget pass (Fan et al. 2025 use 3)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.rs_sigma) and self.rs_sigma >= 0):
            raise UsageError(f"rs_sigma must be a finite number >= 0, got {self.rs_sigma}; e.g. --rs-sigma 0.001")
        if not (isinstance(self.rs_samples, int) and self.rs_samples >= 1):
            raise UsageError(f"rs_samples must be an integer >= 1, got {self.rs_samples}; the paper uses 3")


@register_defense("npo_rs")
class NPORS(NPO):
    """NPO whose forget gradient is averaged over k Gaussian perturbations of the weights."""

    config_class = NPORSConfig

    def step_fn(self):
        return smoothed_step(
            self.forget_term,
            self.retain_term_loss if self.uses_retain else None,
            sigma=self.config.rs_sigma,
            samples=self.config.rs_samples,
            forget_weight=self.config.forget_weight,
            retain_weight=self.config.retain_weight,
        )
