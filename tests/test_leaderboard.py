"""The leaderboard: comparable runs only, ranked by what the attack brought back on held-out V,
gates for defenses that did not unlearn or lost their utility, broken files, the CLI.

Result files are made by the project's own writer: a real plan from ``relearn.make_plan``,
measurements in the shape ``measure_point`` returns, then ``relearn.build_result`` and
``write_yaml_atomic``. Only the scores are chosen by hand.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import leaderboard, relearn
from benchmarks.core.data import load_data
from benchmarks.core.errors import UsageError
from benchmarks.core.recovery import document_ids, question_groups, resolve_count, split_documents
from benchmarks.core.results import (
    attack_settings_hash,
    read_result,
    validate_result,
    write_yaml_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
T975_DF1 = 12.7062  # t_{0.975} with one degree of freedom (two seeds)
DOCS = ["d0", "d1", "d2", "d3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny MUSE-layout data set whose questions and verbmem items know their documents."""
    root = tmp_path_factory.mktemp("data")
    files = {
        "raw/forget.json": [{"text": f"Article {d} about the harbour.", "doc_id": d} for d in DOCS],
        "raw/retain1.json": [{"text": "A retain article."}],
        "knowmem/forget_qa.json": [{"question": f"What is in {d}?", "answer": f"fact {d}", "doc_id": d} for d in DOCS],
        "knowmem/forget_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "knowmem/retain_qa.json": [{"question": "What did Velt unveil?", "answer": "a tram"}],
        "knowmem/retain_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "verbmem/forget.json": [{"prompt": f"Article {d}", "gt": "about the harbour.", "doc_id": d} for d in DOCS],
    }
    for name, records in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records), encoding="utf-8")
    return root


def _value(level, seed: int, step_index: int) -> float:
    """``level`` is a list of V values per milestone, or a function ``(seed, step_index)``."""
    return float(level(seed, step_index) if callable(level) else level[step_index])


def write_run(directory: Path, data_dir: Path, name: str, levels: dict, *, extra: tuple = (),
              defenses: str | None = None, retrain: bool = True, status: dict | None = None) -> Path:
    """Write a result file through the runner's own code paths and return its path.

    ``levels[label] = (v_curve, knowmem_retain)``: the role's KnowMem-forget on every question
    at each milestone (so on V too) and its KnowMem-retain. Labels: ``target``, ``retrain`` and
    defense names. ``status[(seed, label)] = "diverged"`` leaves that trajectory's later steps out.
    """
    defended = defenses or ",".join(label for label in levels if label not in ("target", "retrain"))
    argv = ["--model", "lab/target-tiny", "--defense", defended, "--data", str(data_dir),
            "--steps", "20", "--milestones", "10", "--seeds", "0,1", "--relearn-docs", "2",
            "--output-dir", str(directory), "--state-dir", str(directory / ".state"), *extra]
    if retrain:
        argv += ["--retrain-model", "lab/retrain-tiny"]
    plan = relearn.make_plan(relearn.build_parser().parse_args(argv), argv)
    data = load_data(str(data_dir))
    forget = data.records("raw", "forget")
    ids = document_ids(forget)
    count = resolve_count(len(ids), plan.attack_config.relearn_docs, plan.attack_config.relearn_fraction)
    splits = {seed: split_documents(ids, count, seed) for seed in plan.seeds}
    groups = {seed: question_groups(data.records("knowmem", "forget_qa"), s) for seed, s in splits.items()}
    verbmem_groups = {seed: question_groups(data.records("verbmem", "forget"), s) for seed, s in splits.items()}
    questions = len(data.records("knowmem", "forget_qa"))
    trajectories = {}
    for seed in plan.seeds:
        trajectories[seed] = {}
        for role in plan.roles:
            curve, retain = levels[role.label]
            broken = (status or {}).get((seed, role.label))
            points = {}
            for index, step in enumerate(plan.milestones):
                if broken and index > 0:
                    break
                value = _value(curve, seed, index)
                points[str(step)] = {
                    "knowmem_forget": value,
                    "knowmem_forget_items": [value] * questions,
                    "verbmem_forget": value / 2,
                    "verbmem_forget_items": [value / 2] * len(DOCS),
                    "knowmem_retain": float(retain),
                }
            trajectories[seed][role.label] = {"status": broken or "complete", "error": None, "curve": points,
                                              "losses": [], "attack_seconds": 0.0, "eval_seconds": 0.0}
    meta = {"run_id": f"20260101T000000.00000{len(list(directory.glob('*.yaml')))}Z-{name[:6]:0<6}",
            "created": "2026-01-02T03:04:05+00:00", "model_hash": "sha256:" + "ab" * 32}
    models = {role.label: {"kind": role.kind, "checkpoint": role.ref} for role in plan.roles}
    for role in plan.roles:
        if role.kind == "defended":  # as the runner records each unlearning run behind the model
            models[role.label]["unlearning"] = {f"defense_seed_{s}": {"selection": {}, "epochs": []}
                                                for s in sorted(set(role.defense_seeds.values()))}
    result = relearn.build_result(plan, meta, models, data, splits, groups, trajectories, {"total": 1.0}, None,
                                  verbmem_groups=verbmem_groups)
    return write_yaml_atomic(directory / f"{name}.yaml", result)


