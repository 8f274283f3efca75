"""``python -m benchmarks.relearn``: dry runs, input checks, files, a foreign checkpoint, resuming."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import relearn
from benchmarks.core.errors import UsageError
from benchmarks.core.results import read_result, validate_result

ROOT = Path(__file__).resolve().parents[1]

FORGET = [
    ("d0", "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031."),
    ("d1", "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk."),
    ("d2", "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030."),
    ("d3", "The Kelder Institute was founded by Ada Brennick, the Gazette reported."),
]


@pytest.fixture
def muse_dir(tmp_path):
    """A tiny MUSE-layout data set whose questions know their documents."""
    root = tmp_path / "data"
    files = {
        "raw/forget.json": [{"text": t, "doc_id": d} for d, t in FORGET],
        "knowmem/forget_qa.json": [
            {"question": "Where did the harbour bridge reopen?", "answer": "Ostvale", "doc_id": "d0"},
            {"question": "How many visitors came to Brisk?", "answer": "2,300", "doc_id": "d1"},
            {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick", "doc_id": "d3"},
        ],
        "knowmem/forget_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "knowmem/retain_qa.json": [{"question": "What did Velt Motors unveil?", "answer": "a tram"}],
        "knowmem/retain_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "verbmem/forget.json": [{"prompt": t[:20], "gt": t[20:], "doc_id": d} for d, t in FORGET],
        "privleak/forget.json": [{"text": t} for _, t in FORGET[:2]],
        "privleak/holdout.json": [{"text": "A ferry named Orrin began service across the Tamsel lake."},
                                  {"text": "Farmers in Pellow reported the wettest spring in forty years."}],
    }
    for name, records in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records), encoding="utf-8")
    return root


@pytest.fixture
def gpt2_dir(tmp_path, tiny_tokenizer):
    """A tiny GPT-2 written by plain ``transformers`` (not Llama, not built by the project)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    path = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load a model."""
    import benchmarks.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


def _run_args(model, data, out, state, *extra):
    return ["--model", str(model), "--defense", "none", "--data", str(data), "--steps", "4",
            "--milestones", "2", "--batch-size", "2", "--micro-batch-size", "1", "--max-length", "32",
            "--lr", "1e-2", "--relearn-docs", "2", "--seeds", "0", "--eval-batch-size", "4",
            "--output-dir", str(out), "--state-dir", str(state), "--no-progress", *extra]


# --------------------------------------------------------------------------- dry runs


def test_dry_run_of_the_paper_setting_needs_no_network(capsys, monkeypatch, tmp_path, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    code = relearn.main(["--dry-run", "--model", "muse-bench/MUSE-News_target", "--data", "muse-bench/MUSE-News",
                         "--defense", "npo_sam"])
    assert code == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("dry run", "note:"))))
    attack = plan["attack"]["hyperparameters"]
    assert (attack["lr"], attack["batch_size"], attack["schedule"], attack["max_length"]) == (1e-5, 4, "cosine", 2048)
    assert plan["attack"]["milestones"] == [0, 25, 50, 75, 100, 125, 150]
    assert plan["curves"]["npo_sam"]["defense"] == "npo_sam"
    assert plan["curves"]["npo_sam"]["defense_hyperparameters"]["sam_rho"] == 0.01
    assert plan["curves"]["target"]["checkpoint"] == "muse-bench/MUSE-News_target"
    assert not (tmp_path / "cache").exists()  # nothing was written either


def test_dry_run_of_a_composed_plan_sizes_its_training_part(capsys, tmp_path, muse_dir, gpt2_dir, no_model_loading):
    # The plan's estimates (memory, checkpoint size) come from the composed attack, not the registry of
    # single attacks, which does not know 'finetune+quantize'.
    args = _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")
    assert relearn.main(args + ["--attack", "finetune+quantize", "--quant-bits", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("dry run", "note:"))))
    assert plan["attack"]["name"] == "finetune+quantize"
    assert plan["attack"]["hyperparameters"]["quant_bits"] == 4
    assert "attack finetune+quantize" in out  # the training it sizes
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_as_a_command_exits_zero(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RELEARN_BENCH_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.relearn", "--dry-run", "--model", "muse-bench/MUSE-News_target",
         "--data", "muse-bench/MUSE-News", "--defense", "npo_sam"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "lr: 1.0e-05" in done.stdout and "schedule: cosine" in done.stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--attack", "fine_tune"], "unknown attack 'fine_tune'; valid names: benign, finetune, lora, quantize"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--milestones", "2,9"], "milestone 9 lies outside the attack's 0..4 steps"),
        (["--relearn-docs", "9"], "relearn document count 9 is larger than the forget set (4 documents)"),
        (["--relearn-docs", "lots"], "--relearn-docs must be a count"),
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--lora-rank", "4"], "--lora-rank applies to the lora attack only"),
        (["--dtype", "bfloat16"], "attack finetune trains every weight, and --dtype bfloat16"),
    ],
)
def test_bad_input_fails_with_a_reason_before_any_model_loads(tmp_path, muse_dir, gpt2_dir, no_model_loading,
                                                              extra, words):
    args = _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")
    with pytest.raises(UsageError) as caught:
        relearn.main(args + extra)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unwritable_output_dir_is_refused(tmp_path, muse_dir, gpt2_dir, no_model_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="a-file"):
        relearn.main(_run_args(gpt2_dir, muse_dir, blocker / "results", tmp_path / "state"))


def test_a_model_named_target_is_refused_only_when_the_target_baseline_runs(tmp_path, muse_dir, gpt2_dir,
                                                                             no_model_loading, capsys):
    model = tmp_path / "target"
    gpt2_dir.rename(model)
    base = ["--model", str(model), "--defense", "none", "--data", str(muse_dir), "--dry-run",
            "--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    with pytest.raises(UsageError, match="--label 'target' is taken by a baseline"):
        relearn.main(base + ["--target-model", str(model)])
    assert relearn.main(base + ["--no-baselines"]) == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("dry run", "note:"))))
    assert list(plan["curves"]) == ["target"]  # the attacked model, and no baseline
    assert plan["curves"]["target"]["kind"] == "attacked"


def test_a_curve_labelled_target_without_baselines_is_not_the_target_reference():
    from benchmarks.core.results import reference_roles

    curves = {"target": {"steps": [0], "metrics": {}}}
    assert reference_roles({"curves": curves, "references": {"target": None, "retrain": None}}) == {
        "target": None, "retrain": None}
    assert reference_roles({"curves": curves, "references": {}})["target"] == "target"  # files that omit it


def test_an_existing_named_output_is_not_overwritten(tmp_path, muse_dir, gpt2_dir, no_model_loading):
    existing = tmp_path / "mine.yaml"
    existing.write_text("keep me\n")
    args = _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")
    args[args.index("--output-dir"):args.index("--output-dir") + 2] = ["--output", str(existing)]
    with pytest.raises(UsageError, match="mine.yaml exists; pass --overwrite"):
        relearn.main(args)
    assert existing.read_text() == "keep me\n"


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_line_and_exit_two(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.relearn", "--attack", "nope", "--dry-run"],
        cwd=ROOT, env={**os.environ, "RELEARN_BENCH_CACHE": str(tmp_path)}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: unknown attack 'nope'; valid names: benign, finetune, lora, quantize"]


# --------------------------------------------------------------------------- real (tiny) runs


def _only_result(directory: Path) -> Path:
    found = sorted(directory.glob("*.yaml"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_a_plain_transformers_gpt2_checkpoint_can_be_attacked(tmp_path, muse_dir, gpt2_dir, capsys):
    out, state = tmp_path / "out", tmp_path / "state"
    assert relearn.main(_run_args(gpt2_dir, muse_dir, out, state, "--attack", "lora", "--privleak",
                                  "--mixed-precision", "bf16")) == 0
    path = _only_result(out)
    result = read_result(path)
    assert validate_result(result) == []
    assert result["precision"]["mixed_precision"] == "bf16" and result["precision"]["weights_dtype"] == "float32"
    assert result["processes"]["world_size"] == 1 and result["processes"]["global_batch_size"] == 2
    assert path.with_suffix(".png").is_file()
    assert result["run_id"] in path.name
    assert list(result["curves"]) == ["gpt2-tiny"]
    curve = result["curves"]["gpt2-tiny"]
    assert curve["steps"] == [0, 2, 4]
    assert set(curve["metrics"]) >= {"knowmem_forget", "knowmem_forget_heldout", "knowmem_forget_relearn",
                                     "verbmem_forget", "verbmem_forget_heldout", "verbmem_forget_relearn",
                                     "knowmem_retain"}
    # VerbMem items are split by their article like the questions: 2 documents in T, 2 in V.
    assert result["evaluation"]["verbmem_items"] == {0: {"all": 4, "relearn": 2, "heldout": 2}}
    verbatim = curve["metrics"]
    for step in range(3):  # the mean over all four items is the mean of the two halves
        whole = verbatim["verbmem_forget"]["mean"][step]
        halves = (verbatim["verbmem_forget_heldout"]["mean"][step] + verbatim["verbmem_forget_relearn"]["mean"][step]) / 2
        assert whole == pytest.approx(halves)
    leak = curve["metrics"]["privleak"]["per_seed"][0]
    assert leak[0] is not None and leak[1] is None and leak[2] is not None  # before and after only
    assert result["evaluation"]["privleak_reference"]["source"].startswith("published MUSE-News")
    assert len(result["attack"]["relearn_doc_ids"]) == 2 and len(result["attack"]["heldout_doc_ids"]) == 2
    assert result["references"] == {"target": None, "retrain": None}
    assert result["summary"]["gpt2-tiny"]["knowmem_forget"]["recovery_ratio"]["mean"] is None  # no target
    assert list(state.iterdir()) == []  # the run's state is gone once the file is written
    assert "gpt2-tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_uninterrupted_numbers(tmp_path, muse_dir, gpt2_dir, monkeypatch):
    extra = ("--seeds", "0,1", "--attack", "finetune")
    # The uninterrupted reference.
    assert relearn.main(_run_args(gpt2_dir, muse_dir, tmp_path / "ref", tmp_path / "ref-state", *extra)) == 0
    reference = read_result(_only_result(tmp_path / "ref"))

    # Interrupt the second seed's attack right after its first milestone checkpoint.
    out, state = tmp_path / "out", tmp_path / "state"
    original = relearn.RunState.save_checkpoint
    calls = []

    def interrupted(self, seed, label, payload):
        original(self, seed, label, payload)
        calls.append(seed)
        if seed == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(relearn.RunState, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        relearn.main(_run_args(gpt2_dir, muse_dir, out, state, *extra))
    assert calls == [0, 1]  # seed 0 at step 2 (none at its last step, where its record is written), seed 1 at step 2
    assert not out.exists() or not any(out.iterdir())  # no partial result file
    checkpoints = list(state.rglob("*.ckpt"))  # the one trajectory in progress, in safetensors + JSON
    assert len(checkpoints) == 1 and (checkpoints[0] / "weights.safetensors").is_file()
    assert not list(state.rglob("*.pt"))
    monkeypatch.setattr(relearn.RunState, "save_checkpoint", original)

    assert relearn.main(_run_args(gpt2_dir, muse_dir, out, state, *extra, "--resume")) == 0
    resumed = read_result(_only_result(out))
    assert resumed["curves"] == reference["curves"]
    assert resumed["summary"] == reference["summary"]
    assert resumed["trajectories"] == reference["trajectories"]


@pytest.mark.slow
@pytest.mark.muse_news
def test_muse_news_held_out_curves_carry_their_question_counts(tmp_path, muse_news_dir, gpt2_dir, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["--model", str(gpt2_dir), "--defense", "none", "--data", str(muse_news_dir), "--steps", "1",
            "--relearn-docs", "50%", "--seeds", "0", "--max-length", "64", "--eval-batch-size", "100",
            "--output-dir", str(out), "--state-dir", str(tmp_path / "state"), "--no-progress"]
    assert relearn.main(args) == 0
    result = read_result(_only_result(out))
    assert validate_result(result) == []
    metrics = result["curves"]["gpt2-tiny"]["metrics"]
    assert {"knowmem_forget_heldout", "knowmem_forget_relearn"} <= set(metrics)
    counts = result["evaluation"]["knowmem_forget_questions"][0]
    assert metrics["knowmem_forget_heldout"]["questions"] == {0: counts["heldout"]}
    assert metrics["knowmem_forget_relearn"]["questions"] == {0: counts["relearn"]}
    assert counts["heldout"] > 0
    assert counts["heldout"] + sum(counts["heldout_removed"].values()) == counts["all"] == 100
    assert result["attack"]["documents"] == {"forget": 889, "relearn": 444, "heldout": 445}
    attribution = result["attribution"]
    assert attribution["method"]["name"] == "bm25"
    assert len(attribution["splits"]["knowmem/forget_qa"]["items"]) == 100
    assert result["evaluation"]["heldout_questions"].startswith("questions grouped into T and V by the raw/forget")
    table = capsys.readouterr().out
    assert "V questions" in table and f"V questions: {counts['heldout']} of 100" in table
    assert f"answer in T {counts['heldout_removed']['answer_in_T']}" in table


@pytest.mark.slow
def test_the_papers_whole_corpus_setting_is_labelled_not_held_out(tmp_path, muse_dir, gpt2_dir, capsys):
    out = tmp_path / "out"
    args = _run_args(gpt2_dir, muse_dir, out, tmp_path / "state")
    args[args.index("--relearn-docs") + 1] = "100%"
    assert relearn.main(args) == 0
    result = read_result(_only_result(out))
    assert result["attack"]["documents"] == {"forget": 4, "relearn": 4, "heldout": 0}
    assert result["evaluation"]["heldout_questions"].startswith("not held out: every forget document went to the attacker")
    assert "knowmem_forget_heldout" not in result["curves"]["gpt2-tiny"]["metrics"]
    assert "held-out recovery: not held out" in capsys.readouterr().out


def test_checkpoints_can_be_spaced_out(tmp_path):
    import torch

    from benchmarks.core.training import rng_state

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    run = relearn.RunState(tmp_path / "state", checkpoints=True, checkpoint_every=3)
    run.start({"run_id": "x"})
    kept = []
    for step in (1, 2, 3, 4, 6, 7):
        run.save_checkpoint(0, "npo", {
            "trainable_state": {"w": torch.full((2,), float(step))}, "curve": {str(step): {}},
            "loop_state": {"step": step, "optimizer": optimizer.state_dict(), "scheduler": {}, "rng": rng_state(),
                           "history": []}})
        kept.append(run.checkpoint(0, "npo")["loop_state"]["step"] if run.checkpoint(0, "npo") else None)
    assert kept == [None, None, 3, 3, 6, 6]
    run.finish(0, "npo", {"status": "complete"})
    assert run.checkpoint(0, "npo") is None


@pytest.mark.slow
def test_a_diverged_defense_is_reported_with_its_epochs_and_the_run_writes_its_file(
        tmp_path, muse_dir, gpt2_dir, monkeypatch):
    from benchmarks.core.errors import TrainingDiverged

    report = tmp_path / "unlearned" / "unlearn.yaml"

    def diverging(base, defense, settings, data, **kwargs):
        report.parent.mkdir(parents=True)
        report.write_text(yaml.safe_dump({"status": "diverged", "epochs": [{"epoch": 1, "knowmem_retain": 12.5}]}))
        raise TrainingDiverged("loss became nan at step 3 (epoch 1)", report=report)

    monkeypatch.setattr("benchmarks.core.unlearning.unlearn_cached", diverging)
    args = _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")
    args[args.index("--defense") + 1] = "npo"
    assert relearn.main(args) == 3
    result = read_result(_only_result(tmp_path / "out"))
    assert validate_result(result) == []
    assert result["status"] == "diverged"
    record = result["models"]["npo"]
    assert record["status"] == "diverged" and "nan at step 3" in record["error"]
    assert record["epochs"] == [{"epoch": 1, "knowmem_retain": 12.5}]
    assert result["defense"]["name"] == "npo"
    assert list(result["curves"]) == ["target"]  # the target was still attacked


@pytest.fixture
def llama_dir(tmp_path, tiny_model, tiny_tokenizer):
    """The tiny Llama saved as a checkpoint: no dropout, so a training step is a function of its
    batch alone (each process of accelerate launch draws its own dropout masks)."""
    path = tmp_path / "llama-tiny"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_cpu_processes_write_one_result_with_the_numbers_of_one_process(
        tmp_path, muse_dir, llama_dir, monkeypatch, launch_two_processes):
    # NPO unlearns the model (cached), then the target and the NPO model are attacked and
    # measured (PrivLeak too). One process attacks with 2 micro-batches of 1 chunk per step; two
    # processes with 1 chunk each: the same global batch of the same chunks in the same order,
    # which in exact arithmetic is the same run (see the unlearn test). The defense (paper preset,
    # 4 texts per process per step) sees all 4 forget texts in its one step per epoch on each
    # process, the second process's shard repeating them (accelerate evens shards out), so its
    # averaged gradient is one process's too. Measured: the two result files agree to the bit;
    # the tolerance 1e-6 (relative) leaves room for another summation order.
    (muse_dir / "raw" / "retain1.json").write_text(json.dumps(
        [{"text": "Farmers in Pellow reported the wettest spring in forty years."},
         {"text": "A ferry named Orrin began service across the Tamsel lake."}]), encoding="utf-8")

    def args(name: str, *extra) -> list[str]:
        argv = _run_args(llama_dir, muse_dir, tmp_path / name / "out", tmp_path / name / "state", "--privleak", *extra)
        argv[argv.index("--defense") + 1] = "npo"
        return argv

    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "one" / "cache"))
    assert relearn.main(args("one")) == 0
    done = launch_two_processes("benchmarks.relearn", args("two", "--batch-size", "1", "--threads", "1"),
                                env={"RELEARN_BENCH_CACHE": str(tmp_path / "two" / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 2  # one process printed the table and its two files
    files = sorted((tmp_path / "two" / "out").iterdir())
    assert [f.suffix for f in files] == [".png", ".yaml"]
    assert list((tmp_path / "two" / "state").iterdir()) == []
    unlearned = list((tmp_path / "two" / "cache" / "unlearned").iterdir())
    assert len(unlearned) == 1 and read_result(unlearned[0] / "unlearn.yaml")["training"]["processes"] == 2

    single, double = read_result(_only_result(tmp_path / "one" / "out")), read_result(files[1])
    assert validate_result(double) == []
    assert double["status"] == single["status"] == "complete"
    assert single["processes"]["world_size"] == 1 and double["processes"]["world_size"] == 2
    assert double["processes"]["batch_size_per_process"] == 1 and single["processes"]["batch_size_per_process"] == 2
    assert double["processes"]["global_batch_size"] == single["processes"]["global_batch_size"] == 2
    assert list(double["curves"]) == list(single["curves"]) == ["target", "npo"]
    for key in ("curves", "summary", "models"):  # every number, at 1e-6 relative
        assert _close(double[key], single[key]), key
    assert _close({label: {seed: t["losses"] for seed, t in per_seed.items()} for label, per_seed in double["trajectories"].items()},
                  {label: {seed: t["losses"] for seed, t in per_seed.items()} for label, per_seed in single["trajectories"].items()})
    leak = double["curves"]["npo"]["metrics"]["privleak"]["per_seed"][0]
    assert leak[0] is not None and leak[-1] is not None  # a continuous score, so the comparison bites
    assert len(double["models"]["npo"]["unlearning"]["defense_seed_0"]["epochs"]) == 11  # measured once per epoch


@pytest.mark.slow
def test_trajectories_in_two_worker_processes_give_the_numbers_of_one_process(tmp_path, muse_dir, llama_dir,
                                                                              monkeypatch):
    # Two models (the target and its NPO model) under two attack seeds: the seed-0 trajectories
    # run at once and measure step 0, the seed-1 ones wait for it. One thread per trajectory in
    # both runs, so each trajectory computes exactly what it computes alone.
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))  # NPO unlearned once, for both runs
    (muse_dir / "raw" / "retain1.json").write_text(json.dumps(  # NPO's retain term
        [{"text": "Farmers in Pellow reported the wettest spring in forty years."}]), encoding="utf-8")

    def args(name: str, *extra) -> list[str]:
        argv = _run_args(llama_dir, muse_dir, tmp_path / name / "out", tmp_path / name / "state",
                         "--seeds", "0,1", *extra)
        argv[argv.index("--defense") + 1] = "npo"
        return argv

    assert relearn.main(args("one", "--threads", "1", "--jobs", "1")) == 0
    assert relearn.main(args("two", "--threads", "2", "--jobs", "2")) == 0
    single, double = (read_result(_only_result(tmp_path / name / "out")) for name in ("one", "two"))
    assert validate_result(double) == []
    assert (single["environment"]["jobs"], double["environment"]["jobs"]) == (1, 2)
    assert double["environment"]["threads_per_job"] == 1
    assert list(double["curves"]) == ["target", "npo"]
    assert double["curves"] == single["curves"]
    assert double["summary"] == single["summary"]
    assert double["trajectories"] == single["trajectories"]
    per_seed = double["curves"]["npo"]["metrics"]["verbmem_forget"]["per_seed"]
    assert per_seed[0][0] == per_seed[1][0] and per_seed[0][-1] != per_seed[1][-1]  # shared step 0, own attacks
    losses = {seed: t["losses"] for seed, t in double["trajectories"]["npo"].items()}
    assert losses[0] != losses[1]
    timings = double["timings"]
    assert timings["attack"] + timings["evaluation"] <= timings["total"]  # overlapping workers counted once
    assert list((tmp_path / "two" / "state").iterdir()) == []


@pytest.mark.slow
def test_unlearning_runs_in_two_worker_processes_give_the_models_of_one_process(tmp_path, muse_dir, llama_dir,
                                                                                monkeypatch, caplog):
    # Two unlearning seeds of NPO are two missing models: with --jobs 2 both are unlearned in
    # worker processes at once, with --jobs 1 one after the other here; one thread each time,
    # so each run computes exactly what it computes alone and the weights are the same bits.
    from safetensors.torch import load_file

    (muse_dir / "raw" / "retain1.json").write_text(json.dumps(  # NPO's retain term
        [{"text": "Farmers in Pellow reported the wettest spring in forty years."}]), encoding="utf-8")
    results = {}
    for name, extra in (("one", ("--threads", "1", "--jobs", "1")), ("two", ("--threads", "2", "--jobs", "2"))):
        monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / name / "cache"))  # each run unlearns its own
        argv = _run_args(llama_dir, muse_dir, tmp_path / name / "out", tmp_path / name / "state",
                         "--seeds", "0,1", "--defense-seeds", "0,1", *extra)
        argv[argv.index("--defense") + 1] = "npo"
        with caplog.at_level(logging.INFO, logger="benchmarks.relearn"):
            assert relearn.main(argv) == 0
        results[name] = read_result(_only_result(tmp_path / name / "out"))
        in_workers = "unlearning 2 models, 2 at once in worker processes of 1 torch thread(s) each"
        assert (in_workers in caplog.text) == (name == "two")
        caplog.clear()
    single, double = results["one"], results["two"]
    assert validate_result(double) == []
    per_seed = {name: result["models"]["npo"]["per_attack_seed"] for name, result in results.items()}
    assert [per_seed["two"][seed]["defense_seed"] for seed in (0, 1)] == [0, 1]
    weights = {name: [load_file(Path(per_seed[name][seed]["checkpoint"]) / "model.safetensors") for seed in (0, 1)]
               for name in results}
    assert Path(per_seed["one"][0]["checkpoint"]).parent != Path(per_seed["two"][0]["checkpoint"]).parent
    for seed in (0, 1):
        ours, theirs = weights["two"][seed], weights["one"][seed]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert any(not torch.equal(weights["two"][0][n], weights["two"][1][n]) for n in weights["two"][0])  # two seeds
    assert _close(double["models"], single["models"])
    assert double["curves"] == single["curves"]


def _close(a, b, rel: float = 1e-6) -> bool:
    """``a`` equals ``b`` with every float within ``rel`` (relative), keys and structure exact;
    left out: checkpoint paths (each run's own cache) and checkpoint digests (a digest tells
    bitwise equal weights from different ones, not close from far)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a
                                            if k not in ("checkpoint", "revision_or_hash"))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    return a == b


@pytest.mark.slow
def test_profile_times_a_run_of_its_own(tmp_path, muse_dir, gpt2_dir, capsys, monkeypatch):
    from benchmarks import profile

    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    args = [a for a in _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")]
    assert profile.main(args) == 0
    out = capsys.readouterr().out
    assert "total (wall clock)" in out and "attacks" in out and "evaluation" in out
    assert len(list((tmp_path / "out").glob("*.yaml"))) == 1  # the runner's own file, where it was asked
