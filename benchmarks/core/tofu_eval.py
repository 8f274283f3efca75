"""TOFU evaluation of one model: answer losses, greedy answers, and the TOFU table.

The metric definitions live in :mod:`benchmarks.core.tofu_metrics`; this module only feeds them.
What is measured where (open-unlearning's TOFU suite):

| set | Prob | ROUGE | truth ratio (correct answer, aggregate) |
|---|---|---|---|
| forget (``forgetXX_perturbed``) | exp(−L(answer)) | answer | paraphrased, min(TR, 1/TR) |
| retain (``retain_perturbed``) | exp(−L(answer)) | answer | paraphrased, max(0, 1 − TR) |
| real authors, world facts | normalised | answer | plain answer, max(0, 1 − TR) |

plus forget quality (KS test of the forget truth ratios against the retrain model's on the same
items) and model utility (harmonic mean of the 9 non-forget numbers).

Batching never changes a score: likelihoods are computed on right-padded batches with only
answer tokens counted, generation on left-padded prompts with position ids from the attention
mask (``generate`` derives them), so every row sees what it would see alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from benchmarks.core.chat_format import PromptSettings, collate_pairs, encode_pair, pad_id_for, prompt_ids
from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import token_logps
from benchmarks.core.tofu_data import TofuData, TofuItem
from benchmarks.core import tofu_metrics as tm

logger = logging.getLogger(__name__)

#: open-unlearning's TOFU generation: greedy, up to 200 new tokens.
ROUGE_MAX_NEW_TOKENS = 200
FORGET_ROLE = "forget_perturbed"
UTILITY_ROLES = ("retain_perturbed", "real_authors", "world_facts")
_PREFIX = {"forget_perturbed": "forget", "retain_perturbed": "retain",
           "real_authors": "real_authors", "world_facts": "world_facts"}


@dataclass(frozen=True)
class TofuEvalSettings:
    prompt: PromptSettings = field(default_factory=PromptSettings)
    batch_size: int = 16
    max_new_tokens: int = ROUGE_MAX_NEW_TOKENS
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_losses(model, tokenizer, pairs: Sequence[tuple[str, str]], settings: TofuEvalSettings) -> list[float]:
    """Mean per-token NLL of each answer given its question (answer + closing end-of-turn)."""
    encoded = [encode_pair(tokenizer, q, a, settings.prompt) for q, a in pairs]
    pad_id = pad_id_for(tokenizer, settings.prompt)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    losses: list[float] = [0.0] * len(encoded)
    device = _device(model)
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        batch = collate_pairs([encoded[i] for i in rows], pad_id, settings.prompt.eot_padding)
        input_ids = batch["input_ids"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
        per_token = token_logps(logits, input_ids)
        # The loss mask alone picks the targets: under eot_padding the closing <|eot_id|> is
        # masked out of attention yet still scored, as open-unlearning's labels keep it.
        mask = batch["loss_mask"][:, 1:].to(device).bool()
        nll = -(per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        for row, index in enumerate(rows):
            losses[index] = float(nll[row])
    return losses


@torch.no_grad()
def generate_answers(model, tokenizer, questions: Sequence[str], settings: TofuEvalSettings) -> list[str]:
    """Greedy answers (up to ``max_new_tokens``, stopping at EOS), decoded without special tokens."""
    from transformers import GenerationConfig

    from benchmarks.core.generation import _cut_at_eos, _eos_token_ids

    encoded = [prompt_ids(tokenizer, q, settings.prompt) for q in questions]
    pad_id = pad_id_for(tokenizer, settings.prompt)
    eos_ids = _eos_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = _device(model)
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        if settings.prompt.eot_padding:
            attention_mask = (input_ids != pad_id).long()
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   generation_config=config)
        for row, index in enumerate(rows):
            new = _cut_at_eos(generated[row, width:].tolist(), eos_ids)
            outputs[index] = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return outputs


@dataclass
class SetScores:
    """One evaluation set's aggregates and per-item records."""

    role: str
    prob: float
    rouge: float | None
    truth_ratio: float
    truth_ratios: dict[int, float]
    items: list[dict[str, Any]]