TARGET = ([90, 90, 90], 80)
RETRAIN = ([1, 2, 3], 82)


def _rows(directory: Path, **kwargs):
    results, broken = leaderboard.load_results(directory)
    assert broken == []
    return leaderboard.build_rows(results, **kwargs)


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Rank")]


def _cells(row):
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_files_from_the_writer_are_valid_and_record_the_settings_hash(tmp_path, data_dir):
    path = write_run(tmp_path, data_dir, "npo", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)})
    result = read_result(path)
    assert validate_result(result) == []
    recorded = result["attack"]["settings_hash"]
    assert recorded == attack_settings_hash(result["attack"])  # the reader's computation agrees
    assert len(recorded) == 12


def test_smaller_change_on_v_ranks_first_with_paired_intervals(tmp_path, data_dir):
    # npo: per seed changes 30 - 2 = 28 and 34 - 4 = 30; npo_sam: 12 - 2 = 10 and 12 - 4 = 8.
    npo = lambda seed, i: [2, 20, 30][i] + (2 * seed if i == 0 else 4 * seed if i == 2 else 0)  # noqa: E731
    npo_sam = lambda seed, i: [2, 6, 12][i] + (2 * seed if i == 0 else 0)  # noqa: E731
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN, "npo": (npo, 78), "npo_sam": (npo_sam, 76)})
    (rows,) = _rows(tmp_path).values()
    assert [(r.role, r.ranked) for r in rows] == [("npo_sam", True), ("npo", True)]
    first, second = rows
    assert first.change.mean == pytest.approx(9.0) and second.change.mean == pytest.approx(29.0)
    # Two seeds, per-seed changes two apart: sample sd √2, half width t(1) · √2 / √2.
    assert second.change.half_width == pytest.approx(T975_DF1 * math.sqrt(2) / math.sqrt(2), abs=1e-4)
    assert first.retrain_change.mean == pytest.approx(2.0)  # the retrain model beside it: 3 - 1
    # Recovery ratio per seed (after - before) / (target - before), then the mean.
    assert first.ratio == pytest.approx((10 / 88 + 8 / 86) / 2)
    # Mean change over the attack: trapezoid over steps 0, 10, 20 of the change curve / 20.
    seed0 = (10 * (0 + 4) / 2 + 10 * (4 + 10) / 2) / 20
    seed1 = (10 * (0 + 2) / 2 + 10 * (2 + 8) / 2) / 20
    assert first.mean_change == pytest.approx((seed0 + seed1) / 2)

    assert leaderboard.main([str(tmp_path)]) == 0
    text = (tmp_path / "LEADERBOARD.md").read_text()
    table = _table_rows(text)
    assert len(table) == 2  # the target and retrain baselines are not rows
    cells = _cells(table[0])
    assert cells[:5] == ["1", "npo_sam", "3.0", "12.0", "+9.0 ± 12.7"]
    assert cells[6:10] == ["+2.0 ± 0.0", "0.10", "76.0 (≥ 72.0)", ""]
    assert _cells(table[1])[:2] == ["2", "npo"]
    assert f"## model `lab/target-tiny` · data `{data_dir}` · attack `finetune` (settings " in text
    assert "Attack budget: step 20" in text


