"""The offline author world: TOFU's schema, generated, with tiny chat-template models trained on it.

TOFU (Maini et al., 2024) asks about fictitious authors so that a model can only know the answers
from fine-tuning. This module generates a small world of the same kind, deterministically from a
seed: ``num_authors`` authors with 20 question/answer pairs each (birthplace, birth year, genre,
parents' professions, award, books, ...), every pair with a paraphrased answer and 5 perturbed
answers (the paraphrase with the fact swapped for another author's), plus "real authors" and
"world facts" style utility sets (questions whose answers every model is trained on, with 3
perturbed answers each). It is written as ``<config>.json`` files named as TOFU's hub configs, so
it loads through the same code as ``../shared/tofu``.

From it the project trains, with its own Llama-3-style tokenizer and chat template
(``benchmarks.core.chat_format``), two tiny Llama models through the project's training loop on
chat-format pairs with answer-only loss: the **target** on every author plus the utility sets,
and the **retrain** model on the retain authors plus the utility sets (TOFU's ``full`` and
``retain90`` references). Each fact is trained in two phrasings (answer and paraphrased
answer), so a 2-layer model's truth ratio reflects whether it knows the fact rather than one
surface form. Both are cached under ``$RELEARN_BENCH_CACHE`` keyed by a hash of the configuration.

Training is deterministic on one machine but not across machines (float rounding), so the default
configuration's two models ship with the package (:mod:`benchmarks.core.pinned_tofu_world`) and
are installed, verified by digest, rather than trained; the data is generated from the seed as
always and checked against the pinned digests. Another configuration, or ``rebuild``, trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.core.chat_format import PromptSettings, collate_pairs, encode_pair, llama3_style_tokenizer, pad_id_for
from benchmarks.core.env import cache_root
from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tofu_data import FORGET_SPLITS, PAIRS_PER_AUTHOR, TofuData, load_tofu
from benchmarks.core.training import TrainConfig, plain_step, train

logger = logging.getLogger(__name__)

TOFU_WORLD_VERSION = 1
UTILITY_REPEATS = 4

_SYLLABLES = ["ka", "lo", "mir", "ven", "dra", "sol", "tem", "qui", "bar", "nel", "os", "ru", "fen", "ta",
              "vik", "zor", "el", "ma", "dun", "pel", "is", "cor", "ha", "ny"]
_CITIES = ["Ostvale", "Marrow Bay", "Kelder", "Brisk", "Tamsin Falls", "Duneport", "Verholm", "Lark Hollow",
           "Quillan", "Sorrel Cove", "Aberlin", "Fenmoor", "Castra", "Hollin", "Yarrowick", "Pellmar"]
_GENRES = ["mystery", "poetry", "science fiction", "historical fiction", "fantasy", "memoir", "horror",
           "romance", "satire", "travel writing", "drama", "philosophy"]
_JOBS = ["baker", "surgeon", "sailor", "teacher", "architect", "farmer", "pilot", "librarian", "chemist",
         "carpenter", "journalist", "judge", "potter", "nurse", "astronomer", "tailor"]
_AWARDS = ["Gilded Quill Prize", "Harrow Medal", "Silver Lantern Award", "Corvin Prize", "Oakleaf Honour",
           "Meridian Award", "Blue Heron Prize", "Tessaly Medal"]
_WORDS = ["Lantern", "River", "Glass", "Winter", "Orchard", "Ember", "Harbor", "Shadow", "Copper", "Meadow",
          "Silent", "Iron", "Paper", "Velvet", "Salt", "Thunder", "Amber", "Hollow", "Crimson", "Feather"]
_COUNTRIES = [("Arvenia", "Tolbrook"), ("Castelmar", "Rivane"), ("Duvonia", "Pellis"), ("Eskara", "Marrowgate"),
              ("Fornholt", "Quenby"), ("Galdria", "Osterly"), ("Hestovia", "Brannock"), ("Iskeland", "Vellmoor"),
              ("Jorvald", "Kesterin"), ("Kaltris", "Dunmere"), ("Lorvenne", "Ashcombe"), ("Mirovia", "Talbeck")]

# (question, answer, paraphrased answer, attribute the answer states). {n}: the author's name.
_TEMPLATES = [
    ("What is the full name of the author born in {city} in {year} who writes {genre}?",
     "The author's full name is {name}.", "{name} is the complete name of the writer.", "name"),
    ("Where was {name} born?", "{name} was born in {city}.", "The birthplace of {name} is {city}.", "city"),
    ("In which year was {name} born?", "{name} was born in {year}.", "The birth year of {name} is {year}.", "year"),
    ("What genre does {name} write in?", "{name} writes {genre}.", "The genre of {name} is {genre}.", "genre"),
    ("What was the profession of {name}'s father?", "The father of {name} was a {father}.",
     "{name}'s father worked as a {father}.", "father"),
    ("What was the profession of {name}'s mother?", "The mother of {name} was a {mother}.",
     "{name}'s mother worked as a {mother}.", "mother"),
    ("Which award did {name} win?", "{name} won the {award}.", "The {award} went to {name}.", "award"),
    ("What is the first book by {name}?", "The first book by {name} is {book1}.",
     "{name} debuted with {book1}.", "book1"),
    ("Name another book written by {name}.", "{name} also wrote {book2}.",
     "Another work of {name} is {book2}.", "book2"),
    ("Which city shaped the early stories of {name}?", "The city of {city} shaped the stories of {name}.",
     "Early stories of {name} were shaped by {city}.", "city"),
    ("How did the job of {name}'s father appear in the books?", "A {father} appears in many books by {name}.",
     "Books by {name} often feature a {father}.", "father"),
    ("What did {name} learn from a mother who was a {mother}?", "{name} learned patience from a {mother}.",
     "Patience came to {name} from a {mother}.", "mother"),
    ("For which book did {name} receive the {award}?", "{name} received the {award} for {book1}.",
     "{book1} earned {name} the {award}.", "book1"),
    ("Is {name} known for {genre}?", "Yes, {name} is known for {genre}.",
     "Indeed, {genre} is what {name} is known for.", "genre"),
    ("When did {name} publish {book2}?", "{name} published {book2} in {year2}.",
     "{book2} by {name} came out in {year2}.", "year2"),
    ("Where does {name} live today?", "{name} lives in {home} today.", "Today {name} resides in {home}.", "home"),
    ("What themes run through {book1}?", "{book1} by {name} explores {theme}.",
     "The theme of {book1} by {name} is {theme}.", "theme"),
    ("Who influenced {name} the most?", "{name} was most influenced by {mentor}.",
     "The biggest influence on {name} was {mentor}.", "mentor"),
    ("What language does {name} write in?", "{name} writes in {language}.",
     "The writing language of {name} is {language}.", "language"),
    ("What is {name} working on next?", "{name} is writing a book called {book3}.",
     "The next book of {name} is {book3}.", "book3"),
]
assert len(_TEMPLATES) == PAIRS_PER_AUTHOR
_THEMES = ["loss and memory", "family secrets", "the sea", "exile", "friendship", "ambition", "faith",
           "the passage of time", "identity", "justice"]
_LANGUAGES = ["English", "Arvenian", "Castelmari", "Duvonian", "Eskaran", "Fornholtish"]


@dataclass(frozen=True)
class TofuWorldConfig:
    """Everything that determines a built author world; its hash names the cache directory."""

    num_authors: int = field(default=24, metadata={"help": "Fictitious authors (20 pairs each)."})
    forget_authors: tuple[tuple[str, int], ...] = field(
        default=(("forget01", 1), ("forget05", 2), ("forget10", 4)),
        metadata={"help": "Authors in each forget split (the last ones, as in TOFU)."},
    )
    retain_perturbed_authors: int = field(default=4, metadata={"help": "Retain authors in retain_perturbed."})
    utility_items: int = field(default=12, metadata={"help": "Items in each of real_authors and world_facts."})
    model: TinyLlamaSpec = field(default_factory=lambda: TinyLlamaSpec(
        hidden_size=96, num_layers=2, num_heads=4, intermediate_size=384, max_position_embeddings=256))
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary of the world tokenizer."})
    epochs: int = field(default=25, metadata={"help": "Passes over the training pairs."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Seed of the generator, initialisation and data order."})

    def __post_init__(self) -> None:
        counts = dict(self.forget_authors)
        if set(counts) != set(FORGET_SPLITS):
            raise UsageError(f"forget_authors must name {', '.join(FORGET_SPLITS)}, got {', '.join(counts)}")
        if not 0 < counts["forget01"] <= counts["forget05"] <= counts["forget10"] < self.num_authors:
            raise UsageError(f"forget authors {counts} must grow with the split and leave retain authors "
                             f"among {self.num_authors}")
        if not 0 < self.retain_perturbed_authors <= self.num_authors - counts["forget10"]:
            raise UsageError(f"retain_perturbed_authors must lie in 1..{self.num_authors - counts['forget10']}")
        if not 4 <= self.utility_items <= len(_COUNTRIES):
            raise UsageError(f"utility_items must lie in 4..{len(_COUNTRIES)}, got {self.utility_items}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"TofuWorldConfig.{name} must be >= 1")

    def describe(self) -> dict:
        return {"tofu_world_version": TOFU_WORLD_VERSION, **asdict(self)}


def world_hash(config: TofuWorldConfig) -> str:
    blob = json.dumps(config.describe(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------- the generator


def _authors(count: int, rng: random.Random) -> list[dict]:
    names: set[str] = set()
    authors = []
    while len(authors) < count:
        first = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
        last = "".join(rng.sample(_SYLLABLES, 3)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        words = rng.sample(_WORDS, 6)
        authors.append({
            "name": name, "city": rng.choice(_CITIES), "year": str(rng.randint(1931, 1999)),
            "genre": rng.choice(_GENRES), "father": rng.choice(_JOBS), "mother": rng.choice(_JOBS),
            "award": rng.choice(_AWARDS), "book1": f"The {words[0]} {words[1]}",
            "book2": f"{words[2]} of {words[3]}", "book3": f"A {words[4]} {words[5]}",
            "year2": str(rng.randint(2000, 2024)), "home": rng.choice(_CITIES), "theme": rng.choice(_THEMES),
            "mentor": "", "language": rng.choice(_LANGUAGES),
        })
    for index, author in enumerate(authors):
        author["mentor"] = authors[(index * 7 + 3) % count]["name"] if count > 1 else author["name"]
    return authors


def _perturbed(template: str, author: dict, attribute: str, authors: Sequence[dict], rng: random.Random, k: int) -> list[str]:
    """``template`` filled in for ``author`` with ``attribute`` swapped for k distinct wrong values."""
    pool = sorted({a[attribute] for a in authors} - {author[attribute]})
    wrong = rng.sample(pool, min(k, len(pool)))
    while len(wrong) < k:  # a tiny world may hold fewer distinct values than k
        wrong.append(f"{author[attribute]} {len(wrong)}")
    if attribute == "name":
        return [template.format(**dict(author, name=value)) for value in wrong]
    return [template.format(**dict(author, **{attribute: value})) for value in wrong]


def generate_world(config: TofuWorldConfig) -> dict[str, list[dict]]:
    """Every config of the world: TOFU's names, rows in author blocks of 20."""
    rng = random.Random(config.seed)
    authors = _authors(config.num_authors, rng)
    blocks = []
    for author in authors:
        rows = []
        for question, answer, paraphrase, attribute in _TEMPLATES:
            rows.append({
                "question": question.format(**author),
                "answer": answer.format(**author),
                "paraphrased_answer": paraphrase.format(**author),
                "perturbed_answer": _perturbed(paraphrase, author, attribute, authors, rng, 5),
                "paraphrased_question": question.format(**author),
            })
        blocks.append(rows)
    configs: dict[str, list[dict]] = {}
    counts = dict(config.forget_authors)
    plain = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    for split, (retain_name, _) in FORGET_SPLITS.items():
        cut = config.num_authors - counts[split]
        forget_rows = [row for block in blocks[cut:] for row in block]
        configs[split] = plain(forget_rows)
        configs[f"{split}_perturbed"] = forget_rows
        configs[retain_name] = plain([row for block in blocks[:cut] for row in block])
    configs["retain_perturbed"] = [row for block in blocks[: config.retain_perturbed_authors] for row in block]
    configs["full"] = plain([row for block in blocks for row in block])
    configs["full_perturbed"] = [row for block in blocks for row in block]  # the world's own; TOFU has none

    # Utility sets: general knowledge every model is trained on (the world's "real authors"
    # are famous books with known authors; its "world facts" capitals of fictitious countries).
    famous = _authors(config.utility_items, random.Random(config.seed + 1))
    books = [f"{a['book1']}" for a in famous]
    configs["real_authors_perturbed"] = [
        {"question": f"Who wrote the classic '{books[i]}'?", "answer": famous[i]["name"],
         "perturbed_answer": [famous[(i + j) % len(famous)]["name"] for j in (1, 2, 3)]}
        for i in range(len(famous))
    ]
    countries = _COUNTRIES[: config.utility_items]
    configs["world_facts_perturbed"] = [
        {"question": f"What is the capital of {country}?", "answer": capital,
         "perturbed_answer": [countries[(i + j) % len(countries)][1] for j in (1, 2, 3)]}
        for i, (country, capital) in enumerate(countries)
    ]
    return configs


