"""Defenses: the registry, config checks, the cached reference, and each forget/retain term
on a tiny model against an independent computation."""

from __future__ import annotations

import copy
import importlib
import math
import pkgutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import defenses
from benchmarks.core.errors import TrainingDiverged, UsageError
from benchmarks.core.logprobs import masked_mean_nll, sequence_logps
from benchmarks.core.reference import ReferenceLogps, compute_reference_logps
from benchmarks.core.training import TrainConfig, train
from defenses import DEFENSES, RETAIN_LOSSES, build_defense
from benchmarks.core.unlearn_data import Collate, ForgetRetainDataset, reference_loader, tokenize_texts, training_loader
from defenses.npo import npo_loss

FORGET = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened.",
    "Mayor Tilda Quorn said the festival drew visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick",
]
RETAIN = ["Question: How many boats sailed in the regatta?\nAnswer: 417", "Velt Motors unveiled a tram."]


def _batch(tokenizer, texts=FORGET, start=0):
    examples = tokenize_texts(tokenizer, texts, 64)
    data = ForgetRetainDataset(examples, tokenize_texts(tokenizer, RETAIN, 64))
    return Collate(tokenizer.pad_token_id)([data[i] for i in range(start, len(data))])


def _setup(defense, model, tokenizer, batch_size=3):
    forget = tokenize_texts(tokenizer, FORGET, 64)
    defense.setup(model, reference_loader(forget, tokenizer, batch_size), len(forget))
    return defense


@torch.no_grad()
def _nudge(model, seed=1, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator))


# --------------------------------------------------------------------------- registry


def test_registry_holds_exact_names():
    assert DEFENSES.names() == ["ga", "graddiff", "npo", "npo_cr", "npo_gp", "npo_muse", "npo_rs", "npo_sam", "npo_wa",
                              "rmu", "simnpo"]
    assert RETAIN_LOSSES.names() == ["gdr", "klr", "none"]


@pytest.mark.parametrize("name", ["NPO", "np", "npo_sam2", "sam"])
def test_unknown_defense_fails_listing_the_valid_ones(name):
    with pytest.raises(UsageError, match=r"unknown defense .*valid names: ga, graddiff, npo, npo_cr, npo_gp, npo_muse, npo_rs, npo_sam"):
        build_defense(name)


def test_every_module_of_the_package_is_imported():
    modules = [m.name for m in pkgutil.iter_modules(defenses.__path__)]
    assert {"npo", "npo_sam", "npo_muse", "ga", "retain", "base"} <= set(modules)
    assert all(f"defenses.{m}" in sys.modules for m in modules)


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("npo", {"beta": 0.0}, "beta must be .* > 0, got 0.0"),
        ("npo", {"beta": -0.1}, "beta must be .* > 0, got -0.1"),
        ("npo_muse", {"beta": float("nan")}, "beta"),
        ("npo_sam", {"sam_rho": -0.01}, "sam_rho must be .* >= 0, got -0.01"),
        ("npo", {"retain_weight": -1.0}, "retain_weight"),
        ("ga", {"forget_weight": 0.0}, "forget_weight"),
        ("npo", {"retain_loss": "kl"}, r"unknown retain loss 'kl'; valid names: gdr, klr, none"),
        ("npo", {"sam_rho": 0.01}, r"defense 'npo' takes no setting sam_rho"),
    ],
)
def test_bad_settings_fail_with_the_value_named(name, settings, message):
    with pytest.raises(UsageError, match=message):
        build_defense(name, **settings)


def test_defaults_and_description():
    assert build_defense("npo").describe() == {
        "name": "npo", "forget_weight": 1.0, "retain_weight": 1.0, "retain_loss": "gdr", "beta": 0.1,
    }
    assert build_defense("npo_sam").describe()["sam_rho"] == 0.01
    assert build_defense("ga").config.retain_loss == "none"
    assert build_defense("graddiff").config.retain_loss == "gdr"
    assert not build_defense("npo", retain_loss="none").uses_retain


# --------------------------------------------------------------------------- reference cache


