"""The Llama-3.2-1B architecture with 2 of its 16 layers, random weights, built by plain
``transformers``: hidden 2048, 32 heads, 8 KV heads, head_dim 64, MLP 8192, vocabulary 128256,
tied embeddings, llama3 rope scaling (the published Llama-3.2-1B config), and a tokenizer laid
out as Llama 3's: 128000 ordinary byte-level BPE ids, then its 256 special tokens at their ids
(``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001, ``<|finetune_right_pad_id|>`` 128004,
``<|start_header_id|>`` 128006, ``<|end_header_id|>`` 128007, ``<|eom_id|>`` 128008,
``<|eot_id|>`` 128009, ``<|python_tag|>`` 128010, the rest ``<|reserved_special_token_N|>``)
and a Llama-3.2-style chat template.

Two subcommands:

``build OUT [--layers 2] [--hidden 2048 ...]``
    write such a checkpoint (``save_pretrained``, safetensors, with the tokenizer) to OUT, for
    the project's own commands (``benchmarks.relearn --model OUT``, ``benchmarks.unlearn
    --model OUT``); the BPE's merges are learnt from the world's documents, so world text
    tokenizes to words, and the ids it does not learn are filled with entries no merge reaches.
``step BATCH LENGTH {plain,checkpointing} [bf16]`` (or without ``step``, as before)
    measure the peak memory of two full fine-tuning steps of the model, built in memory, against
    :func:`benchmarks.core.footprint.estimate_peak_bytes`; prints one JSON line with the peak
    resident memory above the process's resident size before the model was built
    (``resource.getrusage``), and the estimate with its parts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

#: Llama 3's vocabulary: 128000 BPE ids, then 256 special tokens.
ORDINARY_IDS = 128000
VOCAB_SIZE = 128256
#: The named special tokens of Llama 3 at their ids; every other id from 128000 on is reserved.
NAMED_SPECIALS = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}


def special_tokens() -> list[str]:
    """The 256 special tokens in id order (128000 + index), named as Llama 3's tokenizer names
    them: the reserved ones are numbered in order of their ids, skipping the named ones."""
    tokens, reserved = [], 0
    for token_id in range(ORDINARY_IDS, VOCAB_SIZE):
        if token_id in NAMED_SPECIALS:
            tokens.append(NAMED_SPECIALS[token_id])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


def llama3_layout_tokenizer(texts, learnt: int = 8000):
    """A byte-level BPE with ``learnt`` ids (at most) trained on ``texts``, padded with
    unreachable entries to 128000 ordinary ids, then Llama 3's special tokens at Llama 3's ids;
    BOS ``<|begin_of_text|>``, EOS ``<|eot_id|>`` and pad ``<|finetune_right_pad_id|>`` as in
    Llama-3.2-Instruct, and the Llama-3.2-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from benchmarks.core.chat_format import LLAMA3_CHAT_TEMPLATE

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=learnt, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # Ids no merge produces: the model's embedding rows for them exist (as in Llama 3, whose
    # ordinary vocabulary is larger than any one corpus needs), text never maps to them.
    for token_id in range(len(vocab), ORDINARY_IDS):
        vocab[f"<unused_{token_id}>"] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens())
    # Llama 3 prepends BOS to every encoding (its tokenizer's template post-processor).
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", 128000)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def llama_1b_config(layers: int = 2, hidden: int = 2048, heads: int = 32, kv_heads: int = 8, head_dim: int = 64,
                    intermediate: int = 8192):
    """Llama-3.2-1B's config (``meta-llama/Llama-3.2-1B``) with ``layers`` layers; the widths
    can be shrunk for tests, the vocabulary and the rest cannot."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        pad_token_id=128004, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def llama_1b_two_layers():
    from transformers import LlamaForCausalLM

    config = llama_1b_config()
    return LlamaForCausalLM(config), config


def world_texts() -> list[str]:
    """The world's documents and questions, to learn the BPE's merges from."""
    from benchmarks.core.data import load_data

    data = load_data("world", subsets=("raw", "knowmem"))
    texts = []
    for split in data.splits.values():
        for record in split.records:
            texts.extend(str(v) for k, v in record.items() if k in ("text", "question", "answer") and v)
    return texts


def build_checkpoint(out: str | Path, texts, *, seed: int = 0, learnt: int = 8000, **widths) -> Path:
    """Write the random-weight checkpoint (float32, safetensors) and its tokenizer to ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    config = llama_1b_config(**widths)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                                               pad_token_id=128004, do_sample=False)
    model.save_pretrained(out)
    llama3_layout_tokenizer(texts, learnt).save_pretrained(out)
    return out


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main(batch: int, length: int, checkpointing: bool, mixed_precision: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.core.checkpoints import format_bytes
    from benchmarks.core.footprint import ModelSize, TrainingShape, estimate_peak_bytes
    from benchmarks.core.logprobs import masked_mean_nll
    from benchmarks.core.training import TrainConfig, plain_step, train

    torch.set_num_threads(1)
    before = _rss()
    model, config = llama_1b_two_layers()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (batch * 2, length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long)} for i in range(batch * 2)]

    def loss(model, b):
        return masked_mean_nll(model, b["input_ids"], b["attention_mask"])

    train(model, DataLoader(rows, batch_size=batch), plain_step(loss),
          TrainConfig(lr=1e-5, max_steps=2, progress=False, gradient_checkpointing=checkpointing,
                      mixed_precision=mixed_precision))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    largest = max(p.numel() for p in model.parameters())
    estimate = estimate_peak_bytes(ModelSize(params, params, config, largest),
                                   TrainingShape(batch, length, mixed_precision, checkpointing), on_cpu=True)
    return {"parameters": params, "batch": batch, "length": length, "gradient_checkpointing": checkpointing,
            "mixed_precision": mixed_precision, "measured": format_bytes(peak),
            "estimate": format_bytes(estimate["total"]), "ratio": round(peak / estimate["total"], 3),
            "parts": {k: format_bytes(v) for k, v in estimate.items()}}


def cli(argv: list[str]) -> None:
    if argv and argv[0] == "build":
        parser = argparse.ArgumentParser(prog="scale_rehearsal.py build")
        parser.add_argument("out")
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--hidden", type=int, default=2048)
        parser.add_argument("--heads", type=int, default=32)
        parser.add_argument("--kv-heads", type=int, default=8)
        parser.add_argument("--head-dim", type=int, default=64)
        parser.add_argument("--intermediate", type=int, default=8192)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv[1:])
        out = build_checkpoint(args.out, world_texts(), seed=args.seed, layers=args.layers, hidden=args.hidden,
                               heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                               intermediate=args.intermediate)
        print(out)
        return
    if argv and argv[0] == "step":
        argv = argv[1:]
    batch, length, mode = int(argv[0]), int(argv[1]), argv[2]
    precision = argv[3] if len(argv) > 3 else "no"
    print(json.dumps(main(batch, length, mode == "checkpointing", precision)))


if __name__ == "__main__":
    cli(sys.argv[1:])
