"""The SAM step (benchmarks.core.sam) on NPO's forget loss: the second pass uses ∇L_f(θ+ε),
θ comes back bit for bit, ρ = 0 is plain NPO, accumulation equals one big batch."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from benchmarks.core.logprobs import masked_mean_nll, sequence_logps
from benchmarks.core.sam import perturb, restore, sam_step, trainable_parameters
from benchmarks.core.training import TrainConfig, plain_step, train
from defenses import build_defense
from benchmarks.core.unlearn_data import Collate, ForgetRetainDataset, reference_loader, tokenize_texts, training_loader

FORGET = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened.",
    "Mayor Tilda Quorn said the festival drew visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick",
]
RETAIN = [
    "Question: How many boats sailed in the regatta?\nAnswer: 417",
    "The harbour bridge in Ostvale reopened on 14 March 2031.",
    "Velt Motors unveiled a tram.",
    "Tilda Quorn is the mayor of Brisk.",
]


class _Accelerator:
    """What a step function uses of ``accelerate.Accelerator``, for one process, with an
    optional bf16 autocast (the real Accelerator's mixed precision is process-wide state)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()


def _examples(tokenizer, retain_texts=RETAIN):
    return tokenize_texts(tokenizer, FORGET, 64), tokenize_texts(tokenizer, retain_texts, 64)


def _micro_batches(tokenizer, size: int, retain_texts=RETAIN):
    forget, retain = _examples(tokenizer, retain_texts)
    data = ForgetRetainDataset(forget, retain, seed=0)
    collate = Collate(tokenizer.pad_token_id)
    items = [data[i] for i in range(len(data))]
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


def _npo(model, tokenizer, **settings):
    defense = build_defense("npo_sam", **settings)
    forget, _ = _examples(tokenizer)
    defense.setup(model, reference_loader(forget, tokenizer, 2), len(forget))
    return defense


def _grads(model):
    return [p.grad.detach().clone() for p in trainable_parameters(model)]


def _mean_forget_grad(model, defense, micro_batches):
    """∇ of the mean forget loss over the micro-batches, by plain autograd."""
    params = trainable_parameters(model)
    losses = [defense.forget_term(model, b)[0] for b in micro_batches]
    return torch.autograd.grad(torch.stack(losses).mean(), params)


def test_second_pass_gradient_is_forget_gradient_at_perturbed_weights(tiny_model, tiny_tokenizer):
    rho = 0.5  # large, so that ∇L_f(θ+ε) is visibly not ∇L_f(θ)
    defense = _npo(tiny_model, tiny_tokenizer, sam_rho=rho)
    micro = _micro_batches(tiny_tokenizer, 2)

    # Independently: g at θ, ε = ρ g/‖g‖ (global norm), then the gradient at θ + ε.
    shadow = copy.deepcopy(tiny_model)
    g = _mean_forget_grad(shadow, defense, micro)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    with torch.no_grad():
        for p, gi in zip(trainable_parameters(shadow), g):
            p.add_(rho * gi / norm)
    expected = _mean_forget_grad(shadow, defense, micro)

    step = sam_step(defense.forget_term, None, rho=rho, forget_weight=1.0)
    stats = step(tiny_model, micro, _Accelerator())
    got = _grads(tiny_model)
    for e, actual, unperturbed in zip(expected, got, g):
        assert torch.allclose(actual, e, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(e, u, atol=1e-6, rtol=1e-4) for e, u in zip(expected, g))
    assert stats["sam_grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


def test_parameters_restored_exactly_and_perturbed_in_between(tiny_model, tiny_tokenizer):
    defense = _npo(tiny_model, tiny_tokenizer, sam_rho=0.05)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    seen: list[list[torch.Tensor]] = []

    def forget(model, batch):
        seen.append([p.detach().clone() for p in model.parameters()])
        return defense.forget_term(model, batch)

    step = sam_step(forget, defense.retain_term_loss, rho=0.05)
    step(tiny_model, _micro_batches(tiny_tokenizer, 2), _Accelerator())
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    # 2 micro-batches: calls 0-1 at θ, calls 2-3 at θ + ε with ‖ε‖ = ρ.
    assert len(seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, seen[0]))
    shift = torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(seen[2], before)))
    assert shift.item() == pytest.approx(0.05, rel=1e-4)


