"""Batched greedy decoding for the generation metrics (VerbMem, KnowMem).

MUSE decodes one prompt at a time with ``model.generate(..., do_sample=False)``. Here prompts
are decoded in batches, left-padded, with a KV cache, and the result must not depend on the
batch size: padding only ever sits to the left of a prompt, is masked out of attention, and
position ids are counted from each prompt's first real token (``generate`` derives them from
the attention mask), so every row sees exactly what it would see alone.

Tokenisation follows MUSE: ``add_special_tokens=True`` (BOS prepended for Llama-style
tokenizers). Outputs are decoded as MUSE decodes them: only the new tokens,
``skip_special_tokens=True``, ``clean_up_tokenization_spaces=True``.

Stop strings. KnowMem cuts every answer at its first ``\n\n``, ``\nQuestion`` or
``Question:`` (DESIGN §3), so whatever is generated after one of them is thrown away. A row
stops once its decoded continuation contains one of the ``stop_strings`` it is given, and a
batch ends when every row has stopped (or reached ``max_new_tokens``). The cut answer is the
same as without stopping: the decoded text up to the stop string does not change when more
tokens follow, and no stop string lies inside another, so the first one to appear is the
first one in the full output. Without stopping, a batch runs until its longest row ends, while
one prompt at a time ends each prompt at its own EOS, which cancels most of what batching gains.

Keys and values are kept in buffers allocated once per batch (:mod:`benchmarks.core.kv_cache`)
rather than concatenated at every step; the tokens are the same.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.core.errors import UsageError
from benchmarks.core.kv_cache import decoding_cache
from benchmarks.core.models import context_length


class StopAtStrings:
    """A ``generate`` stopping criterion: a row is done once the text decoded from its new
    tokens (those after ``prompt_width``) contains one of ``stop_strings``."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, self.prompt_width :].tolist()
        done = [
            any(stop in self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for stop in self.stop_strings)
            for row in new_tokens
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of ``prompt`` as MUSE encodes it; a prompt longer than ``max_prompt_tokens``
    keeps its end, the part the continuation has to follow on from."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) > max_prompt_tokens:
        ids = ids[len(ids) - max_prompt_tokens :]
    return ids


def _eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the model's generation config (which may list
    several, as Llama-3 does) and the tokenizer's EOS."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from benchmarks.core.batching import pad_batch

    batch = pad_batch(rows, pad_id, side="left")
    return batch["input_ids"], batch["attention_mask"]


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of ``prompts`` (at most ``max_new_tokens`` each, stopping at EOS
    and, when given, once a continuation contains one of ``stop_strings``), decoded to text, in
    the order of ``prompts``.

    Prompts are tokenised one by one (no padding, so the tokenizer and its ``padding_side``
    are left untouched), sorted by length so each batch wastes little padding, left-padded
    by hand and decoded with ``model.generate``. A prompt longer than the model context keeps
    its last ``context - max_new_tokens`` tokens.
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    from transformers import GenerationConfig, StoppingCriteriaList

    max_prompt_tokens = context_length(model) - max_new_tokens
    if max_prompt_tokens < 1:
        raise UsageError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context_length(model)} tokens; generate fewer tokens"
        )
    encoded = [encode_prompt(tokenizer, prompt, max_prompt_tokens) for prompt in prompts]
    if any(not ids for ids in encoded):
        raise UsageError("an empty prompt encodes to no tokens and cannot be continued")

    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # Any id works for padding: it is masked out of attention and never decoded.
        pad_id = min(eos_ids) if eos_ids else 0
    # A fresh config, so sampling settings shipped with a checkpoint (temperature, top_p)
    # cannot leak into what must be plain greedy decoding.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
    )

    # Longest first: the first batch shows at once whether memory suffices.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")

    device = next(model.parameters()).device
    outputs: list[str | None] = [None] * len(prompts)
    for batch in batches:
        input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
        stopping = (
            StoppingCriteriaList([StopAtStrings(tokenizer, stop_strings, input_ids.shape[1])])
            if stop_strings else None
        )
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            stopping_criteria=stopping,
            past_key_values=decoding_cache(model, input_ids.shape[1] + max_new_tokens),
        )
        new_tokens = generated[:, input_ids.shape[1] :].tolist()
        for row, index in enumerate(batch):
            outputs[index] = tokenizer.decode(
                _cut_at_eos(new_tokens[row], eos_ids),
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
    return outputs  # type: ignore[return-value]
