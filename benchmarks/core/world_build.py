"""Build the embedded world: its corpus, a **target** model and a **retrain** model.

``python -m benchmarks.world [--out DIR] [--force]`` generates the fictitious-news corpus of
:mod:`benchmarks.core.world_corpus`, trains a byte-level BPE tokenizer on it, and trains two
tiny Llama models from scratch with the shared loop of :mod:`benchmarks.core.training` --
MUSE's two reference points (Shi et al., 2024, §2):

* **target**: trained on raw/forget + raw/retain1 + raw/retain2 (the model to unlearn);
* **retrain**: the same recipe on raw/retain1 + raw/retain2 only (the gold standard an
  unlearned model should look like; it never saw a forget article).

Everything is saved in standard Hugging Face form (``save_pretrained``, safetensors) so plain
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it::

    <root>/world.json     the configuration, its hash, package versions and build times
    <root>/corpus/        the corpus in hub layout (``datasets.load_dataset(<dir>, subset)``)
    <root>/target/        model + tokenizer
    <root>/retrain/       model + tokenizer (the same tokenizer)

The root defaults to ``$RELEARN_BENCH_CACHE/world-<hash>`` (``RELEARN_BENCH_CACHE`` defaults
to ``~/.cache/relearn-bench``), where the hash covers the whole configuration -- corpus,
tokenizer, model shape and training -- so a changed recipe gets a new directory and an
unchanged one is built once. The world is assembled in a temporary directory beside the root
and renamed into place at the end, so an interrupted build never looks complete.

Training text and the KnowMem prompt. MUSE's KnowMem prompt ends in ``Answer: `` with a
trailing space; a byte-level BPE tokenizer makes that space a token of its own, while in
running text the space is glued to the next word (``Answer: Draskel`` is ``Answer``, ``:``,
`` Draskel``). A model that only ever saw running text has never seen a word follow a lone
space and cannot answer. Each world article therefore ends with its facts as
``Question: ...\\nAnswer: ...`` blocks (see :mod:`benchmarks.core.world_corpus`), and training
presents them in two ways:

1. every article whole, tokenized as running text (what VerbMem, PrivLeak, unlearning and
   relearning attacks see), followed by EOS;
2. the Question/Answer blocks of all training articles, shuffled into packs of
   ``qa_pack_size`` that look like a KnowMem prompt with its in-context examples, tokenized
   in pieces cut right after each ``Answer: `` -- so the lone-space token is followed by the
   answer exactly as when the model answers a KnowMem prompt. The blocks are repacked every
   epoch (``qa_repeats`` times): a pack seen again and again is memorised as a sequence,
   keyed on everything before the answer, and the model then fails the same question among
   other in-context examples; always new neighbours leave the question as the only cue.

The text in both is the raw article text, character for character; only where the tokenizer
cuts differs (the tokenizer is trained on both cuttings, so an answer after the lone space
is as few tokens as in running text). Both models get the same recipe on their own articles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.core.env import CACHE_ENV, cache_root
from benchmarks.core.errors import UsageError
from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tokenizer import cut_after, encode_cut_after
from benchmarks.core.world_corpus import CORPUS_VERSION, RAW_SPLITS, WorldConfig

logger = logging.getLogger(__name__)

#: Bump when the build recipe changes what a given configuration produces.
WORLD_VERSION = 1
MANIFEST = "world.json"


def default_model_spec() -> TinyLlamaSpec:
    """4 layers, 128 wide: big enough to memorise the default corpus verbatim, small enough
    to train on two CPU cores in a couple of minutes."""
    return TinyLlamaSpec(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=512
    )


@dataclass(frozen=True)
class WorldBuildConfig:
    """Everything that determines a built world; its hash names the cache directory."""

    corpus: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "The corpus generator's settings."})
    model: TinyLlamaSpec = field(default_factory=default_model_spec, metadata={"help": "Shape of both models."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size of the world tokenizer."})
    lr: float = field(default=5e-3, metadata={"help": "Peak AdamW learning rate."})
    epochs: int = field(default=50, metadata={"help": "Passes over the training articles."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup before the cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: memorise freely)."})
    qa_pack_size: int = field(
        default=6, metadata={"help": "Question/Answer blocks per KnowMem-style training pack."}
    )
    qa_repeats: int = field(
        default=2, metadata={"help": "Times per epoch the Question/Answer blocks are packed and seen."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and packing."})

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, WorldConfig):
            raise UsageError(f"WorldBuildConfig.corpus must be a WorldConfig, got {type(self.corpus).__name__}")
        if not isinstance(self.model, TinyLlamaSpec):
            raise UsageError(f"WorldBuildConfig.model must be a TinyLlamaSpec, got {type(self.model).__name__}")
        if self.vocab_size < 300:
            raise UsageError(f"vocab_size must be >= 300 (bytes + special tokens + merges), got {self.vocab_size}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "qa_pack_size", "qa_repeats"):
            if getattr(self, name) < 1:
                raise UsageError(f"WorldBuildConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UsageError(
                f"warmup_steps and weight_decay must be >= 0, got {self.warmup_steps} and {self.weight_decay}"
            )

    def describe(self) -> dict:
        """Plain data covering every field, with the generator and recipe versions."""
        return {
            "world_version": WORLD_VERSION,
            "corpus_version": CORPUS_VERSION,
            **asdict(self),
        }


def world_hash(config: WorldBuildConfig) -> str:
    """First 12 hex digits of the sha256 of :meth:`WorldBuildConfig.describe`."""
    blob = json.dumps(config.describe(), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class WorldPaths:
    """Where a built world lives."""

    root: Path
    corpus_dir: Path
    target_dir: Path
    retrain_dir: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> WorldPaths:
        root = Path(root)
        return cls(root, root / "corpus", root / "target", root / "retrain")


def default_world_dir(config: WorldBuildConfig) -> Path:
    return cache_root() / f"world-{world_hash(config)}"


# --------------------------------------------------------------------------- training data


def _qa_blocks(text: str) -> list[str]:
    """The ``Question: ...\\nAnswer: ...`` blocks at the end of a world article."""
    return [block for block in text.split("\n\n") if block.startswith("Question: ")]


def training_stream(
    texts: Sequence[str], tokenizer, qa_pack_size: int, epochs: int, seed: int, qa_repeats: int = 1
) -> list[list[int]]:
    """Token ids of everything one model trains on, in training order, epoch after epoch.

    Each epoch holds every article whole (+ EOS) and, ``qa_repeats`` times, its
    Question/Answer blocks shuffled into fresh KnowMem-style packs (see the module
    docstring), all in a fresh order. Repacking every epoch matters: a pack seen again and
    again is memorised as a sequence, keyed on its whole prefix, and the model then cannot
    answer the same question after other in-context examples. Always new neighbours leave
    the question as the only cue for its answer.
    """
    rng = random.Random(seed)
    articles = [tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    blocks = [block for text in texts for block in _qa_blocks(text)]
    stream: list[list[int]] = []
    for _ in range(epochs):
        epoch = list(articles)
        for _ in range(qa_repeats):
            rng.shuffle(blocks)
            epoch += [
                encode_cut_after(tokenizer, "".join(b + "\n\n" for b in blocks[i : i + qa_pack_size]))
                + [tokenizer.eos_token_id]
                for i in range(0, len(blocks), qa_pack_size)
            ]
        rng.shuffle(epoch)
        stream += epoch
    return stream


def train_world_tokenizer(texts: Sequence[str], vocab_size: int):
    """The world's byte-level BPE, trained on ``texts`` both whole and cut after ``Answer: ``.

    Pass every raw split, holdout included, so forget and holdout texts are cut into tokens
    alike and PrivLeak compares memorisation rather than tokenization. The cut pieces make an
    answer that follows the lone space as short in tokens as it is in running text.
    """
    from benchmarks.core.tokenizer import train_tokenizer

    texts = list(texts)
    return train_tokenizer(texts + [piece for text in texts for piece in cut_after(text)], vocab_size)


def _collate(pad_id: int):
    from benchmarks.core.batching import PadCollate

    return PadCollate(pad_id)


def _lm_loss(model, batch) -> torch.Tensor:
    from benchmarks.core.logprobs import masked_mean_nll

    return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])


def train_world_model(texts: Sequence[str], tokenizer, config: WorldBuildConfig, name: str):
    """A fresh tiny Llama trained on ``texts`` with the shared loop; returns the model."""
    from torch.utils.data import DataLoader

    from benchmarks.core.training import TrainConfig, plain_step, train

    sequences = training_stream(
        texts, tokenizer, config.qa_pack_size, config.epochs, config.seed, config.qa_repeats
    )
    longest = max(len(s) for s in sequences)
    if longest > config.model.max_position_embeddings:
        raise UsageError(
            f"a {name} training sequence has {longest} tokens, more than the model context "
            f"{config.model.max_position_embeddings}; raise max_position_embeddings or lower qa_pack_size"
        )
    model = tiny_llama(config.model, tokenizer, seed=config.seed)
    # The stream already holds every epoch in order, so the loop makes one pass over it.
    loader = DataLoader(sequences, batch_size=config.batch_size, shuffle=False, collate_fn=_collate(tokenizer.pad_token_id))
    train_config = TrainConfig(
        lr=config.lr,
        epochs=1,
        schedule="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        seed=config.seed,
    )
    logger.info(
        "training %s: %d epochs of %d sequences, %d tokens in all", name, config.epochs,
        len(sequences) // config.epochs, sum(len(s) for s in sequences),
    )
    result = train(model, loader, plain_step(_lm_loss), train_config)
    logger.info("%s: %d steps, final loss %.4f", name, result.steps, result.history[-1]["loss"])
    model.eval()
    return model, result


# --------------------------------------------------------------------------- building


def library_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def read_manifest(root: Path) -> dict | None:
    """The ``world.json`` of a built world, or None when ``root`` holds no complete world."""
    from benchmarks.core.pinning import read_json_or_none

    return read_json_or_none(Path(root) / MANIFEST)


def share_tree(root: Path) -> None:
    """Give a built world the permissions of an ordinary directory tree (umask applied):
    some writers (temporary directories, checkpoint files) create theirs private."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_world(root: Path, purpose: str, is_complete=None):
    """A directory beside ``root`` to assemble a world in, renamed to ``root`` when the block
    ends without error (removed otherwise), so an interrupted build never looks complete. If
    another process completed the same world first (``is_complete(root)``, default: it holds a
    ``world.json``), its world is kept and ours dropped."""
    is_complete = is_complete or (lambda path: read_manifest(path) is not None)
    root.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp, which makes it private) so the world gets the usual permissions.
    staging = root.parent / f".{root.name}.{purpose}.{os.getpid()}.{time.time_ns()}"
    staging.mkdir()
    try:
        yield staging
        share_tree(staging)
        try:
            os.replace(staging, root)
        except OSError:
            if not is_complete(root):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_world(config: WorldBuildConfig, root: Path) -> WorldPaths:
    """Build the world into ``root`` (which must not exist): corpus, tokenizer, both models.

    Assembled in a temporary directory beside ``root`` and renamed at the end.
    """
    from benchmarks.core.data import load_data, write_hub_layout

    root = Path(root)
    with staged_world(root, "building") as staging:
        started = time.perf_counter()
        paths = WorldPaths.at(staging)
        data = load_data("world", world_config=config.corpus)
        write_hub_layout(data, paths.corpus_dir)
        raw = {split: [r["text"] for r in data.records("raw", split)] for split in RAW_SPLITS}

        tokenizer = train_world_tokenizer([t for texts in raw.values() for t in texts], config.vocab_size)
        timings = {"corpus_and_tokenizer_s": time.perf_counter() - started}

        recipes = {
            "target": raw["forget"] + raw["retain1"] + raw["retain2"],
            "retrain": raw["retain1"] + raw["retain2"],
        }
        for name, texts in recipes.items():
            began = time.perf_counter()
            model, result = train_world_model(texts, tokenizer, config, name)
            out = getattr(paths, f"{name}_dir")
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            timings[f"{name}_s"] = time.perf_counter() - began
            timings[f"{name}_steps"] = result.steps
            timings[f"{name}_final_loss"] = result.history[-1]["loss"]
            del model

        manifest = {
            "hash": world_hash(config),
            "config": config.describe(),
            "training_data": {"target": ["forget", "retain1", "retain2"], "retrain": ["retain1", "retain2"]},
            "corpus": data.describe()["splits"],
            "versions": library_versions(),
            "torch_threads": torch.get_num_threads(),
            "timings": timings,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("world %s built in %.1f s at %s", world_hash(config), time.perf_counter() - started, root)
    return WorldPaths.at(root)


def check_world_target(out_dir: str | os.PathLike | None) -> None:
    """Fail with one line, before any work, when ``out_dir`` (default: the cache) cannot be
    created or written."""
    from benchmarks.core.results import check_writable_directory

    if out_dir is not None:
        check_writable_directory(out_dir, "--out")
    else:
        check_writable_directory(cache_root(), f"the cache (${CACHE_ENV})")


def ensure_world(
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: WorldBuildConfig | None = None,
    rebuild: bool = False,
) -> WorldPaths:
    """Paths of the world of ``config`` (default: the default world) in ``out_dir`` (default:
    the cache directory for its hash), making it first when none is there.

    A configuration the package ships pinned (:mod:`benchmarks.core.pinned_world`) is
    installed from the pinned models, verified by digest, unless ``rebuild`` asks to train it
    from the recipe; any other configuration is trained. A pinned world already installed is
    verified by digest again on every call.

    ``force`` remakes it even when a complete world is there, and replaces a world of another
    configuration (refused without it). A directory holding anything but a world is never
    replaced.
    """
    from benchmarks.core import pinned_world

    config = config or WorldBuildConfig()
    root = Path(out_dir).expanduser().resolve() if out_dir is not None else default_world_dir(config)
    wanted = world_hash(config)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("hash") == wanted and not force:
        if manifest.get("pinned"):
            pinned_world.verify_installed(WorldPaths.at(root))
        logger.info("using the world %s at %s", wanted, root)
        return WorldPaths.at(root)
    pinned = None if rebuild else pinned_world.pinned_manifest()
    if pinned is not None and pinned.get("hash") != wanted:
        pinned = None

    def make(target: Path) -> WorldPaths:
        if pinned is not None:
            return pinned_world.install(config, target)
        return build_world(config, target)

    if root.exists():
        if root.is_file() or (any(root.iterdir()) and (manifest is None or not force)):
            what = f"a world of another configuration ({manifest.get('hash')})" if manifest else "files that are not a world"
            fix = "pass --force to replace it or choose another --out" if manifest else "choose another --out"
            raise UsageError(f"{root} holds {what}; {fix}")
        # Replace: move the old world aside first so the rename below cannot fail on it.
        aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, aside / root.name)
        try:
            paths = make(root)
        except BaseException:
            if not root.exists():
                os.replace(aside / root.name, root)  # put the old world back
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        return paths
    return make(root)
