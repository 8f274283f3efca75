"""Chat prompts for TOFU: the Llama-3.2 rendering of forget10 row 0, the plain fallback, and the
answer-only mask token by token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.core.chat_format import (
    PromptSettings,
    collate_pairs,
    encode_pair,
    llama3_style_tokenizer,
    pad_id_for,
    prompt_ids,
)
from benchmarks.core.errors import UsageError

SHARED_TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "tofu"
ROW0_QUESTION = ("What is the full name of the author born in Taipei, Taiwan on 05/11/1991 who writes in the "
                 "genre of leadership?")
ROW0_ANSWER = "The author's full name is Hsiao Yun-Hwa."
TEXTS = [ROW0_QUESTION, ROW0_ANSWER, "Cutting Knowledge Date: December 2023", "Today Date: 10 Apr 2025",
         "You are a helpful assistant.", "system user assistant", "Question: Answer:"] * 10


@pytest.fixture(scope="module")
def llama_tokenizer():
    return llama3_style_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def plain_tokenizer():
    from benchmarks.core.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=400)


def _row0_question() -> str:
    if (SHARED_TOFU / "forget10.json").is_file():
        from benchmarks.core.tofu_data import load_tofu

        return load_tofu(str(SHARED_TOFU), "forget10", roles=["forget"]).forget.items[0].question
    return ROW0_QUESTION


def test_llama3_prompt_for_forget10_row0_decodes_to_the_published_string(llama_tokenizer):
    ids = prompt_ids(llama_tokenizer, _row0_question(), PromptSettings())
    decoded = llama_tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == (
        "system\n\nCutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful "
        "assistant.user\n\nWhat is the full name of the author born in Taipei, Taiwan on 05/11/1991 who writes "
        "in the genre of leadership?assistant\n\n"
    )
    full = llama_tokenizer.decode(ids)
    assert full.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert full.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert full.count("<|begin_of_text|>") == 1  # the template's BOS only, none added on top


def test_prompt_settings_reach_the_template(llama_tokenizer):
    ids = prompt_ids(llama_tokenizer, "Who?", PromptSettings(system_prompt="Be brief.", date_string="1 Jan 2030"))
    text = llama_tokenizer.decode(ids, skip_special_tokens=True)
    assert "Today Date: 1 Jan 2030\n\nBe brief.user" in text


def test_answer_mask_covers_answer_and_closing_eot_only(llama_tokenizer):
    settings = PromptSettings()
    pair = encode_pair(llama_tokenizer, ROW0_QUESTION, ROW0_ANSWER, settings)
    prompt = prompt_ids(llama_tokenizer, ROW0_QUESTION, settings)
    answer = llama_tokenizer(ROW0_ANSWER, add_special_tokens=False)["input_ids"]
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert pair.input_ids == prompt + answer + [eot]
    assert pair.answer_start == len(prompt)
    mask = pair.loss_mask
    for position, (token, scored) in enumerate(zip(pair.input_ids, mask)):
        assert scored == (position >= len(prompt)), (position, llama_tokenizer.decode([token]))
    scored_text = llama_tokenizer.decode([t for t, m in zip(pair.input_ids, mask) if m])
    assert scored_text == ROW0_ANSWER + "<|eot_id|>"
    # the prompt's own <|eot_id|> tokens (after system and user) are never scored
    assert [m for t, m in zip(pair.input_ids, mask) if t == eot] == [0, 0, 1]


def test_plain_format_without_a_template(plain_tokenizer):
    settings = PromptSettings()
    ids = prompt_ids(plain_tokenizer, "Who wrote it?", settings)
    assert plain_tokenizer.decode(ids, skip_special_tokens=True) == "Question: Who wrote it?\nAnswer:"
    assert ids[0] == plain_tokenizer.bos_token_id
    pair = encode_pair(plain_tokenizer, "Who wrote it?", "Ada.", settings)
    scored = [t for t, m in zip(pair.input_ids, pair.loss_mask) if m]
    assert scored[-1] == plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(scored, skip_special_tokens=True) == " Ada."


def test_collate_masks_padding_and_eot_padding_masks_every_eot(llama_tokenizer):
    settings = PromptSettings()
    pairs = [encode_pair(llama_tokenizer, "Who?", "Ada.", settings),
             encode_pair(llama_tokenizer, ROW0_QUESTION, ROW0_ANSWER, settings)]
    pad = pad_id_for(llama_tokenizer, settings)
    batch = collate_pairs(pairs, pad)
    short = len(pairs[0].input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert batch["loss_mask"][0].tolist()[: short] == pairs[0].loss_mask
    assert batch["loss_mask"][0, short:].sum() == 0

    parity = PromptSettings(eot_padding=True)
    eot = llama_tokenizer.eos_token_id
    assert pad_id_for(llama_tokenizer, parity) == eot
    batch = collate_pairs(pairs, pad_id_for(llama_tokenizer, parity), eot_padding=True)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(attention, (ids != eot).long())
    # the template's end-of-turn tokens inside row 1 are hidden too, the loss still scores the last
    assert int(((ids[1] == eot) & (attention[1] == 0)).sum()) == 3
    assert batch["loss_mask"][1, len(pairs[1].input_ids) - 1] == 1


def test_bad_prompt_settings_fail_with_one_line():
    with pytest.raises(UsageError, match="--date-string must be non-empty"):
        PromptSettings(date_string=" ")
