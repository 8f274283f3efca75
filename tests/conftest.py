"""Shared fixtures: a tiny tokenizer and 2-layer, 64-wide Llama models built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tokenizer import train_tokenizer

# Tiny models gain nothing from intra-op threads, and one thread per process keeps tests
# that start subprocesses (accelerate launch) from oversubscribing small machines.
torch.set_num_threads(1)

SHARED_MUSE_NEWS = Path(__file__).resolve().parents[1].parent / "shared" / "muse-news"

TINY_TEXTS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick\n\n",
    "Question: How many boats sailed in the regatta?\nAnswer: 417\n\n",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY_TEXTS, vocab_size=300)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh 2-layer, 64-wide Llama (random weights, fixed seed) in fp32, eval mode."""
    model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def muse_news_dir():
    if not SHARED_MUSE_NEWS.is_dir():
        pytest.skip(f"MUSE-News copy not found at {SHARED_MUSE_NEWS} (needs ../shared/muse-news)")
    return SHARED_MUSE_NEWS
