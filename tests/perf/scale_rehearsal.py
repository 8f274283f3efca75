"""Peak memory of a full fine-tuning step of the Llama-3.2-1B architecture with 2 of its 16
layers (hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings, llama3
rope scaling; random weights, built by plain ``transformers``), against
:func:`benchmarks.core.footprint.estimate_peak_bytes`.

Run as ``python tests/perf/scale_rehearsal.py BATCH LENGTH {plain,checkpointing} [bf16]``; prints
one JSON line with the measured peak resident memory above the process's resident size before
the model was built (``resource.getrusage``), and the estimate with its parts.
"""

from __future__ import annotations

import json
import resource
import sys


def llama_1b_two_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    return LlamaForCausalLM(config), config


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
    estimate = estimate_peak_bytes(ModelSize(params, params, config),
                                   TrainingShape(batch, length, mixed_precision, checkpointing))
    return {"parameters": params, "batch": batch, "length": length, "gradient_checkpointing": checkpointing,
            "mixed_precision": mixed_precision, "measured": format_bytes(peak),
            "estimate": format_bytes(estimate["total"]), "ratio": round(peak / estimate["total"], 3),
            "parts": {k: format_bytes(v) for k, v in estimate.items()}}


if __name__ == "__main__":
    batch, length, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    precision = sys.argv[4] if len(sys.argv) > 4 else "no"
    print(json.dumps(main(batch, length, mode == "checkpointing", precision)))
