"""The one padding collate: token-id lists into padded ``input_ids`` and ``attention_mask``.

Training and log-likelihood scoring pad on the right (:func:`benchmarks.core.logprobs.target_mask`
keeps padding out of every sum); batched generation pads on the left so that every prompt
ends where the new tokens begin.
"""

from __future__ import annotations

from typing import Sequence

import torch

SIDES = ("right", "left")


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (masked either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """``input_ids`` padded with ``pad_id`` to the longest sequence, and ``attention_mask``
    (1 = real token); ``side`` is where the padding goes."""
    if side not in SIDES:
        raise ValueError(f"padding side must be one of {', '.join(SIDES)}, got {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if not len(ids):
            continue
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PadCollate:
    """``collate_fn`` for a DataLoader whose items are token-id lists."""

    def __init__(self, pad_id: int, side: str = "right") -> None:
        self.pad_id = pad_id
        self.side = side

    def __call__(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad_id, self.side)
