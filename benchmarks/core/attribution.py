"""Which raw document each evaluation item came from, when the data does not say.

Held-out recovery (DESIGN §5) needs every question to know its article. The embedded world's
records carry a ``doc_id``; MUSE-News as published does not: ``knowmem/forget_qa`` holds bare
question/answer pairs and ``verbmem/forget`` bare prompt/continuation pairs. This module
recovers the link lexically and says how sure it is:

* every raw document of the matching split (``raw/forget`` for forget items, ``raw/retain1``
  and ``raw/retain2`` for retain questions) is scored against a query with Okapi BM25
  (Robertson & Zaragoza, 2009, "The Probabilistic Relevance Framework: BM25 and Beyond",
  eq. 3.15 with the idf of Lucene, which stays positive):
  ``score(D, Q) = sum_t qtf(t) * idf(t) * tf(t, D) * (k1 + 1) / (tf(t, D) + k1 * (1 - b + b * |D| / avgdl))``,
  ``idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))``, over lower-cased word unigrams and
  bigrams (a bigram such as "route 666" identifies an article far better than its two words);
* the query is the question followed by its answer; for a verbmem item it is the opening of
  the prompt (its first :data:`VERBMEM_QUERY_WORDS` words): MUSE's verbmem prompts are long
  passages that start inside one article and often run on into the next ones, so the place
  where the passage starts is its article, while the whole passage would point at whichever
  article holds most of it;
* the top document is assigned when its relative margin over the best document with a
  *different* text, ``(s1 - s2) / s1``, reaches the threshold; otherwise the item is
  ambiguous. Records with identical text (MUSE-News's raw/forget holds some verbatim
  duplicates) are one candidate: the first of them is assigned and the others are listed in
  ``same_text``, since a document and its copy cannot be told apart and must not be split
  between T and V.

Items that already carry ``doc_id`` keep it (status ``given``). Everything is deterministic;
:func:`attribute_data` caches its result under a key made of the method, its parameters and
the sha256 of every split involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.core.errors import UsageError
from benchmarks.core.recovery import document_ids

logger = logging.getLogger(__name__)

__all__ = [
    "METHOD",
    "DEFAULT_THRESHOLD",
    "ItemAttribution",
    "SplitAttribution",
    "DataAttribution",
    "BM25Index",
    "normalize_text",
    "attribute_items",
    "attribute_data",
]

METHOD = "bm25"
#: BM25's usual constants (Robertson & Zaragoza, 2009, §3.3): term-frequency saturation and
#: length normalisation.
BM25_K1, BM25_B = 1.2, 0.75
#: Word n-grams indexed: unigrams and bigrams.
NGRAM_RANGE = (1, 2)
#: Lower-cased runs of word characters, single characters included ("a", "5").
TOKEN_PATTERN = r"(?u)\b\w+\b"
#: Minimum relative margin (s1 - s2) / s1 of the top document for an assignment. On the shared
#: MUSE-News copy it keeps 23 of the 26 forget questions whose answer occurs in a single record
#: assigned to that record while marking about a third of all questions ambiguous.
DEFAULT_THRESHOLD = 0.1
#: Words of a verbmem prompt's opening used as its query.
VERBMEM_QUERY_WORDS = 20
#: Later windows of a verbmem passage (prompt + gt) start every this many words; each is
#: attributed like the opening, and the documents they land in are the item's ``runs_into``.
VERBMEM_WINDOW_STRIDE = 100
#: Bumped when the method changes, so that cached results of an older method are not reused.
METHOD_VERSION = 2

GIVEN, ATTRIBUTED, AMBIGUOUS, NO_MATCH = "given", "attributed", "ambiguous", "no_match"
STATUSES = (GIVEN, ATTRIBUTED, AMBIGUOUS, NO_MATCH)

#: Which raw splits each evaluation split is attributed against.
DOCUMENT_SPLITS = {
    "knowmem/forget_qa": ("forget",),
    "verbmem/forget": ("forget",),
    "knowmem/retain_qa": ("retain1", "retain2"),
}


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space: how answers are compared
    with documents ("10 Women and  10 men" matches "10 women and 10 men")."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ItemAttribution:
    """Where one item came from. ``doc_id`` is None unless ``status`` is given/attributed;
    ``best`` is the top document even for an ambiguous item (for auditing); ``margin`` is the
    relative margin (None for given ids); ``same_text`` lists other ids whose text equals the
    assigned document's; ``runs_into`` (verbmem items) the other documents that later parts
    of the passage are attributed to, in passage order."""

    status: str
    doc_id: str | None
    best: str | None = None
    margin: float | None = None
    same_text: tuple[str, ...] = ()
    runs_into: tuple[str, ...] = ()

    @property
    def assigned(self) -> bool:
        return self.status in (GIVEN, ATTRIBUTED)

    @property
    def documents(self) -> tuple[str, ...]:
        """The assigned document and its verbatim copies (empty when not assigned)."""
        return (self.doc_id, *self.same_text) if self.doc_id is not None else ()

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"status": self.status, "doc_id": self.doc_id}
        if self.status != GIVEN:
            out.update(best=self.best, margin=None if self.margin is None else round(self.margin, 6))
        if self.same_text:
            out["same_text"] = list(self.same_text)
        if self.runs_into:
            out["runs_into"] = list(self.runs_into)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ItemAttribution":
        return cls(status=data["status"], doc_id=data["doc_id"], best=data.get("best"),
                   margin=data.get("margin"), same_text=tuple(data.get("same_text", ())),
                   runs_into=tuple(data.get("runs_into", ())))


@dataclass(frozen=True)
class SplitAttribution:
    """The attribution of every item of one evaluation split, in the split's order."""

    key: str  # e.g. "knowmem/forget_qa"
    documents: tuple[str, ...]  # raw splits ranked, e.g. ("forget",)
    items: tuple[ItemAttribution, ...]

    def __len__(self) -> int:
        return len(self.items)

    def coverage(self) -> dict[str, int]:
        counts = {"items": len(self.items)}
        counts.update({status: sum(item.status == status for item in self.items) for status in STATUSES})
        counts["assigned"] = counts[GIVEN] + counts[ATTRIBUTED]
        return counts

    def to_dict(self) -> dict:
        return {"documents": [f"raw/{name}" for name in self.documents], "coverage": self.coverage(),
                "items": [item.to_dict() for item in self.items]}


