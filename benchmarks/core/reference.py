"""Reference log-likelihoods computed once, before training, keyed by example.

NPO (Zhang et al. 2024, eq. 3) compares the policy with π_ref, the model before unlearning.
π_ref never changes during training, so its log-likelihood of each forget example is a
constant: one forward pass over the forget set before the first update gives every value the
loss will ever need, and no second model has to stay in memory (DESIGN §7).

Batches carry an ``index`` tensor (the example's position in its dataset); the cache is a
table indexed by it. Under ``accelerate launch`` each process scores its shard and the table
is completed by gathering across processes, so every process holds the full table.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

import torch

from benchmarks.core.logprobs import sequence_logps

logger = logging.getLogger(__name__)


class ReferenceLogps:
    """A table of log π_ref(x) for examples ``0 .. size-1`` of one dataset (float32, on CPU
    until moved). Looking up an example that was never scored is an error, not a NaN."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.dim() != 1:
            raise ValueError(f"reference log-likelihoods must be a 1-d table, got shape {tuple(values.shape)}")
        self.values = values.float()

    def __len__(self) -> int:
        return self.values.numel()

    def to(self, device: torch.device | str) -> "ReferenceLogps":
        return ReferenceLogps(self.values.to(device))

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """log π_ref(x) for the examples named by ``index`` (shape ``[B]``), on ``index``'s device."""
        values = self.values.to(index.device)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= values.numel()):
            raise KeyError(
                f"example index out of range 0..{values.numel() - 1}: {index.tolist()}"
            )
        picked = values[index.long()]
        if torch.isnan(picked).any():
            missing = index[torch.isnan(picked)].tolist()
            raise KeyError(f"no reference log-likelihood was computed for examples {missing}")
        return picked


@torch.no_grad()
def compute_reference_logps(
    model,
    batches: Iterable[dict[str, Any]],
    num_examples: int,
    accelerator=None,
) -> ReferenceLogps:
    """Score every example once with ``model`` (the reference, i.e. the model before any
    update) and return the table keyed by ``batch["index"]``.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask``, ``index`` and optionally
    ``loss_mask``; with an ``accelerator`` it should be a prepared (sharded) loader, and the
    forward runs under the accelerator's autocast so that the cached values are what the
    policy itself computes at step 0 (the NPO ratio starts at exactly 0).
    """
    was_training = model.training
    model.eval()
    table = torch.full((num_examples,), float("nan"), dtype=torch.float32)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    for batch in batches:
        with autocast():
            logps = sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch.get("loss_mask")
            ).float()
        index = batch["index"].long()
        if accelerator is not None and accelerator.num_processes > 1:
            # Shards may differ in size at the end; pad with -1 and drop those rows.
            index = accelerator.pad_across_processes(index, pad_index=-1)
            logps = accelerator.pad_across_processes(logps, pad_index=0)
            index, logps = accelerator.gather(index), accelerator.gather(logps)
        keep = index >= 0
        # Under sharding, the last batch may repeat examples to even out processes; the
        # repeated values are identical, so overwriting is harmless.
        table[index[keep].cpu()] = logps[keep].cpu()
    if was_training:
        model.train()
    missing = torch.isnan(table).sum().item()
    if missing:
        raise RuntimeError(
            f"reference log-likelihoods are missing for {missing} of {num_examples} examples; "
            "the reference batches did not cover the dataset"
        )
    logger.info("cached reference log-likelihoods for %d examples", num_examples)
    return ReferenceLogps(table)
