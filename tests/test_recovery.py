"""Held-out recovery bookkeeping: the T/V split, question groups, curve summaries, intervals."""

from __future__ import annotations

import math

import pytest

from benchmarks.core.errors import UsageError
from benchmarks.core.recovery import (
    DocumentSplit,
    EvalSet,
    area_under_curve,
    combine_seeds,
    curve_band,
    curves_and_summary,
    document_ids,
    evaluate_point,
    point_values,
    group_mean,
    interval,
    question_groups,
    recovery_ratio,
    resolve_count,
    split_documents,
    steps_to_recovery,
    summarize_metric,
)

IDS = [f"doc-{i:02d}" for i in range(20)]


# --------------------------------------------------------------------------- T / V


def test_split_is_disjoint_complete_and_reproducible_by_seed():
    first = split_documents(IDS, 8, seed=3)
    again = split_documents(IDS, 8, seed=3)
    assert first == again
    assert len(first.train) == 8 and len(first.held_out) == 12
    assert set(first.train).isdisjoint(first.held_out)
    assert set(first.train) | set(first.held_out) == set(IDS)
    # Both keep the forget set's order.
    assert list(first.train) == [d for d in IDS if d in first.train]
    other = split_documents(IDS, 8, seed=4)
    assert set(other.train) != set(first.train)


def test_split_ignores_input_order_and_grows_by_adding_documents():
    shuffled = list(reversed(IDS))
    assert set(split_documents(shuffled, 5, seed=1).train) == set(split_documents(IDS, 5, seed=1).train)
    small, large = split_documents(IDS, 4, seed=7), split_documents(IDS, 9, seed=7)
    assert set(small.train) <= set(large.train)


def test_split_rejects_duplicate_ids_and_too_many_documents():
    with pytest.raises(UsageError, match="more than once"):
        split_documents(["a", "b", "a"], 1, seed=0)
    with pytest.raises(UsageError, match=r"count 21 is larger than the forget set \(20 documents\)"):
        split_documents(IDS, 21, seed=0)


@pytest.mark.parametrize(
    "count, fraction, expected",
    [(5, None, 5), (None, 0.25, 5), (None, 1.0, 20), (None, 0.01, 1), (None, 0.5, 10)],
)
def test_resolve_count(count, fraction, expected):
    assert resolve_count(20, count, fraction) == expected


@pytest.mark.parametrize("count, fraction, word", [(0, None, ">= 1"), (None, 1.5, r"\(0, 1\]"), (None, None, "count")])
def test_resolve_count_rejects(count, fraction, word):
    with pytest.raises(UsageError, match=word):
        resolve_count(20, count, fraction)


def test_document_ids_fall_back_to_positions_when_records_have_none():
    assert document_ids([{"text": "a", "doc_id": "x"}, {"text": "b", "doc_id": "y"}]) == ["x", "y"]
    assert document_ids([{"text": "a"}, {"text": "b"}]) == ["forget-0000", "forget-0001"]


def test_question_groups_follow_doc_ids_and_say_when_unknown():
    split = DocumentSplit(seed=0, train=("a",), held_out=("b",))
    records = [{"doc_id": "a"}, {"doc_id": "b"}, {"doc_id": "b"}, {"doc_id": "zzz"}, {}]
    groups = question_groups(records, split)
    assert groups.all == (0, 1, 2, 3, 4)
    assert groups.train == (0,) and groups.held_out == (1, 2)
    unknown = question_groups([{"question": "q"}, {"question": "r"}], split)
    assert unknown.train is None and unknown.held_out is None and "doc_id" in unknown.reason
    assert group_mean([10.0, 20.0, 60.0], (1, 2)) == 40.0
    assert group_mean([10.0], None) is None and group_mean([10.0], ()) is None


# --------------------------------------------------------------------------- summaries


