"""TOFU's metrics against values derived by hand (and scipy's own functions where they are the
definition)."""

from __future__ import annotations

import math

import pytest

from benchmarks.core.errors import UsageError
from benchmarks.core.tofu_metrics import (
    MODEL_UTILITY_PARTS,
    answer_prob,
    forget_quality,
    model_utility,
    normalised_prob,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_closer_to_1,
    truth_ratio_true_better,
)


def test_prob_is_exp_of_minus_mean_nll():
    assert answer_prob(math.log(4)) == pytest.approx(0.25)
    assert answer_prob(0.0) == 1.0


def test_truth_ratio_when_the_model_prefers_the_correct_answer():
    # mean perturbed loss (2 + 4) / 2 = 3; TR = e^-3 / e^-1 = e^-2
    tr = truth_ratio(1.0, [2.0, 4.0])
    assert tr == pytest.approx(math.exp(-2))
    assert truth_ratio_closer_to_1([tr]) == pytest.approx(math.exp(-2))  # min(e^-2, e^2)
    assert truth_ratio_true_better([tr]) == pytest.approx(1 - math.exp(-2))


def test_truth_ratio_when_the_model_prefers_the_wrong_answers():
    tr = truth_ratio(3.0, [1.0])  # e^-1 / e^-3 = e^2
    assert tr == pytest.approx(math.exp(2))
    assert truth_ratio_closer_to_1([tr]) == pytest.approx(math.exp(-2))  # 1/TR
    assert truth_ratio_true_better([tr]) == 0.0  # max(0, 1 - e^2)


def test_truth_ratio_averages_losses_not_probabilities():
    # geometric mean of perturbed probabilities: exp(-(0 + 2)/2) = e^-1, not (1 + e^-2) / 2
    assert truth_ratio(0.0, [0.0, 2.0]) == pytest.approx(math.exp(-1))


def test_truth_ratio_aggregates_over_items():
    ratios = [0.5, 2.0, 1.0, 4.0]
    assert truth_ratio_closer_to_1(ratios) == pytest.approx((0.5 + 0.5 + 1.0 + 0.25) / 4)
    assert truth_ratio_true_better(ratios) == pytest.approx((0.5 + 0 + 0 + 0) / 4)


def test_normalised_prob():
    assert normalised_prob(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)
    # p = 0.6 against 0.1 + 0.1 + 0.2
    nll = lambda p: -math.log(p)  # noqa: E731
    assert normalised_prob(nll(0.6), [nll(0.1), nll(0.1), nll(0.2)]) == pytest.approx(0.6)
    with pytest.raises(UsageError):
        normalised_prob(0.0, [])


def test_rouge_is_recall_not_f1():
    # LCS 3 of a 6-token reference: recall 1/2, precision 1, F1 2/3
    assert rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l_recall("the cat sat on the mat and then slept", "the cat sat") == pytest.approx(1.0)


def test_rouge_stems_words():
    assert rouge_l_recall("running cats", "run cat") == pytest.approx(1.0)


def test_forget_quality_is_the_ks_p_value():
    from scipy.stats import ks_2samp

    model = [0.1, 0.2, 0.3, 0.4, 0.5]
    retrain = [0.6, 0.7, 0.8, 0.9, 1.0]
    # fully separated samples of 5 and 5: exact p = 2 / C(10, 5)
    assert forget_quality(model, retrain) == pytest.approx(2 / math.comb(10, 5))
    assert forget_quality(model, model) == pytest.approx(1.0)
    mixed = [0.15, 0.65, 0.35, 0.9, 0.05, 0.5]
    assert forget_quality(mixed, retrain) == pytest.approx(ks_2samp(mixed, retrain).pvalue)
    with pytest.raises(UsageError, match="retrain"):
        forget_quality(model, [])


def test_model_utility_is_the_harmonic_mean_of_nine_numbers():
    parts = dict.fromkeys(MODEL_UTILITY_PARTS, 0.5)
    parts["world_facts_rouge"] = 1.0
    # 9 / (8 * 2 + 1)
    assert model_utility(parts) == pytest.approx(9 / 17)
    parts["retain_prob"] = 0.0
    assert model_utility(parts) == 0.0
    del parts["retain_rouge"]
    with pytest.raises(UsageError, match="retain_rouge"):
        model_utility(parts)
