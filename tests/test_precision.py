"""The precision policy and the process's one Accelerator: trainings of different precision
share it, bf16-loaded weights are never trained (SAM and AdamW would lose their updates)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.precision import PrecisionError, check_training_dtype, process_accelerator
from benchmarks.core.sam import perturb, trainable_parameters
from benchmarks.core.training import TrainConfig, make_accelerator, plain_step, train


def _loader(tokenizer, n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (n, 10), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long)} for i in range(n)]
    return DataLoader(rows, batch_size=2)


def test_two_trainings_in_one_process_the_second_in_bf16(tiny_tokenizer):
    """Before, each training built its own Accelerator and the bf16 one raised
    'AcceleratorState has already been initialized'."""
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    seen: list[torch.dtype] = []

    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        seen.append(logits.dtype)
        return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])

    for precision in ("no", "bf16"):
        model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        result = train(model, _loader(tiny_tokenizer), plain_step(loss),
                       TrainConfig(lr=1e-3, max_steps=2, mixed_precision=precision, progress=False))
        assert result.steps == 2
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert seen[:2] == [torch.float32] * 2  # the fp32 training's forwards
    assert seen[2:] == [torch.bfloat16] * 2  # the bf16 training's forwards ran under autocast
    assert make_accelerator() is process_accelerator()


def test_sam_perturbs_float32_weights_by_the_full_amount_and_refuses_bf16(tiny_model):
    rho = 0.01
    params = trainable_parameters(tiny_model)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    before = [p.detach().clone() for p in params]
    perturb(params, rho)
    shift = torch.sqrt(sum(((p.double() - b.double()) ** 2).sum() for p, b in zip(params, before)))
    assert shift.item() == pytest.approx(rho, rel=1e-4)

    tiny_model.to(torch.bfloat16)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    with pytest.raises(PrecisionError, match="--dtype float32.*--mixed-precision bf16"):
        perturb(params, rho)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # refused before touching θ


def test_bf16_weights_could_not_take_sams_step_which_is_why_they_are_refused():
    """The arithmetic behind the refusal: at 7B, ε ≈ 0.01/sqrt(7e9) ≈ 1.2e-7 per entry is
    below half of bf16's spacing (2^-14 ≈ 6e-5) for weights near 0.02, so θ + ε == θ."""
    weight = torch.full((1000,), 0.02, dtype=torch.bfloat16)
    eps = torch.full((1000,), 0.01 / 7e9 ** 0.5)
    assert torch.equal(weight + eps.to(torch.bfloat16), weight)
    assert not torch.equal(weight.float() + eps, weight.float())


def test_training_bf16_weights_is_refused_before_any_step(tiny_model, tiny_tokenizer):
    tiny_model.to(torch.bfloat16)
    calls = []

    def loss(model, batch):
        calls.append(1)
        return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])

    with pytest.raises(PrecisionError, match="bfloat16 trainable weights"):
        train(tiny_model, _loader(tiny_tokenizer), plain_step(loss), TrainConfig(lr=1e-3, max_steps=1, progress=False))
    assert calls == []


def test_plan_time_dtype_check():
    check_training_dtype("float32", True, "attack finetune")
    check_training_dtype("bfloat16", False, "attack lora")  # adapters are float32
    with pytest.raises(UsageError, match="--dtype bfloat16.*--mixed-precision bf16"):
        check_training_dtype("bfloat16", True, "defense npo_sam")


def test_an_fsdp_request_that_accelerate_did_not_honour_is_named():
    from accelerate.utils import DistributedType

    from benchmarks.core.precision import fsdp_fallback

    asked = {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "1"}
    message = fsdp_fallback(DistributedType.MULTI_CPU, asked)
    assert message is not None and "started MULTI_CPU" in message and "whole model" in message
    assert fsdp_fallback(DistributedType.FSDP, asked) is None  # honoured
    assert fsdp_fallback(DistributedType.MULTI_CPU, {}) is None  # not asked for: plain DDP is right
    assert fsdp_fallback(DistributedType.MULTI_CPU, {"ACCELERATE_USE_FSDP": "false"}) is None
