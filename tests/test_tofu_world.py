"""The author world end to end on a tiny build: schema, evaluation (batch-size invariant), the
evaluate and relearn commands, and the author-level T/V split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from benchmarks.core.models import TinyLlamaSpec, load_model
from benchmarks.core.tofu_data import PAIRS_PER_AUTHOR
from benchmarks.core.tofu_eval import TofuEvalSettings, evaluate_tofu
from benchmarks.core.tofu_relearn import attack_pairs, split_authors
from benchmarks.core.tofu_world import TofuWorldConfig, build_tofu_world, generate_world

TINY = TofuWorldConfig(
    num_authors=6, forget_authors=(("forget01", 1), ("forget05", 2), ("forget10", 2)),
    retain_perturbed_authors=2, utility_items=4, epochs=2, batch_size=32, vocab_size=400,
    model=TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_position_embeddings=256),
)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return build_tofu_world(TINY, tmp_path_factory.mktemp("tofu-world") / "world")


def test_generated_world_has_tofus_schema():
    configs = generate_world(TINY)
    assert configs == generate_world(TINY)  # deterministic
    assert len(configs["forget10"]) == 2 * PAIRS_PER_AUTHOR and len(configs["retain90"]) == 4 * PAIRS_PER_AUTHOR
    assert not {r["question"] for r in configs["forget10"]} & {r["question"] for r in configs["retain90"]}
    for row in configs["forget10_perturbed"]:
        assert len(row["perturbed_answer"]) == 5 and row["paraphrased_answer"] not in row["perturbed_answer"]
    assert {len(r["perturbed_answer"]) for r in configs["real_authors_perturbed"]} == {3}
    assert {len(r["perturbed_answer"]) for r in configs["world_facts_perturbed"]} == {3}


def test_world_loads_with_its_own_author_numbers(tiny_world):
    data = tiny_world.data("forget10")
    assert data.forget_authors() == [4, 5]
    assert data["retain"].authors() == [0, 1, 2, 3]
    assert data.describe()["kind"] == "world"


def test_scores_do_not_depend_on_batch_size(tiny_world):
    model, tokenizer = load_model(str(tiny_world.target_dir))
    data = tiny_world.data()
    one = evaluate_tofu(model, tokenizer, data, TofuEvalSettings(batch_size=1, max_new_tokens=6))
    many = evaluate_tofu(model, tokenizer, data, TofuEvalSettings(batch_size=7, max_new_tokens=6))
    for key, value in one.scores.items():
        if value is None:
            assert many.scores[key] is None
        else:
            assert many.scores[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    generations = [i["generation"] for i in one.sets["forget_perturbed"].items]
    assert generations == [i["generation"] for i in many.sets["forget_perturbed"].items]
    assert 0 <= one.scores["model_utility"] <= 1


def test_evaluate_command_on_a_tofu_directory(tiny_world, tmp_path, capsys):
    from benchmarks.evaluate import main

    out = tmp_path / "eval.yaml"
    common = ["--data", str(tiny_world.data_dir), "--batch-size", "32", "--max-new-tokens", "8"]
    assert main(["--model", str(tiny_world.target_dir), "--retrain-model", str(tiny_world.retrain_dir),
                 "--output", str(out), "--log-samples", *common]) == 0
    table = capsys.readouterr().out
    assert "forget quality" in table and "model utility" in table
    document = yaml.safe_load(out.read_text())
    assert document["benchmark"] == "tofu"
    assert document["settings"]["prompt"]["date_string"] == "10 Apr 2025"
    assert document["settings"]["prompt"]["format"] == "chat_template"
    model_scores = document["models"]["model"]["scores"]
    assert document["models"]["retrain"]["scores"]["forget_quality"] == 1.0
    assert 0 < model_scores["forget_quality"] <= 1
    items = document["models"]["model"]["metrics"]["items"]["forget_perturbed"]
    assert len(items) == 40 and {"generation", "rouge", "prob", "truth_ratio"} <= set(items[0])

    # the retrain reference from the earlier file gives the same forget quality
    retrain_file = tmp_path / "retrain.yaml"
    assert main(["--model", str(tiny_world.retrain_dir), "--output", str(retrain_file), *common]) == 0
    again = tmp_path / "again.yaml"
    assert main(["--model", str(tiny_world.target_dir), "--retrain-result", str(retrain_file),
                 "--output", str(again), *common]) == 0
    reused = yaml.safe_load(again.read_text())["models"]["model"]["scores"]["forget_quality"]
    assert reused == pytest.approx(model_scores["forget_quality"])


def test_evaluate_rejects_bad_tofu_arguments(tiny_world, tmp_path):
    from benchmarks.core.errors import UsageError
    from benchmarks.evaluate import main

    with pytest.raises(UsageError, match="unknown --forget-split 'forget7'"):
        main(["--data", str(tiny_world.data_dir), "--model", str(tiny_world.target_dir), "--forget-split", "forget7"])
    with pytest.raises(UsageError, match="--retrain-result .* does not exist"):
        main(["--data", str(tiny_world.data_dir), "--model", str(tiny_world.target_dir),
              "--retrain-result", str(tmp_path / "none.yaml")])


def test_split_is_by_author_and_the_attacker_never_sees_v(tiny_world):
    data = tiny_world.data()
    authors = data.forget_authors()
    for seed in range(5):
        t, v = split_authors(authors, None, 0.5, seed)
        assert set(t).isdisjoint(v) and sorted(t + v) == authors and len(t) == 1
        pairs = attack_pairs(data.forget.items, t)
        assert len(pairs) == PAIRS_PER_AUTHOR * len(t)
        v_items = data.forget.of_authors(v)
        v_text = {i.question for i in v_items} | {i.answer for i in v_items}
        assert not any(q in v_text or a in v_text for q, a in pairs)
    assert split_authors(list(range(20)), None, 0.5, 3) == split_authors(list(range(20)), None, 0.5, 3)
    assert split_authors(list(range(20)), None, 0.5, 3) != split_authors(list(range(20)), None, 0.5, 4)


def test_relearn_with_npo_on_a_tofu_directory(tiny_world, tmp_path, capsys):
    from benchmarks.relearn import main

    out = tmp_path / "relearn.yaml"
    code = main(["--data", str(tiny_world.data_dir), "--model", str(tiny_world.target_dir), "--defense", "npo",
                 "--retrain-model", str(tiny_world.retrain_dir), "--steps", "2", "--milestones", "0,1,2",
                 "--lr", "1e-3", "--output", str(out), "--no-progress", "--max-new-tokens", "8"])
    assert code == 0
    document = yaml.safe_load(out.read_text())
    assert document["kind"] == "tofu_relearn" and document["prompt"]["format"] == "chat_template"
    assert set(document["models"]) == {"retrain", "target", "npo"}
    split = document["attack"]["authors"]["0"]
    assert set(split["T"]).isdisjoint(split["V"])
    curve = document["curves"]["npo"]["0"]
    assert [point[0] for point in curve["prob_V"]] == [0, 1, 2]
    assert {"prob_T", "rouge_V", "truth_ratio_V", "forget_quality_V"} <= set(curve)
    assert all(0 <= p[1] <= 1 for p in curve["forget_quality_V"])
    # the retrain model against its own step-0 truth ratios: identical samples at step 0
    assert document["curves"]["retrain"]["0"]["forget_quality_V"][0] == [0, 1.0]
    utility = document["utility"]["npo"]["0"]
    assert not math.isnan(utility["before"]["model_utility"]) and "after" in utility
    after = document["summary"]["npo"]["prob_V"]["after"]
    assert after["per_seed"] == {"0": curve["prob_V"][-1][1]} and after["ci95_low"] is None  # one seed
    assert document["summary"]["npo"]["model_utility"]["before"]["mean"] == utility["before"]["model_utility"]
    assert document["bands"]["npo"]["steps"] == [0, 1, 2] and "Student t" in document["definitions"]["interval"]
    assert "V Prob" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relearn_dry_run_for_the_published_checkpoints(capsys, monkeypatch):
    from benchmarks.relearn import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--data", "tofu", "--model",
                 "Naahraf27/npo_llama-3.2-1b-instruct_forget10_ep10_lr5e-5_alpha1.0_beta0.1", "--defense", "none",
                 "--target-model", "open-unlearning/tofu_Llama-3.2-1B-Instruct_full",
                 "--retrain-model", "open-unlearning/tofu_Llama-3.2-1B-Instruct_retain90", "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["prompt"]["system_prompt"] == "You are a helpful assistant."
    assert plan["prompt"]["date_string"] == "10 Apr 2025"
    seed0 = plan["split"]["seed 0"]
    assert sorted(seed0["T authors"] + seed0["V authors"]) == list(range(180, 200))
    assert len(seed0["T authors"]) == 10
    assert Path(plan["resume_state"]).name.startswith("tofu-") and plan["plot"].endswith(".png")
    assert set(plan["models"]) == {"retrain", "target", "npo_llama-3.2-1b-instruct_forget10_ep10_lr5e-5_alpha1.0_beta0.1"}


def test_relearn_refuses_a_label_taken_by_a_baseline(tiny_world):
    from benchmarks.core.errors import UsageError
    from benchmarks.relearn import main

    with pytest.raises(UsageError, match="--label"):
        main(["--data", str(tiny_world.data_dir), "--model", str(tiny_world.target_dir), "--defense", "none",
              "--dry-run"])


@pytest.mark.slow
def test_relearn_resumes_after_an_interruption_with_the_same_numbers(tiny_world, tmp_path, monkeypatch):
    from benchmarks.core.run_state import RunState
    from benchmarks.relearn import main

    def args(name: str, *extra: str) -> list[str]:
        return ["--data", str(tiny_world.data_dir), "--model", str(tiny_world.target_dir), "--defense", "none",
                "--label", "attacked", "--retrain-model", str(tiny_world.retrain_dir), "--steps", "2",
                "--milestones", "0,1,2", "--lr", "1e-3", "--output", str(tmp_path / f"{name}.yaml"),
                "--state-dir", str(tmp_path / f"{name}-state"), "--no-progress", "--max-new-tokens", "8", *extra]

    assert main(args("reference")) == 0
    reference = yaml.safe_load((tmp_path / "reference.yaml").read_text())
    assert not any((tmp_path / "reference-state").iterdir())  # a complete run leaves no state

    # Interrupt the attacked model's trajectory right after its first milestone checkpoint.
    original = RunState.save_checkpoint
    saved = []

    def interrupted(self, seed, label, payload):
        original(self, seed, label, payload)
        saved.append((label, payload["loop_state"]["step"]))
        if label == "attacked":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args("run"))
    assert saved == [("retrain", 1), ("retrain", 2), ("attacked", 1)]
    assert not (tmp_path / "run.yaml").exists()  # no partial result file
    state = next((tmp_path / "run-state").iterdir())
    assert (state / "seed0-retrain.json").is_file()  # finished: not run again
    assert [p.name for p in state.glob("*.ckpt")] == ["seed0-attacked.ckpt"]
    run_id = RunState(state, True).meta()["run_id"]
    monkeypatch.setattr(RunState, "save_checkpoint", original)

    assert main(args("run", "--resume")) == 0
    resumed = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert resumed["run_id"] == run_id
    for section in ("curves", "utility", "summary", "bands"):
        assert resumed[section] == reference[section], section
    assert set(resumed["timings"]) == set(reference["timings"])
    assert not state.exists()
