"""Batched greedy generation: same strings as an uncached one-by-one reference, for any
batch size; prompts keep their end when too long; generation stops at EOS and at stop
strings."""

from __future__ import annotations

import pytest
import torch

from benchmarks.core.errors import UsageError
from benchmarks.core.generation import greedy_generate
from benchmarks.core.models import TinyLlamaSpec, tiny_llama

PROMPTS = [
    "The",
    "Question: Who founded the Kelder Institute?\nAnswer: ",
    "Mayor Tilda Quorn said the festival",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030. The",
    "417",
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on",
] * 2


def lively_model(tokenizer, max_positions: int = 512):
    """A tiny random Llama with large weights, so greedy outputs vary from prompt to prompt
    and step to step (a freshly initialised one tends to repeat a single token)."""
    model = tiny_llama(TinyLlamaSpec(max_position_embeddings=max_positions), tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@torch.no_grad()
def reference_tokens(model, ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Uncached, unpadded greedy decoding: a full forward pass per new token."""
    ids = list(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


def reference_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    new = reference_tokens(model, ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer):
    return lively_model(tiny_tokenizer), tiny_tokenizer


@pytest.mark.slow
def test_outputs_identical_for_batch_sizes_1_and_16(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    sixteen = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=16)
    three = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert one == sixteen == three
    assert len(set(one[:6])) == 6, "outputs should differ between prompts for this test to bite"


def test_matches_uncached_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS[:6]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=6)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert output == reference_greedy(model, tokenizer, ids, 10)


def test_order_follows_the_prompts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS[:6]
    forward = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    backward = greedy_generate(model, tokenizer, prompts[::-1], max_new_tokens=5, batch_size=4)
    assert backward == forward[::-1]


def test_tokenizer_is_left_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    before = (tokenizer.padding_side, tokenizer.pad_token_id, tokenizer.truncation_side)
    greedy_generate(model, tokenizer, PROMPTS[:4], max_new_tokens=2, batch_size=4)
    assert (tokenizer.padding_side, tokenizer.pad_token_id, tokenizer.truncation_side) == before


def test_generation_stops_at_eos(tiny_tokenizer):
    model = lively_model(tiny_tokenizer)
    prompt = PROMPTS[3]
    ids = tiny_tokenizer(prompt)["input_ids"]
    full = reference_tokens(model, ids, 6, eos_id=None)
    # Declare the third generated token an end-of-sequence token (as a checkpoint's
    # generation config may list extra EOS ids): the text must end before it.
    stop = full[2]
    assert stop not in full[:2]
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]
    [output, other] = greedy_generate(model, tiny_tokenizer, [prompt, PROMPTS[2]], max_new_tokens=6)
    assert output == tiny_tokenizer.decode(full[:2])
    assert other  # the other row keeps going


def _first_cut(text: str, stops) -> str:
    positions = [text.find(stop) for stop in stops if stop in text]
    return text[: min(positions)] if positions else text


def test_a_row_stops_at_its_first_stop_string_and_the_cut_text_is_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts, new_tokens = PROMPTS[:6], 16
    full = [reference_tokens(model, tokenizer(p)["input_ids"], new_tokens, tokenizer.eos_token_id) for p in prompts]
    # Stop strings taken from what the model writes, so that some rows meet one early, some late.
    texts = [tokenizer.decode(tokens) for tokens in full]
    stops = (texts[0][3:5], texts[1][-3:-1])
    for batch_size in (1, 6):
        outputs = greedy_generate(model, tokenizer, prompts, new_tokens, batch_size, stop_strings=stops)
        for tokens, output in zip(full, outputs):
            # Expected: the shortest prefix of the full greedy output whose text holds a stop string.
            expected = next((tokenizer.decode(tokens[:k]) for k in range(1, len(tokens) + 1)
                             if any(stop in tokenizer.decode(tokens[:k]) for stop in stops)),
                            tokenizer.decode(tokens))
            assert output == expected
            assert _first_cut(output, stops) == _first_cut(tokenizer.decode(tokens), stops)
    assert sum(len(o) < len(t) for o, t in zip(outputs, texts)) >= 2, "the test needs rows that stop early"


def test_long_prompt_keeps_its_end(tiny_tokenizer):
    context, new_tokens = 32, 8
    model = lively_model(tiny_tokenizer, max_positions=context)
    prompt = " ".join(["Mayor Tilda Quorn said the festival drew 2,300 visitors."] * 6)
    ids = tiny_tokenizer(prompt)["input_ids"]
    assert len(ids) > context
    [output] = greedy_generate(model, tiny_tokenizer, [prompt], max_new_tokens=new_tokens)
    assert output == reference_greedy(model, tiny_tokenizer, ids[-(context - new_tokens):], new_tokens)


def test_bad_arguments(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert greedy_generate(model, tokenizer, [], max_new_tokens=4) == []
    with pytest.raises(UsageError, match="context"):
        greedy_generate(model, tokenizer, ["x"], max_new_tokens=512)
    with pytest.raises(UsageError, match="batch size"):
        greedy_generate(model, tokenizer, ["x"], max_new_tokens=4, batch_size=0)


def test_the_preallocated_cache_generates_the_tokens_of_the_default_cache(model_and_tokenizer):
    from benchmarks.core.generation import _left_pad
    from benchmarks.core.kv_cache import PreallocatedLayer, decoding_cache

    model, tokenizer = model_and_tokenizer
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS[:6]]
    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
    settings = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)
    default = model.generate(**settings)
    cache = decoding_cache(model, input_ids.shape[1] + 12)
    preallocated = model.generate(**settings, past_key_values=cache)
    assert torch.equal(default, preallocated)
    assert len(set(map(tuple, default[:, input_ids.shape[1]:].tolist()))) == 6, "rows should differ for this test"
    layer = cache.layers[0]
    assert isinstance(layer, PreallocatedLayer)
    # Every position but the last generated token was written into the buffer, never re-allocated.
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()
    assert layer.keys.shape[-2] == input_ids.shape[1] + 11


def test_a_preallocated_layer_past_its_capacity_falls_back_to_concatenation():
    from benchmarks.core.kv_cache import PreallocatedLayer

    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 3, n, 4, generator=generator) for n in (3, 1, 2)]
    layer = PreallocatedLayer(capacity=4)
    for part in parts:
        keys, values = layer.update(part, -part)
    expected = torch.cat(parts, dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.get_seq_length() == 6
    with pytest.raises(ValueError, match="capacity"):
        PreallocatedLayer(capacity=0)
