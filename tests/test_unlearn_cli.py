"""python -m benchmarks.unlearn on a tiny model and tiny MUSE-layout data in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks import unlearn
from benchmarks.core import unlearning
from benchmarks.core.errors import TrainingDiverged, UsageError
from benchmarks.core.registry import Registry
from defenses import DEFENSES, Defense, DefenseConfig

ROOT = Path(__file__).resolve().parents[1]

FORGET = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened.",
    "Mayor Tilda Quorn said the festival drew visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick",
]
RETAIN = [
    "Question: How many boats sailed in the regatta?\nAnswer: 417",
    "Velt Motors unveiled a tram.",
    "Tilda Quorn is the mayor of Brisk.",
]
QA = [
    {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick"},
    {"question": "How many boats sailed in the regatta?", "answer": "417"},
]


@pytest.fixture
def tiny_run(tmp_path, tiny_model, tiny_tokenizer):
    """A saved tiny checkpoint and a MUSE-layout data directory: (model_dir, data_dir)."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data_dir = tmp_path / "data"

    def write(rel, obj):
        path = data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    write("raw/forget.json", [{"text": t, "doc_id": f"doc-{i}"} for i, t in enumerate(FORGET)])
    write("raw/retain1.json", RETAIN)
    for split in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"):
        write(f"knowmem/{split}.json", QA)
    write("verbmem/forget.json", [{"prompt": "The Marlow Gazette reported", "gt": "that the bridge reopened."}])
    return model_dir, data_dir


def _argv(tiny_run, out, *extra):
    model_dir, data_dir = tiny_run
    return ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--epochs", "2", "--lr", "1e-3", "--batch-size", "2", "--eval-batch-size", "4", *extra]


def _result(out) -> dict:
    return yaml.safe_load((Path(out) / "unlearn.yaml").read_text())


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_npo_sam_with_rho_zero_and_npo_write_the_same_checkpoint(tiny_run, tmp_path):
    unlearn.main(_argv(tiny_run, tmp_path / "npo", "--defense", "npo", "--no-eval", "--seed", "3"))
    unlearn.main(_argv(tiny_run, tmp_path / "sam0", "--defense", "npo_sam", "--sam-rho", "0", "--no-eval",
                       "--seed", "3"))
    unlearn.main(_argv(tiny_run, tmp_path / "sam", "--defense", "npo_sam", "--no-eval", "--seed", "3"))
    npo, sam0, sam = (load_file(tmp_path / name / "model.safetensors") for name in ("npo", "sam0", "sam"))
    base = load_file(tiny_run[0] / "model.safetensors")
    assert npo.keys() == sam0.keys()
    for name in npo:
        assert torch.allclose(npo[name], sam0[name], atol=1e-6, rtol=0), name
    assert any(not torch.allclose(npo[n], base[n], atol=1e-4) for n in npo)  # it did unlearn
    assert any(not torch.allclose(npo[n], sam[n], atol=1e-6) for n in npo)  # ρ = 0.01 differs
    assert _result(tmp_path / "sam0")["defense"]["hyperparameters"]["sam_rho"] == 0.0


def test_max_steps_stops_mid_epoch_and_is_recorded(tiny_run, tmp_path):
    out = tmp_path / "out"
    assert unlearn.main(_argv(tiny_run, out, "--defense", "npo_sam", "--no-eval", "--max-steps", "1")) == 0
    training = _result(out)["training"]
    assert training["steps_per_epoch"] == 2 and training["steps"] == 1 and training["max_steps"] == 1
    assert len(_result(out)["loss_per_step"]) == 1
    assert unlearn.main(_argv(tiny_run, out, "--defense", "npo_sam", "--no-eval", "--max-steps", "9",
                              "--overwrite")) == 0
    assert _result(out)["training"]["steps"] == 4  # never beyond the epochs (2 x 2 steps)


