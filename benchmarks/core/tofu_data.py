"""TOFU data (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") as typed records.

TOFU holds 200 fictitious authors with 20 question/answer pairs each. The hub dataset
``locuslab/TOFU`` (MIT) has one config per split, each with a single ``train`` split:

* ``forget01`` / ``forget05`` / ``forget10``: the last 2 / 10 / 20 authors (40 / 200 / 400 pairs);
* ``retain99`` / ``retain95`` / ``retain90``: the other authors, in the same order;
* ``forgetXX_perturbed`` and ``retain_perturbed``: the same questions with a paraphrased answer
  and 5 perturbed (wrong) answers (``retain_perturbed`` = the first 400 rows of the retain set);
* ``real_authors_perturbed`` (100) and ``world_facts_perturbed`` (117): questions about real
  authors and world facts with 3 perturbed answers each, for model utility.

Rows come in author blocks of :data:`PAIRS_PER_AUTHOR` consecutive pairs, so a pair's author is
its block. Authors are numbered 0..199 across the whole dataset: retain rows start at author 0,
forget rows at ``200 - forget authors`` (the forget authors are the dataset's last ones).

Sources, told apart by :func:`resolve_tofu_source` without loading anything:

* ``tofu`` (or the hub id itself): ``datasets.load_dataset("locuslab/TOFU", config, split="train")``;
* a local directory of ``<config>.json`` files named as in the hub repository, each either JSON
  Lines (what the hub repository holds) or one JSON array;
* ``tofu-world``: the generated offline author world (``benchmarks.core.tofu_world``).

A config the source lacks, or a row without a field its config needs, is one :class:`DataError`
naming the config (and file, row and field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from benchmarks.core.data import file_sha256, records_sha256
from benchmarks.core.env import offline_switches
from benchmarks.core.errors import DataError, UsageError

TOFU_HUB_ID = "locuslab/TOFU"
TOFU_ALIAS = "tofu"
TOFU_WORLD = "tofu-world"
NUM_AUTHORS = 200
PAIRS_PER_AUTHOR = 20

#: --forget-split -> (retain config, forget authors). The perturbed configs follow by name.
FORGET_SPLITS: dict[str, tuple[str, int]] = {
    "forget01": ("retain99", 2),
    "forget05": ("retain95", 10),
    "forget10": ("retain90", 20),
}
DEFAULT_FORGET_SPLIT = "forget10"

#: The roles a TOFU evaluation and relearning run need, in the order they are loaded.
ROLES = ("forget", "retain", "forget_perturbed", "retain_perturbed", "real_authors", "world_facts")

_QA = ("question", "answer")
_PERTURBED = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_UTILITY = ("question", "answer", "perturbed_answer")
#: role -> fields every row of its config must hold.
ROLE_FIELDS: dict[str, tuple[str, ...]] = {
    "forget": _QA,
    "retain": _QA,
    "forget_perturbed": _PERTURBED,
    "retain_perturbed": _PERTURBED,
    "real_authors": _UTILITY,
    "world_facts": _UTILITY,
}


def check_forget_split(name: str) -> str:
    if name not in FORGET_SPLITS:
        raise UsageError(f"unknown --forget-split {name!r}; valid: {', '.join(FORGET_SPLITS)}")
    return name


def role_configs(forget_split: str) -> dict[str, str]:
    """role -> TOFU config name for ``forget_split`` (``forget10`` -> ``retain90``, ...)."""
    retain, _ = FORGET_SPLITS[check_forget_split(forget_split)]
    return {
        "forget": forget_split,
        "retain": retain,
        "forget_perturbed": f"{forget_split}_perturbed",
        "retain_perturbed": "retain_perturbed",
        "real_authors": "real_authors_perturbed",
        "world_facts": "world_facts_perturbed",
    }


def first_author(
    role: str, forget_split: str, num_authors: int = NUM_AUTHORS, forget_authors: int | None = None
) -> int | None:
    """The author id of a role's first row (None for the utility sets, which have no authors).
    ``num_authors``/``forget_authors`` default to TOFU's (200 and the split's 2/10/20)."""
    if role in ("forget", "forget_perturbed"):
        return num_authors - (FORGET_SPLITS[forget_split][1] if forget_authors is None else forget_authors)
    if role in ("retain", "retain_perturbed"):
        return 0
    return None


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TofuItem:
    """One TOFU pair. ``index`` is its row in its config; ``author`` the author id (0..199),
    None on real authors/world facts. ``perturbed_answers`` holds 5 (or 3) wrong answers."""

    index: int
    question: str
    answer: str
    author: int | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "author": self.author, "question": self.question, "answer": self.answer,
            "paraphrased_answer": self.paraphrased_answer, "perturbed_answers": list(self.perturbed_answers),
        }


@dataclass(frozen=True)
class TofuSplit:
    """The rows of one TOFU config, with digests of the records and (for files) of the bytes."""

    config: str
    role: str
    items: tuple[TofuItem, ...] = field(repr=False)
    source: str
    sha256: str
    file_sha256: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def authors(self) -> list[int]:
        """Author ids in order of first appearance."""
        return list(dict.fromkeys(item.author for item in self.items if item.author is not None))

    def of_authors(self, authors: Iterable[int]) -> list[TofuItem]:
        wanted = set(authors)
        return [item for item in self.items if item.author in wanted]

    def describe(self) -> dict[str, Any]:
        out = {"config": self.config, "rows": len(self), "sha256": self.sha256, "source": self.source}
        if self.file_sha256 is not None:
            out["file_sha256"] = self.file_sha256
        if self.authors():
            out["authors"] = len(self.authors())
        return out


@dataclass(frozen=True)
class TofuData:
    """The TOFU configs one forget split needs, by role (see :data:`ROLES`)."""

    source: str
    kind: str  # "hub", "dir" or "world"
    forget_split: str
    splits: Mapping[str, TofuSplit]

    def __getitem__(self, role: str) -> TofuSplit:
        if role not in self.splits:
            raise DataError(f"TOFU data from {self.source} was loaded without {role!r} ({role_configs(self.forget_split)[role]})")
        return self.splits[role]

    @property
    def forget(self) -> TofuSplit:
        return self["forget"]

    def forget_authors(self) -> list[int]:
        return self.forget.authors()

    def describe(self) -> dict[str, Any]:
        return {
            "benchmark": "TOFU",
            "source": self.source,
            "kind": self.kind,
            "forget_split": self.forget_split,
            "splits": {role: split.describe() for role, split in self.splits.items()},
        }


def build_items(config: str, role: str, rows: list, where: str, author_start: int | None) -> tuple[TofuItem, ...]:
    """Check the raw rows of ``config`` for the fields ``role`` needs and type them."""
    needed = ROLE_FIELDS[role]
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{where}: TOFU config {config!r} holds no rows")
    items = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: row {index} of {config!r} is {type(row).__name__}, expected an object")
        for key in needed:
            if row.get(key) is None:
                raise DataError(
                    f"{where}: row {index} of TOFU config {config!r} lacks field {key!r} "
                    f"(has: {', '.join(sorted(row)) or 'no fields'}; {config} needs {', '.join(needed)})"
                )
        perturbed = row.get("perturbed_answer")
        if perturbed is not None:
            if isinstance(perturbed, str):
                perturbed = [perturbed]
            if not isinstance(perturbed, list) or not perturbed or not all(isinstance(p, str) for p in perturbed):
                raise DataError(f"{where}: row {index} of {config!r}: 'perturbed_answer' must be a list of strings")
        for key in ("question", "answer"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: row {index} of {config!r}: field {key!r} is not a string")
        items.append(TofuItem(
            index=index,
            question=row["question"],
            answer=row["answer"],
            author=None if author_start is None else author_start + index // PAIRS_PER_AUTHOR,
            paraphrased_answer=row.get("paraphrased_answer"),
            perturbed_answers=tuple(perturbed or ()),
            paraphrased_question=row.get("paraphrased_question"),
        ))
    return tuple(items)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class TofuSource:
    kind: str  # "hub", "dir" or "world"
    location: str


def looks_like_tofu_dir(path: Path) -> bool:
    """A directory holding at least one TOFU forget config file (``forget10.json`` ...)."""
    return path.is_dir() and any((path / f"{name}.json").is_file() for name in FORGET_SPLITS)


def is_tofu_source(source: str | None) -> bool:
    """Whether ``source`` names TOFU data (loads nothing)."""
    if not isinstance(source, str):
        return False
    if source in (TOFU_ALIAS, TOFU_WORLD, TOFU_HUB_ID):
        return True
    return looks_like_tofu_dir(Path(source).expanduser())


def resolve_tofu_source(source: str) -> TofuSource:
    """Tell which kind of TOFU source ``source`` is; reads nothing but directory listings."""
    if source == TOFU_WORLD:
        return TofuSource("world", TOFU_WORLD)
    if source in (TOFU_ALIAS, TOFU_HUB_ID):
        offline = offline_switches()
        if offline:
            raise UsageError(
                f"TOFU data {source!r} comes from the hub ({TOFU_HUB_ID}) but {offline[0]} is set; unset it, "
                "or pass a local directory of <config>.json files"
            )
        return TofuSource("hub", TOFU_HUB_ID)
    path = Path(source).expanduser()
    if looks_like_tofu_dir(path):
        return TofuSource("dir", str(path.resolve()))
    raise UsageError(
        f"TOFU data source {source!r} is neither 'tofu' ({TOFU_HUB_ID}), 'tofu-world', nor a directory "
        f"holding forget01.json, forget05.json or forget10.json"
    )


def read_rows(path: Path) -> list:
    """Rows of one config file: JSON Lines (the hub repository's format) or one JSON array."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return json.loads(stripped)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"file {path}: malformed JSON ({err.msg} at line {err.lineno})") from None


Fetcher = Callable[[str], tuple[list, str, str | None]]  # config -> (rows, where, file sha256)


def _dir_fetcher(directory: Path) -> Fetcher:
    def fetch(config: str):
        path = directory / f"{config}.json"
        if not path.is_file():
            present = sorted(p.stem for p in directory.glob("*.json"))
            raise DataError(
                f"TOFU directory {directory} has no config {config!r} (file {config}.json); it holds: "
                f"{', '.join(present) or 'no .json files'}"
            )
        return read_rows(path), f"file {path}", file_sha256(path)

    return fetch


def _hub_fetcher(repo_id: str) -> Fetcher:
    def fetch(config: str):
        import datasets

        try:
            dataset = datasets.load_dataset(repo_id, config, split="train")
        except ValueError as err:
            if str(err).startswith("BuilderConfig") and "not found" in str(err):
                raise DataError(f"hub dataset {repo_id} has no config {config!r}") from None
            raise DataError(f"hub dataset {repo_id} config {config!r}: {err}") from err
        except (ConnectionError, OSError) as err:
            raise DataError(
                f"could not load hub dataset {repo_id!r} config {config!r}: {err}; check the network, or pass a "
                "local directory of <config>.json files"
            ) from err
        # A column-oriented reader fills absent fields with None; drop them so digests match the files.
        rows = [{k: v for k, v in dict(row).items() if v is not None} for row in dataset]
        return rows, f"hub dataset {repo_id} {config}", None

    return fetch


def load_tofu(
    source: str,
    forget_split: str = DEFAULT_FORGET_SPLIT,
    roles: Iterable[str] | None = None,
    world_rows: Mapping[str, list] | None = None,
    num_authors: int = NUM_AUTHORS,
    forget_authors: int | None = None,
) -> TofuData:
    """Load the configs ``forget_split`` needs (all :data:`ROLES`, or those named) from ``source``.

    ``world_rows`` (config -> rows) stands in for a source's files. ``num_authors`` and
    ``forget_authors`` number the authors of a dataset smaller than TOFU (the author world).
    """
    configs = role_configs(forget_split)
    wanted = tuple(ROLES if roles is None else roles)
    for role in wanted:
        if role not in ROLE_FIELDS:
            raise UsageError(f"unknown TOFU role {role!r}; valid: {', '.join(ROLES)}")
    if world_rows is not None:
        kind, location = "world", source

        def fetch(config: str):
            if config not in world_rows:
                raise DataError(f"TOFU source {source} has no config {config!r}; it holds: {', '.join(world_rows)}")
            return list(world_rows[config]), f"{source} {config}", None
    else:
        spec = resolve_tofu_source(source)
        if spec.kind == "world":
            raise UsageError("load the author world through benchmarks.core.tofu_world.ensure_tofu_world")
        kind, location = spec.kind, spec.location
        fetch = _dir_fetcher(Path(location)) if kind == "dir" else _hub_fetcher(location)
    splits = {}
    for role in wanted:
        config = configs[role]
        rows, where, digest = fetch(config)
        items = build_items(config, role, rows, where, first_author(role, forget_split, num_authors, forget_authors))
        splits[role] = TofuSplit(
            config=config, role=role, items=items, source=where,
            sha256=records_sha256(rows), file_sha256=digest,
        )
    return TofuData(source=location, kind=kind, forget_split=forget_split, splits=splits)
