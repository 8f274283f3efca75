"""MUSE-compatible NPO: the NPO formula applied to raw logits, as the MUSE code computes it.

This is NOT the loss of the NPO paper (:mod:`defenses.npo`). It exists so that numbers
published with the MUSE code — MUSE itself (Shi et al. 2024) and the NPO+SAM paper's code
built on it — can be reproduced. MUSE's trainer computes

    neg_log_ratio = ref_logits − policy_logits          # [B, T, V], unnormalised scores
    loss = −(2/β) · mean(log σ(β · neg_log_ratio))      # mean over every (b, t, v) entry

i.e. the NPO expression element-wise on the difference of raw output logits over the whole
vocabulary at every position, averaged, rather than on the difference of sequence
log-likelihoods log π_θ(x) − log π_ref(x) (an open discrepancy in the MUSE repository).
Two consequences: the loss depends on logit offsets that softmax ignores, and it pushes every
vocabulary entry, not the likelihood of the text.

MUSE's batches are fixed-length chunks with no padding, so its mean runs over all positions.
Here padded positions are left out (mean over the attention mask's positions × vocabulary),
which is the same number on unpadded batches.

Per-token logits of the reference cannot be cached cheaply (B × T × V values per batch), so
this variant keeps a frozen copy of the model before unlearning, as MUSE does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defenses.base import Defense, register_defense
from defenses.npo import NPOConfig


def npo_muse_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    beta: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """−(2/β) · mean log σ(β · (ref_logits − policy_logits)) over positions × vocabulary.

    ``policy_logits``/``ref_logits``: ``[B, T, V]``; ``attention_mask``: ``[B, T]`` (1 = real
    token) or None for MUSE's unpadded batches. Computed in float32.
    """
    if not beta > 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    per_entry = F.logsigmoid(beta * (ref_logits.float() - policy_logits.float()))
    if attention_mask is None:
        mean = per_entry.mean()
    else:
        mask = attention_mask.to(per_entry.dtype)
        mean = (per_entry.sum(dim=-1) * mask).sum() / (mask.sum().clamp(min=1) * per_entry.size(-1))
    return -(2.0 / beta) * mean


@register_defense("npo_muse")
class NPOMuse(Defense):
    """NPO as MUSE's code computes it (raw-logit variant); keeps a frozen reference model."""

    config_class = NPOConfig
    needs_reference_model = True

    def forget_loss(self, model, forget):
        if self.reference_model is None:
            raise RuntimeError("npo_muse needs the reference model; call setup() before training")
        inputs = {"input_ids": forget["input_ids"], "attention_mask": forget["attention_mask"]}
        with torch.no_grad():
            ref_logits = self.reference_model(**inputs).logits
        logits = model(**inputs).logits
        return npo_muse_loss(logits, ref_logits, self.config.beta, forget["attention_mask"])