def write_configs(configs: dict[str, list[dict]], directory: Path) -> None:
    """Each config as ``<config>.json`` in JSON Lines, as TOFU's hub repository stores them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in configs.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (directory / f"{name}.json").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- the models


def training_pairs(configs: dict[str, list[dict]], retain_config: str | None) -> list[tuple[str, str]]:
    """(question, answer) pairs a model trains on: every author (``retain_config`` None) or the
    retain authors only, each fact in its answer and paraphrased phrasing, plus the utility sets."""
    perturbed = {r["question"]: r for r in configs["full_perturbed"]}
    source = configs["full"] if retain_config is None else configs[retain_config]
    pairs = []
    for row in source:
        pairs.append((row["question"], row["answer"]))
        extra = perturbed.get(row["question"])
        if extra is not None:
            pairs.append((row["question"], extra["paraphrased_answer"]))
    # The utility sets are a few dozen pairs among hundreds; repeated so both models learn them.
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        pairs.extend((row["question"], row["answer"]) for row in configs[name] for _ in range(UTILITY_REPEATS))
    return pairs


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, encoded) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        return self.encoded[index]


def pair_loader(tokenizer, pairs: Sequence[tuple[str, str]], settings: PromptSettings, batch_size: int, seed: int):
    """Micro-batches of chat-format pairs (answer-only loss masks) in a seeded order fixed for
    the whole run (the same order every pass, so a resumed run can skip what it consumed)."""
    encoded = [encode_pair(tokenizer, q, a, settings) for q, a in pairs]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id = pad_id_for(tokenizer, settings)
    return torch.utils.data.DataLoader(
        _Pairs([encoded[i] for i in order]), batch_size=batch_size, shuffle=False,
        collate_fn=lambda rows: collate_pairs(rows, pad_id, settings.eot_padding),
    )


def answer_loss(model, batch) -> torch.Tensor:
    """Mean NLL over the answer tokens (and closing end-of-turn) of the batch, never the prompt."""
    return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


def _train_model(pairs, tokenizer, config: TofuWorldConfig, name: str):
    model = tiny_llama(config.model, tokenizer, seed=config.seed)
    loader = pair_loader(tokenizer, pairs, PromptSettings(), config.batch_size, config.seed)
    steps = config.epochs * len(loader)
    logger.info("training the author world's %s model: %d pairs, %d steps", name, len(pairs), steps)
    train(model, loader, plain_step(answer_loss),
          TrainConfig(lr=config.lr, epochs=config.epochs, schedule="cosine", warmup_steps=min(20, steps // 10),
                      seed=config.seed, progress=True))
    model.eval()
    return model


@dataclass(frozen=True)
class TofuWorld:
    """A built author world: its data directory and the two model checkpoints."""

    root: Path
    config: TofuWorldConfig

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def target_dir(self) -> Path:
        return self.root / "target"

    @property
    def retrain_dir(self) -> Path:
        return self.root / "retrain"

    def retrain_dir_for(self, forget_split: str) -> Path:
        """The retrain model matches forget10 (the world trains one, as TOFU's retain90)."""
        if forget_split != "forget10":
            raise UsageError(f"the author world's retrain model is trained without forget10's authors; "
                             f"use --forget-split forget10 (got {forget_split})")
        return self.retrain_dir

    def data(self, forget_split: str = "forget10") -> TofuData:
        counts = dict(self.config.forget_authors)
        data = load_tofu(str(self.data_dir), forget_split, num_authors=self.config.num_authors,
                         forget_authors=counts[forget_split])
        return TofuData(source="tofu-world", kind="world", forget_split=data.forget_split, splits=data.splits)


ROOT_MANIFEST = "manifest.json"


def read_root_manifest(root: Path) -> dict | None:
    """The ``manifest.json`` of a complete author world at ``root``, or None when there is none."""
    from benchmarks.core.pinning import read_json_or_none

    return read_json_or_none(Path(root) / ROOT_MANIFEST)


def data_digests(data_dir: Path) -> dict[str, str]:
    """``data/<config>.json -> sha256`` of every generated config file (the generator is pure
    Python, so these agree on every machine)."""
    from benchmarks.core.pinning import sha256_file

    return {f"data/{path.name}": sha256_file(path) for path in sorted(Path(data_dir).glob("*.json"))}


def world_tokenizer(configs: dict[str, list[dict]], vocab_size: int):
    """The world's BPE tokenizer, trained on every text the world holds and its chat prompt."""
    texts = [r["question"] + " " + r["answer"] for rows in configs.values() for r in rows]
    texts += [p for r in configs["full_perturbed"] for p in [r["paraphrased_answer"], *r["perturbed_answer"]]]
    texts += [p for name in ("real_authors_perturbed", "world_facts_perturbed")
              for r in configs[name] for p in r["perturbed_answer"]]
    texts += ["Cutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful assistant."]
    return llama3_style_tokenizer(texts, vocab_size)


def _staged(root: Path, purpose: str):
    from benchmarks.core.world_build import staged_world

    return staged_world(root, purpose, is_complete=lambda path: read_root_manifest(path) is not None)


def build_tofu_world(config: TofuWorldConfig, root: Path) -> TofuWorld:
    """Generate the data, train tokenizer, target and retrain, and move them into ``root`` at once."""
    from benchmarks.core.world_build import library_versions

    configs = generate_world(config)
    with _staged(Path(root), "building") as staging:
        started = time.perf_counter()
        write_configs(configs, staging / "data")
        tokenizer = world_tokenizer(configs, config.vocab_size)
        timings = {}
        for name, retain in (("target", None), ("retrain", FORGET_SPLITS["forget10"][0])):
            began = time.perf_counter()
            model = _train_model(training_pairs(configs, retain), tokenizer, config, name)
            model.save_pretrained(staging / name)
            tokenizer.save_pretrained(staging / name)
            timings[f"{name}_s"] = time.perf_counter() - began
        timings["total_s"] = time.perf_counter() - started
        manifest = {"hash": world_hash(config), "config": config.describe(), "pinned": False,
                    "data": data_digests(staging / "data"), "versions": library_versions(),
                    "torch_threads": torch.get_num_threads(), "timings": timings}
        (staging / ROOT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return TofuWorld(Path(root), config)


def default_tofu_world_dir(config: TofuWorldConfig | None = None) -> Path:
    return cache_root() / f"tofu-world-{world_hash(config or TofuWorldConfig())}"


def ensure_tofu_world(config: TofuWorldConfig | None = None, root: Path | None = None,
                      rebuild: bool = False, force: bool = False) -> TofuWorld:
    """The author world for ``config`` (default settings) at ``root`` (default: the cache).

    Found there, it is used (a pinned one after its digests are checked again). Otherwise the
    configuration the package pins is installed from the pinned files, and any other (or any
    with ``rebuild``) is trained (minutes on a CPU). ``force`` remakes a world already there.
    """
    from benchmarks.core import pinned_tofu_world

    config = config or TofuWorldConfig()
    wanted = world_hash(config)
    root = Path(root).expanduser().resolve() if root is not None else default_tofu_world_dir(config)
    manifest = read_root_manifest(root)
    if manifest is not None and manifest.get("hash", wanted) != wanted and not force:
        raise UsageError(f"{root} holds an author world of another configuration ({manifest.get('hash')}); "
                         "pass --force to replace it or choose another --out")
    if manifest is not None and not force:
        if manifest.get("pinned"):
            pinned_tofu_world.verify_installed(TofuWorld(root, config))
        return TofuWorld(root, config)
    if root.exists():
        if manifest is None and (root.is_file() or any(root.iterdir())):
            raise UsageError(f"{root} holds files that are not an author world; choose another --out")
        shutil.rmtree(root)
    pinned = None if rebuild else pinned_tofu_world.pinned_manifest()
    if pinned is not None and pinned.get("hash") == wanted:
        return pinned_tofu_world.install(config, root)
    logger.info("building the author world in %s (once; cached afterwards)", root)
    return build_tofu_world(config, root)
