"""The MUSE metrics (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for
Language Models", §3 and their evaluation code), computed exactly as MUSE defines them.

- **VerbMem-forget**: greedy-decode 128 new tokens after each verbmem ``prompt``; ROUGE-L F1
  against ``gt`` cut to its first 128 tokens; mean × 100.
- **KnowMem-forget / -retain**: prompt = ICL examples ``Question: {q}\\nAnswer: {a}\\n\\n``
  followed by ``Question: {q}\\nAnswer: ``; greedy-decode 32 new tokens; cut the output at the
  first ``\\n\\n``, ``\\nQuestion`` or ``Question:``; ROUGE-L F1 against the answer; mean × 100.
- **PrivLeak**: Min-40% score per text; ROC AUC of forget (class 0) vs holdout (class 1) texts
  with minus the Min-K% score as classifier score; (AUC − AUC_retrain) / AUC_retrain × 100.

ROUGE is the ``rouge-score`` package's ``rougeL`` F-measure without stemming, as in MUSE.
The metric functions take plain lists of records, so they run on any subset of questions
(for instance only those of documents an attacker never saw); :func:`evaluate` runs metrics
chosen by exact name on a whole data set.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch

from benchmarks.core.batching import pad_batch
from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.generation import greedy_generate
from benchmarks.core.logprobs import target_mask, token_logps
from benchmarks.core.models import context_length
from benchmarks.core.registry import Registry

logger = logging.getLogger(__name__)

KNOWMEM_MAX_NEW_TOKENS = 32
VERBMEM_MAX_NEW_TOKENS = 128
MIN_K_FRACTION = 0.4
# Where MUSE cuts a KnowMem answer: the model has started the next ICL example.
ANSWER_STOPS = ("\n\n", "\nQuestion", "Question:")
# Forget-vs-holdout Min-40% AUC of the MUSE-News retrain model, as published with MUSE
# (Shi et al., 2024; AUC_RETRAIN["news"]["forget_holdout_Min-40%"] in their code).
MUSE_NEWS_RETRAIN_AUC = 0.4772
MUSE_NEWS_RETRAIN_AUC_SOURCE = "published MUSE-News retrain value (Shi et al., 2024)"


# --------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class GenerationItem:
    """One scored generation. ``score`` is ROUGE-L F1 × 100, the scale of the aggregate,
    so the aggregate is the plain mean of the item scores."""

    prompt: str
    generation: str
    reference: str
    score: float
    doc_id: Any = None
    # KnowMem only: the decoded output before it was cut at ANSWER_STOPS (generation stops
    # once it holds one, so it ends with the first stop string).
    raw_generation: str | None = None


@dataclass(frozen=True)
class MembershipItem:
    """One text scored for PrivLeak: its split, its Min-K% score and how many tokens it had."""

    split: str
    text: str
    min_k: float
    num_tokens: int
    doc_id: Any = None


@dataclass
class MetricResult:
    """A metric's value (on MUSE's 0–100 scale), the per-item log behind it, and any
    intermediate numbers (PrivLeak's AUCs)."""

    name: str
    score: float
    items: list[GenerationItem | MembershipItem] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"score": float(self.score)}
        if self.details:
            out["details"] = dict(self.details)
        if with_items:
            out["items"] = [
                {key: value for key, value in asdict(item).items() if value is not None}
                for item in self.items
            ]
        return out


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`: one :class:`MetricResult` per metric, in run order."""

    results: dict[str, MetricResult]

    @property
    def scores(self) -> dict[str, float]:
        return {name: float(result.score) for name, result in self.results.items()}

    def to_dict(self, with_items: bool = False) -> dict[str, Any]:
        return {name: result.to_dict(with_items) for name, result in self.results.items()}


# --------------------------------------------------------------------------- text scoring


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (``rouge-score``, ``rougeL``, no stemmer), as MUSE scores."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def truncate_answer(text: str) -> str:
    """Cut a KnowMem output at the first ``\\n\\n``, ``\\nQuestion`` or ``Question:``."""
    cut = len(text)
    for stop in ANSWER_STOPS:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def knowmem_prompt(icl_examples: Sequence[Mapping[str, str]], question: str) -> str:
    """MUSE's KnowMem prompt: every ICL example as ``Question: {q}\\nAnswer: {a}\\n\\n``, then
    ``Question: {q}\\nAnswer: `` (with the trailing space)."""
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in icl_examples)
    return shots + f"Question: {question}\nAnswer: "


def truncate_reference(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens and decoded back.

    As MUSE's VerbMem code does, the text is tokenised with ``add_special_tokens=True`` before
    cutting, so with a BOS-prepending tokenizer the BOS is one of the ``max_tokens``.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _field(record: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in record:
        raise DataError(f"{where} record lacks the field {name!r} (has: {', '.join(record) or 'none'})")
    return record[name]


# --------------------------------------------------------------------------- KnowMem / VerbMem


def knowmem(
    model,
    tokenizer,
    qa_records: Sequence[Mapping[str, Any]],
    icl_records: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    progress: bool = False,
    name: str = "knowmem",
) -> MetricResult:
    """KnowMem: mean ROUGE-L F1 × 100 of the truncated greedy answers against the answers."""
    if not qa_records:
        raise DataError(f"{name}: no questions to evaluate")
    icl = [
        {"question": _field(r, "question", "knowmem ICL"), "answer": _field(r, "answer", "knowmem ICL")}
        for r in icl_records
    ]
    prompts = [knowmem_prompt(icl, _field(r, "question", "knowmem")) for r in qa_records]
    answers = [str(_field(r, "answer", "knowmem")) for r in qa_records]
    # Generation stops once an answer is cut (the cut answer is unchanged, see generation.py).
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, ANSWER_STOPS)
    items = []
    for record, prompt, answer, output in zip(qa_records, prompts, answers, outputs):
        generation = truncate_answer(output)
        items.append(
            GenerationItem(
                prompt=prompt,
                generation=generation,
                reference=answer,
                score=100.0 * rouge_l_f1(generation, answer),
                doc_id=_doc_id(record),
                raw_generation=output,
            )
        )
    return MetricResult(name, _mean(item.score for item in items), items)


def verbmem(
    model,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    progress: bool = False,
    name: str = "verbmem",
) -> MetricResult:
    """VerbMem: mean ROUGE-L F1 × 100 of the greedy continuation against the ground truth
    cut to ``max_new_tokens`` tokens."""
    if not records:
        raise DataError(f"{name}: no prompts to evaluate")
    prompts = [str(_field(r, "prompt", "verbmem")) for r in records]
    references = [truncate_reference(tokenizer, str(_field(r, "gt", "verbmem")), max_new_tokens) for r in records]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    items = [
        GenerationItem(
            prompt=prompt,
            generation=output,
            reference=reference,
            score=100.0 * rouge_l_f1(output, reference),
            doc_id=_doc_id(record),
        )
        for record, prompt, reference, output in zip(records, prompts, references, outputs)
    ]
    return MetricResult(name, _mean(item.score for item in items), items)


# --------------------------------------------------------------------------- PrivLeak


def min_k_count(num_tokens: int, fraction: float = MIN_K_FRACTION) -> int:
    """How many of ``num_tokens`` token log-probs make up "the lowest K%":
    ``max(1, int(num_tokens * fraction))``.

    MUSE uses ``int(num_tokens * fraction)``, which is 0 (and the mean undefined) for texts
    of fewer than 3 tokens at K = 40%; keeping at least one token agrees with MUSE on every
    text it can score.
    """
    if num_tokens < 1:
        raise ValueError("Min-K% needs at least one predicted token")
    return max(1, int(num_tokens * fraction))


def min_k_score(token_log_probs: torch.Tensor | Sequence[float], fraction: float = MIN_K_FRACTION) -> float:
    """Min-K% score of one text: minus the mean of its lowest ``min_k_count`` token
    log-probabilities (Shi et al., 2024, "Detecting Pretraining Data from Large Language
    Models"; MUSE's ``Min-40%``). Higher means the text looks less familiar to the model."""
    values = torch.as_tensor(token_log_probs, dtype=torch.float64).flatten()
    k = min_k_count(values.numel(), fraction)
    lowest = torch.sort(values).values[:k]
    return float(-lowest.mean())


@torch.inference_mode()
def min_k_scores(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    fraction: float = MIN_K_FRACTION,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """``(Min-K% score, number of scored tokens)`` for each text, in order.

    Each text is tokenised whole as MUSE does (``add_special_tokens=True``) and cut only
    where it exceeds the model's context (keeping its beginning). Texts are scored in
    right-padded batches; :func:`target_mask` keeps padding out of every score, so the
    result does not depend on ``batch_size``.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    limit = context_length(model)
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"][:limit] for text in texts]
    for index, ids in enumerate(encoded):
        if len(ids) < 2:
            raise DataError(
                f"text {index} ({texts[index][:40]!r}) has {len(ids)} token(s); Min-K% needs "
                "at least one predicted token"
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="min-k", unit="batch")
    device = next(model.parameters()).device
    scores: list[tuple[float, int] | None] = [None] * len(texts)
    for batch in batches:
        padded = pad_batch([encoded[index] for index in batch], pad_id)
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_token = token_logps(logits, input_ids)
        mask = target_mask(attention_mask)
        for row, index in enumerate(batch):
            values = per_token[row][mask[row]].cpu()
            scores[index] = (min_k_score(values, fraction), int(values.numel()))
    return scores  # type: ignore[return-value]


def forget_holdout_auc(forget_min_k: Sequence[float], holdout_min_k: Sequence[float]) -> float:
    """ROC AUC with the holdout texts as the positive class and minus the Min-K% score as
    the classifier score (MUSE's ``forget_holdout`` orientation): a model that memorised
    the forget texts scores them as more familiar than the holdout texts, giving AUC ≈ 0;
    a model that never saw either gives AUC ≈ 0.5."""
    if not forget_min_k or not holdout_min_k:
        raise DataError("PrivLeak needs at least one forget text and one holdout text")
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_min_k) + [1] * len(holdout_min_k)
    classifier_score = [-float(s) for s in list(forget_min_k) + list(holdout_min_k)]
    return float(roc_auc_score(labels, classifier_score))


def privleak_score(auc: float, retrain_auc: float) -> float:
    """PrivLeak = (AUC − AUC_retrain) / AUC_retrain × 100 (MUSE §3): about −100 for a model
    that memorised the forget set, 0 for the retrain model, > 0 when over-unlearned."""
    if not 0.0 < retrain_auc <= 1.0:
        raise UsageError(
            f"retrain AUC must lie in (0, 1] for PrivLeak's ratio, got {retrain_auc}; a retrain "
            "model that separates forget from holdout texts perfectly cannot serve as reference"
        )
    return (auc - retrain_auc) / retrain_auc * 100.0


def privleak(
    model,
    tokenizer,
    forget_records: Sequence[Mapping[str, Any]],
    holdout_records: Sequence[Mapping[str, Any]],
    retrain_auc: float | None = None,
    batch_size: int = 16,
    as_retrain: bool = False,
    progress: bool = False,
    name: str = "privleak",
) -> MetricResult:
    """PrivLeak of ``model``. AUC_retrain is ``retrain_auc`` when given; with ``as_retrain``
    the model is itself the retrain reference (its PrivLeak is 0 by definition); otherwise
    the published MUSE-News value :data:`MUSE_NEWS_RETRAIN_AUC` is used."""
    splits = [("forget", r) for r in forget_records] + [("holdout", r) for r in holdout_records]
    texts = [str(_field(r, "text", f"privleak {split}")) for split, r in splits]
    scored = min_k_scores(model, tokenizer, texts, batch_size, progress=progress)
    items = [
        MembershipItem(split=split, text=text, min_k=score, num_tokens=count, doc_id=_doc_id(record))
        for (split, record), text, (score, count) in zip(splits, texts, scored)
    ]
    auc = forget_holdout_auc(
        [i.min_k for i in items if i.split == "forget"], [i.min_k for i in items if i.split == "holdout"]
    )
    if as_retrain:
        reference, source = auc, "this model (it is the retrain model)"
    elif retrain_auc is not None:
        reference, source = float(retrain_auc), "retrain model"
    else:
        reference, source = MUSE_NEWS_RETRAIN_AUC, MUSE_NEWS_RETRAIN_AUC_SOURCE
        logger.info("PrivLeak uses AUC_retrain = %s, the %s", reference, source)
    details = {
        "auc": auc,
        "retrain_auc": reference,
        "retrain_auc_source": source,
        "min_k_fraction": MIN_K_FRACTION,
    }
    # The retrain model is its own reference: 0 by definition, even where its AUC is 0.
    score = 0.0 if as_retrain else privleak_score(auc, reference)
    return MetricResult(name, score, items, details)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EvalSettings:
    """What every metric run needs besides the model and the data."""

    batch_size: int = 16
    retrain_auc: float | None = None
    as_retrain: bool = False
    progress: bool = False


@dataclass(frozen=True)
class MetricSpec:
    """A metric by exact name: its table label, which direction an unlearned model should
    move it, the ``(subset, split)`` pairs it reads, and how to run it on a ``MuseData``."""

    name: str
    label: str
    goal: str  # "lower", "higher" or "closer to 0", from the unlearner's point of view
    splits: tuple[tuple[str, str], ...]
    run: Callable[[Any, Any, Any, EvalSettings], MetricResult]


METRICS: Registry[MetricSpec] = Registry("metric")


def _register(name: str, label: str, goal: str, splits: tuple[tuple[str, str], ...]):
    def add(run: Callable[[Any, Any, Any, EvalSettings], MetricResult]):
        METRICS.register(name)(MetricSpec(name, label, goal, splits, run))
        return run

    return add


@_register("verbmem_forget", "VerbMem-forget", "lower", (("verbmem", "forget"),))
def _run_verbmem_forget(model, tokenizer, data, settings: EvalSettings) -> MetricResult:
    return verbmem(
        model, tokenizer, data.records("verbmem", "forget"),
        batch_size=settings.batch_size, progress=settings.progress, name="verbmem_forget",
    )


@_register("knowmem_forget", "KnowMem-forget", "lower",
           (("knowmem", "forget_qa"), ("knowmem", "forget_qa_icl")))
def _run_knowmem_forget(model, tokenizer, data, settings: EvalSettings) -> MetricResult:
    return knowmem(
        model, tokenizer, data.records("knowmem", "forget_qa"), data.records("knowmem", "forget_qa_icl"),
        batch_size=settings.batch_size, progress=settings.progress, name="knowmem_forget",
    )


@_register("knowmem_retain", "KnowMem-retain", "higher",
           (("knowmem", "retain_qa"), ("knowmem", "retain_qa_icl")))
def _run_knowmem_retain(model, tokenizer, data, settings: EvalSettings) -> MetricResult:
    return knowmem(
        model, tokenizer, data.records("knowmem", "retain_qa"), data.records("knowmem", "retain_qa_icl"),
        batch_size=settings.batch_size, progress=settings.progress, name="knowmem_retain",
    )


@_register("privleak", "PrivLeak", "closer to 0", (("privleak", "forget"), ("privleak", "holdout")))
def _run_privleak(model, tokenizer, data, settings: EvalSettings) -> MetricResult:
    return privleak(
        model, tokenizer, data.records("privleak", "forget"), data.records("privleak", "holdout"),
        retrain_auc=settings.retrain_auc, batch_size=settings.batch_size,
        as_retrain=settings.as_retrain, progress=settings.progress, name="privleak",
    )


# MUSE's column order.
DEFAULT_METRICS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")


def parse_metric_names(spec: str | Sequence[str]) -> list[str]:
    """Validated metric names from ``"a,b"`` or a list (duplicates dropped, order kept);
    an unknown name raises :class:`UsageError` listing the valid ones."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no metric given; valid names: {', '.join(METRICS.names())}")
    for name in names:
        METRICS.get(name)
    return list(dict.fromkeys(names))


def required_splits(names: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(subset, split)`` pairs the named metrics read, in order, without repeats."""
    return list(dict.fromkeys(pair for name in names for pair in METRICS.get(name).splits))


def evaluate(
    model,
    tokenizer,
    data,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 16,
    retrain_auc: float | None = None,
    as_retrain: bool = False,
    progress: bool = False,
) -> EvaluationResult:
    """Run the named metrics on ``data`` (a ``MuseData``: anything with
    ``records(subset, split)``) and return their scores and per-item logs.

    ``retrain_auc``: the retrain model's forget-vs-holdout AUC for PrivLeak (default: the
    published MUSE-News value); ``as_retrain``: ``model`` is the retrain model itself.
    """
    names = parse_metric_names(metrics)
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    settings = EvalSettings(batch_size, retrain_auc, as_retrain, progress)
    was_training = model.training
    model.eval()
    try:
        results = {}
        for name in names:
            logger.info("evaluating %s", name)
            results[name] = METRICS.get(name).run(model, tokenizer, data, settings)
            logger.info("%s = %.2f", name, results[name].score)
    finally:
        model.train(was_training)
    return EvaluationResult(results)


def _doc_id(record: Mapping[str, Any]) -> Any:
    return record.get("doc_id")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
