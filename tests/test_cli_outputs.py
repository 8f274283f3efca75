"""Every command refuses an output path it cannot write with the one-line ``error: ...`` and
exit 2 of any bad input, before it builds, loads or reads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import evaluate, leaderboard, profile, relearn, unlearn, world
from benchmarks.core.errors import run_cli

PROC = Path("/proc")


def _commands(unwritable: Path, tmp_path: Path) -> dict[str, tuple]:
    """Command name -> (main, argv) whose only fault is the unwritable output ``unwritable``."""
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    return {
        "world": (world.main, ["--out", str(unwritable)]),
        "relearn --output-dir": (relearn.main, ["--output-dir", str(unwritable), "--state-dir", str(tmp_path / "s")]),
        "relearn --output": (relearn.main, ["--output", str(unwritable / "run.yaml"), "--state-dir", str(tmp_path / "s")]),
        "relearn --state-dir": (relearn.main, ["--output-dir", str(tmp_path / "out"), "--state-dir", str(unwritable)]),
        "unlearn --out": (unlearn.main, ["--defense", "npo", "--out", str(unwritable)]),
        "unlearn --report": (unlearn.main, ["--defense", "npo", "--out", str(tmp_path / "ckpt"),
                                            "--report", str(unwritable / "report.yaml")]),
        "evaluate": (evaluate.main, ["--output", str(unwritable / "scores.yaml")]),
        "leaderboard": (leaderboard.main, [str(results), "--output", str(unwritable / "LEADERBOARD.md")]),
        "profile --cache": (profile.main, ["--cache", str(unwritable)]),
        "profile --output-dir": (profile.main, ["--output-dir", str(unwritable), "--state-dir", str(tmp_path / "s")]),
    }


COMMANDS = list(_commands(Path("x"), Path("/tmp")).keys())


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Fail the test if a command builds a world, loads a model or data, or reads results."""
    import benchmarks.core.data as data
    import benchmarks.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("work began before the output path was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(data, "load_data", refuse)
    monkeypatch.setattr("benchmarks.core.world_build.ensure_world", refuse)
    monkeypatch.setattr("benchmarks.core.world_build.build_world", refuse)
    monkeypatch.setattr(leaderboard, "load_results", refuse)
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))


def _exit_and_stderr(main, argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv)
    return done.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.skipif(not (PROC / "self").is_dir(), reason="needs Linux /proc, which nobody can create files in")
@pytest.mark.parametrize("command", COMMANDS)
def test_a_path_under_proc_is_refused_in_one_line(command, tmp_path, no_work, capsys):
    # /proc accepts no new files even from root, for whom os.access says every path is writable.
    main, argv = _commands(PROC / "forbidden", tmp_path)[command]
    code, lines = _exit_and_stderr(main, argv, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/proc" in lines[0], lines
    assert "not writable" in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_path_under_a_file_is_refused_in_one_line(command, tmp_path, no_work, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    main, argv = _commands(blocker / "sub", tmp_path)[command]
    code, lines = _exit_and_stderr(main, argv, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "a-file" in lines[0], lines


def test_the_probe_leaves_nothing_behind(tmp_path):
    from benchmarks.core.results import check_writable_directory

    assert check_writable_directory(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert os.listdir(tmp_path) == []  # neither the directory nor the probe file was left
