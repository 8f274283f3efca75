"""Retain terms: what keeps an unlearned model useful on the data it should still know.

MUSE (Shi et al. 2024, §4) pairs each forget loss with one of two regularisers on a batch of
retain data, weighted by ``w_retain`` in ``w_forget · L_forget + w_retain · L_retain``:

* ``gdr`` -- Gradient Descent on Retain: the usual next-token NLL on the retain batch;
* ``klr`` -- KL on Retain: the KL divergence from the model before unlearning to the current
  model, per retain token;
* ``none`` -- no retain term.

The losses are pure functions of log-probs/logits (:func:`gdr_loss`, :func:`klr_loss`); the
registered classes run the model and call them. Padding never counts: every mean is over the
non-padding target positions given by :func:`benchmarks.core.logprobs.target_mask`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from benchmarks.core.logprobs import target_mask, token_logps
from benchmarks.core.registry import Registry


def gdr_loss(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL: ``−Σ mask·log p(x_t|x_<t) / Σ mask`` over the batch's tokens."""
    mask = mask.to(token_log_probs.dtype)
    return -(token_log_probs * mask).sum() / mask.sum().clamp(min=1)


def klr_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over retain target positions of ``KL(π_ref(·|x_<t) ‖ π_θ(·|x_<t))``.

    ``policy_logits``/``ref_logits``: ``[B, T, V]`` model outputs; ``mask``: ``[B, T-1]``, which
    next-token positions count (the last position predicts past the text and is dropped).
    The direction (expectation under π_ref) is that of MUSE's and TOFU's KL regulariser;
    unlike MUSE's code, which passes raw logits to ``F.kl_div``, both arguments are
    normalised to log-probabilities first, so the value is a true KL divergence (≥ 0, and 0
    exactly when the distributions agree). Computed in float32.
    """
    policy = F.log_softmax(policy_logits[:, :-1, :].float(), dim=-1)
    ref = F.log_softmax(ref_logits[:, :-1, :].float(), dim=-1)
    per_position = F.kl_div(policy, ref, reduction="none", log_target=True).sum(dim=-1)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


class RetainLoss:
    """A retain term: ``term(model, retain_batch, reference_model) -> scalar``."""

    name: ClassVar[str] = ""
    active: ClassVar[bool] = True
    needs_reference_model: ClassVar[bool] = False

    def __call__(self, model, retain: dict[str, torch.Tensor], reference_model=None) -> torch.Tensor:
        raise NotImplementedError


RETAIN_LOSSES: Registry[type[RetainLoss]] = Registry("retain loss")


@RETAIN_LOSSES.register("gdr")
class GradientDescentRetain(RetainLoss):
    """GDR: NLL of the retain batch (MUSE's ``gdr``)."""

    name = "gdr"

    def __call__(self, model, retain, reference_model=None):
        logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
        mask = target_mask(retain["attention_mask"], retain.get("loss_mask"))  # TOFU: answers only
        return gdr_loss(token_logps(logits, retain["input_ids"]), mask)


@RETAIN_LOSSES.register("klr")
class KLRetain(RetainLoss):
    """KLR: KL from the model before unlearning (a frozen copy kept in memory) to the current
    model on the retain batch (MUSE's ``klr``)."""

    name = "klr"
    needs_reference_model = True

    def __call__(self, model, retain, reference_model=None):
        if reference_model is None:
            raise RuntimeError("the klr retain loss needs the reference model; call Defense.setup first")
        inputs = {"input_ids": retain["input_ids"], "attention_mask": retain["attention_mask"]}
        with torch.no_grad():
            ref_logits = reference_model(**inputs).logits
        logits = model(**inputs).logits
        return klr_loss(logits, ref_logits, target_mask(retain["attention_mask"], retain.get("loss_mask")))


@RETAIN_LOSSES.register("none")
class NoRetain(RetainLoss):
    """No retain term: the objective is the forget loss alone."""

    name = "none"
    active = False

    def __call__(self, model, retain, reference_model=None):
        raise RuntimeError("the 'none' retain loss has no value; Defense skips it")