@dataclass(frozen=True)
class DataAttribution:
    """Attributions of the evaluation splits of one data set, how they were made, and the
    splits that could not be attributed (with the reason)."""

    method: Mapping[str, Any]
    splits: Mapping[str, SplitAttribution]
    unavailable: Mapping[str, str] = field(default_factory=dict)

    def get(self, key: str) -> SplitAttribution | None:
        return self.splits.get(key)

    def to_dict(self) -> dict:
        return {"method": dict(self.method),
                "splits": {key: split.to_dict() for key, split in self.splits.items()},
                "unavailable": dict(self.unavailable)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataAttribution":
        splits = {
            key: SplitAttribution(key=key, documents=tuple(d.removeprefix("raw/") for d in split["documents"]),
                                  items=tuple(ItemAttribution.from_dict(i) for i in split["items"]))
            for key, split in data["splits"].items()
        }
        return cls(method=data["method"], splits=splits, unavailable=data.get("unavailable", {}))


def method_description(threshold: float) -> dict[str, Any]:
    """What a result file records about the method."""
    return {
        "name": METHOD,
        "version": METHOD_VERSION,
        "k1": BM25_K1,
        "b": BM25_B,
        "ngrams": list(NGRAM_RANGE),
        "tokens": "lower-cased word characters (regex " + TOKEN_PATTERN + ")",
        "query": {"knowmem": "question + ' ' + answer",
                  "verbmem": f"the first {VERBMEM_QUERY_WORDS} words of the prompt; windows of as many words "
                             f"every {VERBMEM_WINDOW_STRIDE} words of prompt + gt give runs_into"},
        "margin": "(s1 - s2) / s1: s1 the top document's score, s2 the best score of a document with another text",
        "threshold": threshold,
        "rule": "assign the top document when margin >= threshold, else ambiguous; no_match when no document "
                "shares a term with the query; records that carry doc_id keep it (given)",
    }


# --------------------------------------------------------------------------- BM25


class BM25Index:
    """BM25 scores of queries against a fixed list of documents (sparse, vectorised).

    The per-document term weights ``idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |D| / avgdl))``
    are computed once; a query's scores are then one sparse product with its term counts.
    Document length |D| counts unigrams only, so adding bigrams does not change it.
    """

    def __init__(self, texts: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> None:
        import numpy as np
        from sklearn.feature_extraction.text import CountVectorizer

        if not texts:
            raise UsageError("BM25 needs at least one document")
        self.vectorizer = CountVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, ngram_range=NGRAM_RANGE,
                                          dtype=np.float64)
        try:
            counts = self.vectorizer.fit_transform(list(texts)).tocoo()
        except ValueError:  # every document is empty: nothing can match
            self.weights = None
            self.size = len(texts)
            return
        unigram = np.array([" " not in term for term in self.vectorizer.get_feature_names_out()])
        lengths = np.bincount(counts.row, weights=counts.data * unigram[counts.col], minlength=counts.shape[0])
        mean_length = lengths.mean() if lengths.mean() > 0 else 1.0
        doc_freq = np.bincount(counts.col, minlength=counts.shape[1])
        idf = np.log1p((counts.shape[0] - doc_freq + 0.5) / (doc_freq + 0.5))
        tf = counts.data
        counts.data = idf[counts.col] * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * lengths[counts.row] / mean_length))
        self.weights = counts.tocsr()
        self.size = counts.shape[0]

    def scores(self, queries: Sequence[str]):
        """``(len(queries), len(documents))`` array of scores; a repeated query term counts
        as often as it occurs (qtf)."""
        import numpy as np

        if self.weights is None:
            return np.zeros((len(queries), self.size))
        query_counts = self.vectorizer.transform(list(queries))
        return (query_counts @ self.weights.T).toarray()


