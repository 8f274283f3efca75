"""Token and sequence log-probabilities: the one implementation every loss and metric uses.

A sequence log-likelihood is log π(x) = Σ_t log p(x_t | x_<t) over the non-padding target
tokens (NPO, Zhang et al. 2024, §3). Padding never enters a sum: positions whose attention
mask is 0 (and, optionally, positions marked by a ``loss_mask`` of 0, such as a prompt) are
excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1: shape ``[B, T-1]`` (first token has no prediction).

    Computed in float32 (float64 for float64 logits), so bf16 runs do not lose the small
    differences NPO works with.
    """
    logits = logits[:, :-1, :]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64
    targets = input_ids[:, 1:]
    return -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


def target_mask(attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the T-1 predicted positions count: the target and its context are both real
    tokens (this also handles left padding), and ``loss_mask`` (if given) marks the target."""
    mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if loss_mask is not None:
        mask &= loss_mask[:, 1:].bool()
    return mask


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_t log p(x_t | x_<t) over non-padding target tokens for each sequence: shape ``[B]``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = token_logps(logits, input_ids)
    mask = target_mask(attention_mask, loss_mask)
    return (per_token * mask).sum(dim=-1)


def masked_mean_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the non-padding target tokens of the
    batch (the usual language-modelling loss; pads excluded)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = token_logps(logits, input_ids)
    mask = target_mask(attention_mask, loss_mask)
    return -(per_token * mask).sum() / mask.sum().clamp(min=1)