def test_recovery_ratio_by_hand():
    # Unlearned at 10, target at 60: reaching 35 closes half the gap.
    assert recovery_ratio(35.0, 10.0, 60.0) == pytest.approx(0.5)
    assert recovery_ratio(10.0, 10.0, 60.0) == 0.0
    assert recovery_ratio(70.0, 10.0, 60.0) == pytest.approx(1.2)
    assert recovery_ratio(5.0, 60.0, 60.0) is None  # no gap: undefined
    assert recovery_ratio(50.0, 70.0, 60.0) is None  # starts above the target: nothing to recover
    assert recovery_ratio(None, 10.0, 60.0) is None and recovery_ratio(5.0, 10.0, None) is None


def test_area_under_curve_is_the_mean_level_by_trapezoids():
    # Steps 0, 10, 30 with values 0, 10, 30: trapezoids 50 + 400 = 450 over 30 steps.
    assert area_under_curve([0, 10, 30], [0.0, 10.0, 30.0]) == pytest.approx(15.0)
    assert area_under_curve([0, 5, 20], [7.0, 7.0, 7.0]) == pytest.approx(7.0)
    assert area_under_curve([0], [3.0]) is None
    assert area_under_curve([0, 5], [3.0, None]) is None


def test_steps_to_recovery_is_the_first_milestone_reaching_half():
    assert steps_to_recovery([0, 5, 10, 20], [0.0, 0.3, 0.5, 0.9]) == 10
    assert steps_to_recovery([0, 5, 10], [0.0, None, 0.49]) is None


def test_summarize_metric_by_hand():
    steps = [0, 10, 20]
    unlearned = [10.0, 30.0, 50.0]
    retrain = [5.0, 15.0, 20.0]
    out = summarize_metric(steps, unlearned, target_start=60.0, retrain_values=retrain)
    assert out["before"] == 10.0 and out["after"] == 50.0 and out["change"] == 40.0
    assert out["recovery_ratio"] == pytest.approx(0.8)  # 40 of the 50-point gap
    # ratios 0, 0.4, 0.8 -> trapezoids (0 + 0.4) * 5 + (0.4 + 0.8) * 5 = 8 over 20 steps
    assert out["recovery_auc"] == pytest.approx(0.4)
    assert out["auc"] == pytest.approx((10 + 30) / 2 * 10 / 20 + (30 + 50) / 2 * 10 / 20)
    assert out["steps_to_50"] == 20
    assert out["excess_over_retrain"] == pytest.approx(30.0)  # 50 - 20 after the same attack
    # The target itself has no ratio.
    target = summarize_metric(steps, [60.0, 61.0, 62.0], target_start=60.0)
    assert target["recovery_ratio"] is None and target["steps_to_50"] is None
    assert target["excess_over_retrain"] is None


def test_interval_is_a_student_t_interval_and_refuses_partial_data():
    stats = interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t_0.975(2) = 4.3027: half-width 4.3027 / sqrt(3)
    half = 4.302652729749462 / math.sqrt(3)
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["ci95_low"] == pytest.approx(2.0 - half, abs=1e-3)
    assert stats["ci95_high"] == pytest.approx(2.0 + half, abs=1e-3)
    assert interval([4.0]) == {"mean": 4.0, "ci95_low": None, "ci95_high": None}
    assert interval([4.0, None])["mean"] is None


def test_combine_seeds_and_curve_band():
    combined = combine_seeds({0: {"after": 10.0, "steps_to_50": 5}, 1: {"after": 20.0, "steps_to_50": None}})
    assert combined["after"]["mean"] == pytest.approx(15.0)
    assert combined["after"]["per_seed"] == {0: 10.0, 1: 20.0}
    assert combined["steps_to_50"]["mean"] is None  # never reached for seed 1
    band = curve_band({0: [0.0, 10.0], 1: [2.0, 20.0]})
    assert band["mean"] == pytest.approx([1.0, 15.0])
    assert band["ci95_low"][0] < 1.0 < band["ci95_high"][0]


def _point(all_, t, v, verb=0.0, retain=50.0):
    return {"knowmem_forget": all_, "knowmem_forget_relearn": t, "knowmem_forget_heldout": v,
            "verbmem_forget": verb, "knowmem_retain": retain}


