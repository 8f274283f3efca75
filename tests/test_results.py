"""Result files: schema validation, atomic writes, run ids, environment, plots."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.core import results
from benchmarks.core.errors import UsageError
from benchmarks.core.plots import plot_recovery, recovery_figure
from benchmarks.core.results import (
    SCHEMA_VERSION,
    ResultFileError,
    check_output_target,
    command_line,
    environment_info,
    mean_ci95,
    new_run_id,
    read_result,
    t_quantile_975,
    timed,
    to_plain,
    validate_result,
    write_yaml_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _interval(mean):
    return {"mean": mean, "ci95_low": mean - 1.0, "ci95_high": mean + 1.0}


def synthetic_result(
    roles=("npo", "npo_sam", "target", "retrain"),
    metrics=("knowmem_forget", "knowmem_forget_heldout", "knowmem_retain"),
    steps=(0, 5, 10),
    seeds=(0, 1),
):
    """A small result dict that follows the schema; the curve of role r, metric m, seed s at
    step index i is 10·r_index + m_index + s + i (hand-checkable)."""
    curves, summary = {}, {}
    for r, role in enumerate(roles):
        metric_curves, metric_summary = {}, {}
        for m, metric in enumerate(metrics):
            per_seed = {s: [float(10 * r + m + s + i) for i in range(len(steps))] for s in seeds}
            mean = [sum(per_seed[s][i] for s in seeds) / len(seeds) for i in range(len(steps))]
            metric_curves[metric] = {
                "per_seed": per_seed,
                "mean": mean,
                "ci95_low": [v - 1.0 for v in mean],
                "ci95_high": [v + 1.0 for v in mean],
            }
            metric_summary[metric] = {
                "before": _interval(mean[0]),
                "after": _interval(mean[-1]),
                "recovery_ratio": _interval(0.5),
                "auc": _interval(0.3),
                "steps_to_50": {"mean": None, "ci95_low": None, "ci95_high": None},
                "excess_over_retrain": _interval(2.0),
            }
        curves[role] = {"steps": list(steps), "metrics": metric_curves}
        summary[role] = metric_summary
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": "20260102T030405.000001Z-abcdef",
        "command": "python -m benchmarks.relearn --defense npo",
        "created": "2026-01-02T03:04:05+00:00",
        "status": "complete",
        "model": {"id": "world/target", "revision_or_hash": "0" * 16, "dtype": "float32"},
        "defense": {"name": "npo", "hyperparameters": {"beta": 0.1, "lr": 1e-5}},
        "attack": {
            "name": "finetune",
            "hyperparameters": {"lr": 1e-5, "steps": steps[-1]},
            "seeds": list(seeds),
            "relearn_doc_ids": ["doc-0", "doc-1"],
            "heldout_doc_ids": ["doc-2", "doc-3", "doc-4"],
        },
        "data": {"source": "world", "splits": {"knowmem/forget_qa": {"n": 10, "sha256": "ab" * 32}}},
        "curves": curves,
        "summary": summary,
        "higher_is_better": {m: results.HIGHER_IS_BETTER.get(m) for m in metrics},
        "references": {"target": "target" if "target" in roles else None,
                       "retrain": "retrain" if "retrain" in roles else None},
        "environment": {
            "python": "3.11.9", "packages": {"torch": "2.13.0", "peft": None}, "device": "cpu",
            "threads": 2, "git_revision": None, "git_dirty": None,
        },
        "timings": {"attack": 1.5, "evaluation": 2.25},
    }


# --------------------------------------------------------------------------- validation


def test_synthetic_result_is_valid():
    assert validate_result(synthetic_result()) == []


def test_validate_names_a_missing_key():
    data = synthetic_result()
    del data["model"]["dtype"]
    del data["timings"]
    problems = validate_result(data)
    assert "model.dtype: missing" in problems
    assert "timings: missing" in problems
    assert len(problems) == 2


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(status="done"), "status: 'done' is not one of"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version: 2 is newer"),
        (lambda d: d["attack"].update(seeds=[0, "one"]), "attack.seeds: expected a list of integers"),
        (lambda d: d["curves"]["npo"]["metrics"]["knowmem_forget"]["mean"].pop(),
         "curves.npo.metrics.knowmem_forget.mean: has 2 values for 3 steps"),
        (lambda d: d["curves"]["npo"]["metrics"]["knowmem_forget"]["per_seed"][1].__setitem__(0, "x"),
         "curves.npo.metrics.knowmem_forget.per_seed.1: expected numbers or null"),
        (lambda d: d["curves"]["npo"].update(steps=[0, 10, 5]), "curves.npo.steps: steps must be strictly increasing"),
        (lambda d: d["summary"]["npo"]["knowmem_forget"].pop("auc"), "summary.npo.knowmem_forget.auc: missing"),
        (lambda d: d["references"].update(retrain="nobody"), "references.retrain: names role 'nobody'"),
        (lambda d: d["higher_is_better"].pop("knowmem_retain"), "higher_is_better.knowmem_retain: missing"),
        (lambda d: d["environment"].update(threads=True), "environment.threads: expected int, got bool"),
        (lambda d: d.update(created="yesterday"), "created: not an ISO 8601 time"),
    ],
)
def test_validate_flags_wrong_values(edit, expected):
    data = synthetic_result()
    edit(data)
    problems = validate_result(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_validate_accepts_nulls_for_unmeasured_points():
    data = synthetic_result()
    data["status"] = "diverged"
    series = data["curves"]["npo"]["metrics"]["knowmem_forget"]
    series["per_seed"][0][-1] = None
    series["mean"][-1] = None
    assert validate_result(data) == []


def test_validate_rejects_a_non_mapping():
    assert validate_result([1, 2]) == ["result: expected a mapping, got list"]


# --------------------------------------------------------------------------- statistics


def test_mean_ci95_by_hand():
    # mean 2, sample sd 1, half width t_{0.975}(2) / sqrt(3) = 4.3027 / 1.7321.
    stat = mean_ci95([1.0, 2.0, 3.0])
    assert stat["mean"] == pytest.approx(2.0)
    assert stat["ci95_high"] - stat["mean"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert stat["mean"] - stat["ci95_low"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert mean_ci95([5.0, None]) == {"mean": 5.0, "ci95_low": None, "ci95_high": None}
    assert mean_ci95([]) == {"mean": None, "ci95_low": None, "ci95_high": None}


@pytest.mark.parametrize(
    "df, quantile",
    # Published two-sided 95 % critical values of Student's t.
    [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (31, 2.0395),
     (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)],
)
def test_t_quantiles_match_tables(df, quantile):
    assert t_quantile_975(df) == pytest.approx(quantile, abs=6e-5)


# --------------------------------------------------------------------------- identity


def test_run_ids_are_unique_sortable_and_filesystem_safe():
    ids = [new_run_id() for _ in range(500)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids
    for run_id in ids[:5]:
        assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}", run_id)


def test_command_line_is_shell_quoted():
    assert command_line("benchmarks.relearn", ["--out", "my results/run.yaml", "--seeds", "0"]) == (
        "python -m benchmarks.relearn --out 'my results/run.yaml' --seeds 0"
    )


def test_timed_accumulates_seconds():
    timings = {}
    with timed(timings, "attack"):
        pass
    with timed(timings, "attack"):
        pass
    assert set(timings) == {"attack"} and timings["attack"] >= 0


def test_environment_info_records_versions_threads_and_git():
    import torch

    env = environment_info()
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["PyYAML"] == yaml.__version__
    assert env["threads"] == torch.get_num_threads()
    assert env["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    revision = env["git_revision"]
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}", revision)
    assert env["git_dirty"] in (None, True, False)
    # It fits the schema's environment section.
    data = synthetic_result()
    data["environment"] = env
    assert validate_result(data) == []


# --------------------------------------------------------------------------- writing


def test_write_then_read_round_trips(tmp_path):
    data = synthetic_result()
    path = write_yaml_atomic(tmp_path / "run.yaml", data)
    assert read_result(path) == data
    text = path.read_text()
    assert text.startswith("schema_version: 1\nrun_id:")
    assert "steps: [0, 5, 10]" in text  # lists of numbers stay on one line
    assert "&id" not in text  # no YAML anchors


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("old: 1\n")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        write_yaml_atomic(path, {"new": 2})
    assert path.read_text() == "old: 1\n"
    write_yaml_atomic(path, {"new": 2}, overwrite=True)
    assert yaml.safe_load(path.read_text()) == {"new": 2}


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, overwrite):
    def dump_half_then_fail(data, stream):
        stream.write("schema_version: 1\nrun_")
        stream.flush()
        raise RuntimeError("disk full")

    monkeypatch.setattr(results, "_dump", dump_half_then_fail)
    old = tmp_path / "old.yaml"
    old.write_text("old: 1\n")
    with pytest.raises(RuntimeError, match="disk full"):
        write_yaml_atomic(old, {"new": 2}, overwrite=True)
    assert old.read_text() == "old: 1\n"
    with pytest.raises(RuntimeError, match="disk full"):
        write_yaml_atomic(tmp_path / "new.yaml", {"new": 2}, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.yaml"]


def test_interrupt_during_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(data, stream):
        stream.write("schema")
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "_dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_yaml_atomic(tmp_path / "run.yaml", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_write_creates_missing_directories(tmp_path):
    path = write_yaml_atomic(tmp_path / "a" / "b" / "run.yaml", {"a": 1})
    assert path.is_file()


def test_unwritable_directory_is_a_usage_error_naming_it(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(UsageError, match=re.escape(str(blocker / "sub"))):
        write_yaml_atomic(blocker / "sub" / "run.yaml", {"a": 1})
    with pytest.raises(UsageError, match="not a directory"):
        check_output_target(blocker / "sub" / "run.yaml")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_directory_is_a_usage_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            check_output_target(locked / "run.yaml")
    finally:
        locked.chmod(0o700)


def test_check_output_target(tmp_path):
    existing = tmp_path / "run.yaml"
    existing.write_text("a: 1\n")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        check_output_target(existing)
    assert check_output_target(existing, overwrite=True) == existing
    nested = tmp_path / "x" / "y" / "run.yaml"
    assert check_output_target(nested) == nested
    assert not (tmp_path / "x").exists()  # checking creates nothing
    assert check_output_target(tmp_path / "out_dir") == tmp_path / "out_dir"


def test_to_plain_converts_numpy_tuples_and_paths():
    value = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, Path("x/y")), 3: np.int64(7)}
    assert to_plain(value) == {"a": 0.5, "b": [0, 1, 2], "c": [1, "x/y"], 3: 7}
    with pytest.raises(TypeError, match=r"result\.curves\.npo: value of type object"):
        to_plain({"curves": {"npo": object()}})


# --------------------------------------------------------------------------- reading


def test_read_broken_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run_id: abc\ncurves: [1, 2\n")
    with pytest.raises(ResultFileError, match=rf"{re.escape(str(path))} is not valid YAML at line \d+"):
        read_result(path)


def test_read_rejects_non_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ResultFileError, match="holds a YAML list"):
        read_result(path)
    with pytest.raises(ResultFileError, match="does not exist"):
        read_result(tmp_path / "missing.yaml")


def test_read_does_not_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ResultFileError, match="not valid YAML"):
        read_result(path)


# --------------------------------------------------------------------------- plots


def test_recovery_figure_draws_one_line_per_role_and_dashed_references():
    data = synthetic_result()
    figure = recovery_figure(data)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "KnowMem-forget (all)", "KnowMem-forget on held-out V", "KnowMem-retain",
    ]
    for ax in visible:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["npo", "npo_sam", "target", "retrain"]
        assert [line.get_linestyle() for line in lines] == ["-", "-", "--", "--"]
        assert list(lines[0].get_xdata()) == [0, 5, 10]
        assert ax.get_ylim() == (0.0, 100.0)
        assert len(ax.collections) == 4  # one seed band per role
    # The npo mean on the first panel: seeds 0 and 1 give 0+s+i, so the mean is i + 0.5.
    assert list(visible[0].get_lines()[0].get_ydata()) == [0.5, 1.5, 2.5]


def test_recovery_figure_leaves_gaps_for_unmeasured_points():
    data = synthetic_result(roles=("npo", "retrain"), metrics=("knowmem_forget",))
    series = data["curves"]["npo"]["metrics"]["knowmem_forget"]
    series["mean"][-1] = series["ci95_low"][-1] = series["ci95_high"][-1] = None
    (ax,) = [ax for ax in recovery_figure(data).axes if ax.get_visible()]
    assert math.isnan(ax.get_lines()[0].get_ydata()[-1])


def test_plot_recovery_writes_a_png_atomically(tmp_path):
    path = plot_recovery(synthetic_result(), tmp_path / "run.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        plot_recovery(synthetic_result(), path)
    plot_recovery(synthetic_result(), path, overwrite=True)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_curves_is_an_error():
    data = copy.deepcopy(synthetic_result())
    data["curves"] = {}
    with pytest.raises(ValueError, match="no curves"):
        recovery_figure(data)
