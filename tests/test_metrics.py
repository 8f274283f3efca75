"""MUSE metrics: values derived by hand, PrivLeak orientation, batch-size independence."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.metrics import (
    METRICS,
    MUSE_NEWS_RETRAIN_AUC,
    EvaluationResult,
    evaluate,
    forget_holdout_auc,
    knowmem,
    knowmem_prompt,
    min_k_count,
    min_k_score,
    min_k_scores,
    parse_metric_names,
    privleak,
    privleak_score,
    rouge_l_f1,
    truncate_answer,
    truncate_reference,
    verbmem,
)

# ----------------------------------------------------------------------------- ROUGE


def test_perfect_answer_scores_one_and_disjoint_scores_zero():
    assert rouge_l_f1("Ada Brennick", "Ada Brennick") == 1.0
    assert rouge_l_f1("417 boats", "Ada Brennick") == 0.0


def test_rouge_l_f1_matches_hand_computed_lcs():
    # prediction tokens: the mayor of brisk said ; reference: mayor tilda quorn said
    # LCS = "mayor said" (2); P = 2/5, R = 2/4, F1 = 2PR/(P+R) = 4/9.
    assert rouge_l_f1("The mayor of Brisk said", "Mayor Tilda Quorn said") == pytest.approx(4 / 9)


def test_rouge_is_case_and_punctuation_insensitive_without_stemming():
    assert rouge_l_f1("ADA, Brennick!", "ada brennick") == 1.0
    # No stemmer: "boats" and "boat" are different tokens.
    assert rouge_l_f1("boats", "boat") == 0.0


# ----------------------------------------------------------------------------- KnowMem text


def test_truncate_answer_cuts_at_first_stop():
    assert truncate_answer("Ada Brennick\n\nQuestion: Who?") == "Ada Brennick"
    assert truncate_answer("417\nQuestion: next") == "417"
    assert truncate_answer("Sable Question: next") == "Sable "
    assert truncate_answer("one\ntwo") == "one\ntwo"
    # The earliest of the three wins, whichever is listed first.
    assert truncate_answer("a Question: b\n\nc") == "a "


def test_knowmem_prompt_is_exactly_muses_format():
    icl = [
        {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick"},
        {"question": "How many boats sailed?", "answer": "417"},
    ]
    expected = (
        "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick\n\n"
        "Question: How many boats sailed?\nAnswer: 417\n\n"
        "Question: What is the tram called?\nAnswer: "
    )
    assert knowmem_prompt(icl, "What is the tram called?") == expected
    assert knowmem_prompt([], "Q?") == "Question: Q?\nAnswer: "


def test_truncate_reference_counts_bos_among_the_tokens(tiny_tokenizer):
    text = "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk."
    ids = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    expected = tiny_tokenizer.decode(ids[1:5])  # BOS + 4 text tokens
    assert truncate_reference(tiny_tokenizer, text, 5) == expected
    assert truncate_reference(tiny_tokenizer, text, 10_000) == text


# ----------------------------------------------------------------------------- Min-K%


def test_min_k_count_definition():
    assert [min_k_count(n) for n in (1, 2, 3, 5, 10, 11)] == [1, 1, 1, 2, 4, 4]
    with pytest.raises(ValueError):
        min_k_count(0)


def test_min_k_score_on_hand_made_log_probs():
    log_probs = [-0.1, -2.0, -0.5, -3.0, -0.2, -1.0, -0.05, -4.0, -0.3, -0.7]
    # n = 10 -> k = 4 lowest: -4.0, -3.0, -2.0, -1.0; mean -2.5; score = +2.5
    assert min_k_score(log_probs) == pytest.approx(2.5)
    assert min_k_score(torch.tensor(log_probs)) == pytest.approx(2.5)
    # n = 3 -> k = 1: the single lowest
    assert min_k_score([-0.2, -7.0, -1.0]) == pytest.approx(7.0)


def test_min_k_scores_match_token_by_token_reference(tiny_model, tiny_tokenizer):
    texts = ["Ada Brennick founded it.", "The harbour bridge in Ostvale reopened on 14 March 2031."]
    scored = min_k_scores(tiny_model, tiny_tokenizer, texts, batch_size=2)
    for text, (score, count) in zip(texts, scored):
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), dim=-1)
        per_token = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert count == ids.shape[1] - 1
        k = max(1, int(0.4 * count))
        assert score == pytest.approx(-per_token.sort().values[:k].mean().item(), abs=1e-5)


@pytest.mark.slow
def test_min_k_scores_do_not_depend_on_batch_size(tiny_model, tiny_tokenizer):
    texts = [
        "Ada Brennick founded the Kelder Institute.",
        "417",
        "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
        "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
        "The Marlow Gazette reported that the harbour bridge reopened.",
    ] * 2
    one = min_k_scores(tiny_model, tiny_tokenizer, texts, batch_size=1)
    many = min_k_scores(tiny_model, tiny_tokenizer, texts, batch_size=16)
    for (a, n_a), (b, n_b) in zip(one, many):
        assert n_a == n_b
        assert abs(a - b) < 1e-6


def test_min_k_scores_cut_texts_to_the_context(tiny_tokenizer):
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    model = tiny_llama(TinyLlamaSpec(max_position_embeddings=16), tiny_tokenizer).eval()
    long_text = " ".join(["Mayor Tilda Quorn said the festival drew visitors."] * 10)
    [(_, count)] = min_k_scores(model, tiny_tokenizer, [long_text])
    assert count == 15


def test_min_k_scores_reject_a_text_without_predicted_tokens(tiny_model, tiny_tokenizer):
    with pytest.raises(DataError, match="text 1"):
        min_k_scores(tiny_model, tiny_tokenizer, ["fine text", ""])


# ----------------------------------------------------------------------------- AUC / PrivLeak


def test_memorised_forget_texts_give_auc_zero_and_privleak_minus_100():
    # Memorised forget texts: high log-probs -> low Min-K% scores; holdout texts unfamiliar.
    forget = [0.5, 0.7, 0.9, 1.1]
    holdout = [3.0, 3.5, 4.0, 4.2]
    auc = forget_holdout_auc(forget, holdout)
    assert auc == 0.0
    assert privleak_score(auc, 0.5) == pytest.approx(-100.0)


def test_auc_orientation_and_hand_computed_value():
    # Holdout positive, classifier score = -MinK. Pairs (holdout h, forget f) where
    # -h > -f, i.e. h < f: holdout 1.0 beats forget 2.0 and 3.0; holdout 4.0 beats none.
    # AUC = 2 / (2 * 2) = 0.5.
    assert forget_holdout_auc([2.0, 3.0], [1.0, 4.0]) == pytest.approx(0.5)
    # Unlearned too far: forget texts look *less* familiar than holdout -> AUC 1.
    assert forget_holdout_auc([5.0, 6.0], [1.0, 2.0]) == 1.0
    # A tie counts one half.
    assert forget_holdout_auc([1.0], [1.0]) == 0.5


def test_privleak_score_formula():
    assert privleak_score(0.4772, MUSE_NEWS_RETRAIN_AUC) == 0.0
    assert privleak_score(0.6, 0.5) == pytest.approx(20.0)
    with pytest.raises(UsageError):
        privleak_score(0.5, 0.0)


def test_privleak_reference_choices(tiny_model, tiny_tokenizer):
    forget = [{"text": "Ada Brennick founded the Kelder Institute.", "doc_id": "d1"}]
    holdout = [{"text": "Engineers at Velt Motors unveiled a tram."}]
    published = privleak(tiny_model, tiny_tokenizer, forget, holdout)
    auc = published.details["auc"]
    assert published.details["retrain_auc"] == MUSE_NEWS_RETRAIN_AUC
    assert published.score == pytest.approx((auc - 0.4772) / 0.4772 * 100)
    given = privleak(tiny_model, tiny_tokenizer, forget, holdout, retrain_auc=0.25)
    assert given.score == pytest.approx((auc - 0.25) / 0.25 * 100)
    itself = privleak(tiny_model, tiny_tokenizer, forget, holdout, as_retrain=True)
    assert itself.score == 0.0
    items = itself.to_dict()["items"]
    assert items[0]["doc_id"] == "d1" and items[0]["split"] == "forget"
    assert "doc_id" not in items[1]


@pytest.mark.slow
def test_overfitted_model_leaks_privacy_end_to_end(tiny_tokenizer):
    from benchmarks.core.logprobs import masked_mean_nll
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    forget = [
        "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
        "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
        "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
    ]
    holdout = [
        "Brisk engineers said the tram bridge drew visitors to Marlow in June.",
        "The Ostvale festival reopened the valley harbour to 417 boats.",
        "Quorn unveiled the Gazette on 2 March at the Kelder Institute.",
    ]
    model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
    batch = tiny_tokenizer(forget, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        masked_mean_nll(model, batch["input_ids"], batch["attention_mask"]).backward()
        optimizer.step()
    model.eval()
    result = privleak(
        model, tiny_tokenizer, [{"text": t} for t in forget], [{"text": t} for t in holdout], retrain_auc=0.5
    )
    assert result.details["auc"] == 0.0
    assert result.score == pytest.approx(-100.0)


# ----------------------------------------------------------------------------- generation metrics


def test_knowmem_scores_are_mean_of_items_and_items_carry_doc_ids(tiny_model, tiny_tokenizer):
    qa = [
        {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick", "doc_id": "a"},
        {"question": "How many boats sailed in the regatta?", "answer": "417"},
    ]
    icl = [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}]
    result = knowmem(tiny_model, tiny_tokenizer, qa, icl, max_new_tokens=6)
    assert len(result.items) == 2
    assert result.score == pytest.approx(sum(i.score for i in result.items) / 2)
    first = result.items[0]
    assert first.prompt == knowmem_prompt(icl, qa[0]["question"])
    assert first.generation == truncate_answer(first.raw_generation)
    assert first.score == pytest.approx(100 * rouge_l_f1(first.generation, "Ada Brennick"))
    assert first.doc_id == "a" and result.items[1].doc_id is None


def test_verbmem_reference_is_cut_ground_truth(tiny_model, tiny_tokenizer):
    records = [{"prompt": "The Marlow Gazette reported", "gt": "that the harbour bridge in Ostvale reopened."}]
    result = verbmem(tiny_model, tiny_tokenizer, records, max_new_tokens=4)
    item = result.items[0]
    assert item.reference == truncate_reference(tiny_tokenizer, records[0]["gt"], 4)
    assert item.score == pytest.approx(100 * rouge_l_f1(item.generation, item.reference))
    assert result.score == item.score


def test_knowmem_missing_field_is_a_data_error(tiny_model, tiny_tokenizer):
    with pytest.raises(DataError, match="'answer'"):
        knowmem(tiny_model, tiny_tokenizer, [{"question": "Q?"}], [], max_new_tokens=2)


# ----------------------------------------------------------------------------- registry / evaluate


class DictData:
    """Stands in for MuseData: records(subset, split) from a dict."""

    def __init__(self, splits):
        self.splits = splits

    def records(self, subset, split):
        return tuple(self.splits[subset, split])


def small_data() -> DictData:
    qa = [{"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick"}]
    return DictData(
        {
            ("knowmem", "forget_qa"): qa,
            ("knowmem", "forget_qa_icl"): qa,
            ("knowmem", "retain_qa"): qa,
            ("knowmem", "retain_qa_icl"): qa,
            ("verbmem", "forget"): [{"prompt": "The Marlow Gazette", "gt": "reported that"}],
            ("privleak", "forget"): [{"text": "Ada Brennick founded it."}],
            ("privleak", "holdout"): [{"text": "Velt Motors unveiled a tram."}],
        }
    )


def test_metric_registry_names_and_unknown_name():
    assert METRICS.names() == ["knowmem_forget", "knowmem_retain", "privleak", "verbmem_forget"]
    with pytest.raises(UsageError, match="knowmem_forget, knowmem_retain, privleak, verbmem_forget"):
        parse_metric_names("knowmem_forget,privlek")
    assert parse_metric_names(" privleak, knowmem_forget,privleak ") == ["privleak", "knowmem_forget"]
    with pytest.raises(UsageError):
        parse_metric_names(",")


def test_evaluate_runs_selected_metrics(tiny_model, tiny_tokenizer):
    result = evaluate(tiny_model, tiny_tokenizer, small_data(), "knowmem_retain,privleak", retrain_auc=0.5)
    assert isinstance(result, EvaluationResult)
    assert list(result.scores) == ["knowmem_retain", "privleak"]
    assert result.results["privleak"].details["retrain_auc"] == 0.5
    assert all(math.isfinite(v) for v in result.scores.values())
    summary = result.to_dict()
    assert "items" not in summary["knowmem_retain"]
    assert len(result.to_dict(with_items=True)["knowmem_retain"]["items"]) == 1
    assert not tiny_model.training


def test_evaluate_rejects_unknown_metric_before_running(tiny_model, tiny_tokenizer):
    with pytest.raises(UsageError, match="valid names"):
        evaluate(tiny_model, tiny_tokenizer, small_data(), ["verbmem"])
