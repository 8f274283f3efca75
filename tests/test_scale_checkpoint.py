"""The scale rehearsal's checkpoint builder (tests/perf/scale_rehearsal.py), at a small width:
the same code path as the 2048-wide checkpoint, so what the rehearsal measures is a
Llama-3.2-1B-shaped model with Llama 3's vocabulary layout, chat template and tied embeddings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "perf" / "scale_rehearsal.py"
TEXTS = ["The mayor of Lindenfeld opened the bridge in 1931.", "Who opened the bridge? The mayor did.",
         "You are a helpful assistant."] * 20


@pytest.fixture(scope="module")
def rehearsal():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_checkpoint(rehearsal, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "ckpt"
    return rehearsal.build_checkpoint(out, TEXTS, learnt=500, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                                      intermediate=128)


def test_special_tokens_sit_at_llama3_ids(small_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_checkpoint)
    assert len(tok) == 128256
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                     "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                     "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>",
                                     "<|reserved_special_token_247|>"])
    assert ids == [128000, 128001, 128002, 128004, 128006, 128007, 128008, 128009, 128010, 128011, 128255]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    plain = tok("The mayor opened the bridge").input_ids
    assert plain[0] == 128000 and max(plain[1:]) < 500  # BOS prepended; text maps to learnt ids only
    assert tok.decode(plain[1:]) == "The mayor opened the bridge"


def test_chat_template_renders_llama32_turns(small_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_checkpoint)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Who opened the bridge?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, date_string="10 Apr 2025")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\n"
                    "You are a helpful assistant.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWho opened the bridge?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[:2] == [128000, 128006]
    last_header_end = len(ids) - 1 - ids[::-1].index(128007)
    assert tok.decode(ids[last_header_end + 1:]) == "\n\n"  # the assistant's turn starts after it
    assert ids.count(128009) == 2 and ids.count(128000) == 1


def test_model_is_llama_1b_shaped_with_tied_embeddings(rehearsal, small_checkpoint):
    from transformers import AutoModelForCausalLM

    config = json.loads((small_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 128256 and config["tie_word_embeddings"]
    rope = config.get("rope_parameters") or config["rope_scaling"]  # transformers 5 renamed it
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("llama3", 32.0, 500000.0)
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 2
    model = AutoModelForCausalLM.from_pretrained(small_checkpoint)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    full = rehearsal.llama_1b_config()  # the rehearsal's widths: the published Llama-3.2-1B config's
    assert (full.hidden_size, full.num_attention_heads, full.num_key_value_heads, full.head_dim,
            full.intermediate_size, full.num_hidden_layers) == (2048, 32, 8, 64, 8192, 2)
