"""Gradient ascent (GA) and gradient difference (GradDiff): the baselines NPO was designed
to beat (Zhang et al. 2024, "Negative Preference Optimization"; MUSE's ``ga`` and ``ga_gdr``).

GA minimises the likelihood of the forget data, i.e. maximises its NLL:

    L_GA = mean_x log π_θ(x),   log π_θ(x) = Σ_t log p(x_t | x_<t) over non-padding tokens

(the NPO paper's form, on sequence log-likelihoods: NPO's gradient tends to this one as
β → 0, so GA and NPO are compared on the same scale). The loss is unbounded below, which is
why GA drives a model to collapse within a few epochs. MUSE's code uses the token-mean NLL
instead; the two differ per example by its token count, a scale AdamW mostly absorbs but that
changes the balance with a retain term.

GradDiff (Liu et al. 2022, "Continual Learning and Private Unlearning"; TOFU's ``grad_diff``)
is GA plus the GDR retain term (:mod:`defenses.retain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.core.logprobs import sequence_logps
from defenses.base import Defense, DefenseConfig, register_defense


def ga_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """L_GA = mean over the batch of log π_θ(x) (minimising it ascends the forget NLL)."""
    return policy_logps.float().mean()


@dataclass
class GAConfig(DefenseConfig):
    retain_loss: str = field(
        default="none",
        metadata={"help": "Retain term: gdr (NLL on a retain batch), klr (KL to the model before "
                          "unlearning on a retain batch) or none."},
    )


@dataclass
class GradDiffConfig(DefenseConfig):
    """GradDiff: GA on forget, GDR on retain (``retain_loss`` defaults to gdr)."""


class _GradientAscent(Defense):
    def forget_loss(self, model, forget):
        return ga_loss(sequence_logps(model, forget["input_ids"], forget["attention_mask"], forget.get("loss_mask")))


@register_defense("ga")
class GA(_GradientAscent):
    """Gradient ascent on the forget set; no retain term unless asked for."""

    config_class = GAConfig


@register_defense("graddiff")
class GradDiff(_GradientAscent):
    """Gradient difference: ascend on forget, descend on retain (GDR)."""

    config_class = GradDiffConfig