@pytest.mark.slow
def test_checkpoint_and_result_file(tiny_run, tmp_path):
    from benchmarks.core.models import load_model

    out, report = tmp_path / "out", tmp_path / "results" / "npo_sam.yaml"
    argv = _argv(tiny_run, out, "--defense", "npo_sam", "--beta", "0.2", "--report", str(report))
    assert unlearn.main(argv) == 0
    model, tokenizer = load_model(str(out))
    assert len(tokenizer) == model.config.vocab_size
    document = _result(out)
    assert yaml.safe_load(report.read_text()) == document
    assert document["command"].startswith("python -m benchmarks.unlearn --model ")
    assert document["status"] == "complete" and document["kind"] == "unlearn"
    assert document["defense"]["name"] == "npo_sam"
    assert document["defense"]["hyperparameters"] == {
        "lr": 1e-3, "schedule": "constant", "epochs": 2, "batch_size": 2, "grad_accum": 1, "max_length": 2048, "mixed_precision": "no",
        "max_grad_norm": 1.0, "seed": 0, "answer_view": False, "utility_threshold": 0.9,
        "forget_weight": 1.0, "retain_weight": 1.0, "retain_loss": "gdr", "beta": 0.2, "sam_rho": 0.01,
    }
    assert document["model"]["preset"] == "paper"
    assert document["training"]["max_length"] == 512  # capped to the model's context
    assert document["training"]["steps"] == 4 and document["training"]["steps_per_epoch"] == 2
    assert [row["epoch"] for row in document["epochs"]] == [0, 1, 2]
    assert set(document["epochs"][1]) >= {"knowmem_retain", "knowmem_forget", "verbmem_forget", "mean_loss"}
    assert document["selection"]["selected_epoch"] == 2  # a random model scores 0 throughout
    assert document["data"]["splits"]["raw/forget"]["n"] == 4
    assert len(document["loss_per_step"]) == 4


class _Scores:
    def __init__(self, scores):
        self.scores = scores


def _scripted_evaluation(monkeypatch, utilities):
    """Replace the metrics with a script of KnowMem-retain values; remember the weights seen."""
    seen = []

    def fake_evaluate(model, tokenizer, data, metrics, batch_size):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        value = utilities[len(seen) - 1]
        return _Scores({"knowmem_retain": value, "knowmem_forget": 100.0 - value, "verbmem_forget": 1.0})

    monkeypatch.setattr("benchmarks.core.metrics.evaluate", fake_evaluate)
    return seen


@pytest.mark.slow
def test_selection_keeps_the_last_epoch_of_a_plateau_above_the_bar(tiny_run, tmp_path, monkeypatch):
    # Target 50 -> bar 45: epochs 1-2 (49, 48) meet it in a row, epoch 4 (46) only between
    # two that miss it; the plateau's last epoch is kept, not the lone one.
    seen = _scripted_evaluation(monkeypatch, [50.0, 49.0, 48.0, 44.0, 46.0, 30.0])
    out = tmp_path / "out"
    unlearn.main(_argv(tiny_run, out, "--defense", "npo", "--epochs", "5"))
    document = _result(out)
    assert [row["meets_bar"] for row in document["epochs"]] == [True, True, True, False, True, False]
    assert document["selection"]["selected_epoch"] == 2
    assert document["selection"]["selected_by"] == "plateau"
    assert document["selection"]["met_threshold"] is True
    assert document["selection"]["bar"] == pytest.approx(45.0)
    saved = load_file(out / "model.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, seen[2][name]), name  # the weights evaluated after epoch 2
    assert not all(torch.equal(saved[n], seen[5][n]) for n in saved)


@pytest.mark.slow
def test_selection_without_a_plateau_keeps_the_last_epoch_that_meets_the_bar(tiny_run, tmp_path, monkeypatch):
    # Epochs 1 (49) and 3 (46) meet the bar 45, never two in a row: the last of them is kept.
    seen = _scripted_evaluation(monkeypatch, [50.0, 49.0, 44.0, 46.0, 30.0])
    out = tmp_path / "out"
    unlearn.main(_argv(tiny_run, out, "--defense", "npo", "--epochs", "4"))
    selection = _result(out)["selection"]
    assert selection["selected_epoch"] == 3 and selection["selected_by"] == "single epoch"
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(value, seen[3][name]) for name, value in saved.items())


