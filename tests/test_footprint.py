"""Sizes read from a config alone (meta device) and the peak-memory estimate of --dry-run."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmarks.core.footprint import ModelSize, TrainingShape, estimate_peak_bytes, model_size


@pytest.fixture
def llama_dir(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), tie_word_embeddings=True)
    path = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_sizes_from_the_config_match_the_loaded_model(llama_dir):
    from transformers import AutoModelForCausalLM

    from attacks import make_attack

    real = AutoModelForCausalLM.from_pretrained(llama_dir)
    full = model_size(str(llama_dir))
    assert full.parameters == full.trainable == sum(p.numel() for p in real.parameters())
    lora = make_attack("lora")
    adapted = model_size(str(llama_dir), lora.prepare)
    assert full.largest == max(p.numel() for p in real.parameters())
    trained = [p.numel() for p in lora.prepare(real).parameters() if p.requires_grad]
    assert (adapted.trainable, adapted.largest) == (sum(trained), max(trained))
    assert model_size("no-such-owner/no-such-model") is None  # not in the cache: no network asked


def test_activation_estimate_is_within_a_quarter_of_what_autograd_keeps(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    batch, length = 2, 96
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    size = model_size(str(llama_dir))
    estimate = estimate_peak_bytes(size, TrainingShape(batch, length))["activations"]
    assert abs(estimate - sum(kept.values())) <= 0.25 * sum(kept.values())


def test_fsdp_divides_the_states_and_ddp_adds_buckets():
    class Config:
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 64, 4, 4, 256
        num_hidden_layers, vocab_size = 2, 300

    size = ModelSize(parameters=1000, trainable=1000, config=Config())
    shape = TrainingShape(micro_batch=1, max_length=8, sam=True)
    one = estimate_peak_bytes(size, shape)
    assert (one["weights"], one["gradients"], one["optimizer"], one["sam_copy"]) == (4000, 4000, 8000, 4000)
    fsdp = estimate_peak_bytes(size, shape, processes=4, sharded=True)
    assert (fsdp["weights"], fsdp["optimizer"]) == (1000, 2000) and fsdp["activations"] == one["activations"]
    ddp = estimate_peak_bytes(size, shape, processes=4)
    assert ddp["total"] == one["total"] + 4000
    assert one["optimizer_step"] == 4000 and fsdp["optimizer_step"] == 1000
    states = 4000 + 4000 + 8000
    # SAM's copy lives through the passes of a step, not through the optimizer's step
    assert one["total"] == states + max(4000 + one["activations"] + one["logits"], one["optimizer_step"])
    checkpointed = estimate_peak_bytes(size, TrainingShape(1, 8, gradient_checkpointing=True))
    assert checkpointed["activations"] < one["activations"]


def test_dry_run_prints_memory_and_checkpoint_size(llama_dir, capsys, monkeypatch, tmp_path):
    from benchmarks import relearn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    assert relearn.main(["--dry-run", "--model", str(llama_dir), "--defense", "npo_sam",
                         "--data", "muse-bench/MUSE-News", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("dry run", "note:"))))
    memory = plan["memory_per_device"]
    assert set(memory) >= {"attack finetune", "defense npo_sam"}
    assert "sam_copy" in memory["defense npo_sam"]["1 GPU parts"]
    params = model_size(str(llama_dir)).parameters
    assert f"{params:,} trainable parameters" in plan["output"]["checkpoint"]


def test_the_kept_epoch_copy_is_host_memory():
    class Config:
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 64, 4, 4, 256
        num_hidden_layers, vocab_size = 2, 300

    size = ModelSize(parameters=1000, trainable=1000, config=Config())
    plain = TrainingShape(micro_batch=1, max_length=8)
    kept = TrainingShape(micro_batch=1, max_length=8, kept_epoch_copy=True)
    assert estimate_peak_bytes(size, kept)["kept_epoch_copy"] == 4000  # the weights, once
    assert estimate_peak_bytes(size, kept)["total"] == estimate_peak_bytes(size, plain)["total"]  # not on a GPU
    assert estimate_peak_bytes(size, kept, on_cpu=True)["total"] == estimate_peak_bytes(size, plain)["total"] + 4000
    assert estimate_peak_bytes(size, kept, weight_bytes=2, on_cpu=True)["kept_epoch_copy"] == 2000


def test_unlearn_dry_run_sizes_the_defense_and_the_kept_epoch(llama_dir, capsys, monkeypatch, tmp_path):
    from benchmarks import unlearn

    import benchmarks.core.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    args = ["--model", str(llama_dir), "--data", "world", "--defense", "npo_sam", "--out", str(tmp_path / "out"),
            "--batch-size", "2", "--max-length", "64", "--dry-run"]
    memory = {}
    for epochs in ("1", "3"):
        assert unlearn.main(args + ["--epochs", epochs]) == 0
        out = capsys.readouterr().out
        assert out.startswith("dry run: nothing was loaded.")
        plan = yaml.safe_load(out.split("\n", 1)[1])
        assert plan["training"]["epochs"] == int(epochs) and plan["defense"]["sam_rho"] == 0.01
        memory[epochs] = plan["memory_per_device"]["defense npo_sam"]
    assert not (tmp_path / "out").exists()
    size = model_size(str(llama_dir))
    shape = TrainingShape(2, 64, sam=True)
    expected = estimate_peak_bytes(size, shape, on_cpu=True)["total"]
    from benchmarks.core.checkpoints import format_bytes

    assert memory["1"]["1 CPU process"] == memory["1"]["1 GPU"] == format_bytes(expected)
    assert "sam_copy" in memory["1"]["1 GPU parts"] and "host memory besides" not in memory["1"]
    # three epochs: the selection keeps a copy of the weights while later epochs train (on the host)
    assert memory["3"]["1 GPU"] == memory["1"]["1 GPU"]
    assert memory["3"]["1 CPU process"] == format_bytes(expected + 4 * size.parameters)
    assert "kept_epoch_copy" in memory["3"]["host memory besides"]
    assert unlearn.main(args + ["--max-steps", "2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])["training"]["max_steps"] == 2
    from benchmarks.core.errors import UsageError

    with pytest.raises(UsageError, match="--max-steps must be >= 1, got 0"):
        unlearn.main(args + ["--max-steps", "0"])


def test_adamw_on_a_cpu_holds_two_temporaries_of_the_largest_tensor():
    class Config:
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 64, 4, 4, 256
        num_hidden_layers, vocab_size = 2, 300

    size = ModelSize(parameters=1000, trainable=1000, config=Config(), largest=300)
    shape = TrainingShape(micro_batch=1, max_length=8)
    assert estimate_peak_bytes(size, shape)["optimizer_step"] == 4000  # foreach: sqrt(v) of all at once
    assert estimate_peak_bytes(size, shape, on_cpu=True)["optimizer_step"] == 2 * 300 * 4


class Config:
    hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 64, 4, 4, 256
    num_hidden_layers, vocab_size = 2, 300


def test_adamw_cpu_step_temporaries_are_what_the_estimate_says():
    """torch's single-tensor AdamW (the CPU path): the peak above its state while stepping is
    two temporaries of the largest parameter, as estimate_peak_bytes models it on a CPU."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    big, small = torch.nn.Parameter(torch.zeros(300_000)), torch.nn.Parameter(torch.zeros(1000))
    optimizer = torch.optim.AdamW([big, small], lr=0.1)
    assert optimizer.defaults["foreach"] is None  # the default: single-tensor on CPU tensors
    for p in (big, small):
        p.grad = torch.ones_like(p)
    optimizer.step()  # creates the moments
    live: dict[int, int] = {}  # tensors the step creates (not in-place results), while alive
    peak = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not func._schema.is_mutable:
                live[id(out)] = out.numel() * out.element_size()
                peak[0] = max(peak[0], sum(live.values()))
                weakref.finalize(out, live.pop, id(out), None)
            return out

    with Track():
        optimizer.step()
    size = ModelSize(parameters=301_000, trainable=301_000, config=Config(), largest=300_000)
    assert peak[0] == estimate_peak_bytes(size, TrainingShape(1, 8), on_cpu=True)["optimizer_step"] == 2 * 300_000 * 4


