"""TOFU answer scoring against a direct per-pair computation: answer tokens only, batched or
not, and the open-unlearning EOS-padding parity input."""

from __future__ import annotations

import pytest
import torch

from benchmarks.core.chat_format import PromptSettings, encode_pair, llama3_style_tokenizer
from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tofu_eval import TofuEvalSettings, answer_losses

PAIRS = [("Who wrote The Amber Glass?", "Varo Minteck wrote it."),
         ("Where was Varo Minteck born?", "Varo Minteck was born in Ostvale, a harbour town."),
         ("Which award did Varo Minteck win?", "The Harrow Medal.")]


@pytest.fixture(scope="module")
def chat_model():
    tokenizer = llama3_style_tokenizer([q + " " + a for q, a in PAIRS] * 10 + ["You are a helpful assistant."] * 5,
                                       vocab_size=350)
    model = tiny_llama(TinyLlamaSpec(), tokenizer, seed=0).eval()
    return model, tokenizer


def _direct(model, tokenizer, question, answer, settings, hide_eot=False):
    """Mean NLL over positions >= answer_start, from one unpadded forward pass."""
    pair = encode_pair(tokenizer, question, answer, settings)
    ids = torch.tensor([pair.input_ids])
    attention = (ids != tokenizer.eos_token_id).long() if hide_eot else torch.ones_like(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[0].float(), -1)
    targets = range(pair.answer_start, len(pair.input_ids))
    return -sum(float(logp[t - 1, pair.input_ids[t]]) for t in targets) / len(targets)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_answer_losses_score_the_answer_only(chat_model, batch_size):
    model, tokenizer = chat_model
    settings = TofuEvalSettings(batch_size=batch_size)
    losses = answer_losses(model, tokenizer, PAIRS, settings)
    expected = [_direct(model, tokenizer, q, a, settings.prompt) for q, a in PAIRS]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_eot_padding_reproduces_the_parity_input(chat_model):
    model, tokenizer = chat_model
    parity = TofuEvalSettings(batch_size=3, prompt=PromptSettings(eot_padding=True))
    losses = answer_losses(model, tokenizer, PAIRS, parity)
    expected = [_direct(model, tokenizer, q, a, parity.prompt, hide_eot=True) for q, a in PAIRS]
    assert losses == pytest.approx(expected, rel=1e-5)
    real = answer_losses(model, tokenizer, PAIRS, TofuEvalSettings(batch_size=3))
    assert losses != pytest.approx(real, rel=1e-5)  # hiding the template's <|eot_id|> changes the input
