"""The leaderboard: ranking by excess recovery over retrain, broken files, the CLI."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import leaderboard
from benchmarks.core.errors import UsageError
from benchmarks.core.results import SCHEMA_VERSION, validate_result, write_yaml_atomic

ROOT = Path(__file__).resolve().parents[1]
STEPS = [0, 10, 20]
T975_DF1 = 12.7062  # t_{0.975} with one degree of freedom (two seeds)


def _series(per_seed):
    mean = [sum(values) / len(values) for values in zip(*per_seed.values())]
    return {"per_seed": per_seed, "mean": mean, "ci95_low": mean, "ci95_high": mean}


def _stats(value):
    interval = {"mean": value, "ci95_low": None, "ci95_high": None}
    return {k: interval for k in ("before", "after", "recovery_ratio", "auc", "steps_to_50", "excess_over_retrain")}


def result_with(run_id, role, heldout, retrain_heldout, retain, metric="knowmem_forget_heldout"):
    """A valid result file with one defense role, the retrain and target baselines; per-seed
    curves are given by hand over STEPS."""
    curves = {
        role: {"steps": STEPS, "metrics": {metric: _series(heldout), "knowmem_retain": _series(retain)}},
        "target": {"steps": STEPS, "metrics": {metric: _series({0: [90, 91, 92], 1: [90, 91, 92]})}},
        "retrain": {"steps": STEPS, "metrics": {metric: _series(retrain_heldout)}},
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "command": f"python -m benchmarks.relearn --defense {role}",
        "created": "2026-01-02T03:04:05+00:00",
        "status": "complete",
        "model": {"id": "world/target", "revision_or_hash": None, "dtype": "float32"},
        "defense": {"name": role, "hyperparameters": {}},
        "attack": {"name": "finetune", "hyperparameters": {}, "seeds": [0, 1],
                   "relearn_doc_ids": ["d0"], "heldout_doc_ids": ["d1"]},
        "data": {"source": "world", "splits": {}},
        "curves": curves,
        "summary": {name: {m: _stats(0.0) for m in curve["metrics"]} for name, curve in curves.items()},
        "higher_is_better": {metric: False, "knowmem_retain": True},
        "references": {"target": "target", "retrain": "retrain"},
        "environment": {"python": "3.11", "packages": {}, "device": "cpu", "threads": 1, "git_revision": None},
        "timings": {},
    }


RETRAIN = {0: [1, 8, 10], 1: [3, 10, 14]}
# Excess at step 20: seeds give 31 - 10 = 21 and 33 - 14 = 19 -> 20.0 ± 12.7062 · √2 / √2.
NPO = result_with("20260101T000000.000001Z-aaaaaa", "npo", {0: [2, 20, 31], 1: [4, 22, 33]}, RETRAIN,
                  {0: [50, 49, 48], 1: [52, 51, 50]})
# Excess at step 20: 12 - 10 = 2 and 14 - 14 = 0 -> 1.0 ± 12.7062 · √2 / √2.
NPO_SAM = result_with("20260101T000000.000002Z-bbbbbb", "npo_sam", {0: [2, 6, 12], 1: [4, 8, 14]}, RETRAIN,
                      {0: [44, 44, 44], 1: [46, 46, 46]})


@pytest.fixture
def results_dir(tmp_path):
    directory = tmp_path / "results"
    write_yaml_atomic(directory / "world" / "npo.yaml", NPO)
    write_yaml_atomic(directory / "world" / "npo_sam.yaml", NPO_SAM)
    return directory


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Rank")]


def _cells(row):
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_fixtures_are_valid_results():
    assert validate_result(NPO) == [] and validate_result(NPO_SAM) == []


def test_excess_is_paired_by_seed_with_a_t_interval():
    stat = leaderboard.excess_at(NPO, "npo", "retrain", "knowmem_forget_heldout", 20)
    # Differences 21 and 19: mean 20, sample sd √2, half width t(1) · √2 / √2.
    assert stat.mean == pytest.approx(20.0)
    assert stat.half_width == pytest.approx(T975_DF1 * math.sqrt(2) / math.sqrt(2), abs=1e-4)


def test_lower_excess_recovery_ranks_first(results_dir, capsys):
    output = results_dir / "LEADERBOARD.md"
    assert leaderboard.main([str(results_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    text = output.read_text()
    rows = _table_rows(text)
    assert len(rows) == 2  # the target and retrain baselines are not ranked
    first, second = map(_cells, rows)
    assert first[:3] == ["1", "npo_sam", "+1.0 ± 12.7"]
    assert second[:3] == ["2", "npo", "+20.0 ± 12.7"]
    # Ranked on, before, after, utility, step, seeds, run id, file link.
    assert first[3:] == ["KnowMem-forget on held-out V", "3.0", "13.0", "45.0", "20", "2",
                         NPO_SAM["run_id"], "[npo_sam.yaml](world/npo_sam.yaml)"]
    assert second[3:7] == ["KnowMem-forget on held-out V", "3.0", "32.0", "51.0"]
    assert "Regenerate with `python -m benchmarks.leaderboard " in text
    assert "## model `world/target` · data `world` · attack `finetune`" in text
    assert "Attack budget: step 20" in text


def test_budget_picks_the_closest_step(results_dir):
    groups = leaderboard.build_rows(leaderboard.load_results(results_dir)[0], budget=9)
    (rows,) = groups.values()
    # Step 10: npo 20 - 8 and 22 - 10 -> 12; npo_sam 6 - 8 and 8 - 10 -> -2.
    assert [(r.role, r.step, r.excess.mean) for r in rows] == [("npo_sam", 10, -2.0), ("npo", 10, 12.0)]
    assert rows[0].excess.half_width == pytest.approx(0.0)


def test_a_seed_without_a_value_leaves_the_excess_undefined(tmp_path):
    diverged = copy.deepcopy(NPO)
    diverged["status"] = "diverged"
    diverged["curves"]["npo"]["metrics"]["knowmem_forget_heldout"]["per_seed"][1][2] = None
    assert leaderboard.excess_at(diverged, "npo", "retrain", "knowmem_forget_heldout", 20) is None
    assert leaderboard.excess_at(diverged, "npo", "retrain", "knowmem_forget_heldout", 10).mean == 12.0
    ((npo_sam, npo),) = leaderboard.build_rows([(tmp_path / "a.yaml", diverged), (tmp_path / "b.yaml", NPO_SAM)]).values()
    assert (npo_sam.role, npo.role, npo.excess) == ("npo_sam", "npo", None)
    rows = _table_rows(leaderboard.render_table([npo_sam, npo], tmp_path))
    assert _cells(rows[1])[:3] == ["—", "npo (diverged)", "n/a"]


def test_broken_and_invalid_files_are_named_and_skipped(results_dir, caplog):
    (results_dir / "broken.yaml").write_text("run_id: abc\ncurves: [1, 2\n")
    incomplete = dict(NPO, run_id="20260101T000000.000003Z-cccccc")
    del incomplete["environment"]
    write_yaml_atomic(results_dir / "incomplete.yaml", incomplete)
    (results_dir / "settings.yaml").write_text("lr: 0.001\n")  # not a result file: ignored
    (results_dir / ".run.yaml.1234.tmp").write_text("half")  # temporary file of a write
    # An unlearning report has schema_version and run_id but no curves: not ranked, not broken.
    (results_dir / "unlearn.yaml").write_text("schema_version: 1\nkind: unlearn\nrun_id: u1\n")

    with caplog.at_level(logging.WARNING, logger="benchmarks.leaderboard"):
        assert leaderboard.main([str(results_dir)]) == 0
    text = (results_dir / "LEADERBOARD.md").read_text()
    assert len(_table_rows(text)) == 2
    skipped = text.split("## Skipped files", 1)[1]
    assert "broken.yaml" in skipped and "not valid YAML at line" in skipped
    assert "incomplete.yaml" in skipped and "environment: missing" in skipped
    assert "settings.yaml" not in text
    assert "unlearn.yaml" not in text
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.yaml" in warned and "incomplete.yaml" in warned


def test_run_without_retrain_is_listed_unranked(tmp_path):
    lonely = dict(NPO, run_id="20260101T000000.000004Z-dddddd", references={"target": "target", "retrain": None})
    lonely["curves"] = {k: v for k, v in NPO["curves"].items() if k != "retrain"}
    lonely["summary"] = {k: v for k, v in NPO["summary"].items() if k != "retrain"}
    assert validate_result(lonely) == []
    write_yaml_atomic(tmp_path / "a.yaml", lonely)
    write_yaml_atomic(tmp_path / "b.yaml", NPO_SAM)
    leaderboard.main([str(tmp_path), "--output", str(tmp_path / "board.md")])
    rows = _table_rows((tmp_path / "board.md").read_text())
    assert rows[0].startswith("| 1 ") and "npo_sam" in rows[0]
    assert rows[1].startswith("| — ") and "n/a" in rows[1]


def test_all_forget_questions_when_no_heldout_curve(tmp_path):
    plain = result_with("20260101T000000.000005Z-eeeeee", "npo", NPO["curves"]["npo"]["metrics"]
                        ["knowmem_forget_heldout"]["per_seed"], RETRAIN, {0: [50] * 3, 1: [52] * 3},
                        metric="knowmem_forget")
    write_yaml_atomic(tmp_path / "plain.yaml", plain)
    leaderboard.main([str(tmp_path)])
    (row,) = _table_rows((tmp_path / "LEADERBOARD.md").read_text())
    assert "KnowMem-forget (all)" in row and "+20.0 ± 12.7" in row


def test_refuses_to_replace_a_file_it_did_not_write(results_dir):
    foreign = results_dir / "NOTES.md"
    foreign.write_text("my notes\n")
    with pytest.raises(UsageError, match="was not written by python -m benchmarks.leaderboard"):
        leaderboard.main([str(results_dir), "--output", str(foreign)])
    assert foreign.read_text() == "my notes\n"
    leaderboard.main([str(results_dir), "--output", str(foreign), "--overwrite"])
    leaderboard.main([str(results_dir), "--output", str(foreign)])  # its own output: replaced
    assert "npo_sam" in foreign.read_text()


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        leaderboard.main([str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="--budget must be"):
        leaderboard.main([str(tmp_path), "--budget", "-1"])


def test_command_line_entry_point(results_dir):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaderboard", str(results_dir), "--budget", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(results_dir / "LEADERBOARD.md")
    assert "--budget 10" in (results_dir / "LEADERBOARD.md").read_text()
    missing = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaderboard", str(results_dir / "nope")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: results directory")