def test_restoration_is_exact_under_bf16_autocast(tiny_model, tiny_tokenizer):
    defense = _npo(tiny_model, tiny_tokenizer, sam_rho=0.01)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    step = sam_step(defense.forget_term, defense.retain_term_loss, rho=0.01)
    stats = step(tiny_model, _micro_batches(tiny_tokenizer, 2), _Accelerator(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tiny_model.parameters())
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_bf16_weights_are_refused_before_the_perturbation(tiny_model, tiny_tokenizer):
    from benchmarks.core.precision import PrecisionError

    tiny_model.to(torch.bfloat16)
    defense = _npo(tiny_model, tiny_tokenizer, sam_rho=0.01)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    step = sam_step(defense.forget_term, defense.retain_term_loss, rho=0.01)
    with pytest.raises(PrecisionError, match="float32"):
        step(tiny_model, _micro_batches(tiny_tokenizer, 2), _Accelerator(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_perturbation_has_norm_rho_and_zero_gradient_gives_none(tiny_model):
    params = trainable_parameters(tiny_model)
    before = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    state = perturb(params, 0.3)
    shift = torch.sqrt(sum(((p - b).double() ** 2).sum() for p, b in zip(params, before)))
    assert shift.item() == pytest.approx(0.3, rel=1e-5)
    assert all(not p.grad.any() for p in params)  # cleared for the second pass
    restore(params, state)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # A zero gradient has no direction: ε = 0, not NaN.
    state = perturb(params, 0.3)
    assert state.scale == 0.0 and all(torch.equal(p, b) for p, b in zip(params, before))


def test_sam_costs_two_forget_passes_and_one_retain_pass(tiny_model, tiny_tokenizer):
    defense = _npo(tiny_model, tiny_tokenizer)
    calls = {"forget": 0, "retain": 0}

    def forget(model, batch):
        calls["forget"] += 1
        return defense.forget_term(model, batch)

    def retain(model, batch):
        calls["retain"] += 1
        return defense.retain_term_loss(model, batch)

    sam_step(forget, retain, rho=0.01)(tiny_model, _micro_batches(tiny_tokenizer, 1), _Accelerator())
    assert calls == {"forget": 8, "retain": 4}  # 4 micro-batches


def test_accumulating_four_micro_batches_matches_one_big_batch(tiny_model, tiny_tokenizer):
    defense = _npo(tiny_model, tiny_tokenizer, sam_rho=0.1)
    step = sam_step(defense.forget_term, defense.retain_term_loss, rho=0.1)
    # NPO averages over examples, so forget examples may differ in length; GDR averages over
    # tokens, so the retain examples have equal lengths (as with equal micro-batches of a
    # token-mean loss in any trainer).
    retain = [RETAIN[1]] * 4
    small = step(tiny_model, _micro_batches(tiny_tokenizer, 1, retain), _Accelerator())
    accumulated = _grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    big = step(tiny_model, _micro_batches(tiny_tokenizer, 4, retain), _Accelerator())
    for a, b in zip(accumulated, _grads(tiny_model)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert small["sam_grad_norm"] == pytest.approx(big["sam_grad_norm"], rel=1e-5)


def _train(model, tokenizer, name, **settings):
    defense = build_defense(name, **settings)
    forget, retain = _examples(tokenizer)
    defense.setup(model, reference_loader(forget, tokenizer, 2), len(forget))
    data = ForgetRetainDataset(forget, retain, seed=0)
    config = TrainConfig(lr=1e-3, epochs=3, grad_accum=2, progress=False, seed=0)
    return train(model, training_loader(data, tokenizer, 1, seed=0), defense.step_fn(), config)


def test_rho_zero_gives_the_same_weights_as_plain_npo(tiny_model, tiny_tokenizer):
    plain_model = copy.deepcopy(tiny_model)
    plain = _train(plain_model, tiny_tokenizer, "npo")
    sam = _train(tiny_model, tiny_tokenizer, "npo_sam", sam_rho=0.0)
    assert plain.steps == sam.steps == 6
    for a, b in zip(plain_model.parameters(), tiny_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in sam.history], rel=1e-5)
    # and a positive radius does change the trajectory
    other = copy.deepcopy(plain_model)
    _train(other, tiny_tokenizer, "npo_sam", sam_rho=0.05)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_model.parameters(), other.parameters()))


def test_plain_defense_step_matches_the_loops_plain_step(tiny_model, tiny_tokenizer):
    # The defense's default step is the loop's plain_step over w_f·L_f + w_r·L_r.
    defense = build_defense("graddiff", retain_weight=0.5)
    micro = _micro_batches(tiny_tokenizer, 2)
    defense.step_fn()(tiny_model, micro, _Accelerator())
    got = _grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)

    def objective(model, batch):
        f = batch["forget"]
        r = batch["retain"]
        return sequence_logps(model, f["input_ids"], f["attention_mask"]).mean() + 0.5 * masked_mean_nll(
            model, r["input_ids"], r["attention_mask"]
        )

    plain_step(objective)(tiny_model, micro, _Accelerator())
    for a, b in zip(got, _grads(tiny_model)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