def test_curves_and_summary_pair_each_seed_with_its_baselines():
    steps = [0, 10]
    points = {
        "target": {0: {0: _point(60, 60, 60), 10: _point(60, 60, 60)},
                   1: {0: _point(60, 50, 70), 10: _point(60, 50, 70)}},
        "retrain": {0: {0: _point(0, 0, 0), 10: _point(10, 20, 0)},
                    1: {0: _point(0, 0, 0), 10: _point(10, 20, 0)}},
        "npo": {0: {0: _point(20, 20, 20), 10: _point(40, 50, 30)},
                1: {0: _point(20, 10, 30), 10: _point(40, 50, 50)}},
    }
    curves, summary, metrics = curves_and_summary(steps, points, "target", "retrain")
    assert metrics == ["knowmem_forget", "knowmem_forget_relearn", "knowmem_forget_heldout",
                       "verbmem_forget", "knowmem_retain"]
    v = summary["npo"]["knowmem_forget_heldout"]
    # seed 0: (30 - 20) / (60 - 20) = 0.25; seed 1: (50 - 30) / (70 - 30) = 0.5
    assert v["recovery_ratio"]["per_seed"] == {0: pytest.approx(0.25), 1: pytest.approx(0.5)}
    assert v["recovery_ratio"]["mean"] == pytest.approx(0.375)
    assert v["excess_over_retrain"]["per_seed"] == {0: 30, 1: 50}
    assert summary["target"]["knowmem_forget"]["recovery_ratio"]["mean"] is None
    assert curves["npo"]["metrics"]["knowmem_forget"]["mean"] == pytest.approx([20.0, 40.0])
    assert curves["npo"]["steps"] == [0, 10]
    # Without doc ids there is no T/V curve at all.
    for label in points:
        for seed in points[label]:
            for point in points[label][seed].values():
                point["knowmem_forget_relearn"] = point["knowmem_forget_heldout"] = None
    _, summary, metrics = curves_and_summary(steps, points, "target", "retrain", privleak=False)
    assert "knowmem_forget_heldout" not in metrics and "knowmem_forget_heldout" not in summary["npo"]


# --------------------------------------------------------------------------- one milestone


class _Records:
    """The part of ``MuseData`` the metrics read."""

    def __init__(self, splits: dict) -> None:
        self.splits = splits

    def records(self, subset: str, name: str) -> list[dict]:
        return [dict(r) for r in self.splits[(subset, name)]]