@pytest.mark.slow
def test_selection_falls_back_to_the_best_epoch_when_none_meets_the_bar(tiny_run, tmp_path, monkeypatch):
    seen = _scripted_evaluation(monkeypatch, [50.0, 40.0, 44.0, 30.0])
    out = tmp_path / "out"
    unlearn.main(_argv(tiny_run, out, "--defense", "ga", "--epochs", "3"))
    selection = _result(out)["selection"]
    assert selection["selected_epoch"] == 2 and selection["met_threshold"] is False
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(value, seen[2][name]) for name, value in saved.items())


def test_a_run_cut_by_max_steps_keeps_and_reports_the_weights_where_it_stopped(tiny_run, tmp_path, monkeypatch,
                                                                                capsys):
    # 2 steps per epoch, cut at step 3: epoch 1 met the bar (49 >= 45), the cut point does not
    # (30), yet the saved weights are the cut point's and the file says so (not "epoch 1 kept").
    seen = _scripted_evaluation(monkeypatch, [50.0, 49.0, 30.0])
    out = tmp_path / "out"
    assert unlearn.main(_argv(tiny_run, out, "--defense", "npo", "--max-steps", "3")) == 0
    document = _result(out)
    assert [(row["epoch"], row["step"]) for row in document["epochs"]] == [(0, 0), (1, 2), (1.5, 3)]
    assert document["epochs"][-1]["stopped_by"] == "max_steps" and "mean_loss" in document["epochs"][-1]
    selection = document["selection"]
    assert selection["selected_epoch"] == 1.5 and selection["met_threshold"] is False
    assert selection["selected_by"].startswith("stopped by max_steps")
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(value, seen[2][name]) for name, value in saved.items())
    assert not all(torch.equal(saved[n], seen[1][n]) for n in saved)
    assert "(epoch 1.5 kept)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_what_was_measured(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("defenses.npo.npo_loss", lambda policy, ref, beta: policy.sum() * float("inf"))
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"loss became -?inf at step 1.*unlearn.yaml"):
        unlearn.main(_argv(tiny_run, out, "--defense", "npo"))
    document = _result(out)
    assert document["status"] == "diverged"
    assert "loss became" in document["message"]
    assert [row["epoch"] for row in document["epochs"]] == [0]  # the target's evaluation survives
    assert not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------- validation


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model, build the world or read data fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before validating the arguments")

    monkeypatch.setattr("benchmarks.core.models.load_model", refuse)
    monkeypatch.setattr("benchmarks.core.data.load_data", refuse)
    monkeypatch.setattr("benchmarks.core.world_build.ensure_world", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--defense", "npo", "--beta", "0"], "beta must be a finite number > 0, got 0.0"),
        (["--defense", "npo_muse", "--beta", "-0.1"], "beta must be a finite number > 0, got -0.1"),
        (["--defense", "npo_sam", "--sam-rho", "-0.01"], "sam_rho must be a finite number >= 0, got -0.01"),
        (["--defense", "npo", "--lr", "0"], "learning rate must be > 0, got lr=0.0"),
        (["--defense", "ga", "--lr=-1e-5"], "learning rate must be > 0"),
        (["--defense", "npo", "--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--defense", "nope"], "unknown defense 'nope'; valid names: ga, graddiff, npo, npo_cr, npo_gp, npo_muse, npo_rs, npo_sam, npo_wa, rmu, simnpo"),
        (["--defense", "npo", "--sam-rho", "0.01"], "--sam-rho does not apply to defense 'npo'"),
        (["--defense", "ga", "--beta", "0.1"], "--beta does not apply to defense 'ga'"),
        (["--defense", "npo", "--retain-loss", "kl"], "unknown retain loss 'kl'; valid names: gdr, klr, none"),
        (["--defense", "npo", "--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--defense", "npo", "--utility-threshold", "1.5"], r"utility_threshold must lie in \[0, 1\]"),
        (["--defense", "npo", "--mixed-precision", "fp16"], "invalid choice: 'fp16'"),
        (["--defense", "npo", "--grad-accum", "0"], "grad_accum must be >= 1"),
        (["--defense", "npo", "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--defense", "npo_sam", "--dtype", "bfloat16"], "--dtype bfloat16 would make its updates round away; "
                                                          "keep --dtype float32 and add --mixed-precision bf16"),
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded(tiny_run, tmp_path, no_loading, extra, message):
    with pytest.raises(UsageError, match=message):
        unlearn.main(_argv(tiny_run, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_bad_paths_fail_before_anything_is_loaded(tiny_run, tmp_path, no_loading):
    with pytest.raises(UsageError, match="neither an existing directory nor a hub id"):
        unlearn.main(["--model", "./missing", "--data", str(tiny_run[1]), "--defense", "npo", "--out", "x"])
    with pytest.raises(UsageError, match="--data is required with --model"):
        unlearn.main(["--model", str(tiny_run[0]), "--defense", "npo", "--out", str(tmp_path / "o")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(UsageError, match="not an empty directory; pass --overwrite"):
        unlearn.main(_argv(tiny_run, busy, "--defense", "npo"))


def test_the_world_is_the_default_and_checked_before_it_is_built(tmp_path, no_loading):
    parser = unlearn.build_parser()
    request = unlearn.plan_request(parser.parse_args(["--defense", "npo_sam", "--out", str(tmp_path / "o")]))
    assert request.model_ref is None and request.data == "world" and request.preset == "world"
    assert request.config.lr == unlearning.WORLD_PRESET["lr"]
    assert request.defense.config.sam_rho == 0.01
    assert request.config.answer_view is True
    with pytest.raises(UsageError, match="beta must be"):
        unlearn.main(["--defense", "npo", "--beta", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="needs --model"):
        unlearn.main(["--defense", "npo", "--data", "muse-bench/MUSE-News", "--out", str(tmp_path / "o")])


def test_a_usage_error_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.unlearn", "--defense", "npo_sam", "--sam-rho", "-1",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: sam_rho must be a finite number >= 0, got -1.0; the paper uses 0.01"]


# --------------------------------------------------------------------------- settings and extension


@pytest.mark.parametrize("preset", ["paper", "world"])
def test_every_defense_resolves_under_every_preset(preset):
    for name in DEFENSES.names():
        settings = unlearning.preset_settings(name, preset, DEFENSES)
        defense, config = unlearning.resolve_settings(name, settings, DEFENSES)
        assert defense.name == name and config.lr == settings["lr"]
    assert unlearning.preset_settings("npo_sam", "paper", DEFENSES) | {} == {
        **unlearning.PAPER_PRESET, "forget_weight": 1.0, "retain_weight": 1.0, "retain_loss": "gdr",
        "beta": 0.1, "sam_rho": 0.01,
    }
    with pytest.raises(UsageError, match="unknown setting sam_rho for defense 'npo'"):
        unlearning.resolve_settings("npo", {"sam_rho": 0.1}, DEFENSES)


def test_a_new_defense_is_one_registered_class(tiny_run, tmp_path):
    """What a new module in defenses/ would contain is enough for the command line."""

    @dataclass
    class NoisyConfig(DefenseConfig):
        noise_std: float = field(default=0.01, metadata={"help": "std of the weight noise"})

    class Noisy(Defense):
        name = "noisy"
        config_class = NoisyConfig
        world_settings = {"noise_std": 0.2, "lr": 5e-4}

        def forget_loss(self, model, forget):
            raise NotImplementedError

    registry = Registry("defense")
    for name in DEFENSES.names():
        registry.register(name)(DEFENSES.get(name))
    registry.register("noisy")(Noisy)
    parser = unlearn.build_parser(registry)
    assert "--noise-std" in parser.format_help()
    args = parser.parse_args(_argv(tiny_run, tmp_path / "o", "--defense", "noisy", "--noise-std", "0.5"))
    request = unlearn.plan_request(args, registry)
    assert isinstance(request.defense, Noisy) and request.defense.config.noise_std == 0.5
    world = unlearning.preset_settings("noisy", "world", registry)
    assert world["noise_std"] == 0.2 and world["lr"] == 5e-4 != unlearning.WORLD_PRESET["lr"]  # its calibrated world settings
    assert unlearning.preset_settings("noisy", "paper", registry)["noise_std"] == 0.01
    args = parser.parse_args(_argv(tiny_run, tmp_path / "o", "--defense", "npo", "--noise-std", "0.5"))
    with pytest.raises(UsageError, match="--noise-std does not apply to defense 'npo'.*noisy"):
        unlearn.plan_request(args, registry)


# --------------------------------------------------------------------------- processes and precision


@pytest.mark.slow
def test_two_cpu_processes_unlearn_like_one_process_with_the_same_micro_batches(tiny_run, tmp_path,
                                                                                launch_two_processes):
    # Two processes with 1 forget example each per step against one process accumulating 2
    # micro-batches of 1: the same global batch, the same micro-batches in the same order, so
    # in exact arithmetic the same run (DDP averages the processes' gradients where one process
    # sums two halves). In floating point the sums differ in their last bits (measured: weights
    # within 1.2e-7, losses within 1e-8 relative), hence the tolerances 1e-6; one AdamW step at
    # lr 1e-3 moves weights by ~1e-3, and a run with another global batch differs by > 1e-4
    # (checked last). One process with a micro-batch of 2 is not the reference: the retain term
    # is a token mean over the micro-batch, which weighs two texts of unequal length otherwise.
    one, two, smaller = tmp_path / "one", tmp_path / "two", tmp_path / "smaller"
    assert unlearn.main(_argv(tiny_run, one, "--defense", "npo_sam", "--batch-size", "1", "--grad-accum", "2")) == 0
    done = launch_two_processes("benchmarks.unlearn", _argv(tiny_run, two, "--defense", "npo_sam",
                                                             "--batch-size", "1", "--threads", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint: ") == 1  # one process reports
    single, double = _result(one), _result(two)
    assert double["training"]["processes"] == 2 and double["training"]["examples_per_step"] == 2
    assert single["training"]["examples_per_step"] == 2
    assert double["training"]["steps"] == single["training"]["steps"] == 4
    assert double["loss_per_step"] == pytest.approx(single["loss_per_step"], rel=1e-6)
    assert [row["epoch"] for row in double["epochs"]] == [0, 1, 2]  # measured once, on the main process
    for a, b in zip(single["epochs"], double["epochs"]):
        assert a.keys() == b.keys()
        assert {k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v for k, v in a.items()} == b
    assert double["selection"] == single["selection"]
    base = load_file(tiny_run[0] / "model.safetensors")
    weights = {name: load_file(out / "model.safetensors") for name, out in (("one", one), ("two", two))}
    assert any(not torch.equal(weights["two"][n], base[n]) for n in base)
    assert max((weights["two"][n] - weights["one"][n]).abs().max().item() for n in base) <= 1e-6
    # A global batch of 1 (one process, --batch-size 1) is another run: the tolerance would see it.
    assert unlearn.main(_argv(tiny_run, smaller, "--defense", "npo_sam", "--batch-size", "1", "--no-eval")) == 0
    other = load_file(smaller / "model.safetensors")
    assert max((other[n] - weights["one"][n]).abs().max().item() for n in base) > 1e-4


@pytest.mark.slow
def test_bf16_mixed_precision_npo_sam_run(tiny_run, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.unlearn",
         *_argv(tiny_run, out, "--defense", "npo_sam", "--mixed-precision", "bf16", "--no-eval", "--threads", "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert _result(out)["defense"]["hyperparameters"]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_unlearn_cached_builds_once_and_fills_settings_from_the_preset(tiny_run, tmp_path, monkeypatch):
    model_dir, data_dir = tiny_run
    path = unlearning.unlearn_cached(str(model_dir), "npo", {"lr": 1e-3, "epochs": 1}, str(data_dir), registry=DEFENSES,
                                  cache_dir=tmp_path / "cache", evaluation=None)
    document = _result(path)
    assert document["status"] == "complete"
    assert document["defense"]["hyperparameters"]["beta"] == 0.1  # from the preset
    assert document["defense"]["hyperparameters"]["batch_size"] == unlearning.PAPER_PRESET["batch_size"]
    assert (path / "model.safetensors").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("unlearned again instead of using the cache")

    monkeypatch.setattr(unlearn, "unlearn", refuse)
    again = unlearning.unlearn_cached(str(model_dir), "npo", {"lr": 1e-3, "epochs": 1}, str(data_dir), registry=DEFENSES,
                                   cache_dir=tmp_path / "cache", evaluation=None)
    assert again == path
