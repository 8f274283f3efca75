"""Relearning attacks: configs, data packing, what trains, one-run trajectories, resuming."""

from __future__ import annotations

import copy

import pytest
import torch

from attacks import ATTACKS, AttackConfig, LoraAttackConfig, make_attack, pack_documents
from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import sequence_logps

DOCS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
]
SMALL = dict(steps=6, lr=1e-2, batch_size=2, micro_batch_size=1, max_length=24, schedule="cosine")


def _probe(model, tokenizer) -> torch.Tensor:
    """A deterministic read-out of the model: log-likelihoods of two fixed texts."""
    batch = tokenizer(DOCS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------------- configs


def test_attacks_are_registered_by_exact_name():
    assert ATTACKS.names() == ["benign", "finetune", "lora", "quantize"]
    with pytest.raises(UsageError, match="valid names: benign, finetune, lora, quantize"):
        ATTACKS.get("fine-tune")


def test_defaults_are_the_papers_muse_news_attack():
    config = AttackConfig()
    assert (config.lr, config.batch_size, config.schedule, config.steps, config.max_length) == (
        1e-5, 4, "cosine", 150, 2048)


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"relearn_fraction": 1.5}, "fraction"),
        ({"relearn_docs": 0}, "documents must be >= 1"),
        ({"batch_size": 4, "micro_batch_size": 3}, "multiple"),
        ({"schedule": "cosin"}, "cosine"),
        ({"lr": -1.0}, "lr"),
        ({"max_length": 1}, "max length"),
    ],
)
def test_bad_attack_settings_are_named(settings, word):
    with pytest.raises(UsageError, match=word):
        AttackConfig(**settings)


def test_bad_lora_settings_are_named():
    with pytest.raises(UsageError, match="rank"):
        LoraAttackConfig(lora_rank=0)
    with pytest.raises(UsageError, match="dropout"):
        LoraAttackConfig(lora_dropout=1.0)
    with pytest.raises(UsageError, match="takes a LoraAttackConfig"):
        ATTACKS.get("lora")(AttackConfig())


def test_a_count_of_documents_replaces_the_default_fraction():
    config = AttackConfig(relearn_docs=3)
    assert config.relearn_docs == 3 and config.relearn_fraction is None


# --------------------------------------------------------------------------- data


def test_pack_documents_chunks_the_stream_with_bos_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    chunks = pack_documents(tok, DOCS, max_length=16)
    assert all(len(c) <= 16 and c[0] == tok.bos_token_id for c in chunks)
    stream = [t for c in chunks for t in c[1:]]
    expected = []
    for doc in DOCS:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream == expected  # nothing lost, nothing repeated, documents in order
    with pytest.raises(UsageError, match="no documents"):
        pack_documents(tok, [], 16)


# --------------------------------------------------------------------------- what trains


def test_finetune_updates_every_weight(tiny_model, tiny_tokenizer):
    attack = make_attack("finetune", **SMALL)
    before = copy.deepcopy(tiny_model.state_dict())
    model = attack.prepare(tiny_model)
    result = attack.run(model, tiny_tokenizer, DOCS, seed=0, progress=False)
    assert result.steps == 6
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed


def test_lora_leaves_base_weights_unchanged_and_evaluation_sees_adapters(tiny_model, tiny_tokenizer):
    attack = make_attack("lora", **{**SMALL, "lr": 5e-2})
    before = copy.deepcopy(tiny_model.state_dict())
    probe_before = _probe(tiny_model, tiny_tokenizer)
    model = attack.prepare(tiny_model)
    # Adapters start at zero: step 0 sees exactly the model under attack.
    assert torch.allclose(_probe(model, tiny_tokenizer), probe_before, atol=1e-5)
    attack.run(model, tiny_tokenizer, DOCS, seed=0, progress=False)
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert base.keys() == before.keys()
    for name, value in base.items():
        assert torch.equal(value, before[name]), name
    adapters = attack.trainable_state(model)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    # The attacked (adapted) model is what evaluation sees, and it has moved.
    assert not torch.allclose(_probe(model, tiny_tokenizer), probe_before, atol=1e-3)


def test_lora_targets_are_honoured(tiny_model):
    attack = make_attack("lora", lora_targets=("o_proj",), **SMALL)
    model = attack.prepare(tiny_model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("o_proj.lora_" in n for n in names)


# --------------------------------------------------------------------------- trajectories


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["finetune", "lora"])
def test_milestones_of_one_run_equal_runs_stopped_there(tiny_tokenizer, name):
    """A curve from one run's hooks equals, point for point, the same run (same seed and the
    same total-step schedule) stopped at each milestone and read out afterwards."""
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    milestones = (0, 2, 5, 6)

    def fresh():
        attack = make_attack(name, **SMALL)
        return attack, attack.prepare(tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0).eval())

    attack, model = fresh()
    curve = {}
    attack.run(model, tiny_tokenizer, DOCS, seed=1, hook=lambda s, m: curve.__setitem__(s, _probe(m, tiny_tokenizer)),
               hook_steps=milestones, progress=False)
    assert sorted(curve) == list(milestones)
    assert not torch.allclose(curve[0], curve[6])

    for stop in milestones[:-1]:
        attack, model = fresh()

        def halt(step, _model, stop=stop):
            raise _Stop

        with pytest.raises(_Stop):
            attack.run(model, tiny_tokenizer, DOCS, seed=1, hook=halt, hook_steps=(stop,), progress=False)
        torch.testing.assert_close(_probe(model, tiny_tokenizer), curve[stop], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["finetune", "lora"])
def test_resuming_from_a_milestone_gives_the_uninterrupted_numbers(tiny_tokenizer, name):
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    def fresh():
        attack = make_attack(name, **SMALL)
        return attack, attack.prepare(tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0).eval())

    attack, model = fresh()
    saved = {}

    def keep(step, loop_state):
        saved[step] = {"weights": attack.trainable_state(model), "loop": copy.deepcopy(loop_state)}

    full = attack.run(model, tiny_tokenizer, DOCS, seed=2, hook_steps=(0, 3, 6), state_hook=keep, progress=False)
    final = _probe(model, tiny_tokenizer)
    assert sorted(saved) == [3, 6]

    attack, model = fresh()
    attack.load_trainable_state(model, saved[3]["weights"])
    resumed = attack.run(model, tiny_tokenizer, DOCS, seed=2, hook_steps=(0, 3, 6), resume_state=saved[3]["loop"],
                         progress=False)
    torch.testing.assert_close(_probe(model, tiny_tokenizer), final, rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]


def test_attacks_never_import_defenses():
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "attacks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "defenses" or n.startswith("defenses.") for n in names), path.name


def test_answer_view_adds_each_document_cut_after_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    doc = "Question: Which town held the festival?\nAnswer: Brisk\n\n"
    plain = pack_documents(tok, [doc], max_length=512)
    both = pack_documents(tok, [doc], max_length=512, answer_view=True)
    assert len(plain) == len(both) == 1
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    head, tail = doc.split("Answer: ")
    cut = tok(head + "Answer: ", add_special_tokens=False)["input_ids"] + tok(tail, add_special_tokens=False)["input_ids"]
    assert cut != whole  # the marker's trailing space is a token of its own
    eos = [tok.eos_token_id]
    assert both[0] == [tok.bos_token_id] + whole + eos + cut + eos