def _embedding_sized_tensors_built_in_backward(tie: bool, existing_grad: bool) -> float:
    """Peak bytes of embedding-sized tensors created during one backward pass of a Llama whose
    embedding dominates, in multiples of the embedding (by storage, via a dispatch mode)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, hidden = 20000, 64
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=tie))
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    if existing_grad:
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    loss = model(input_ids=ids).logits.logsumexp(-1).mean()

    class Track(TorchDispatchMode):
        live: dict[int, int] = {}
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not func._schema.is_mutable and t.numel() >= vocab * hidden:
                    key = t.untyped_storage().data_ptr()
                    if key not in self.live:
                        self.live[key] = t.untyped_storage().nbytes()
                        Track.peak = max(Track.peak, sum(self.live.values()))
                        weakref.finalize(t, self.live.pop, key, None)
            return out

    with Track():
        loss.backward()
    return Track.peak / (vocab * hidden * 4)


def test_backward_builds_the_embedding_sized_gradients_the_estimate_counts():
    from transformers import LlamaConfig

    created = {(tie, existing): _embedding_sized_tensors_built_in_backward(tie, existing)
               for tie in (True, False) for existing in (True, False)}
    assert created == {(True, True): 3, (True, False): 3, (False, True): 2, (False, False): 2}
    embedding = 20000 * 64 * 4

    def transients(tie, accumulates):
        config = LlamaConfig(vocab_size=20000, hidden_size=64, num_hidden_layers=1, tie_word_embeddings=tie)
        size = ModelSize(2_000_000, 2_000_000, config, largest=20000 * 64)
        return estimate_peak_bytes(size, TrainingShape(1, 16, accumulates=accumulates))["embedding_grad_transients"]

    # beyond the gradients themselves: created afresh, one of them is the new .grad of each
    # embedding-sized parameter (tied: one parameter, untied: two); added into an existing
    # .grad, every one is a temporary
    assert transients(True, True) == 3 * embedding and transients(True, False) == (3 - 1) * embedding
    assert transients(False, True) == 2 * embedding and transients(False, False) == (2 - 2) * embedding
    frozen = ModelSize(2_000_000, 1000, LlamaConfig(vocab_size=20000, hidden_size=64, num_hidden_layers=1),
                       largest=500)  # LoRA: the embedding does not train
    assert estimate_peak_bytes(frozen, TrainingShape(1, 16, accumulates=True))["embedding_grad_transients"] == 0
