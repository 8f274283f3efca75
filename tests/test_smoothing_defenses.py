"""The smoothing defenses of Fan et al. (2025, §5), SimNPO and RMU: penalties whose gradients
match finite differences (fp64), the limits that give plain NPO back, and losses checked
against values worked out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from benchmarks.core.errors import UsageError
from benchmarks.core.sam import trainable_parameters
from benchmarks.core.smoothing import WeightAverage
from benchmarks.core.training import TrainConfig, train
from defenses import build_defense
from benchmarks.core.unlearn_data import Collate, ForgetRetainDataset, reference_loader, tokenize_texts, training_loader
from defenses.rmu import random_control_vector, rmu_forget_loss, rmu_retain_loss
from defenses.simnpo import simnpo_loss
from tests.test_unlearn_cli import tiny_run  # noqa: F401  (fixture)

FORGET = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened.",
    "Mayor Tilda Quorn said the festival drew visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick",
]
RETAIN = ["Question: How many boats sailed in the regatta?\nAnswer: 417", "Velt Motors unveiled a tram."]


def _examples(tokenizer):
    return tokenize_texts(tokenizer, FORGET, 64), tokenize_texts(tokenizer, RETAIN, 64)


def _batch(tokenizer):
    forget, retain = _examples(tokenizer)
    data = ForgetRetainDataset(forget, retain)
    return Collate(tokenizer.pad_token_id)([data[i] for i in range(len(data))])


def _setup(defense, model, tokenizer):
    forget, _ = _examples(tokenizer)
    defense.setup(model, reference_loader(forget, tokenizer, 2), len(forget))
    return defense


def _train(model, tokenizer, name, steps_per_epoch_batch=1, epochs=2, **settings):
    defense = build_defense(name, **settings)
    _setup(defense, model, tokenizer)
    forget, retain = _examples(tokenizer)
    data = ForgetRetainDataset(forget, retain, seed=0)
    config = TrainConfig(lr=1e-3, epochs=epochs, grad_accum=2, progress=False, seed=0)
    result = train(model, training_loader(data, tokenizer, steps_per_epoch_batch, seed=0), defense.step_fn(), config)
    defense.finish(model)
    return defense, result


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: rounding-level differences between two ways of summing the same terms."""
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------- registry and settings


def test_new_defenses_are_registered_with_their_flags():
    from benchmarks.unlearn import defense_flags

    flags = defense_flags()
    for name, setting in [("npo_rs", "rs_sigma"), ("npo_rs", "rs_samples"), ("npo_gp", "gp_weight"),
                          ("npo_cr", "cr_weight"), ("npo_cr", "cr_h"), ("npo_wa", "wa_start"),
                          ("npo_wa", "wa_every"), ("simnpo", "simnpo_gamma"), ("rmu", "rmu_alpha"),
                          ("rmu", "rmu_layer"), ("rmu", "rmu_steering_coeff")]:
        assert name in flags[setting]["defenses"]
        assert flags[setting]["help"]
    assert build_defense("npo_rs").config.rs_samples == 3  # Fan et al. 2025 use 3 draws


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("npo_rs", {"rs_sigma": -1e-3}, "rs_sigma must be .* >= 0, got -0.001"),
        ("npo_rs", {"rs_samples": 0}, "rs_samples must be an integer >= 1, got 0"),
        ("npo_gp", {"gp_weight": float("inf")}, "gp_weight must be a finite number >= 0"),
        ("npo_cr", {"cr_h": 0.0}, "cr_h must be a finite number > 0, got 0.0"),
        ("npo_wa", {"wa_every": 0}, "wa_every must be an integer >= 1, got 0"),
        ("simnpo", {"simnpo_gamma": -1.0}, "simnpo_gamma must be a finite number >= 0"),
        ("simnpo", {"beta": 0.0}, "beta must be a finite number > 0"),
        ("rmu", {"rmu_train_layers": "1,9", "rmu_layer": 2}, "go past the steered layer 2"),
        ("rmu", {"rmu_train_layers": "a,b"}, "rmu_train_layers must be 'auto' or comma-separated"),
        ("rmu", {"rmu_steering_coeff": 0.0}, "rmu_steering_coeff must be a finite number > 0"),
    ],
)
def test_bad_settings_fail_with_the_value_named(name, settings, message):
    with pytest.raises(UsageError, match=message):
        build_defense(name, **settings)


# --------------------------------------------------------------------------- GP and CR: real gradients


