"""The quantize and benign attacks and composed attack plans: RTN against values worked out by
hand and its error bounds, what a plan measures at each milestone and in which order, and benign
data that holds none of the forget documents."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from attacks import ATTACKS, attack_class, attack_flags, make_attack
from tests.test_relearn_cli import gpt2_dir, muse_dir  # noqa: F401  (fixtures)
from attacks.benign import read_corpus, without_forget_documents
from attacks.quantize import fake_quantize, quantized_linears
from benchmarks.core.errors import DataError, UsageError

DOCS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
]
SMALL = dict(steps=4, lr=1e-2, batch_size=2, micro_batch_size=1, max_length=24, schedule="constant")

W = torch.tensor([[1.0, -0.4, 0.25, 0.1],
                  [2.0, 0.0, -3.0, 1.0]])


# --------------------------------------------------------------------------- RTN by hand


def test_rtn_per_channel_at_4_bits_matches_the_hand_computed_grid():
    # 4 bits, symmetric: levels -7..7, Δ = max|w| / 7 per row.
    # row 0: Δ = 1/7:  1 -> 7, -0.4 -> -2.8 -> -3, 0.25 -> 1.75 -> 2, 0.1 -> 0.7 -> 1
    # row 1: Δ = 3/7:  2 -> 4.67 -> 5, 0 -> 0, -3 -> -7, 1 -> 2.33 -> 2
    expected = torch.tensor([[7, -3, 2, 1], [5 * 3, 0, -7 * 3, 2 * 3]], dtype=torch.float32) / 7
    assert torch.allclose(fake_quantize(W, 4), expected, atol=1e-7)


def test_rtn_groups_of_two_get_their_own_scales():
    # row 1 in groups [2, 0] (Δ = 2/7: exact) and [-3, 1] (Δ = 3/7: 1 -> 2 · 3/7)
    got = fake_quantize(W, 4, group_size=2)
    assert torch.allclose(got[1], torch.tensor([2.0, 0.0, -3.0, 6 / 7]), atol=1e-7)
    # row 0 in groups [1, -0.4] (Δ = 1/7) and [0.25, 0.1] (Δ = 0.25/7: exact 0.25, 0.1 -> 2.8 -> 3)
    assert torch.allclose(got[0], torch.tensor([1.0, -3 / 7, 0.25, 3 * 0.25 / 7]), atol=1e-7)
    with pytest.raises(UsageError, match="quant_group_size 3 does not divide a layer's 4 input features"):
        fake_quantize(W, 4, group_size=3)


def test_rtn_asymmetric_uses_the_min_max_grid():
    # 2 bits (codes 0..3), row [2, 0, -3, 1]: Δ = (2 − (−3)) / 3 = 5/3, zero point round(3 / Δ) =
    # round(1.8) = 2; round(w/Δ) = [1.2 -> 1, 0, -1.8 -> -2, 0.6 -> 1], codes + 2 = [3, 2, 0, 3],
    # dequantized (code − 2) · Δ.
    got = fake_quantize(W[1:], 2, scheme="asymmetric")
    assert torch.allclose(got, torch.tensor([[5 / 3, 0.0, -10 / 3, 5 / 3]]), atol=1e-6)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_error_is_at_most_half_a_step_and_8_bits_beat_4(scheme, group_size):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for bits in (8, 4):
        q = fake_quantize(weight, bits, group_size, scheme)
        groups = weight.reshape(32, -1, group_size or 64)
        if scheme == "symmetric":
            step = groups.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        else:
            step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2 ** bits - 1)
        error = (q - weight).abs().reshape_as(groups)
        assert (error <= step / 2 + 1e-6).all()
        levels = max(len(torch.unique(row)) for row in q.reshape_as(groups).reshape(-1, group_size or 64))
        assert levels <= (2 ** bits - 1 if scheme == "symmetric" else 2 ** bits)
        errors[bits] = error.mean().item()
    assert errors[8] < errors[4] / 10  # Δ shrinks ~18x (symmetric) or 17x (asymmetric)


def test_smaller_groups_never_quantize_worse_than_whole_rows():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    row_error = (fake_quantize(weight, 4) - weight).abs().amax(dim=1)
    rows = weight.abs().amax(dim=1) / 7 / 2
    group_error = (fake_quantize(weight, 4, 16) - weight).abs().amax(dim=1)
    assert (group_error <= rows + 1e-6).all() and (row_error <= rows + 1e-6).all()
    assert group_error.mean() < row_error.mean()


# --------------------------------------------------------------------------- the quantize attack


def test_quantize_changes_only_decoder_linear_weights_to_their_quantized_values(tiny_model):
    before = copy.deepcopy(tiny_model.state_dict())
    attack = make_attack("quantize", quant_bits=4)
    model = attack.apply(attack.prepare(tiny_model))
    layers = {f"{name}.weight" for name, _ in quantized_linears(model)}
    assert "model.layers.0.self_attn.q_proj.weight" in layers and "lm_head.weight" not in layers
    for key, value in model.state_dict().items():
        if key in layers:
            assert torch.equal(value, fake_quantize(before[key], 4)), key
            assert not torch.equal(value, before[key])
        else:
            assert torch.equal(value, before[key]), key  # embeddings, norms, tied head untouched
    again = copy.deepcopy(model.state_dict())
    attack.apply(model)
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())  # RTN is idempotent


def test_quantize_run_measures_the_model_before_and_after(tiny_model, tiny_tokenizer):
    attack = make_attack("quantize", quant_bits=8)
    assert attack.config.steps == 1 and not attack.trains
    seen = {}
    q_proj = tiny_model.model.layers[0].self_attn.q_proj.weight
    original = q_proj.detach().clone()
    attack.run(attack.prepare(tiny_model), tiny_tokenizer, DOCS, seed=0,
               hook=lambda step, m: seen.__setitem__(step, m.model.layers[0].self_attn.q_proj.weight.clone()),
               hook_steps=[0, 1])
    assert sorted(seen) == [0, 1]
    assert torch.equal(seen[0], original) and torch.equal(seen[1], fake_quantize(original, 8))


def test_quantize_settings_are_checked():
    with pytest.raises(UsageError, match="quant_bits must be an integer from 2 to 8, got 16"):
        make_attack("quantize", quant_bits=16)
    with pytest.raises(UsageError, match="unknown quant_backend 'gptq'"):
        make_attack("quantize", quant_backend="gptq")
    with pytest.raises(UsageError, match="bitsandbytes quantizes to 4 or 8 bits"):
        make_attack("quantize", quant_backend="bitsandbytes", quant_bits=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bitsandbytes_backend_needs_cuda(tiny_model):
    attack = make_attack("quantize", quant_backend="bitsandbytes", quant_bits=4)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        attack.apply(tiny_model)


# --------------------------------------------------------------------------- composed plans


def test_a_plan_is_exact_names_with_the_training_attack_first():
    assert attack_class("finetune+quantize").name == "finetune+quantize"
    with pytest.raises(UsageError, match="at most one training attack, and it comes first"):
        attack_class("quantize+finetune")
    with pytest.raises(UsageError, match="at most one training attack"):
        attack_class("finetune+lora")
    with pytest.raises(UsageError, match="repeats an attack"):
        attack_class("finetune+quantize+quantize")
    with pytest.raises(UsageError, match="unknown attack 'quantise'"):
        attack_class("finetune+quantise")
    assert "finetune+quantize" not in ATTACKS  # plans are built, not registered


@pytest.mark.slow
def test_a_plan_config_travels_to_a_worker_process_and_back():
    import copy

    from benchmarks.core.job_pool import JobPool

    config = make_attack("finetune+quantize", quant_bits=4, steps=7, relearn_docs=3).config
    with JobPool(2, threads=1) as pool:  # the worker unpickles it, copies it and sends the copy back
        pool.submit("config", copy.copy, config)
        _, returned = pool.next_done()
    assert type(returned) is type(config)
    assert returned.to_dict() == config.to_dict()
    assert [type(part) for part in returned.part_configs] == [type(part) for part in config.part_configs]


def test_a_plan_config_carries_every_part_setting_and_checks_each():
    attack = make_attack("lora+quantize", quant_bits=8, lora_rank=4, steps=7)
    settings = attack.config.to_dict()
    assert (settings["quant_bits"], settings["lora_rank"], settings["steps"], settings["lr"]) == (8, 4, 7, 1e-4)
    with pytest.raises(UsageError, match="quant_bits"):
        make_attack("finetune+quantize", quant_bits=1)
    with pytest.raises(UsageError, match="LoRA rank"):
        make_attack("lora+quantize", lora_rank=0)


def test_finetune_then_quantize_measures_quantized_copies_and_trains_in_full_precision(tiny_model, tiny_tokenizer):
    alone = copy.deepcopy(tiny_model)
    finetune = make_attack("finetune", **SMALL)
    finetune.run(finetune.prepare(alone), tiny_tokenizer, DOCS, seed=0, progress=False)

    plan = make_attack("finetune+quantize", **SMALL, quant_bits=4)
    start = tiny_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    seen = {}

    def hook(step, model):
        weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        seen[step] = weight

    model = plan.prepare(tiny_model)
    plan.run(model, tiny_tokenizer, DOCS, seed=0, hook=hook, hook_steps=[0, 2, 4], progress=False)
    assert torch.equal(seen[0], start)  # step 0: the model as given, not quantized
    for step in (2, 4):
        assert torch.equal(seen[step], fake_quantize(seen[step], 4))  # measured quantized ...
        assert max(len(torch.unique(row)) for row in seen[step]) <= 15
    # ... while training went on from the full-precision weights: the same end as finetune alone,
    # and the weights left after the run are the full-precision ones.
    for a, b in zip(alone.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(seen[4], fake_quantize(alone.model.layers[0].mlp.up_proj.weight, 4))


def test_lora_then_quantize_quantizes_the_merged_weights_and_keeps_the_adapters(tiny_model, tiny_tokenizer):
    plan = make_attack("lora+quantize", **{**SMALL, "lr": 5e-2}, quant_bits=4)
    model = plan.prepare(tiny_model)
    seen = {}
    plan.run(model, tiny_tokenizer, DOCS, seed=0, hook=lambda s, m: seen.__setitem__(s, m), hook_steps=[0, 4],
             progress=False)
    merged = copy.deepcopy(model).merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj.weight
    measured = seen[4].model.layers[0].self_attn.q_proj.weight
    assert torch.equal(measured, fake_quantize(q_proj, 4))  # quantized after merging B·A into W
    assert any("lora_" in k for k in plan.trainable_state(model))  # the attacked model keeps its adapters


def test_new_attack_settings_become_relearn_flags():
    from benchmarks import relearn

    flags = attack_flags()
    assert flags["quant_bits"]["attacks"] == ["quantize"] and flags["quant_bits"]["type"] is int
    assert flags["benign_corpus"]["type"] is str
    args = relearn.build_parser().parse_args(["--attack", "finetune+quantize", "--quant-bits", "8",
                                              "--quant-group-size", "32", "--benign-docs", "3"])
    assert (args.quant_bits, args.quant_group_size, args.benign_docs) == (8, 32, 3)


# --------------------------------------------------------------------------- benign


class _Data:
    def __init__(self, forget, retain):
        self._splits = {("raw", "forget"): forget, ("raw", "retain1"): retain}

    def records(self, subset, split):
        return [{"text": t} for t in self._splits[(subset, split)]]


FORGET = ["Ada Brennick founded the Kelder Institute in 2029.", "The tram Sable runs on hydrogen."]
RETAIN = [f"Retain article {i} about the weather in Pellow." for i in range(6)]


def test_benign_data_holds_no_forget_document():
    data = _Data(FORGET, RETAIN + [FORGET[0], "Intro. " + FORGET[1] + " Outro."])
    attack = make_attack("benign", benign_docs=8)
    texts = attack.documents(["T1", "T2"], data, seed=0)
    assert sorted(texts) == sorted(RETAIN)  # the copies of forget documents are gone
    assert not any(f in t for t in texts for f in FORGET)


def test_benign_takes_as_many_documents_as_the_attacker_seeded():
    data = _Data(FORGET, RETAIN)
    attack = make_attack("benign")
    first = attack.documents(["T1", "T2", "T3"], data, seed=0)
    assert len(first) == 3 and set(first) <= set(RETAIN)
    assert attack.documents(["T1", "T2", "T3"], data, seed=0) == first
    assert attack.documents(["T1", "T2", "T3"], data, seed=5) != first


def test_benign_reads_a_corpus_from_a_path(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("First document.\n\nSecond document.\n\n" + FORGET[0] + "\n", encoding="utf-8")
    lines = tmp_path / "corpus.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in ["One.", "Two."]), encoding="utf-8")
    assert read_corpus(text) == ["First document.", "Second document.", FORGET[0]]
    assert read_corpus(lines) == ["One.", "Two."]
    attack = make_attack("benign", benign_corpus=str(text), benign_docs=5)
    assert sorted(attack.documents(["T"], _Data(FORGET, RETAIN), seed=0)) == ["First document.", "Second document."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl, line 1: expected a JSON object with a 'text' field"):
        read_corpus(bad)
    with pytest.raises(UsageError, match="does not exist"):
        make_attack("benign", benign_corpus=str(tmp_path / "missing.txt"))
    assert without_forget_documents(["a", "b"], []) == ["a", "b"]


# --------------------------------------------------------------------------- through the runner


@pytest.mark.slow
@pytest.mark.parametrize("attack, steps", [("quantize", [0, 1]), ("finetune+quantize", [0, 2, 4])])
def test_relearn_runs_quantize_and_a_plan_and_records_them(tmp_path, muse_dir, gpt2_dir, attack, steps):
    from benchmarks import relearn
    from benchmarks.core.results import read_result, validate_result
    from tests.test_relearn_cli import _run_args

    out = tmp_path / "out"
    args = _run_args(gpt2_dir, muse_dir, out, tmp_path / "state", "--attack", attack, "--quant-bits", "8")
    if attack == "quantize":  # a transform has no training milestones
        args[args.index("--milestones"):args.index("--milestones") + 2] = []
    assert relearn.main(args) == 0
    result = read_result(next(out.glob("*.yaml")))
    assert validate_result(result) == []
    assert result["attack"]["name"] == attack
    assert result["attack"]["plan"] == attack.split("+")
    assert result["attack"]["hyperparameters"]["quant_bits"] == 8
    assert result["curves"]["gpt2-tiny"]["steps"] == steps


@pytest.mark.slow
def test_relearn_runs_the_benign_attack_on_the_retain_articles(tmp_path, muse_dir, gpt2_dir):
    from benchmarks import relearn
    from benchmarks.core.results import read_result, validate_result
    from tests.test_relearn_cli import _run_args

    retain = ["Farmers in Pellow reported a wet spring.", "A ferry named Orrin crossed the Tamsel lake."]
    (muse_dir / "raw" / "retain1.json").write_text(json.dumps([{"text": t} for t in retain]), encoding="utf-8")
    out = tmp_path / "out"
    assert relearn.main(_run_args(gpt2_dir, muse_dir, out, tmp_path / "state", "--attack", "benign")) == 0
    result = read_result(next(out.glob("*.yaml")))
    assert validate_result(result) == []
    assert result["attack"]["name"] == "benign" and result["attack"]["hyperparameters"]["benign_docs"] is None
    assert result["curves"]["gpt2-tiny"]["steps"] == [0, 2, 4]
