"""TOFU relearning summaries: mean and Student-t 95 % interval over attack seeds (hand-derived
values), the printed table, and the plot file with its early path checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from benchmarks.core.tofu_relearn import TofuRole, curve_bands, format_tofu_summary, summarize

# t_0.975 with 2 degrees of freedom (three seeds), from a t table.
T975_DF2 = 4.302652729696


def _plan(milestones=(0, 5)):
    return SimpleNamespace(roles=[TofuRole("retrain", "retrain", "r"), TofuRole("target", "target", "t"),
                                  TofuRole("npo", "defended", None, defense="npo")],
                           milestones=list(milestones))


def _curves():
    """prob_V from step 0 to 5 per seed: npo 0.2 -> 0.4/0.5/0.6, target 0.8 -> 0.8, retrain 0.05 -> 0.15."""
    curves = {"retrain": {}, "target": {}, "npo": {}}
    for seed, after in zip(("0", "1", "2"), (0.4, 0.5, 0.6)):
        curves["retrain"][seed] = {"prob_V": [[0, 0.05], [5, 0.15]]}
        curves["target"][seed] = {"prob_V": [[0, 0.8], [5, 0.8]]}
        curves["npo"][seed] = {"prob_V": [[0, 0.2], [5, after]]}
    return curves


def _utility():
    row = lambda before, after: {"before": {"model_utility": before}, "after": {"model_utility": after}}  # noqa: E731
    return {"npo": {"0": row(0.5, 0.45), "1": row(0.5, 0.47), "2": row(0.5, 0.49)}}


def test_summary_gives_mean_and_t_interval_over_seeds():
    summary = summarize(_plan(), _curves(), _utility())
    npo = summary["npo"]["prob_V"]
    # after: 0.4, 0.5, 0.6 -> mean 0.5, s = 0.1, half-width t(2) * 0.1 / sqrt(3) = 0.24841
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert npo["after"]["mean"] == pytest.approx(0.5)
    assert npo["after"]["ci95_high"] - npo["after"]["mean"] == pytest.approx(0.248414, abs=1e-6)
    assert npo["after"]["ci95_low"] == pytest.approx(0.5 - half)
    assert npo["after"]["per_seed"] == {"0": 0.4, "1": 0.5, "2": 0.6}
    # the same value for every seed: a zero-width interval
    assert npo["before"] == {"mean": pytest.approx(0.2), "ci95_low": pytest.approx(0.2),
                             "ci95_high": pytest.approx(0.2), "per_seed": {"0": 0.2, "1": 0.2, "2": 0.2}}
    # recovery per seed against that seed's target: 0.2/0.6, 0.3/0.6, 0.4/0.6 -> mean 0.5, s = 1/6
    assert npo["recovery_ratio"]["mean"] == pytest.approx(0.5)
    assert npo["recovery_ratio"]["ci95_high"] == pytest.approx(0.5 + T975_DF2 * (1 / 6) / math.sqrt(3))
    # gain beyond the retrain model's 0.1: 0.1, 0.2, 0.3
    assert npo["excess_over_retrain"]["mean"] == pytest.approx(0.2)
    assert npo["excess_over_retrain"]["ci95_high"] - 0.2 == pytest.approx(half)
    assert summary["target"]["prob_V"]["recovery_ratio"]["mean"] is None  # no gap to itself
    # model utility before (0.5 each seed) and after (0.45, 0.47, 0.49: s = 0.02)
    utility = summary["npo"]["model_utility"]
    assert utility["before"]["mean"] == pytest.approx(0.5)
    assert utility["after"]["ci95_high"] - utility["after"]["mean"] == pytest.approx(T975_DF2 * 0.02 / math.sqrt(3))
    assert "model_utility" not in summary["target"]  # no utility rows given for it


def test_one_seed_has_a_mean_and_no_interval():
    curves = {label: {"0": per_seed["0"]} for label, per_seed in _curves().items()}
    stats = summarize(_plan(), curves)["npo"]["prob_V"]["after"]
    assert stats["mean"] == pytest.approx(0.4) and stats["ci95_low"] is None and stats["ci95_high"] is None


def test_bands_follow_the_milestones():
    curves = _curves()
    curves["npo"]["2"]["prob_V"] = [[0, 0.2]]  # a seed stopped before step 5: no interval there
    bands = curve_bands(_plan(), curves)
    band = bands["npo"]["metrics"]["prob_V"]
    assert bands["npo"]["steps"] == [0, 5]
    assert band["mean"][0] == pytest.approx(0.2) and band["mean"][1] is None
    two = curve_bands(_plan(), _curves())["npo"]["metrics"]["prob_V"]
    assert two["ci95_high"][1] - two["mean"][1] == pytest.approx(T975_DF2 * 0.1 / math.sqrt(3))


def test_printed_table_shows_mean_and_half_width():
    result = {"summary": summarize(_plan(), _curves(), _utility()),
              "attack": {"name": "finetune", "seeds": [0, 1, 2]}, "milestones": [0, 5]}
    text = format_tofu_summary(result)
    npo_v = next(line for line in text.splitlines() if line.startswith("| npo") and "V Prob" in line)
    assert "0.500 ±0.248" in npo_v and "0.200 ±0.000" in npo_v
    npo_table = [line for line in text.splitlines() if line.startswith("| npo")][-1]
    assert "0.470 ±0.050" in npo_table  # model utility after: 0.47 ± 0.04968
    assert "mean ± 95% t-interval half-width" in text


def _document(seeds=("0", "1", "2")):
    curves = {label: {s: per_seed[s] for s in seeds} for label, per_seed in _curves().items()}
    return {"models": {"retrain": {"kind": "retrain"}, "target": {"kind": "target"}, "npo": {"kind": "defended"}},
            "bands": curve_bands(_plan(), curves), "status": "complete",
            "attack": {"name": "finetune", "seeds": [int(s) for s in seeds], "authors": {"0": {"T": [1], "V": [2]}}},
            "data": {"source": "tofu-world", "forget_split": "forget10"}}


def test_plot_is_written_and_not_replaced_without_overwrite(tmp_path):
    from benchmarks.core.errors import UsageError
    from benchmarks.core.tofu_relearn import plot_tofu_relearn

    png = tmp_path / "run.png"
    assert plot_tofu_relearn(_document(), png) == png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(UsageError, match="exists"):
        plot_tofu_relearn(_document(), png)
    plot_tofu_relearn(_document(seeds=("0",)), png, overwrite=True)  # one seed: lines without a band
    assert png.read_bytes() != data


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a run gets as far as loading data or a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the output paths were checked")

    monkeypatch.setattr("benchmarks.core.tofu_cli.load_tofu_source", refuse)
    monkeypatch.setattr("benchmarks.core.models.load_model", refuse)


def test_bad_output_paths_fail_before_anything_loads(tmp_path, nothing_loads):
    from benchmarks.core.errors import UsageError
    from benchmarks.relearn import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    base = ["--data", "tofu-world", "--no-progress"]
    with pytest.raises(UsageError, match="a-file"):
        main(base + ["--output-dir", str(blocker / "results")])
    with pytest.raises(UsageError, match="a-file"):
        main(base + ["--output", str(blocker / "run.yaml")])
    taken = tmp_path / "run.png"  # the plot's place beside --output
    taken.write_bytes(b"keep me")
    with pytest.raises(UsageError, match=r"run\.png exists; pass --overwrite"):
        main(base + ["--output", str(tmp_path / "run.yaml")])
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="not both"):
        main(base + ["--output", str(tmp_path / "other.yaml"), "--output-dir", str(tmp_path)])
