"""Evaluation: the project's batched KnowMem generation and Min-K% scoring against one item at
a time, as MUSE's evaluation code runs them. Both sides must give the same scores (asserted);
only the time differs.

* ``knowmem_batched``: :func:`benchmarks.core.metrics.knowmem` (left-padded batches of
  ``EVAL_BATCH_SIZE`` with a KV cache) on ``NUM_QUESTIONS`` questions
  (:func:`perf_support.knowmem_questions`);
* ``knowmem_sequential``: :func:`perf_support.knowmem_one_by_one` on the same questions;
* ``min_k_batched`` / ``min_k_sequential``: Min-40% scores of the PrivLeak texts (forget and
  holdout) by :func:`benchmarks.core.metrics.min_k_scores` and one text per forward pass.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from benchmarks.core.metrics import knowmem, min_k_scores
from perf_support import (
    EVAL_BATCH_SIZE,
    KNOWMEM_NEW_TOKENS,
    NUM_QUESTIONS,
    knowmem_one_by_one,
    knowmem_questions,
    min_k_one_by_one,
    paired_ratio,
    paired_seconds,
)

KNOWMEM_GROUP = f"knowmem: {NUM_QUESTIONS} questions, {KNOWMEM_NEW_TOKENS} new tokens"

# What the batched case produced, for the one-by-one case to compare with.
_BATCHED: dict[str, list] = {}


def _privleak_texts(world) -> list[str]:
    return [r["text"] for split in ("forget", "holdout") for r in world.data.records("privleak", split)]


def _tokens(world, texts: list[str]) -> int:
    return sum(len(world.tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts)


def _batched_knowmem(world, qa, icl) -> list[tuple[str, float]]:
    result = knowmem(world.model, world.tokenizer, qa, icl, batch_size=EVAL_BATCH_SIZE)
    return [(item.generation, item.score) for item in result.items]


@pytest.fixture(scope="module")
def questions(perf_world):
    return knowmem_questions(perf_world, NUM_QUESTIONS)


@pytest.mark.benchmark(group=KNOWMEM_GROUP)
def test_knowmem_batched(benchmark, record, perf_world, questions):
    qa, icl = questions
    _batched_knowmem(perf_world, qa[:2], icl)  # warm up, untimed
    outputs = benchmark.pedantic(_batched_knowmem, args=(perf_world, qa, icl), rounds=2, warmup_rounds=0)
    _BATCHED["knowmem"] = outputs
    record("knowmem_batched", questions=len(qa), batch_size=EVAL_BATCH_SIZE)


@pytest.mark.benchmark(group=KNOWMEM_GROUP)
def test_knowmem_sequential(benchmark, record, perf_world, questions):
    qa, icl = questions
    knowmem_one_by_one(perf_world.model, perf_world.tokenizer, qa[:2], icl)  # warm up, untimed
    outputs = benchmark.pedantic(
        knowmem_one_by_one, args=(perf_world.model, perf_world.tokenizer, qa, icl), rounds=1, warmup_rounds=0
    )
    record("knowmem_sequential", questions=len(qa), batch_size=1)
    batched = _BATCHED.get("knowmem") or _batched_knowmem(perf_world, qa, icl)
    # Batching must not change a single generation, hence not a single score.
    assert [g for g, _ in batched] == [g for g, _ in outputs]
    assert [s for _, s in batched] == [s for _, s in outputs]

    if not benchmark.enabled:
        return
    # Paired figure: the same questions again, one batch's worth at a time, batched and one
    # by one back to back, so both see the same machine load (sum over the chunks).
    chunks = [qa[start : start + EVAL_BATCH_SIZE] for start in range(0, len(qa), EVAL_BATCH_SIZE)]
    seconds = paired_seconds([
        (partial(_batched_knowmem, perf_world, chunk, icl),
         partial(knowmem_one_by_one, perf_world.model, perf_world.tokenizer, chunk, icl))
        for chunk in chunks
    ])
    ratio = sum(c for _, c in seconds) / sum(b for b, _ in seconds)
    record("knowmem_sequential", paired={"knowmem_batched": ratio}, paired_rounds=len(chunks))


@pytest.mark.benchmark(group="min-k%: privleak forget + holdout texts")
def test_min_k_batched(benchmark, record, perf_world):
    texts = _privleak_texts(perf_world)
    scores = benchmark.pedantic(
        min_k_scores, args=(perf_world.model, perf_world.tokenizer, texts),
        kwargs={"batch_size": EVAL_BATCH_SIZE}, rounds=5, warmup_rounds=1,
    )
    _BATCHED["min_k"] = [score for score, _ in scores]
    record("min_k_batched", texts=len(texts), batch_size=EVAL_BATCH_SIZE, tokens_per_call=_tokens(perf_world, texts))


@pytest.mark.benchmark(group="min-k%: privleak forget + holdout texts")
def test_min_k_sequential(benchmark, record, perf_world):
    texts = _privleak_texts(perf_world)
    scores = benchmark.pedantic(
        min_k_one_by_one, args=(perf_world.model, perf_world.tokenizer, texts), rounds=5, warmup_rounds=1
    )
    record("min_k_sequential", texts=len(texts), batch_size=1, tokens_per_call=_tokens(perf_world, texts))
    batched = _BATCHED.get("min_k") or [
        s for s, _ in min_k_scores(perf_world.model, perf_world.tokenizer, texts, batch_size=EVAL_BATCH_SIZE)
    ]
    torch.testing.assert_close(torch.tensor(batched, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)

    if not benchmark.enabled:
        return
    ratio = paired_ratio(
        partial(min_k_scores, perf_world.model, perf_world.tokenizer, texts, batch_size=EVAL_BATCH_SIZE),
        partial(min_k_one_by_one, perf_world.model, perf_world.tokenizer, texts),
        rounds=4,
    )
    record("min_k_sequential", paired={"min_k_batched": ratio}, paired_rounds=4)