def test_a_defense_that_did_not_unlearn_is_never_ranked_above_one_that_did(tmp_path, data_dir):
    # npo_sam barely moves under the attack but never forgot (V 60 before, retrain 1 + 10 = 11);
    # npo forgot (V 5) and recovers a lot. A change-only ranking would put npo_sam first.
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN,
                                          "npo": ([5, 30, 50], 78), "npo_sam": ([60, 60, 61], 79)})
    (rows,) = _rows(tmp_path).values()
    assert [(r.role, r.ranked) for r in rows] == [("npo", True), ("npo_sam", False)]
    assert rows[1].reasons == ["did not unlearn: V before 60.0 > retrain 1.0 + 10"]
    leaderboard.main([str(tmp_path)])
    table = [_cells(r) for r in _table_rows((tmp_path / "LEADERBOARD.md").read_text())]
    assert [c[:2] for c in table] == [["1", "npo"], ["—", "npo_sam"]]
    assert table[1][9].startswith("did not unlearn")
    # A gate of 60 points lets it in, and then it ranks first (its change is the smallest).
    (rows,) = _rows(tmp_path, gate=60.0).values()
    assert [(r.role, r.ranked) for r in rows] == [("npo_sam", True), ("npo", True)]


def test_a_collapsed_model_is_not_ranked(tmp_path, data_dir):
    # npo_sam's KnowMem-retain is 0: it "recovers" nothing because it knows nothing.
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN,
                                          "npo": ([3, 20, 40], 75), "npo_sam": ([0, 0, 0], 0)})
    (rows,) = _rows(tmp_path).values()
    assert [(r.role, r.ranked) for r in rows] == [("npo", True), ("npo_sam", False)]
    assert rows[1].reasons == ["lost utility: KnowMem-retain 0.0 < 0.9 × target 80.0"]
    # 0.9 × 80 = 72 is the bar: 75 passes, and a model just below it does not.
    write_run(tmp_path / "b", data_dir, "run", {"target": TARGET, "retrain": RETRAIN, "npo": ([3, 20, 40], 71.9)})
    ((row,),) = _rows(tmp_path / "b").values()
    assert not row.ranked and row.reasons[0].startswith("lost utility")


def test_runs_with_other_attack_settings_land_in_other_tables(tmp_path, data_dir):
    levels = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)}
    write_run(tmp_path, data_dir, "default", levels)
    write_run(tmp_path, data_dir, "same", levels)
    write_run(tmp_path, data_dir, "lr", levels, extra=("--lr", "1e-3"))
    write_run(tmp_path, data_dir, "seeds", levels, extra=("--seeds", "0,2"))
    write_run(tmp_path, data_dir, "docs", levels, extra=("--relearn-docs", "1"))
    groups = _rows(tmp_path)
    tables = sorted(sorted(r.path.stem for r in rows) for rows in groups.values())
    assert tables == [["default", "same"], ["docs"], ["lr"], ["seeds"]]
    assert len({setting.attack_hash for setting in groups}) == 4
    leaderboard.main([str(tmp_path)])
    assert (tmp_path / "LEADERBOARD.md").read_text().count("## model ") == 4


def test_runs_over_several_unlearning_seeds_get_a_table_of_their_own(tmp_path, data_dir):
    levels = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)}
    write_run(tmp_path, data_dir, "default", levels)
    write_run(tmp_path, data_dir, "dseeds", levels, extra=("--defense-seeds", "0,1"))
    groups = _rows(tmp_path)
    assert sorted(setting.defense_seeds for setting in groups) == ["0", "0,1"]
    assert len({setting.attack_hash for setting in groups}) == 1  # the attack itself is the same
    leaderboard.main([str(tmp_path)])
    assert "defense seeds 0,1)" in (tmp_path / "LEADERBOARD.md").read_text()


def test_the_matrix_puts_each_attack_in_a_column(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "ft", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)})
    write_run(tmp_path, data_dir, "lora", {"target": TARGET, "retrain": RETRAIN,
                                           "npo": (lambda seed, i: [4, 8, 10 + 4 * seed][i], 78)},
              extra=("--attack", "lora"))
    results, _ = leaderboard.load_results(tmp_path)
    text = "\n".join(leaderboard.render_matrix(results, tmp_path))
    assert text.count("## Defenses × attacks") == 1
    header, _, *body = [line for line in text.splitlines() if line.startswith("|")]
    assert _cells(header) == ["Model", "finetune", "lora"]
    cells = {_cells(row)[0]: _cells(row)[1:] for row in body}
    assert list(cells) == ["target", "retrain", "npo"]
    # lora's after values are 10 and 14 over seeds 0, 1: mean 12, t(1 df) x sd / sqrt(2) = 12.706 x 2.
    assert cells["npo"] == ["2.0 → 30.0 ± 0.0", f"4.0 → 12.0 ± {T975_DF1 * 2:.1f}"]
    assert cells["retrain"][0] == "1.0 → 3.0 ± 0.0"