def score_items(
    model, tokenizer, role: str, items: Sequence[TofuItem], settings: TofuEvalSettings, with_rouge: bool = True,
) -> SetScores:
    """Prob, ROUGE and truth ratio of ``items`` from one role (see the table above)."""
    if not items:
        raise UsageError(f"no {role} items to evaluate")
    utility = role in ("real_authors", "world_facts")
    for item in items:
        if not item.perturbed_answers or (not utility and item.paraphrased_answer is None):
            raise UsageError(f"{role} item {item.index} lacks perturbed/paraphrased answers; load the *_perturbed config")
    # One batched pass over every answer the set needs: plain, (paraphrased), perturbed.
    pairs: list[tuple[str, str]] = []
    spans = []
    for item in items:
        start = len(pairs)
        pairs.append((item.question, item.answer))
        if not utility:
            pairs.append((item.question, item.paraphrased_answer))
        pairs.extend((item.question, wrong) for wrong in item.perturbed_answers)
        spans.append(start)
    losses = answer_losses(model, tokenizer, pairs, settings)
    generations = generate_answers(model, tokenizer, [i.question for i in items], settings) if with_rouge else None
    records, probs, ratios, rouges = [], [], {}, []
    for position, (item, start) in enumerate(zip(items, spans)):
        plain = losses[start]
        correct = plain if utility else losses[start + 1]
        wrong = losses[start + (1 if utility else 2) : start + (1 if utility else 2) + len(item.perturbed_answers)]
        prob = tm.normalised_prob(plain, wrong) if utility else tm.answer_prob(plain)
        ratio = tm.truth_ratio(correct, wrong)
        record = {"index": item.index, "author": item.author, "question": item.question, "answer": item.answer,
                  "prob": prob, "truth_ratio": ratio, "answer_nll": plain, "correct_nll": correct,
                  "perturbed_nll": list(wrong)}
        if generations is not None:
            rouge = tm.rouge_l_recall(generations[position], item.answer)
            record.update(generation=generations[position], rouge=rouge)
            rouges.append(rouge)
        probs.append(prob)
        ratios[item.index] = ratio
        records.append(record)
    aggregate = tm.truth_ratio_closer_to_1 if role == FORGET_ROLE else tm.truth_ratio_true_better
    return SetScores(
        role=role,
        prob=sum(probs) / len(probs),
        rouge=sum(rouges) / len(rouges) if rouges else None,
        truth_ratio=aggregate(list(ratios.values())),
        truth_ratios=ratios,
        items=records,
    )


@dataclass
class TofuResult:
    """The TOFU table's numbers for one model, and what is needed to audit them."""

    scores: dict[str, float | None]
    sets: dict[str, SetScores]

    @property
    def forget_truth_ratios(self) -> dict[int, float]:
        return self.sets[FORGET_ROLE].truth_ratios

    def to_dict(self, with_items: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scores": dict(self.scores),
            # Always kept: a later run can use them as the retrain reference (forget quality).
            "forget_truth_ratios": {int(k): float(v) for k, v in self.forget_truth_ratios.items()},
        }
        if with_items:
            out["items"] = {role: s.items for role, s in self.sets.items()}
        return out


def forget_quality_on(model_ratios: Mapping[int, float], retrain_ratios: Mapping[int, float] | None) -> float | None:
    """Forget quality over the items both have (None without retrain values); the retrain values
    must cover every item the model was scored on, so the two samples are the same questions."""
    if retrain_ratios is None:
        return None
    missing = sorted(set(model_ratios) - set(retrain_ratios))
    if missing:
        raise UsageError(
            f"the retrain reference has no truth ratio for forget items {missing[:5]}...; evaluate the retrain "
            "model on the same forget split"
        )
    keys = sorted(model_ratios)
    return tm.forget_quality([model_ratios[k] for k in keys], [retrain_ratios[k] for k in keys])


def evaluate_tofu(
    model,
    tokenizer,
    data: TofuData,
    settings: TofuEvalSettings,
    retrain_truth_ratios: Mapping[int, float] | None = None,
    forget_items: Sequence[TofuItem] | None = None,
    utility: bool = True,
) -> TofuResult:
    """The TOFU table for ``model``: forget Prob/ROUGE/truth ratio (on ``forget_items``, default
    the whole forget split), forget quality when retrain truth ratios are given, and (with
    ``utility``) the 9 utility numbers and model utility."""
    model.eval()
    sets = {FORGET_ROLE: score_items(model, tokenizer, FORGET_ROLE,
                                     list(forget_items) if forget_items is not None else data[FORGET_ROLE].items,
                                     settings)}
    forget = sets[FORGET_ROLE]
    scores: dict[str, float | None] = {
        "forget_prob": forget.prob,
        "forget_rouge": forget.rouge,
        "forget_truth_ratio": forget.truth_ratio,
        "forget_quality": forget_quality_on(forget.truth_ratios, retrain_truth_ratios),
    }
    if utility:
        parts = {}
        for role in UTILITY_ROLES:
            result = score_items(model, tokenizer, role, data[role].items, settings)
            sets[role] = result
            prefix = _PREFIX[role]
            parts.update({f"{prefix}_prob": result.prob, f"{prefix}_rouge": result.rouge,
                          f"{prefix}_truth_ratio": result.truth_ratio})
        scores.update(parts)
        scores["model_utility"] = tm.model_utility(parts)
    return TofuResult(scores=scores, sets=sets)


#: Columns of the TOFU table, in open-unlearning's order, with what is better.
TABLE_COLUMNS = (
    ("forget_prob", "forget Prob ↓"),
    ("forget_rouge", "forget ROUGE ↓"),
    ("forget_truth_ratio", "forget TR"),
    ("forget_quality", "forget quality ↑"),
    ("model_utility", "model utility ↑"),
)


def format_tofu_table(rows: Sequence[tuple[str, str, Mapping[str, float | None]]]) -> str:
    """``(role, label, scores)`` rows as the TOFU table (raw 0-1 values, as TOFU reports them)."""
    from tabulate import tabulate

    def cell(value):
        if value is None:
            return "n/a"
        return f"{value:.3g}" if value < 1e-3 else f"{value:.3f}"

    headers = ["role", "model"] + [label for _, label in TABLE_COLUMNS]
    body = [[role, label] + [cell(scores.get(key)) for key, _ in TABLE_COLUMNS] for role, label, scores in rows]
    return tabulate(body, headers=headers, tablefmt="github")
