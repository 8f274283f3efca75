"""The shared training loop: accumulation equivalence, hooks, schedules, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.core.errors import TrainingDiverged, UsageError
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.training import TrainConfig, plain_step, train


def _batches(tokenizer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, 12), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long)} for i in range(n)]


def _nll(model, batch):
    return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulating_four_micro_batches_equals_one_big_batch(tiny_model, tiny_tokenizer):
    """Gradients, not weights, are compared: Adam is nearly invariant to the loss scale, so a
    wrong 1/k factor would hide behind it."""
    from accelerate import Accelerator

    data = _batches(tiny_tokenizer, n=8)
    step = plain_step(_nll)
    accelerator = Accelerator()
    micro = list(DataLoader(data, batch_size=2))
    stats = step(tiny_model, micro, accelerator)
    accumulated = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    # Equal lengths and no padding: the mean of 4 micro-batch means is the mean over all 8.
    big = step(tiny_model, list(DataLoader(data, batch_size=8)), accelerator)
    for name, p in tiny_model.named_parameters():
        assert torch.allclose(accumulated[name], p.grad, atol=1e-7, rtol=1e-5), name
    assert stats["loss"] == pytest.approx(big["loss"], rel=1e-6)


def test_hooks_run_at_step_zero_milestones_and_epoch_ends(tiny_model, tiny_tokenizer):
    data = _batches(tiny_tokenizer, n=6)
    seen, epochs, before = [], [], _params(tiny_model)

    def hook(step, model):
        seen.append(step)
        if step == 0:  # step 0 sees the untouched model
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    cfg = TrainConfig(lr=1e-3, epochs=2, progress=False)
    result = train(
        tiny_model, DataLoader(data, batch_size=2), plain_step(_nll), cfg,
        hook=hook, hook_steps=(0, 2, 5), epoch_hook=lambda e, s, m: epochs.append((e, s)),
    )
    assert result.steps == 6
    assert seen == [0, 2, 5]
    assert epochs == [(1, 3), (2, 6)]
    assert [h["epoch"] for h in result.history] == [1, 1, 1, 2, 2, 2]


def test_max_steps_cycles_the_data_and_cosine_decays_to_zero(tiny_model, tiny_tokenizer):
    data = _batches(tiny_tokenizer, n=4)
    cfg = TrainConfig(lr=1e-3, max_steps=10, schedule="cosine", progress=False)
    result = train(tiny_model, DataLoader(data, batch_size=2), plain_step(_nll), cfg)
    assert result.steps == 10
    lrs = [h["lr"] for h in result.history]
    # After step s of 10 the cosine schedule sits at lr * (1 + cos(pi * s / 10)) / 2.
    expected = [1e-3 * (1 + math.cos(math.pi * s / 10)) / 2 for s in range(1, 11)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_non_finite_loss_stops_with_the_step_named(tiny_model, tiny_tokenizer):
    data = _batches(tiny_tokenizer, n=4)
    calls = []

    def exploding(model, batch):
        calls.append(1)
        loss = _nll(model, batch)
        return loss * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(TrainingDiverged, match="step 2"):
        train(tiny_model, DataLoader(data, batch_size=2), plain_step(exploding),
              TrainConfig(lr=1e-3, epochs=1, progress=False))


@pytest.mark.parametrize(
    "kwargs, word",
    [({"lr": 0}, "lr"), ({"epochs": 0}, "epochs"), ({"max_steps": 0}, "steps"),
     ({"schedule": "cosin"}, "cosine"), ({"mixed_precision": "fp8"}, "bf16")],
)
def test_bad_settings_are_named(kwargs, word):
    with pytest.raises(UsageError, match=word):
        TrainConfig(**kwargs)


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_weights(tiny_tokenizer):
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    data = _batches(tiny_tokenizer, n=4)
    weights, kept = [], []
    for checkpointing in (False, True):
        model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
        saved = [0]

        def count(t):
            saved[0] += t.numel()
            return t

        def loss(model, batch):
            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                return _nll(model, batch)

        cfg = TrainConfig(lr=1e-3, max_steps=2, progress=False, gradient_checkpointing=checkpointing)
        train(model, DataLoader(data, batch_size=2), plain_step(loss), cfg)
        weights.append(_params(model))
        kept.append(saved[0])
        assert not model.is_activation_checkpointing  # switched off again for evaluation
    assert kept[1] < kept[0] / 2  # activations kept for the backward pass
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], atol=1e-6), name
