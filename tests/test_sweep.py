"""--lr-sweep: the capped best along a trajectory, the best over the grid, and the command."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.core.errors import UsageError
from benchmarks.core.sweep import capped_best, lr_sweep_summary, parse_grid
from tests.test_relearn_cli import _run_args, gpt2_dir, muse_dir  # noqa: F401  (fixtures)


def test_grid_is_parsed_sorted_and_checked():
    assert parse_grid("1e-4,1e-5,3e-5") == [1e-5, 3e-5, 1e-4]
    for text, words in [("1e-4", "at least two"), ("1e-4,x", "comma-separated"), ("1e-4,-1", "> 0"),
                        ("1e-4,1e-4", "repeats")]:
        with pytest.raises(UsageError, match=words):
            parse_grid(text)


def test_milestones_count_only_while_utility_holds():
    steps = [0, 5, 10, 20]
    forget = [10.0, 40.0, 70.0, 90.0]
    retain = [50.0, 48.0, 40.0, 49.0]  # falls below 0.9 x 50 = 45 at step 10
    assert capped_best(steps, forget, retain, 0.9) == (40.0, 5)  # step 20 comes after the break
    assert capped_best(steps, forget, retain, 0.0) == (90.0, 20)
    assert capped_best(steps, forget, [None] * 4, 0.9) is None


def _result(forget_per_seed, retain_per_seed, steps=(0, 5, 10)):
    return {"curves": {"npo": {"steps": list(steps), "metrics": {
        "knowmem_forget_heldout": {"per_seed": forget_per_seed},
        "knowmem_forget": {"per_seed": forget_per_seed},
        "knowmem_retain": {"per_seed": retain_per_seed}}}}}


def test_the_best_learning_rate_is_the_highest_capped_mean_over_seeds():
    results = {
        1e-5: _result({0: [10, 20, 30], 1: [10, 25, 35]}, {0: [50, 50, 50], 1: [50, 50, 50]}),
        # higher forget values, but utility breaks after step 0 for seed 0 and at step 10 for seed 1
        1e-3: _result({0: [10, 80, 90], 1: [10, 60, 95]}, {0: [50, 10, 10], 1: [50, 46, 20]}),
    }
    table = lr_sweep_summary(results, cap=0.9)["npo"]
    assert table["per_lr"]["1e-05"]["mean"] == pytest.approx(32.5)  # (30 + 35) / 2
    assert table["per_lr"]["0.001"]["mean"] == pytest.approx(35.0)  # (10 + 60) / 2
    assert table["best_lr"] == 1e-3 and table["best"] == pytest.approx(35.0)
    assert table["per_lr"]["0.001"]["per_seed"][1] == {"value": 60, "step": 5}
    assert lr_sweep_summary(results, cap=1.0)["npo"]["best_lr"] == 1e-5


@pytest.mark.slow
def test_lr_sweep_runs_once_per_rate_and_writes_the_sweep_file(tmp_path, muse_dir, gpt2_dir):
    from benchmarks import relearn

    out = tmp_path / "out"
    args = _run_args(gpt2_dir, muse_dir, out, tmp_path / "state")
    lr_at = args.index("--lr")
    del args[lr_at:lr_at + 2]
    assert relearn.main(args + ["--lr-sweep", "1e-3,1e-2", "--utility-cap", "0.5"]) == 0
    sweep = [p for p in out.glob("relearn-lrsweep-*.yaml")]
    assert len(sweep) == 1
    document = yaml.safe_load(sweep[0].read_text())
    assert document["learning_rates"] == [1e-3, 1e-2] and document["utility_cap"] == 0.5
    runs = {float(k): v for k, v in document["runs"].items()}
    for lr, path in runs.items():
        run = yaml.safe_load(open(path).read())
        assert run["attack"]["hyperparameters"]["lr"] == lr
        assert f"--lr {lr!r}" in run["command"] and "--lr-sweep" not in run["command"]
    assert set(document["best"]["gpt2-tiny"]["per_lr"]) == {"0.001", "0.01"}
    # The leaderboard ranks the runs and leaves the sweep file out (neither ranked nor broken).
    from benchmarks.leaderboard import load_results

    results, broken = load_results(out)
    assert len(results) == 2 and broken == []


def test_lr_sweep_refuses_a_single_lr_flag(tmp_path, muse_dir, gpt2_dir):
    from benchmarks import relearn

    args = _run_args(gpt2_dir, muse_dir, tmp_path / "out", tmp_path / "state")
    with pytest.raises(UsageError, match="give --lr or --lr-sweep, not both"):
        relearn.main(args + ["--lr-sweep", "1e-3,1e-2"])