def attribute_items(
    queries: Sequence[str],
    texts: Sequence[str],
    doc_ids: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    index: BM25Index | None = None,
) -> list[ItemAttribution]:
    """Rank ``texts`` for each query and assign or mark ambiguous (see the module docstring).

    Ties are broken by document order, so the result depends only on the inputs.
    """
    import numpy as np

    if len(texts) != len(doc_ids):
        raise ValueError("one id per document")
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"attribution threshold must lie in [0, 1), got {threshold}")
    index = index or BM25Index(texts)
    # Verbatim copies compete as one candidate: group them by text.
    group_of: dict[str, int] = {}
    groups: list[list[int]] = []
    for position, text in enumerate(texts):
        if text not in group_of:
            group_of[text] = len(groups)
            groups.append([])
        groups[group_of[text]].append(position)
    group = np.array([group_of[t] for t in texts])
    results = []
    for row in index.scores(queries):
        # Best score per text group, reached first by the group's first record.
        best_per_group = np.full(len(groups), -np.inf)
        np.maximum.at(best_per_group, group, row)
        order = np.argsort(-best_per_group, kind="stable")
        top_score = best_per_group[order[0]]
        if top_score <= 0.0:
            results.append(ItemAttribution(NO_MATCH, None, None, 0.0))
            continue
        runner_up = best_per_group[order[1]] if len(groups) > 1 else 0.0
        margin = float((top_score - max(runner_up, 0.0)) / top_score)
        members = [doc_ids[i] for i in groups[order[0]]]
        if margin >= threshold:
            results.append(ItemAttribution(ATTRIBUTED, members[0], members[0], margin, tuple(members[1:])))
        else:
            results.append(ItemAttribution(AMBIGUOUS, None, members[0], margin))
    return results


def _query(split_key: str, record: Mapping[str, Any]) -> str:
    if split_key.startswith("verbmem/"):
        return " ".join(record["prompt"].split()[:VERBMEM_QUERY_WORDS])
    return f"{record['question']} {record['answer']}"


