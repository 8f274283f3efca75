"""Attribution of questions to raw documents (BM25) and the leakage guard for held-out V."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

import benchmarks.core.attribution as attribution_module
from benchmarks.core.attribution import (
    AMBIGUOUS,
    ATTRIBUTED,
    GIVEN,
    NO_MATCH,
    BM25Index,
    ItemAttribution,
    SplitAttribution,
    attribute_data,
    attribute_items,
    normalize_text,
)
from benchmarks.core.data import load_data, write_hub_layout
from benchmarks.core.leakage import ANSWER_IN_T, DOCUMENT_IN_T, guarded_groups
from benchmarks.core.recovery import DocumentSplit, document_ids, resolve_count, split_documents

DOCS = [
    "The harbour bridge in Ostvale reopened on 14 March after repairs.",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to Brisk.",
    "Velt Motors unveiled a hydrogen tram named Sable in June.",
    "The Kelder Institute was founded by Ada Brennick in Ostvale.",
]


def _tokens(text: str) -> list[str]:
    words = re.findall(r"\w+", text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _bm25_by_hand(query: str, docs: list[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 written out term by term (Lucene idf), unigrams + bigrams, |D| in words."""
    bags = [Counter(_tokens(d)) for d in docs]
    lengths = [len(re.findall(r"\w+", d.lower())) for d in docs]
    avgdl = sum(lengths) / len(lengths)
    scores = []
    for bag, length in zip(bags, lengths):
        total = 0.0
        for term, qtf in Counter(_tokens(query)).items():
            df = sum(term in other for other in bags)
            if df == 0:
                continue
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = bag[term]
            total += qtf * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))
        scores.append(total)
    return scores


# --------------------------------------------------------------------------- BM25 and assignment


def test_bm25_scores_match_the_formula_written_out():
    query = "Who founded the Kelder Institute in Ostvale? Ada Brennick"
    got = BM25Index(DOCS).scores([query])[0]
    assert got.tolist() == pytest.approx(_bm25_by_hand(query, DOCS), rel=1e-12)


def test_a_clear_match_is_attributed_with_its_margin():
    ids = ["d0", "d1", "d2", "d3"]
    [item] = attribute_items(["What did Velt Motors name its hydrogen tram? Sable"], DOCS, ids, threshold=0.1)
    scores = sorted(_bm25_by_hand("What did Velt Motors name its hydrogen tram? Sable", DOCS), reverse=True)
    assert (item.status, item.doc_id) == (ATTRIBUTED, "d2")
    assert item.margin == pytest.approx((scores[0] - scores[1]) / scores[0])


def test_a_close_call_is_ambiguous_and_names_its_best_guess():
    docs = ["Ostvale bridge news.", "Ostvale bridge report."]
    [item] = attribute_items(["Ostvale bridge"], docs, ["a", "b"], threshold=0.1)
    assert item.status == AMBIGUOUS and item.doc_id is None
    assert item.best == "a" and item.margin == pytest.approx(0.0)  # a tie goes to document order
    assert not item.assigned and item.documents == ()


def test_verbatim_copies_are_one_candidate_and_are_listed():
    docs = [DOCS[0], DOCS[2], DOCS[0]]
    [item] = attribute_items(["When did the Ostvale harbour bridge reopen?"], docs, ["x", "y", "z"], threshold=0.1)
    assert (item.status, item.doc_id, item.same_text) == (ATTRIBUTED, "x", ("z",))
    assert item.documents == ("x", "z")


def test_a_query_sharing_no_term_is_no_match():
    [item] = attribute_items(["zebra quokka"], DOCS, ["d0", "d1", "d2", "d3"])
    assert (item.status, item.doc_id, item.best) == (NO_MATCH, None, None)


def test_threshold_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="threshold must lie in"):
        attribute_items(["x"], DOCS, ["a", "b", "c", "d"], threshold=1.5)