def test_the_matrix_takes_per_attack_the_run_that_attacked_the_most_models(tmp_path, data_dir):
    both = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78), "npo_sam": ([1, 10, 20], 78)}
    write_run(tmp_path / "matrix", data_dir, "ft-all", both, extra=("--milestones", "2"))
    write_run(tmp_path / "zz-later", data_dir, "ft-one", {"target": TARGET, "retrain": RETRAIN,
                                                        "npo": ([2, 20, 40], 78)})
    write_run(tmp_path / "matrix", data_dir, "lora", both, extra=("--attack", "lora"))
    results, _ = leaderboard.load_results(tmp_path)
    text = "\n".join(leaderboard.render_matrix(results, tmp_path))
    header, _, *body = [line for line in text.splitlines() if line.startswith("|")]
    cells = {_cells(row)[0]: _cells(row)[1:] for row in body}
    assert _cells(header)[1] == "finetune"
    assert cells["npo_sam"][0] != "–" and cells["npo"][0] == "2.0 → 30.0 ± 0.0"  # not the later one-defense run


def test_a_matrix_needs_two_attacks(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "ft", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)})
    results, _ = leaderboard.load_results(tmp_path)
    assert leaderboard.render_matrix(results, tmp_path) == []


def test_quantize_bits_are_part_of_the_attack_label():
    assert leaderboard.attack_label({"attack": {"name": "finetune+quantize", "hyperparameters": {"quant_bits": 4}}}) \
        == "finetune+quantize-4"
    assert leaderboard.attack_label({"attack": {"name": "lora", "hyperparameters": {"quant_bits": 4}}}) == "lora"


def test_a_file_without_the_recorded_hash_joins_the_runs_of_its_settings(tmp_path, data_dir):
    levels = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)}
    write_run(tmp_path, data_dir, "new", levels)
    older = read_result(write_run(tmp_path.parent / f"{tmp_path.name}-scratch", data_dir, "old", levels))
    del older["attack"]["settings_hash"]  # as files written before the hash was recorded
    write_yaml_atomic(tmp_path / "old.yaml", older)
    (rows,) = _rows(tmp_path).values()
    assert sorted(r.path.stem for r in rows) == ["new", "old"]


def test_other_model_weights_or_data_are_other_tables(tmp_path, data_dir):
    levels = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)}
    first = read_result(write_run(tmp_path, data_dir, "a", levels))
    other = copy.deepcopy(first)
    other["run_id"] = first["run_id"][:-6] + "zzzzzz"
    other["model"]["revision_or_hash"] = "sha256:" + "cd" * 32
    write_yaml_atomic(tmp_path / "weights.yaml", other)
    moved = copy.deepcopy(first)
    moved["data"]["splits"]["knowmem/forget_qa"]["sha256"] = "0" * 64
    write_yaml_atomic(tmp_path / "data.yaml", moved)
    assert len(_rows(tmp_path)) == 3


def test_budget_picks_the_closest_step(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN,
                                          "npo": ([2, 20, 30], 78), "npo_sam": ([2, 6, 40], 76)})
    (rows,) = _rows(tmp_path, budget=9).values()
    assert [(r.role, r.step, r.change.mean) for r in rows] == [("npo_sam", 10, 4.0), ("npo", 10, 18.0)]
    (rows,) = _rows(tmp_path).values()
    assert [(r.role, r.step) for r in rows] == [("npo", 20), ("npo_sam", 20)]


def test_a_diverged_trajectory_leaves_the_row_unranked(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN,
                                          "npo": ([2, 20, 30], 78), "npo_sam": ([2, 6, 12], 76)},
              status={(1, "npo_sam"): "diverged"})
    (rows,) = _rows(tmp_path).values()
    # The file is "diverged", but npo's own trajectories are complete: it is still ranked.
    assert [(r.role, r.ranked) for r in rows] == [("npo", True), ("npo_sam", False)]
    npo_sam = next(r for r in rows if r.role == "npo_sam")
    assert npo_sam.change is None and npo_sam.status == "diverged"
    assert any("a seed has no value" in reason for reason in npo_sam.reasons)
    text = leaderboard.render_table(rows, tmp_path)
    assert "npo_sam (diverged)" in text