def _later_windows(record: Mapping[str, Any]) -> list[str]:
    """Queries for the later parts of a verbmem passage: :data:`VERBMEM_QUERY_WORDS` words
    every :data:`VERBMEM_WINDOW_STRIDE` words of prompt + gt (a last window shorter than half
    the size is dropped: too few words to place)."""
    words = (record["prompt"] + " " + record["gt"]).split()
    starts = range(VERBMEM_WINDOW_STRIDE, len(words) - VERBMEM_QUERY_WORDS // 2, VERBMEM_WINDOW_STRIDE)
    return [" ".join(words[start:start + VERBMEM_QUERY_WORDS]) for start in starts]


def _with_runs_into(
    item: ItemAttribution, record: Mapping[str, Any], texts, doc_ids, threshold: float, index: BM25Index
) -> ItemAttribution:
    """``item`` with the documents that the passage's later windows land in (MUSE's verbmem
    passages often start in one article and run on into the next)."""
    later = []
    for window in attribute_items(_later_windows(record), texts, doc_ids, threshold, index):
        if window.assigned and window.doc_id not in item.documents and window.doc_id not in later:
            later.append(window.doc_id)
    return replace(item, runs_into=tuple(later)) if later else item


def attribute_split(
    split_key: str,
    records: Sequence[Mapping[str, Any]],
    documents: Sequence[Mapping[str, Any]],
    doc_ids: Sequence[str],
    document_splits: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    index: BM25Index | None = None,
) -> SplitAttribution:
    """Attribute the records of one evaluation split against ``documents``; a record's own
    ``doc_id`` wins (status ``given``)."""
    to_rank = [i for i, r in enumerate(records) if r.get("doc_id") is None]
    ranked = {}
    if to_rank:
        texts = [d["text"] for d in documents]
        index = index or BM25Index(texts)
        found = attribute_items([_query(split_key, records[i]) for i in to_rank], texts, doc_ids, threshold, index)
        if split_key.startswith("verbmem/"):
            found = [_with_runs_into(item, records[i], texts, doc_ids, threshold, index)
                     for i, item in zip(to_rank, found)]
        ranked = dict(zip(to_rank, found))
    items = tuple(ranked[i] if i in ranked else ItemAttribution(GIVEN, str(r["doc_id"]))
                  for i, r in enumerate(records))
    return SplitAttribution(key=split_key, documents=tuple(document_splits), items=items)


def split_document_ids(data, names: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The records of raw splits ``names`` and their ids: a record's ``doc_id``, else
    ``<split>-<position>`` (as :func:`benchmarks.core.recovery.document_ids` names forget
    documents, so the ids agree with those of the T/V split)."""
    records, ids = [], []
    for name in names:
        split_records = data.records("raw", name)
        records.extend(split_records)
        ids.extend(document_ids(split_records, prefix=name))
    return records, ids


# --------------------------------------------------------------------------- data sets


def _cache_key(data, threshold: float) -> str:
    hashed = {}
    for key, names in DOCUMENT_SPLITS.items():
        subset, name = key.split("/")
        if data.has(subset, name):
            hashed[key] = data.split(subset, name).sha256
        for raw in names:
            if data.has("raw", raw):
                hashed[f"raw/{raw}"] = data.split("raw", raw).sha256
    blob = json.dumps({"method": method_description(threshold), "splits": hashed}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def attribute_data(
    data, threshold: float = DEFAULT_THRESHOLD, cache_dir: str | os.PathLike | None = None
) -> DataAttribution:
    """Attribute ``knowmem/forget_qa``, ``verbmem/forget`` and ``knowmem/retain_qa`` of a
    ``MuseData`` to their raw documents (see :data:`DOCUMENT_SPLITS`).

    A split that is absent, or whose raw documents are absent (the shared MUSE-News copy has
    no raw/retain1), is listed under ``unavailable`` with the reason, unless all its records
    carry ``doc_id``. With ``cache_dir`` the result is stored as JSON keyed by the method and
    the sha256 of the splits, and read back on the next call.
    """
    cache_path = Path(cache_dir) / f"attribution-{_cache_key(data, threshold)}.json" if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        try:
            cached = DataAttribution.from_dict(json.loads(cache_path.read_text(encoding="utf-8")))
            logger.info("attribution read from %s", cache_path)
            return cached
        except (ValueError, KeyError, TypeError) as err:  # a damaged cache file is rebuilt, not trusted
            logger.warning("ignoring unreadable attribution cache %s (%s)", cache_path, err)

    splits: dict[str, SplitAttribution] = {}
    unavailable: dict[str, str] = {}
    indexes: dict[tuple[str, ...], BM25Index] = {}  # forget questions and verbmem share raw/forget's index
    for key, names in DOCUMENT_SPLITS.items():
        subset, name = key.split("/")
        if not data.has(subset, name):
            unavailable[key] = f"the data has no split {key}"
            continue
        records = data.split(subset, name).records
        absent = [raw for raw in names if not data.has("raw", raw)]
        if all(r.get("doc_id") is not None for r in records):
            documents, ids = [], []
        elif absent:
            unavailable[key] = f"its documents ({', '.join('raw/' + raw for raw in absent)}) are not in the data"
            continue
        else:
            documents, ids = split_document_ids(data, names)
            if names not in indexes:
                indexes[names] = BM25Index([d["text"] for d in documents])
        splits[key] = attribute_split(key, records, documents, ids, names, threshold, indexes.get(names))
        coverage = splits[key].coverage()
        logger.info("%s: %d of %d items assigned to a document (%d given, %d ambiguous, %d without a match)",
                    key, coverage["assigned"], coverage["items"], coverage[GIVEN], coverage[AMBIGUOUS],
                    coverage[NO_MATCH])
    result = DataAttribution(method=method_description(threshold), splits=splits, unavailable=unavailable)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.to_dict(), sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_path)  # atomic: a concurrent reader sees the old file or the whole new one
    return result