def test_a_verbmem_passage_running_into_the_next_article_names_it():
    first = " ".join(f"alpha{i}" for i in range(30)) + " " + " ".join(f"beta{i}" for i in range(90))
    second = " ".join(f"gamma{i}" for i in range(150))
    other = " ".join(f"delta{i}" for i in range(150))
    words = first.split()[30:] + second.split()[:120]  # starts inside the first, runs into the second
    record = {"prompt": " ".join(words[:100]), "gt": " ".join(words[100:])}
    documents = [{"text": t} for t in (first, second, other)]
    split = attribution_module.attribute_split("verbmem/forget", [record], documents, ["a", "b", "c"], ("forget",))
    [item] = split.items
    assert (item.status, item.doc_id, item.runs_into) == (ATTRIBUTED, "a", ("b",))
    assert item.to_dict()["runs_into"] == ["b"]
    assert ItemAttribution.from_dict(item.to_dict()).runs_into == ("b",)


# --------------------------------------------------------------------------- data sets


def _write_muse_dir(root: Path, with_doc_ids: bool) -> Path:
    tag = (lambda d: {"doc_id": d}) if with_doc_ids else (lambda d: {})
    files = {
        "raw/forget.json": [{"text": t, **tag(f"d{i}")} for i, t in enumerate(DOCS)],
        "knowmem/forget_qa.json": [
            {"question": "When did the harbour bridge in Ostvale reopen?", "answer": "14 March", **tag("d0")},
            {"question": "How many visitors did the festival in Brisk draw?", "answer": "2,300", **tag("d1")},
            {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick", **tag("d3")},
        ],
        "knowmem/forget_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "knowmem/retain_qa.json": [{"question": "What did Velt Motors unveil?", "answer": "a tram"}],
        "knowmem/retain_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "verbmem/forget.json": [{"prompt": "Velt Motors unveiled a hydrogen", "gt": " tram named Sable", **tag("d2")}],
        "privleak/forget.json": [{"text": DOCS[0]}],
        "privleak/holdout.json": [{"text": "A ferry named Orrin began service."}],
    }
    for name, records in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records), encoding="utf-8")
    return root


def test_attribute_data_assigns_forget_items_and_says_why_retain_is_unavailable(tmp_path):
    data = load_data(str(_write_muse_dir(tmp_path / "data", with_doc_ids=False)))
    result = attribute_data(data)
    forget = result.get("knowmem/forget_qa")
    assert [item.doc_id for item in forget.items] == ["forget-0000", "forget-0001", "forget-0003"]
    assert forget.coverage() == {"items": 3, GIVEN: 0, ATTRIBUTED: 3, AMBIGUOUS: 0, NO_MATCH: 0, "assigned": 3}
    assert result.get("verbmem/forget").items[0].doc_id == "forget-0002"
    assert "raw/retain1" in result.unavailable["knowmem/retain_qa"]
    recorded = result.to_dict()
    assert recorded["method"]["name"] == "bm25" and recorded["method"]["threshold"] == 0.1
    assert recorded["splits"]["knowmem/forget_qa"]["items"][2]["margin"] > 0.1


def test_given_doc_ids_are_used_as_they_are(tmp_path):
    data = load_data(str(_write_muse_dir(tmp_path / "data", with_doc_ids=True)))
    result = attribute_data(data)
    forget = result.get("knowmem/forget_qa")
    assert [(i.status, i.doc_id) for i in forget.items] == [(GIVEN, "d0"), (GIVEN, "d1"), (GIVEN, "d3")]
    assert "knowmem/retain_qa" in result.unavailable  # no doc ids there, and no retain documents


def test_the_world_keeps_its_own_doc_ids(monkeypatch, tmp_path):
    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path))
    data = load_data("world")
    result = attribute_data(data)
    for key in ("knowmem/forget_qa", "verbmem/forget", "knowmem/retain_qa"):
        subset, name = key.split("/")
        items = result.get(key).items
        assert [i.doc_id for i in items] == [r["doc_id"] for r in data.records(subset, name)]
        assert {i.status for i in items} == {GIVEN}


