"""NPO with weight averaging along the unlearning trajectory (Fan et al., ICML 2025, "Towards
LLM Unlearning Resilient to Relearning Attacks", §5, "weight averaging", after stochastic weight
averaging: Izmailov et al., UAI 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization").

Training is plain NPO; what the defense returns is the mean of the weights visited,

    θ̄ = (1/n) Σ_j θ_{s_j},    s_j = start, start + every, start + 2·every, ...  (≤ the last step)

where θ_s are the weights after s optimizer steps. Averaging points along a trajectory lands in
the middle of a wide basin rather than at the sharp edge a single iterate may sit on
(:class:`benchmarks.core.smoothing.WeightAverage`). Per-epoch evaluation sees θ̄ as it stands at
that epoch, so the epoch kept by the selection rule is judged on the averaged weights, and the
kept checkpoint holds them. With ``wa_start`` beyond the run's last step nothing is averaged
and the result is plain NPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.core.errors import UsageError
from benchmarks.core.sam import trainable_parameters
from benchmarks.core.smoothing import WeightAverage, swapped_weights
from benchmarks.core.training import plain_step
from defenses.base import register_defense
from defenses.npo import NPO, NPOConfig


@dataclass
class NPOWAConfig(NPOConfig):
    wa_start: int = field(
        default=1,
        metadata={"help": "First optimizer step whose weights enter the average (0: the model before "
                          "unlearning too; a step beyond the run: no averaging, plain NPO)."},
    )
    wa_every: int = field(
        default=1, metadata={"help": "Steps between two weights that enter the average (>= 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.wa_start, int) and self.wa_start >= 0):
            raise UsageError(f"wa_start must be an integer >= 0, got {self.wa_start}")
        if not (isinstance(self.wa_every, int) and self.wa_every >= 1):
            raise UsageError(f"wa_every must be an integer >= 1, got {self.wa_every}")


@register_defense("npo_wa")
class NPOWA(NPO):
    """NPO whose returned weights are the running mean of its trajectory."""

    config_class = NPOWAConfig
    # The embedded world (46 steps per epoch): averaging from step 1 kept the early, barely
    # unlearned weights in the mean (KnowMem-forget 15.8 at epoch 6); from step 138 (epoch 4 on,
    # where plain NPO has settled) the average meets the operating point at epochs 2-6.
    world_settings = {**NPO.world_settings, "wa_start": 138}

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.average = WeightAverage(self.config.wa_start, self.config.wa_every)
        self.steps_done = 0

    def step_fn(self):
        plain = plain_step(self.total_loss)
        self.average = WeightAverage(self.config.wa_start, self.config.wa_every)
        self.steps_done = 0

        def step(model, micro_batches, accelerator):
            # The loop hands the step function θ_s before update s + 1: fold θ_s in if it is due.
            if self.average.due(self.steps_done):
                self.average.add(trainable_parameters(model))
            self.steps_done += 1
            return plain(model, micro_batches, accelerator)

        return step

    def averaged_weights(self, model):
        """θ̄ at the current step (the current weights folded in if due), or None before start."""
        params = trainable_parameters(model)
        if self.average.due(self.steps_done):
            return self.average.including(params)
        return self.average.mean

    def evaluation_weights(self, model):
        return swapped_weights(trainable_parameters(model), self.averaged_weights(model))

    def finish(self, model) -> None:
        import torch

        values = self.averaged_weights(model)
        if values is None:
            return
        with torch.no_grad():
            for p, v in zip(trainable_parameters(model), values, strict=True):
                p.copy_(v.to(p.dtype))
