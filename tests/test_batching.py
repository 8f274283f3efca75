"""The one padding collate and the one encode_cut_after, shared by world, defenses, attacks,
metrics and generation."""

from __future__ import annotations

import copy

import torch

from benchmarks.core.batching import PadCollate, pad_batch
from benchmarks.core.tokenizer import encode_cut_after


def test_right_and_left_padding():
    right = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = PadCollate(9, side="left")([[5, 6, 7], [8], []])
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert left["input_ids"].dtype == torch.long


def test_every_user_shares_the_one_implementation():
    import attacks.base
    import benchmarks.core.unlearn_data
    import benchmarks.core.world_build
    from benchmarks.core import tokenizer

    assert benchmarks.core.unlearn_data.pad_batch is pad_batch
    assert isinstance(benchmarks.core.world_build._collate(0), PadCollate)
    assert benchmarks.core.world_build.encode_cut_after is tokenizer.encode_cut_after
    assert attacks.base.encode_cut_after is tokenizer.encode_cut_after


def test_encode_cut_after_without_a_bos_token(tiny_tokenizer):
    """The world's old copy put ``bos_token_id`` (None) first whatever the tokenizer."""
    no_bos = copy.deepcopy(tiny_tokenizer)
    no_bos.bos_token = None
    text = "Question: Who founded it?\nAnswer: Ada Brennick"
    ids = encode_cut_after(no_bos, text)
    assert None not in ids
    assert no_bos.decode(ids) == text
    with_bos = encode_cut_after(tiny_tokenizer, text)
    assert with_bos[0] == tiny_tokenizer.bos_token_id and with_bos[1:] == ids
    # the marker's trailing space ends a piece: "Answer: " then "Ada ..." tokenized apart
    assert ids == (tiny_tokenizer(text[: text.index("Ada")], add_special_tokens=False)["input_ids"]
                   + tiny_tokenizer("Ada Brennick", add_special_tokens=False)["input_ids"])