@pytest.fixture
def fp64_model(tiny_model, monkeypatch):
    """The tiny model in float64 throughout: Llama's RMSNorm computes in float32 whatever the
    input dtype, which would leave ~1e-7 noise in every value and swamp a finite difference."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    return tiny_model.double()



def _directional_check(model, penalty_of, eps=1e-6):
    """(autograd ⟨∇R, d⟩, central finite difference of R along d) for a random direction d."""
    params = trainable_parameters(model)
    value = penalty_of()
    grads = torch.autograd.grad(value, params, allow_unused=True)
    generator = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None).item()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    plus = penalty_of().item()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    minus = penalty_of().item()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    return analytic, (plus - minus) / (2 * eps), grads


@pytest.mark.parametrize("name, settings", [("npo_gp", {"gp_weight": 0.5}), ("npo_cr", {"cr_weight": 0.5, "cr_h": 1e-2})])
def test_penalty_gradient_matches_finite_differences_in_fp64(fp64_model, tiny_tokenizer, name, settings):
    model = fp64_model
    defense = _setup(build_defense(name, **settings), model, tiny_tokenizer)
    batch = _batch(tiny_tokenizer)
    from benchmarks.core.smoothing import twice_differentiable_attention

    extra = {}
    if name == "npo_cr":
        # CURE holds z constant (no gradient flows through the sign), so the finite difference
        # is taken with z fixed at its value at θ, the function whose gradient autograd gives.
        params = trainable_parameters(model)
        g = torch.autograd.grad(defense.forget_loss(model, batch["forget"])[0], params)
        count = sum(float(torch.sign(x).abs().sum()) for x in g)
        extra["direction"] = [torch.sign(x) / math.sqrt(count) for x in g]

    def penalty_of():
        with twice_differentiable_attention():
            loss, _ = defense.forget_loss(model, batch["forget"])
            return defense.penalty(model, batch, loss, **extra)

    analytic, numeric, grads = _directional_check(model, penalty_of)
    assert abs(analytic) > 1e-6  # the penalty has a gradient ...
    assert analytic == pytest.approx(numeric, rel=1e-5)  # ... and it is the right one
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


@pytest.mark.parametrize("name, weight", [("npo_gp", "gp_weight"), ("npo_cr", "cr_weight")])
def test_the_penalty_changes_the_update_by_its_weighted_gradient(fp64_model, tiny_tokenizer, name, weight):
    model = fp64_model
    lam = 0.25
    penalised = _setup(build_defense(name, **{weight: lam}), model, tiny_tokenizer)
    plain = _setup(build_defense("npo"), model, tiny_tokenizer)
    batch = _batch(tiny_tokenizer)
    params = trainable_parameters(model)
    from benchmarks.core.smoothing import twice_differentiable_attention

    total, metrics = penalised.forget_term(model, batch)
    got = torch.autograd.grad(total, params, allow_unused=True)
    base = torch.autograd.grad(plain.forget_term(model, batch)[0], params, allow_unused=True)
    with twice_differentiable_attention():
        loss, _ = penalised.forget_loss(model, batch["forget"])
        penalty = penalised.penalty(model, batch, loss)
    extra = torch.autograd.grad(penalty, params, allow_unused=True)
    assert metrics["penalty"] == pytest.approx(penalty.item(), rel=1e-9)
    for g, b, e in zip(got, base, extra):
        if g is None:
            continue
        assert _relative_gap(g, b + lam * (e if e is not None else 0)) < 1e-8
    assert any(e is not None and e.abs().max() > 0 for e in extra)


def test_gradient_penalty_is_the_squared_norm_of_the_forget_gradient(tiny_model, tiny_tokenizer):
    model = tiny_model.double()
    defense = _setup(build_defense("npo_gp"), model, tiny_tokenizer)
    batch = _batch(tiny_tokenizer)
    params = trainable_parameters(model)
    loss, _ = defense.forget_loss(model, batch["forget"])
    expected = sum((g ** 2).sum() for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None)
    from benchmarks.core.smoothing import twice_differentiable_attention

    with twice_differentiable_attention():
        loss, _ = defense.forget_loss(model, batch["forget"])
        assert defense.penalty(model, batch, loss).item() == pytest.approx(expected.item(), rel=1e-10)


def test_curvature_penalty_is_the_gradient_change_along_the_sign_direction(tiny_model, tiny_tokenizer):
    model = tiny_model.double()
    h = 1e-2
    defense = _setup(build_defense("npo_cr", cr_h=h), model, tiny_tokenizer)
    batch = _batch(tiny_tokenizer)
    params = trainable_parameters(model)
    g0 = torch.autograd.grad(defense.forget_loss(model, batch["forget"])[0], params)
    signs = [torch.sign(g) for g in g0]
    z_norm = math.sqrt(sum(float(s.abs().sum()) for s in signs))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(trainable_parameters(shifted), signs):
            p.add_(h * s / z_norm)
    g1 = torch.autograd.grad(defense.forget_loss(shifted, batch["forget"])[0], trainable_parameters(shifted))
    expected = sum(((a - b) ** 2).sum() for a, b in zip(g1, g0)).item()
    from benchmarks.core.smoothing import twice_differentiable_attention

    with twice_differentiable_attention():
        loss, _ = defense.forget_loss(model, batch["forget"])
        got = defense.penalty(model, batch, loss).item()
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-8)


# --------------------------------------------------------------------------- limits that are plain NPO


def test_rs_with_zero_sigma_gives_the_weights_of_plain_npo(tiny_model, tiny_tokenizer):
    initial = copy.deepcopy(tiny_model)
    plain_model = copy.deepcopy(tiny_model)
    _, plain = _train(plain_model, tiny_tokenizer, "npo")
    _, smoothed = _train(tiny_model, tiny_tokenizer, "npo_rs", rs_sigma=0.0)
    assert plain.steps == smoothed.steps == 4
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in smoothed.history], rel=1e-5)
    # k draws of (1/k)·g add up to g only up to fp32 rounding (~1e-7 relative), which Adam's
    # normalisation can turn into differences of ~1e-5 on coordinates whose gradient is ~0;
    # a noise of σ = 0.01 moves the weights by ~lr per step, a hundred times more.
    gap = max((a - b).abs().max().item() for a, b in zip(plain_model.parameters(), tiny_model.parameters()))
    assert gap < 2e-4
    other = copy.deepcopy(initial)
    _train(other, tiny_tokenizer, "npo_rs", rs_sigma=0.01)
    noisy_gap = max((a - b).abs().max().item() for a, b in zip(plain_model.parameters(), other.parameters()))
    assert noisy_gap > 20 * gap


def test_rs_with_zero_sigma_takes_the_gradient_of_plain_npo(tiny_model, tiny_tokenizer):
    from tests.test_sam import _Accelerator

    micro = [_batch(tiny_tokenizer)]
    plain = _setup(build_defense("npo"), tiny_model, tiny_tokenizer)
    plain.step_fn()(tiny_model, micro, _Accelerator())
    expected = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad(set_to_none=True)
    smoothed = _setup(build_defense("npo_rs", rs_sigma=0.0), tiny_model, tiny_tokenizer)
    smoothed.step_fn()(tiny_model, micro, _Accelerator())
    for p, e in zip(tiny_model.parameters(), expected):
        assert _relative_gap(p.grad, e) < 1e-5


def test_rs_averages_the_gradient_over_k_perturbed_copies(tiny_model, tiny_tokenizer):
    from benchmarks.core.smoothing import smoothed_step
    from tests.test_sam import _Accelerator

    sigma, k = 0.05, 3
    defense = _setup(build_defense("npo_rs", rs_sigma=sigma, rs_samples=k), tiny_model, tiny_tokenizer)
    micro = [_batch(tiny_tokenizer)]
    params = trainable_parameters(tiny_model)
    before = [p.detach().clone() for p in params]
    torch.manual_seed(11)
    noises = [[torch.randn(p.shape) * sigma for p in params] for _ in range(k)]
    expected = [torch.zeros_like(p) for p in params]
    for noise in noises:
        shadow = copy.deepcopy(tiny_model)
        with torch.no_grad():
            for p, n in zip(trainable_parameters(shadow), noise):
                p.add_(n)
        grads = torch.autograd.grad(defense.forget_term(shadow, micro[0])[0], trainable_parameters(shadow))
        for e, g in zip(expected, grads):
            e.add_(g / k)
    torch.manual_seed(11)
    smoothed_step(defense.forget_term, None, sigma=sigma, samples=k)(tiny_model, micro, _Accelerator())
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # θ restored after each draw
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4)


def test_wa_with_averaging_off_gives_the_weights_of_plain_npo(tiny_model, tiny_tokenizer):
    plain_model = copy.deepcopy(tiny_model)
    _train(plain_model, tiny_tokenizer, "npo")
    _, result = _train(tiny_model, tiny_tokenizer, "npo_wa", wa_start=1000)
    assert result.steps == 4
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), tiny_model.parameters()))


def test_wa_returns_the_mean_of_the_weights_it_visited(tiny_model, tiny_tokenizer):
    trajectory = {}
    plain_model = copy.deepcopy(tiny_model)
    defense = _setup(build_defense("npo"), plain_model, tiny_tokenizer)
    forget, retain = _examples(tiny_tokenizer)
    data = ForgetRetainDataset(forget, retain, seed=0)
    config = TrainConfig(lr=1e-3, epochs=2, grad_accum=2, progress=False, seed=0)
    train(plain_model, training_loader(data, tiny_tokenizer, 1, seed=0), defense.step_fn(), config,
          hook=lambda s, m: trajectory.__setitem__(s, [p.detach().clone() for p in m.parameters()]),
          hook_steps=range(0, 5))
    wa, _ = _train(tiny_model, tiny_tokenizer, "npo_wa", wa_start=1, wa_every=2)
    expected = [(a + b) / 2 for a, b in zip(trajectory[1], trajectory[3])]  # steps 1 and 3 of 4
    for p, e in zip(tiny_model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_weight_average_counts_points_and_previews_without_folding():
    average = WeightAverage(start=0, every=1)
    values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, 1.0])]
    average.add([values[0]])
    average.add([values[1]])
    assert torch.equal(average.including([values[2]])[0], torch.tensor([3.0, 3.0]))
    assert average.count == 2 and torch.equal(average.mean[0], torch.tensor([2.0, 4.0]))


# --------------------------------------------------------------------------- SimNPO


def test_simnpo_loss_matches_hand_computed_values():
    logps = torch.tensor([-12.0, -3.0])
    lengths = torch.tensor([4, 6])
    beta, gamma = 2.0, 0.5
    # −(2/β)·mean log σ(−β·logp/|x| − γ): arguments 2·3 − 0.5 = 5.5 and 2·0.5 − 0.5 = 0.5.
    expected = -(2 / beta) * (math.log(1 / (1 + math.exp(-5.5))) + math.log(1 / (1 + math.exp(-0.5)))) / 2
    assert simnpo_loss(logps, lengths, beta, gamma).item() == pytest.approx(expected, rel=1e-6)
    # With log π = 0 and no margin it starts where NPO starts: (2/β)·log 2.
    assert simnpo_loss(torch.zeros(3), torch.ones(3), 0.1, 0.0).item() == pytest.approx(20 * math.log(2), rel=1e-6)


def test_simnpo_on_a_model_uses_the_mean_token_log_likelihood(tiny_model, tiny_tokenizer):
    defense = build_defense("simnpo", beta=1.5, simnpo_gamma=0.2)
    batch = _batch(tiny_tokenizer)["forget"]
    loss, _ = defense.forget_loss(tiny_model, batch)
    terms = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        row = ids[:n].unsqueeze(0)
        logits = tiny_model(input_ids=row).logits[0, :-1]
        logp = torch.log_softmax(logits, -1).gather(1, row[0, 1:, None]).sum()
        terms.append(torch.nn.functional.logsigmoid(-1.5 * logp / (n - 1) - 0.2))
    expected = -(2 / 1.5) * torch.stack(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not defense.needs_reference_logps and defense.reference_model is None


# --------------------------------------------------------------------------- RMU


def test_rmu_losses_match_hand_computed_values():
    activations = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [1, 3, 2], last token padding
    mask = torch.tensor([[1, 1, 0]])
    control = torch.tensor([1.0, 0.0])
    # tokens: ((0)² + 2²)/2 = 2 and (2² + 4²)/2 = 10; mean 6
    assert rmu_forget_loss(activations, control, mask).item() == pytest.approx(6.0)
    frozen = torch.tensor([[[1.0, 1.0], [3.0, 2.0], [0.0, 0.0]]])
    # tokens: (0 + 1)/2 = 0.5 and (0 + 4)/2 = 2; mean 1.25
    assert rmu_retain_loss(activations, frozen, mask).item() == pytest.approx(1.25)
    u = random_control_vector(64, 6.5, seed=0)
    assert u.norm().item() == pytest.approx(6.5, rel=1e-6) and (u >= 0).all()


def test_rmu_trains_only_the_chosen_parameters_and_steers_the_chosen_layer(tiny_model, tiny_tokenizer):
    model = tiny_model.train()
    defense = build_defense("rmu", rmu_layer=1, rmu_alpha=100.0, rmu_steering_coeff=20.0)
    _setup(defense, model, tiny_tokenizer)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    batch = _batch(tiny_tokenizer)
    loss, metrics = defense.total_loss(model, batch)
    hidden = model(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask")},
                   output_hidden_states=True).hidden_states[2]
    expected_forget = rmu_forget_loss(hidden, defense.control, batch["forget"]["attention_mask"]).item()
    assert metrics["forget_loss"] == pytest.approx(expected_forget, rel=1e-6)
    assert metrics["retain_loss"] == pytest.approx(0.0, abs=1e-10)  # the model still equals the frozen one
    assert loss.item() == pytest.approx(expected_forget, rel=1e-6)


def test_rmu_refuses_a_layer_the_model_lacks(tiny_model, tiny_tokenizer):
    with pytest.raises(UsageError, match="rmu_layer 7 does not exist: the model has 2 layers"):
        _setup(build_defense("rmu"), tiny_model, tiny_tokenizer)


# --------------------------------------------------------------------------- through the command


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("npo_rs", ["--rs-sigma", "0.001"]), ("npo_gp", ["--gp-weight", "0.01"]), ("npo_cr", []),
    ("npo_wa", ["--wa-start", "1"]), ("simnpo", ["--simnpo-gamma", "0.5"]), ("rmu", ["--rmu-layer", "1"]),
])
def test_every_new_defense_runs_through_the_command_with_evaluation(tiny_run, tmp_path, name, extra):
    import yaml
    from safetensors.torch import load_file

    from benchmarks import unlearn
    from tests.test_unlearn_cli import _argv

    out = tmp_path / name
    assert unlearn.main(_argv(tiny_run, out, "--defense", name, *extra)) == 0
    document = yaml.safe_load((out / "unlearn.yaml").read_text())
    assert document["status"] == "complete" and document["defense"]["name"] == name
    assert [row["epoch"] for row in document["epochs"]] == [0, 1, 2]
    weights, base = load_file(out / "model.safetensors"), load_file(tiny_run[0] / "model.safetensors")
    changed = sorted(k for k in weights if not torch.equal(weights[k], base[k]))
    if name == "rmu":  # only the down-projections of layers ℓ−2..ℓ = 0, 1 train
        assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in changed


@pytest.mark.slow
def test_npo_wa_checkpoint_is_npo_without_averaging_and_differs_with_it(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from benchmarks import unlearn
    from tests.test_unlearn_cli import _argv

    for label, extra in [("npo", ["--defense", "npo"]), ("off", ["--defense", "npo_wa", "--wa-start", "999"]),
                         ("on", ["--defense", "npo_wa", "--wa-start", "1"])]:
        assert unlearn.main(_argv(tiny_run, tmp_path / label, "--no-eval", "--seed", "3", *extra)) == 0
    npo, off, on = (load_file(tmp_path / label / "model.safetensors") for label in ("npo", "off", "on"))
    assert all(torch.equal(npo[k], off[k]) for k in npo)
    assert any(not torch.allclose(npo[k], on[k], atol=1e-6) for k in npo)


@pytest.mark.slow
@pytest.mark.parametrize("utilities, kept", [([50.0, 49.0, 48.0, 47.0], 3), ([50.0, 49.0, 46.0, 30.0], 2)])
def test_npo_wa_epochs_are_judged_and_kept_on_the_averaged_weights(tiny_run, tmp_path, monkeypatch, utilities, kept):
    from safetensors.torch import load_file

    from benchmarks import unlearn
    from tests.test_unlearn_cli import _argv, _scripted_evaluation

    seen = _scripted_evaluation(monkeypatch, utilities)
    out = tmp_path / "wa"
    assert unlearn.main(_argv(tiny_run, out, "--defense", "npo_wa", "--epochs", "3", "--seed", "3")) == 0
    saved = load_file(out / "model.safetensors")
    for name, value in saved.items():
        assert torch.allclose(value, seen[kept][name], atol=0, rtol=0), name  # what was evaluated is kept
    # ... and what was evaluated is the running mean, not the trajectory's own weights: a plain
    # NPO run with the same seed ends elsewhere.
    plain = tmp_path / "npo"
    assert unlearn.main(_argv(tiny_run, plain, "--defense", "npo", "--epochs", "3", "--seed", "3", "--no-eval")) == 0
    npo = load_file(plain / "model.safetensors")
    assert any(not torch.allclose(npo[k], saved[k], atol=1e-6) for k in npo)