def test_a_run_without_retrain_is_listed_unranked(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "lonely", {"target": TARGET, "npo": ([2, 20, 30], 78)}, retrain=False)
    ((row,),) = _rows(tmp_path).values()
    assert not row.ranked and row.reasons == ["no retrain baseline under the same attack"]
    assert row.change.mean == pytest.approx(28.0)  # still shown


def test_a_run_without_held_out_documents_is_listed_unranked(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "all-docs", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)},
              extra=("--relearn-docs", "4"))  # every document in T: V is empty
    ((row,),) = _rows(tmp_path).values()
    assert not row.ranked and row.reasons[0].startswith("no KnowMem-forget curve on held-out V")


def test_broken_and_invalid_files_are_named_and_skipped(tmp_path, data_dir, caplog):
    levels = {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)}
    write_run(tmp_path, data_dir, "good", levels)
    (tmp_path / "broken.yaml").write_text("run_id: abc\ncurves: [1, 2\n")
    incomplete = read_result(write_run(tmp_path.parent / f"{tmp_path.name}-scratch", data_dir, "incomplete", levels))
    del incomplete["environment"]
    write_yaml_atomic(tmp_path / "incomplete.yaml", incomplete)
    (tmp_path / "settings.yaml").write_text("lr: 0.001\n")  # not a result file: ignored
    (tmp_path / ".run.yaml.1234.tmp").write_text("half")  # temporary file of a write
    # An unlearning report has schema_version and run_id but no curves: not ranked, not broken.
    (tmp_path / "unlearn.yaml").write_text("schema_version: 1\nkind: unlearn\nrun_id: u1\n")

    with caplog.at_level(logging.WARNING, logger="benchmarks.leaderboard"):
        assert leaderboard.main([str(tmp_path)]) == 0
    text = (tmp_path / "LEADERBOARD.md").read_text()
    assert len(_table_rows(text)) == 1
    skipped = text.split("## Skipped files", 1)[1]
    assert "broken.yaml" in skipped and "not valid YAML at line" in skipped
    assert "incomplete.yaml" in skipped and "environment: missing" in skipped
    assert "settings.yaml" not in text
    assert "unlearn.yaml" not in text
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.yaml" in warned and "incomplete.yaml" in warned


def test_the_committed_result_files_render(tmp_path):
    committed = ROOT / "results"
    if not any(committed.rglob("relearn-*.yaml")):
        pytest.skip("no committed relearning result files")
    assert leaderboard.main([str(committed), "--output", str(tmp_path / "board.md")]) == 0
    text = (tmp_path / "board.md").read_text()
    assert "## model `world/target`" in text and "Skipped files" not in text


def test_refuses_to_replace_a_file_it_did_not_write(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)})
    foreign = tmp_path / "NOTES.md"
    foreign.write_text("my notes\n")
    with pytest.raises(UsageError, match="was not written by python -m benchmarks.leaderboard"):
        leaderboard.main([str(tmp_path), "--output", str(foreign)])
    assert foreign.read_text() == "my notes\n"
    leaderboard.main([str(tmp_path), "--output", str(foreign), "--overwrite"])
    leaderboard.main([str(tmp_path), "--output", str(foreign)])  # its own output: replaced
    assert "npo" in foreign.read_text()


@pytest.mark.parametrize("argv, words", [
    (["missing"], "does not exist"),
    (["--budget", "-1"], "--budget must be"),
    (["--gate", "-2"], "--gate must be"),
    (["--utility-fraction", "1.5"], "--utility-fraction must lie in [0, 1]"),
])
def test_bad_arguments_are_usage_errors(tmp_path, argv, words):
    argv = [str(tmp_path / a) if a == "missing" else a for a in argv]
    if "missing" not in " ".join(argv):
        argv = [str(tmp_path), *argv]
    with pytest.raises(UsageError) as caught:
        leaderboard.main(argv)
    assert words in str(caught.value)


def test_command_line_entry_point(tmp_path, data_dir):
    write_run(tmp_path, data_dir, "run", {"target": TARGET, "retrain": RETRAIN, "npo": ([2, 20, 30], 78)})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaderboard", str(tmp_path), "--budget", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "LEADERBOARD.md")
    assert "--budget 10" in (tmp_path / "LEADERBOARD.md").read_text()
    missing = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaderboard", str(tmp_path / "nope")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: results directory")
