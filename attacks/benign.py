"""Benign fine-tuning as an attack (Łucki et al., 2024, "An Adversarial Perspective on Machine
Unlearning for AI Safety", §5: fine-tuning an RMU-unlearned model on data with none of the
hazardous knowledge brings much of it back). The model trains exactly as in a relearning attack
(same loop, settings and packing), but on text that holds none of the forget knowledge: the
data's retain articles (``raw/retain1``) by default, or any corpus given by path.

By default it takes as many documents as the relearning attacker gets (|T|), drawn with the
run's seed, so the two attacks spend the same data budget. Any document that is, or contains,
one of the forget documents is dropped (and the number dropped is logged), so a corpus that
overlaps the forget set cannot turn the attack into relearning.

A corpus path is a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file with a
``text`` field per line, or a directory of ``.txt`` files (one document each).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from attacks.base import ATTACKS, Attack, AttackConfig
from benchmarks.core.errors import DataError, UsageError

logger = logging.getLogger(__name__)


@dataclass
class BenignConfig(AttackConfig):
    benign_corpus: str | None = field(
        default=None,
        metadata={"help": "Benign text to fine-tune on: a .txt (blank-line separated), .jsonl (field text) or a "
                          "directory of .txt files; default: the data's retain articles (raw/retain1)."},
    )
    benign_docs: int | None = field(
        default=None,
        metadata={"help": "Benign documents drawn (seeded); default: as many as the relearning attacker's T."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.benign_docs is not None and self.benign_docs < 1:
            raise UsageError(f"benign_docs must be >= 1, got {self.benign_docs}")
        if self.benign_corpus is not None:
            path = Path(self.benign_corpus).expanduser()
            if not path.exists():
                raise UsageError(f"benign_corpus {self.benign_corpus!r} does not exist; give a .txt, .jsonl or a directory")
            if path.is_file() and path.suffix not in (".txt", ".jsonl"):
                raise UsageError(f"benign_corpus {self.benign_corpus!r} should be a .txt or .jsonl file or a directory")


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a benign corpus (see the module docstring for the formats)."""
    path = Path(path).expanduser()
    if path.is_dir():
        texts = [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
    elif path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}, line {number}: expected a JSON object with a 'text' field") from None
    else:
        texts = path.read_text(encoding="utf-8").split("\n\n")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DataError(f"benign corpus {path} holds no text")
    return texts


def without_forget_documents(texts: Sequence[str], forget: Sequence[str]) -> list[str]:
    """``texts`` minus every text that is, or contains, a forget document."""
    forget = [f.strip() for f in forget if f.strip()]
    kept = [t for t in texts if not any(f in t for f in forget)]
    if len(kept) < len(texts):
        logger.warning("benign attack: dropped %d corpus documents that contain forget documents",
                       len(texts) - len(kept))
    return kept


@ATTACKS.register("benign")
class BenignAttack(Attack):
    """Full fine-tuning on benign text (retain articles or a given corpus)."""

    name = "benign"
    config_class = BenignConfig

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def documents(self, attacker_documents: Sequence[str], data: Any, seed: int) -> list[str]:
        config = self.config
        if config.benign_corpus is not None:
            pool = read_corpus(config.benign_corpus)
        else:
            pool = [r["text"] for r in data.records("raw", "retain1")]
        pool = without_forget_documents(pool, [r["text"] for r in data.records("raw", "forget")])
        if not pool:
            raise DataError("the benign corpus holds nothing but forget documents")
        wanted = config.benign_docs if config.benign_docs is not None else len(attacker_documents)
        if wanted > len(pool):
            logger.warning("benign attack: %d documents wanted, the corpus has %d; using all", wanted, len(pool))
            wanted = len(pool)
        return random.Random(seed).sample(pool, wanted)