def test_reference_cache_matches_per_example_scores_whatever_the_batch_size(tiny_model, tiny_tokenizer):
    forget = tokenize_texts(tiny_tokenizer, FORGET, 64)
    expected = [
        sequence_logps(tiny_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
        for ids in forget
    ]
    for batch_size in (1, 3, 4):
        table = compute_reference_logps(tiny_model, reference_loader(forget, tiny_tokenizer, batch_size), len(forget))
        assert table.values.tolist() == pytest.approx(expected, rel=1e-5)
    assert table.lookup(torch.tensor([2, 0])).tolist() == pytest.approx([expected[2], expected[0]], rel=1e-5)


def test_reference_lookup_refuses_unknown_examples():
    table = ReferenceLogps(torch.tensor([-1.0, float("nan")]))
    with pytest.raises(KeyError, match="out of range"):
        table.lookup(torch.tensor([2]))
    with pytest.raises(KeyError, match=r"no reference log-likelihood .* \[1\]"):
        table.lookup(torch.tensor([0, 1]))


def test_reference_cache_must_cover_the_dataset(tiny_model, tiny_tokenizer):
    forget = tokenize_texts(tiny_tokenizer, FORGET, 64)
    partial = list(reference_loader(forget, tiny_tokenizer, 2))[:1]
    with pytest.raises(RuntimeError, match="missing for 2 of 4"):
        compute_reference_logps(tiny_model, partial, len(forget))


# --------------------------------------------------------------------------- NPO


def test_cached_reference_npo_equals_npo_with_a_second_model(tiny_model, tiny_tokenizer):
    reference_model = copy.deepcopy(tiny_model).eval()
    defense = _setup(build_defense("npo", beta=0.1), tiny_model, tiny_tokenizer)
    _nudge(tiny_model)  # move away from π_ref so that the ratio and gradients are not trivial
    batch = _batch(tiny_tokenizer)
    forget = batch["forget"]

    cached, _ = defense.forget_term(tiny_model, batch)
    cached.backward()
    cached_grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad(set_to_none=True)

    with torch.no_grad():
        ref = sequence_logps(reference_model, forget["input_ids"], forget["attention_mask"])
    policy = sequence_logps(tiny_model, forget["input_ids"], forget["attention_mask"])
    live = npo_loss(policy, ref, 0.1)
    live.backward()

    assert abs(cached.item() - live.item()) < 1e-6
    assert abs(cached.item() - 2 / 0.1 * math.log(2)) > 1e-3  # the nudge mattered
    for a, p in zip(cached_grads, tiny_model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=0)


def test_npo_starts_at_two_over_beta_log_two(tiny_model, tiny_tokenizer):
    defense = _setup(build_defense("npo", beta=0.2), tiny_model, tiny_tokenizer)
    loss, metrics = defense.forget_term(tiny_model, _batch(tiny_tokenizer))
    assert loss.item() == pytest.approx(2 / 0.2 * math.log(2), abs=1e-5)
    assert metrics["log_ratio"] == pytest.approx(0.0, abs=1e-4)


def test_npo_leaves_padding_out(tiny_model, tiny_tokenizer):
    defense = _setup(build_defense("npo"), tiny_model, tiny_tokenizer)
    _nudge(tiny_model)
    padded = _batch(tiny_tokenizer)  # 4 examples of different lengths, right-padded
    assert (padded["forget"]["attention_mask"] == 0).any()
    together = defense.forget_term(tiny_model, padded)[0].item()
    alone = [defense.forget_term(tiny_model, _collate_one(tiny_tokenizer, i))[0].item() for i in range(4)]
    assert together == pytest.approx(sum(alone) / 4, rel=1e-5)


def _collate_one(tokenizer, i):
    examples = tokenize_texts(tokenizer, FORGET, 64)
    return Collate(tokenizer.pad_token_id)([ForgetRetainDataset(examples)[i]])


def test_npo_muse_uses_the_muse_expression_with_a_frozen_reference(tiny_model, tiny_tokenizer):
    reference_model = copy.deepcopy(tiny_model).eval()
    defense = build_defense("npo_muse", beta=0.1)
    defense.setup(tiny_model)
    assert defense.reference_model is not None and defense.reference_logps is None
    assert not any(p.requires_grad for p in defense.reference_model.parameters())
    batch = _batch(tiny_tokenizer, FORGET[:1])  # one example: no padding, as in MUSE's batches
    at_start = defense.forget_term(tiny_model, batch)
    assert at_start.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    _nudge(tiny_model)
    ids = batch["forget"]["input_ids"]
    with torch.no_grad():
        ref_logits = reference_model(ids).logits
    muse = -F.logsigmoid(0.1 * (ref_logits - tiny_model(ids).logits)).mean() * 2 / 0.1
    assert defense.forget_term(tiny_model, batch).item() == pytest.approx(muse.item(), rel=1e-6)


# --------------------------------------------------------------------------- GA and retain terms


def test_ga_forget_loss_is_mean_sequence_log_likelihood(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    forget = batch["forget"]
    expected = sequence_logps(tiny_model, forget["input_ids"], forget["attention_mask"]).mean()
    assert build_defense("ga").forget_term(tiny_model, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_total_loss_weights_forget_and_gdr_retain(tiny_model, tiny_tokenizer):
    defense = build_defense("graddiff", forget_weight=2.0, retain_weight=0.5)
    batch = _batch(tiny_tokenizer)
    forget, retain = batch["forget"], batch["retain"]
    loss, metrics = defense.total_loss(tiny_model, batch)
    f = sequence_logps(tiny_model, forget["input_ids"], forget["attention_mask"]).mean()
    r = masked_mean_nll(tiny_model, retain["input_ids"], retain["attention_mask"])
    assert loss.item() == pytest.approx(2.0 * f.item() + 0.5 * r.item(), rel=1e-6)
    assert metrics["forget_loss"] == pytest.approx(f.item(), rel=1e-6)
    assert metrics["retain_loss"] == pytest.approx(r.item(), rel=1e-6)


def test_klr_is_zero_before_training_and_positive_after(tiny_model, tiny_tokenizer):
    defense = _setup(build_defense("npo", retain_loss="klr"), tiny_model, tiny_tokenizer)
    assert defense.reference_model is not None and defense.reference_logps is not None
    batch = _batch(tiny_tokenizer)
    assert defense.retain_loss(tiny_model, batch["retain"]).item() == pytest.approx(0.0, abs=1e-6)
    _nudge(tiny_model)
    assert defense.retain_loss(tiny_model, batch["retain"]).item() > 1e-4


def test_no_reference_model_for_cached_npo_with_gdr(tiny_model, tiny_tokenizer):
    defense = _setup(build_defense("npo_sam"), tiny_model, tiny_tokenizer)
    assert defense.reference_model is None


# --------------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_training_with_a_clear_message(tiny_model, tiny_tokenizer):
    defense = _setup(build_defense("npo"), tiny_model, tiny_tokenizer)
    defense.reference_logps = ReferenceLogps(torch.full((4,), float("-inf")))
    forget = tokenize_texts(tiny_tokenizer, FORGET, 64)
    data = ForgetRetainDataset(forget, tokenize_texts(tiny_tokenizer, RETAIN, 64))
    with pytest.raises(TrainingDiverged, match="loss became inf at step 1"):
        train(tiny_model, training_loader(data, tiny_tokenizer, 2, seed=0), defense.step_fn(),
              TrainConfig(lr=1e-3, progress=False))


# --------------------------------------------------------------------------- data pipeline


def test_long_texts_are_split_into_windows_that_each_start_with_bos(tiny_tokenizer):
    text = " ".join(FORGET)
    ids = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tiny_tokenizer.bos_token_id
    windows = tokenize_texts(tiny_tokenizer, [text], 8)
    assert all(w[0] == bos and 2 <= len(w) <= 8 for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[1:]  # nothing lost, nothing repeated
    assert tokenize_texts(tiny_tokenizer, [text], 10_000) == [ids]


def test_extra_views_come_after_the_running_text(tiny_tokenizer):
    view = lambda text: [tiny_tokenizer.bos_token_id] + tiny_tokenizer(text.upper(), add_special_tokens=False)["input_ids"]
    plain = tokenize_texts(tiny_tokenizer, FORGET[:2], 1000)
    both = tokenize_texts(tiny_tokenizer, FORGET[:2], 1000, [view])
    assert both[:2] == plain and both[2:] == [view(t) for t in FORGET[:2]]


def test_retain_partners_cover_the_whole_retain_set_over_epochs():
    # 2 forget and 6 retain examples: epochs 0, 1, 2 pair the forget examples with retain
    # positions 0-1, 2-3 and 4-5 of the permutation, so three epochs see every retain example once.
    forget = [[1, 2], [3, 4]]
    retain = [[10 + k] for k in range(6)]
    data = ForgetRetainDataset(forget, retain, seed=3)
    seen = []
    for epoch in range(3):
        data.set_epoch(epoch)
        seen += [data[i]["retain"][0] for i in range(2)]
    assert sorted(seen) == [10, 11, 12, 13, 14, 15]
    assert seen == [10 + k for k in data.retain_order]
    data.set_epoch(3)  # and then around again
    assert [data[i]["retain"][0] for i in range(2)] == seen[:2]


def test_the_training_loop_tells_the_dataset_its_epoch(tiny_model):

    from benchmarks.core.training import TrainConfig, plain_step, train

    class Recording(torch.utils.data.Dataset):
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.tensor([1, 2, 3])

    dataset = Recording()
    loader = DataLoader(dataset, batch_size=1)

    def loss(model, batch):
        return model(input_ids=batch).logits.float().mean()

    train(tiny_model, loader, plain_step(loss), TrainConfig(lr=1e-4, epochs=3))
    # (accelerate's prepared loader passes the epoch on as well: the same value, twice)
    assert list(dict.fromkeys(dataset.epochs)) == [0, 1, 2] and dataset.epochs == sorted(dataset.epochs)


def test_forget_examples_carry_their_index_and_a_seeded_retain_partner(tiny_tokenizer):
    forget = tokenize_texts(tiny_tokenizer, FORGET, 64)
    retain = tokenize_texts(tiny_tokenizer, RETAIN, 64)
    data = ForgetRetainDataset(forget, retain, seed=5)
    assert sorted(data.retain_order) == [0, 1]
    assert data.retain_order == ForgetRetainDataset(forget, retain, seed=5).retain_order
    for i in range(len(data)):
        assert data[i]["forget"] == (i, forget[i])
        assert data[i]["retain"] == retain[data.retain_order[i % 2]]
    batch = Collate(tiny_tokenizer.pad_token_id)([data[2], data[0]])
    assert batch["forget"]["index"].tolist() == [2, 0]
    mask = batch["forget"]["attention_mask"]
    assert mask.sum(dim=1).tolist() == [len(forget[2]), len(forget[0])]
    assert (batch["forget"]["input_ids"][mask == 0] == tiny_tokenizer.pad_token_id).all()