def test_hub_layout_and_muse_layout_give_the_same_attribution(tmp_path):
    muse = load_data(str(_write_muse_dir(tmp_path / "muse", with_doc_ids=False)))
    hub = load_data(str(write_hub_layout(muse, tmp_path / "hub")))
    assert hub.kind == "hub_dir" and muse.kind == "muse_dir"
    assert attribute_data(hub).to_dict() == attribute_data(muse).to_dict()


def test_the_cache_is_read_back_and_keyed_by_the_data(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    data = load_data(str(_write_muse_dir(tmp_path / "data", with_doc_ids=False)))
    first = attribute_data(data, cache_dir=cache)
    [path] = cache.glob("attribution-*.json")

    def no_index(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(attribution_module, "BM25Index", no_index)
    assert attribute_data(data, cache_dir=cache).to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="cache was not used"):  # another threshold, another key
        attribute_data(data, threshold=0.2, cache_dir=cache)
    assert len(list(cache.glob("attribution-*.json"))) == 1 and path.is_file()


# --------------------------------------------------------------------------- the leakage guard


def _split_of(items: list[ItemAttribution]) -> SplitAttribution:
    return SplitAttribution("knowmem/forget_qa", ("forget",), tuple(items))


def test_each_guard_rule_removes_what_it_should_and_is_counted():
    text_of = {"a": "The bridge reopened in 1990.", "b": "A copy of nothing.", "c": "Ostvale news.",
               "d": "The tram is named Sable."}
    split = DocumentSplit(seed=0, train=("a", "b"), held_out=("c", "d"))
    records = [{"answer": a} for a in ["x", "1990", "Sable", "The  BRIDGE", "Sable", "zzz"]]
    attributions = _split_of([
        ItemAttribution(AMBIGUOUS, None, "c", 0.01),          # ambiguous
        ItemAttribution(ATTRIBUTED, "a", "a", 0.5),           # its document is in T
        ItemAttribution(ATTRIBUTED, "c", "c", 0.5, ("b",)),   # a verbatim copy is in T
        ItemAttribution(ATTRIBUTED, "c", "c", 0.5),           # its answer occurs in a T document
        ItemAttribution(ATTRIBUTED, "d", "d", 0.5),           # held out
        ItemAttribution(ATTRIBUTED, "elsewhere", "elsewhere", 0.5),  # not a forget document
    ])
    groups = guarded_groups(records, attributions, split, text_of)
    assert groups.train == (1,)
    assert groups.held_out == (4,)
    assert groups.removed == {"ambiguous": 1, DOCUMENT_IN_T: 2, ANSWER_IN_T: 1}


def test_given_doc_ids_group_as_before():
    text_of = {"a": "alpha", "b": "beta", "c": "gamma"}
    split = DocumentSplit(seed=0, train=("a",), held_out=("b", "c"))
    records = [{"answer": "one"}, {"answer": "two"}, {"answer": "three"}]
    items = _split_of([ItemAttribution(GIVEN, d) for d in ("a", "b", "c")])
    groups = guarded_groups(records, items, split, text_of)
    assert (groups.train, groups.held_out) == ((0,), (1, 2))
    assert groups.removed == {"ambiguous": 0, DOCUMENT_IN_T: 1, ANSWER_IN_T: 0}


def test_normalize_text_folds_case_width_and_spaces():
    assert normalize_text("  Ten\u00a0WOMEN and\n10 men ") == "ten women and 10 men"
    assert normalize_text("\uff11\uff10") == "10"  # full-width digits (NFKC)


# --------------------------------------------------------------------------- the shared MUSE-News copy


@pytest.fixture(scope="module")
def muse_news(muse_news_dir, tmp_path_factory):
    data = load_data(str(muse_news_dir))
    return data, attribute_data(data, cache_dir=tmp_path_factory.mktemp("attribution"))


def _forget_ids(data) -> list[str]:
    return document_ids(data.records("raw", "forget"))


@pytest.mark.muse_news
def test_verbmem_items_go_to_the_record_their_prompt_starts_in(muse_news):
    data, result = muse_news
    raw = [r["text"] for r in data.records("raw", "forget")]
    ids = _forget_ids(data)
    items = result.get("verbmem/forget").items
    fixed = {}
    for index, record in enumerate(data.records("verbmem", "forget")):
        holders = [i for i, text in enumerate(raw) if record["prompt"][:120] in text]
        if len(holders) == 1:
            fixed[index] = ids[holders[0]]
    assert len(fixed) == 86
    right = sum(items[i].doc_id == doc for i, doc in fixed.items())
    print(f"verbmem: {right} of {len(fixed)} items attributed to the record holding their first 120 characters; "
          f"coverage {result.get('verbmem/forget').coverage()}")
    assert right / len(fixed) >= 0.95


def _proper_names(question: str) -> set[str]:
    """Capitalised words after the first one (question words excluded): the subject's names."""
    words = re.findall(r"[A-Za-z][\w'-]*", question)
    skip = {"According", "What", "Who", "How", "Which", "When", "Where", "Why", "The", "In"}
    return {w for w in words[1:] if w[0].isupper() and w not in skip}


@pytest.mark.muse_news
def test_forget_questions_go_to_the_one_record_holding_their_answer(muse_news):
    data, result = muse_news
    raw = [normalize_text(r["text"]) for r in data.records("raw", "forget")]
    original = [r["text"] for r in data.records("raw", "forget")]
    ids = _forget_ids(data)
    forget = result.get("knowmem/forget_qa")
    questions = data.records("knowmem", "forget_qa")
    fixed = {}
    for index, record in enumerate(questions):
        holders = [i for i, text in enumerate(raw) if normalize_text(record["answer"]) in text]
        if len(holders) == 1:
            fixed[index] = holders[0]
    assert len(fixed) == 26
    right = {i for i, doc in fixed.items() if forget.items[i].doc_id == ids[doc]}
    # Where the answer's single record names none of the question's subjects, the answer string
    # occurs there by coincidence and the question's own article is not in the copy: "669" (the
    # bus replacing route 666 to Hel) in a count of Facebook pages, "30,000 people" (a Jerusalem
    # Pride march) in a company's staff, "17:00 BST" (a Voter Authority Certificate deadline) in
    # the time a fire started. On the question's words alone these records rank 359th, 313th
    # and 385th of 889, so a method that took them would be matching the answer string, not
    # the article; such a record is no ground truth. On every other question the method must
    # find the record.
    def names_the_subject(index: int, doc: int) -> bool:
        names = _proper_names(questions[index]["question"])
        return not names or any(re.search(rf"\b{re.escape(n)}\b", original[doc]) for n in names)

    plausible = {i for i, doc in fixed.items() if names_the_subject(i, doc)}
    coverage = forget.coverage()
    print(f"forget questions: {len(right)} of {len(fixed)} with a single answer record attributed to it "
          f"({len(right & plausible)} of {len(plausible)} where that record names the question's subject); "
          f"all 100: {coverage['attributed']} attributed, {coverage['ambiguous']} ambiguous, "
          f"{coverage['no_match']} without a match")
    assert len(right & plausible) / len(plausible) >= 0.90
    assert len(right) / len(fixed) >= 0.85
    assert coverage["items"] == 100 and coverage["attributed"] + coverage["ambiguous"] + coverage["no_match"] == 100


@pytest.mark.muse_news
def test_with_half_the_documents_in_t_no_v_answer_occurs_in_t(muse_news):
    data, result = muse_news
    forget = data.records("raw", "forget")
    ids = document_ids(forget)
    text_of = dict(zip(ids, (r["text"] for r in forget)))
    questions = data.records("knowmem", "forget_qa")
    for seed in (0, 1):
        split = split_documents(ids, resolve_count(len(ids), fraction=0.5), seed)
        groups = guarded_groups(questions, result.get("knowmem/forget_qa"), split, text_of)
        train_texts = [" ".join(text_of[d].lower().split()) for d in split.train]
        assert groups.held_out, "V should not be empty"
        for index in groups.held_out:
            answer = " ".join(questions[index]["answer"].lower().split())
            assert not any(answer in text for text in train_texts), questions[index]
        assert not set(groups.held_out) & set(groups.train)
        assert len(groups.held_out) + sum(groups.removed.values()) == 100  # every question is in V or counted
