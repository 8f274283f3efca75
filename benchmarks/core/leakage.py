"""Which forget questions may count as held out (V): the leakage guard.

Knowledge on V that an attack brings back is *recovered* only if the attacker's documents T do
not contain it (Deeb & Roger, 2024). With attributed rather than given documents (see
:mod:`benchmarks.core.attribution`) three things can let T leak into V, and each is a rule:

1. ``ambiguous`` -- the question has no confidently attributed document, so it may well come
   from a T document;
2. ``document_in_T`` -- its attributed document (or a verbatim copy of it) is in T;
3. ``answer_in_T`` -- its normalised answer (:func:`~benchmarks.core.attribution.normalize_text`)
   occurs as a substring of some T document: whatever its source, an attacker who trained on
   that document has seen the answer. A substring test removes more than a word-boundary test
   would ("12" inside "2012"); a guard should err that way.

The rules are applied in this order and each removed question is counted under the first rule
that removes it, so the counts add up to the number removed. T's questions are those whose
attributed document is in T (the answer rule does not apply to them: T is scored as it is).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from benchmarks.core.attribution import SplitAttribution, normalize_text
from benchmarks.core.recovery import DocumentSplit, ItemGroups

__all__ = ["RULES", "GUARD_RULE", "guarded_groups"]

AMBIGUOUS, DOCUMENT_IN_T, ANSWER_IN_T = "ambiguous", "document_in_T", "answer_in_T"
#: The rules in the order they are applied.
RULES = (AMBIGUOUS, DOCUMENT_IN_T, ANSWER_IN_T)
#: What a result file says about the guard.
GUARD_RULE = (
    "a forget question counts for V only if it is attributed to a document (not ambiguous), that document "
    "and its verbatim copies are not in T, and its normalised answer (NFKC, case-folded, whitespace collapsed) "
    "occurs as a substring of no T document; removals are counted under the first rule that applies, in the "
    "order ambiguous, document_in_T, answer_in_T"
)


def guarded_groups(
    records: Sequence[Mapping[str, Any]],
    attribution: SplitAttribution,
    split: DocumentSplit,
    text_of: Mapping[str, str],
) -> ItemGroups:
    """T's and V's questions under the guard; ``removed`` counts V's removals per rule.

    ``records`` are the forget questions in the order ``attribution`` covers them;
    ``text_of`` maps every forget document id to its text (T's texts are read from it).
    """
    if len(records) != len(attribution):
        raise ValueError(f"{len(records)} questions but {len(attribution)} attributions")
    train_ids = set(split.train)
    train_texts = [normalize_text(text_of[d]) for d in split.train]
    removed = {rule: 0 for rule in RULES}
    train, held_out = [], []
    for index, (record, item) in enumerate(zip(records, attribution.items)):
        if not item.assigned:
            removed[AMBIGUOUS] += 1
            continue
        if any(d in train_ids for d in item.documents):
            removed[DOCUMENT_IN_T] += 1
            if item.doc_id in train_ids:
                train.append(index)
            continue
        if item.doc_id not in text_of:
            # Attributed to a document outside the forget set: neither T's nor V's.
            continue
        answer = normalize_text(record["answer"])
        if answer and any(answer in text for text in train_texts):
            removed[ANSWER_IN_T] += 1
            continue
        held_out.append(index)
    return ItemGroups(tuple(range(len(records))), tuple(train), tuple(held_out), removed=removed)