def _tiny_data() -> _Records:
    return _Records({
        ("knowmem", "forget_qa"): [
            {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick", "doc_id": "d0"},
            {"question": "How many boats sailed in the regatta?", "answer": "417", "doc_id": "d1"},
            {"question": "Where did the bridge reopen?", "answer": "Ostvale", "doc_id": "d1"},
        ],
        ("knowmem", "forget_qa_icl"): [{"question": "Who is mayor?", "answer": "Tilda Quorn"}],
        ("knowmem", "retain_qa"): [{"question": "What did Velt Motors unveil?", "answer": "a tram"}],
        ("knowmem", "retain_qa_icl"): [{"question": "Who is mayor?", "answer": "Tilda Quorn"}],
        ("verbmem", "forget"): [{"prompt": "The Marlow Gazette reported", "gt": "that the harbour bridge", "doc_id": "d0"},
                                {"prompt": "How many boats", "gt": "sailed in the regatta? 417", "doc_id": "d1"},
                                {"prompt": "The bridge reopened", "gt": "in Ostvale on Monday", "doc_id": "d1"}],
        ("privleak", "forget"): [{"text": "The Marlow Gazette reported that the harbour bridge reopened."}],
        ("privleak", "holdout"): [{"text": "Engineers at Velt Motors unveiled a hydrogen tram."}],
    })


def test_step_zero_point_equals_a_plain_evaluation(tiny_model, tiny_tokenizer):
    from benchmarks.core.metrics import evaluate

    data = _tiny_data()
    split = DocumentSplit(seed=0, train=("d0",), held_out=("d1",))
    evalset = EvalSet.from_data(data, privleak=True)
    point = evaluate_point(tiny_model, tiny_tokenizer, evalset, question_groups(evalset.forget_qa, split),
                           question_groups(evalset.verbmem, split), batch_size=2, privleak=True, retrain_auc=0.5)
    plain = evaluate(tiny_model, tiny_tokenizer, data, ["knowmem_forget", "verbmem_forget", "knowmem_retain",
                                                        "privleak"], batch_size=2, retrain_auc=0.5)
    for name, score in plain.scores.items():
        assert point[name] == pytest.approx(score, abs=1e-9), name
    items = [i.score for i in plain.results["knowmem_forget"].items]
    assert point["knowmem_forget_relearn"] == pytest.approx(items[0])
    assert point["knowmem_forget_heldout"] == pytest.approx((items[1] + items[2]) / 2)
    verbatim = [i.score for i in plain.results["verbmem_forget"].items]
    assert point["verbmem_forget_relearn"] == pytest.approx(verbatim[0])
    assert point["verbmem_forget_heldout"] == pytest.approx((verbatim[1] + verbatim[2]) / 2)


def test_verbmem_items_split_by_their_article_like_the_questions():
    split = DocumentSplit(seed=0, train=("d0", "d2"), held_out=("d1",))
    raw = {"knowmem_forget": 50.0, "knowmem_forget_items": [10.0, 90.0], "verbmem_forget": 40.0,
           "verbmem_forget_items": [30.0, 60.0, 20.0, 50.0], "knowmem_retain": 70.0}
    questions = [{"doc_id": "d0"}, {"doc_id": "d1"}]
    verbatim = [{"doc_id": "d0"}, {"doc_id": "d1"}, {"doc_id": "d2"}, {"doc_id": "d1"}]
    values = point_values(raw, question_groups(questions, split), question_groups(verbatim, split))
    assert values["verbmem_forget_relearn"] == pytest.approx((30 + 20) / 2)  # d0 and d2: the attacker's
    assert values["verbmem_forget_heldout"] == pytest.approx((60 + 50) / 2)  # d1: never trained on
    assert values["verbmem_forget"] == 40.0 and values["knowmem_forget_heldout"] == 90.0
    assert "verbmem_forget_items" not in values and "knowmem_forget_items" not in values
    # Items without doc ids (MUSE-News as published), or no per-item scores: no T/V value.
    unknown = point_values(raw, question_groups(questions, split), question_groups([{}] * 4, split))
    assert unknown["verbmem_forget_heldout"] is None and unknown["verbmem_forget_relearn"] is None
    older = {k: v for k, v in raw.items() if k != "verbmem_forget_items"}
    assert point_values(older, question_groups(questions, split), question_groups(verbatim, split))[
        "verbmem_forget_heldout"] is None


def test_verbmem_t_and_v_curves_are_summarised_for_recovery():
    steps = [0, 10]

    def point(v_verbatim):
        return {"knowmem_forget": 0.0, "knowmem_forget_relearn": 0.0, "knowmem_forget_heldout": 0.0,
                "verbmem_forget": v_verbatim, "verbmem_forget_relearn": v_verbatim,
                "verbmem_forget_heldout": v_verbatim, "knowmem_retain": 50.0}

    points = {"target": {0: {0: point(80.0), 10: point(80.0)}},
              "retrain": {0: {0: point(10.0), 10: point(12.0)}},
              "npo": {0: {0: point(20.0), 10: point(50.0)}}}
    _, summary, metrics = curves_and_summary(steps, points, "target", "retrain")
    assert {"verbmem_forget_relearn", "verbmem_forget_heldout"} <= set(metrics)
    v = summary["npo"]["verbmem_forget_heldout"]
    assert v["recovery_ratio"]["mean"] == pytest.approx((50 - 20) / (80 - 20))
    assert v["excess_over_retrain"]["mean"] == pytest.approx(50 - 12)
