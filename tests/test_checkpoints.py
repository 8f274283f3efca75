"""Resume checkpoints in safetensors and JSON: a round trip restores the loop exactly, no
pickle is involved, and spacing them out skips milestones."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader

from benchmarks.core.checkpoints import load_resume_checkpoint, save_resume_checkpoint
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.training import TrainConfig, plain_step, train


def _loader(tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (8, 10), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long)} for i in range(8)]
    return DataLoader(rows, batch_size=2)


def _nll(model, batch):
    return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])


def test_a_resumed_training_from_the_safetensors_checkpoint_equals_the_uninterrupted_one(tiny_tokenizer, tmp_path):
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    config = TrainConfig(lr=1e-3, max_steps=4, schedule="cosine", warmup_steps=1, progress=False)
    reference = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
    train(reference, _loader(tiny_tokenizer), plain_step(_nll), config)

    model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
    sizes = []

    def state_hook(step, state):
        if step == 2:
            sizes.append(save_resume_checkpoint(tmp_path / "ckpt", model.state_dict(), state, {"curve": {"2": 1.5}}))

    train(model, _loader(tiny_tokenizer), plain_step(_nll), TrainConfig(**{**config.__dict__, "max_steps": 4}),
          hook_steps=(2,), state_hook=state_hook)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["optimizer.safetensors", "rng.safetensors", "state.json", "weights.safetensors"]
    assert sizes[0] == sum(p.stat().st_size for p in (tmp_path / "ckpt").iterdir())
    json.loads((tmp_path / "ckpt" / "state.json").read_text())  # plain JSON, no pickle anywhere

    weights, loop_state, extra = load_resume_checkpoint(tmp_path / "ckpt")
    assert extra == {"curve": {"2": 1.5}} and loop_state["step"] == 2
    resumed = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=5)  # other weights, overwritten below
    resumed.load_state_dict(weights)
    train(resumed, _loader(tiny_tokenizer), plain_step(_nll), config, resume_state=loop_state)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_saving_again_replaces_the_checkpoint_and_absent_is_none(tmp_path):
    assert load_resume_checkpoint(tmp_path / "none") is None
    import random

    import numpy as np

    from benchmarks.core.training import rng_state

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    for step in (1, 2):
        loop = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": step},
                "rng": rng_state(), "history": [{"loss": 1.0}] * step}
        save_resume_checkpoint(tmp_path / "ckpt", {"w": torch.full((2,), float(step))}, loop)
    weights, loop_state, _ = load_resume_checkpoint(tmp_path / "ckpt")
    assert torch.equal(weights["w"], torch.full((2,), 2.0)) and loop_state["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no leftovers beside it
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    restored.load_state_dict(loop_state["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert restored.param_groups[0]["lr"] == 0.1
    random.setstate(loop_state["rng"]["python"])
    np.random.set_state(loop_state["rng"]["numpy"])
    torch.set_rng_state(loop_state["rng"]["torch"])


def _tied_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def test_tied_embeddings_are_copied_and_written_once(tiny_tokenizer, tmp_path):
    from benchmarks.core.checkpoints import cpu_copy
    from benchmarks.core.training import rng_state

    model = _tied_llama(tiny_tokenizer)
    state = model.state_dict()
    copy = cpu_copy(state)
    assert copy["lm_head.weight"] is copy["model.embed_tokens.weight"]  # one copy under both names
    assert copy["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()  # a copy, not a view
    assert all(torch.equal(copy[k], v) for k, v in state.items())

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loop = {"step": 1, "optimizer": optimizer.state_dict(), "scheduler": {}, "rng": rng_state(), "history": []}
    save_resume_checkpoint(tmp_path / "ckpt", copy, loop)
    distinct = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    embedding = model.model.embed_tokens.weight.numel()
    written = (tmp_path / "ckpt" / "weights.safetensors").stat().st_size
    # float32 entries of the distinct tensors (plus the header); a second embedding would add 4 x embedding
    assert 4 * distinct <= written < 4 * distinct + 4 * embedding // 2
    state_json = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state_json["weight_aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}

    weights, _, _ = load_resume_checkpoint(tmp_path / "ckpt")
    assert set(weights) == set(state) and weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    fresh = _tied_llama(tiny_tokenizer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(weights)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
