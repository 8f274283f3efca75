"""What every relearning attack shares: its settings, its data and its run.

A relearning attack fine-tunes a model on a few forget documents T with the plain
language-modelling loss (Hu et al., 2024, "Jogging the Memory of Unlearned LLMs Through
Targeted Relearning Attacks"; Fan et al., ICML 2025, §5). The documents are packed into one
token stream and cut into ``max_length`` chunks, as MUSE fine-tunes on its corpora: each
document is tokenised without special tokens and followed by EOS, and every chunk starts with
BOS (when the tokenizer has one). The chunks are shuffled once by the seed and then read in
that fixed order, pass after pass, until ``steps`` optimizer steps are done.

An attack is one class: its config (a dataclass below) and :meth:`Attack.prepare`, which
decides what trains (all weights, or LoRA adapters). The training itself is the project's one
loop (:func:`benchmarks.core.training.train`); evaluation milestones are its hooks.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import torch

from benchmarks.core.batching import PadCollate
from benchmarks.core.errors import UsageError
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.registry import Registry
from benchmarks.core.tokenizer import encode_cut_after
from benchmarks.core.training import SCHEDULES, TrainConfig, TrainResult, plain_step, train

logger = logging.getLogger(__name__)


@dataclass
class AttackConfig:
    """Settings shared by every relearning attack.

    Defaults are the NPO+SAM paper's MUSE-News attack (Fan et al., ICML 2025, §5): AdamW,
    lr 1e-5, batch 4, cosine schedule, 100/125/150 steps over the forget corpus in 2048-token
    chunks (here one 150-step run, evaluated on the way). The embedded world uses its own
    calibrated values (``benchmarks.relearn.WORLD_PRESET``).
    """

    relearn_docs: int | None = field(
        default=None,
        metadata={"help": "Number of forget documents the attacker trains on (T); the rest are held out (V)."},
    )
    relearn_fraction: float | None = field(
        default=1.0,
        metadata={"help": "Fraction of the forget documents in T (used when relearn_docs is not set)."},
    )
    steps: int = field(default=150, metadata={"help": "Optimizer steps of the attack."})
    lr: float = field(default=1e-5, metadata={"help": "AdamW peak learning rate."})
    schedule: str = field(default="cosine", metadata={"help": "Learning-rate schedule: constant, linear or cosine."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    batch_size: int = field(default=4, metadata={"help": "Chunks per optimizer step and process (under accelerate "
                                                         "launch the optimizer sees this times the processes)."})
    micro_batch_size: int = field(
        default=4, metadata={"help": "Chunks per forward pass; batch_size / micro_batch_size steps are accumulated."}
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per training chunk (BOS included)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient-norm clip; None disables."})
    mixed_precision: str = field(default="no", metadata={"help": "'no' (fp32) or 'bf16' autocast."})
    answer_view: bool = field(
        default=False,
        metadata={"help": "Also train on each document tokenized with a cut after every 'Answer: ' (the second "
                          "view the embedded world's models learned their facts from; for the world only)."},
    )

    def __post_init__(self) -> None:
        if self.relearn_docs is not None:
            if self.relearn_docs < 1:
                raise UsageError(f"relearn documents must be >= 1, got {self.relearn_docs}")
            self.relearn_fraction = None
        elif self.relearn_fraction is None:
            raise UsageError("set the relearn documents as a count (relearn_docs) or a fraction (relearn_fraction)")
        elif not 0.0 < self.relearn_fraction <= 1.0:
            raise UsageError(f"relearn fraction must lie in (0, 1], got {self.relearn_fraction}")
        if self.steps < 1:
            raise UsageError(f"attack steps must be >= 1, got {self.steps}; pass e.g. --steps 100")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise UsageError(f"batch sizes must be >= 1, got batch {self.batch_size}, micro-batch {self.micro_batch_size}")
        if self.batch_size % self.micro_batch_size:
            raise UsageError(
                f"batch size {self.batch_size} is not a multiple of the micro-batch size {self.micro_batch_size}; "
                "pick a micro-batch size that divides it"
            )
        if self.max_length < 2:
            raise UsageError(f"max length must be >= 2 tokens, got {self.max_length}")
        # The loop's own checks (lr, warmup, decay, clip, precision) with the same messages.
        self.train_config(seed=0)

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    def train_config(self, seed: int, progress: bool = True) -> TrainConfig:
        return TrainConfig(
            lr=self.lr,
            max_steps=self.steps,
            grad_accum=self.grad_accum,
            mixed_precision=self.mixed_precision,
            max_grad_norm=self.max_grad_norm,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            seed=seed,
            progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# --------------------------------------------------------------------------- data


def pack_documents(tokenizer, texts: Sequence[str], max_length: int, answer_view: bool = False) -> list[list[int]]:
    """Token chunks of at most ``max_length`` ids from the documents packed end to end.

    Each document is followed by EOS so the model sees where one ends; each chunk begins with
    BOS when the tokenizer has one (what ``add_special_tokens=True`` would give a single
    text), so a chunk looks like the start of a text to the model. With ``answer_view`` every
    document follows a second time, tokenized with a cut after each ``Answer: `` (see
    :func:`benchmarks.core.tokenizer.encode_cut_after`), the way the embedded world's models
    saw their facts.
    """
    if not texts:
        raise UsageError("the attacker has no documents to train on")
    views = [lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]]
    if answer_view:
        views.append(lambda text: encode_cut_after(tokenizer, text, add_special_tokens=False))
    stream: list[int] = []
    for view in views:
        for text in texts:
            stream.extend(view(text))
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
    bos = tokenizer.bos_token_id
    body = max_length - (1 if bos is not None else 0)
    chunks = []
    for start in range(0, len(stream), body):
        piece = stream[start : start + body]
        if len(piece) + (bos is not None) < 2:  # a single token predicts nothing
            continue
        chunks.append(([bos] if bos is not None else []) + piece)
    return chunks


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> list[int]:
        return self.chunks[index]


def relearn_loader(tokenizer, texts: Sequence[str], config: AttackConfig, seed: int) -> torch.utils.data.DataLoader:
    """Micro-batches of packed chunks in a seeded order fixed for the whole run.

    The order is drawn once here rather than by a shuffling sampler, so the loader yields the
    same sequence on every pass and a resumed run can skip what it already consumed.
    """
    chunks = pack_documents(tokenizer, texts, config.max_length, config.answer_view)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return torch.utils.data.DataLoader(
        _Chunks([chunks[i] for i in order]),
        batch_size=config.micro_batch_size,
        shuffle=False,
        collate_fn=PadCollate(pad_id),
    )


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the real (non-padding) tokens of the batch."""
    return masked_mean_nll(model, batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------------- attacks


class Attack:
    """A relearning attack: a config and what trains. Subclasses set ``config_class`` and
    override :meth:`prepare` (and, if only part of the model trains, the state methods);
    :meth:`documents` when they train on something other than the attacker's forget documents."""

    name: str = ""
    config_class: type[AttackConfig] = AttackConfig
    #: Whether only float32 parameters added by :meth:`prepare` train (then the base weights
    #: may be loaded in bf16; see ``benchmarks.core.precision``).
    trains_adapters_only: bool = False
    #: Whether the attack trains (a trajectory of steps) or only transforms the weights once.
    trains: bool = True

    def documents(self, attacker_documents: Sequence[str], data: Any, seed: int) -> list[str]:
        """The texts the attack trains on: by default the attacker's forget documents T.
        ``data`` is the run's dataset (``benchmarks.core.data``), for attacks that train on
        other text."""
        return list(attacker_documents)

    def __init__(self, config: AttackConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise UsageError(
                f"attack {self.name!r} takes a {self.config_class.__name__}, got {type(self.config).__name__}"
            )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train and evaluate, with the parameters to train set to
        ``requires_grad``."""
        raise NotImplementedError

    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a resume checkpoint must hold to rebuild the attacked model (a CPU copy; tied
        weights copied once, see :func:`benchmarks.core.checkpoints.cpu_copy`)."""
        from benchmarks.core.checkpoints import cpu_copy

        return cpu_copy(model.state_dict())

    def load_trainable_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def run(
        self,
        model: torch.nn.Module,
        tokenizer,
        documents: Sequence[str],
        *,
        seed: int,
        hook: Callable[[int, torch.nn.Module], None] | None = None,
        hook_steps: Sequence[int] = (),
        state_hook: Callable[[int, dict], None] | None = None,
        resume_state: dict | None = None,
        progress: bool = True,
        gradient_checkpointing: bool = False,
    ) -> TrainResult:
        """Fine-tune the *prepared* ``model`` on ``documents`` for ``config.steps`` steps.

        ``hook(step, model)`` evaluates the model at step 0 and at each milestone of this one
        run; ``state_hook``/``resume_state`` checkpoint and resume it (see
        :func:`benchmarks.core.training.train`).
        """
        loader = relearn_loader(tokenizer, documents, self.config, seed)
        logger.info(
            "%s attack: %d documents -> %d chunks of <= %d tokens, %d steps",
            self.name, len(documents), len(loader.dataset), self.config.max_length, self.config.steps,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        return train(
            model,
            loader,
            plain_step(lm_loss),
            replace(self.config.train_config(seed, progress), gradient_checkpointing=gradient_checkpointing),
            hook=hook,
            hook_steps=hook_steps,
            params=params,
            state_hook=state_hook,
            resume_state=resume_state,
        )


ATTACKS: Registry[type[Attack]] = Registry("attack")


class WeightTransform(Attack):
    """An attack that changes the weights once, with no training (e.g. quantization). Its
    curve has two points: step 0 (the model as given) and step ``config.steps`` ("after").

    Subclasses implement :meth:`apply` (transform in place and return the model to evaluate);
    :meth:`applied` undoes it on exit, so that a composed plan (:mod:`attacks.compose`) can
    measure a transformed copy at each milestone of a training attack and go on training the
    untransformed weights.
    """

    trains = False

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        return model

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The transformed model for the duration of the block; the weights are put back
        exactly afterwards (a copy of the state is kept on the CPU meanwhile)."""
        saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        try:
            with torch.no_grad():
                yield self.apply(model)
        finally:
            with torch.no_grad():
                model.load_state_dict(saved)

    def run(self, model, tokenizer, documents, *, seed, hook=None, hook_steps=(), state_hook=None,
            resume_state=None, progress=True, gradient_checkpointing=False) -> TrainResult:
        """Measure the model as given (step 0), transform it, measure it again at the last of
        ``hook_steps``. The transformed weights stay in the model."""
        after = max(hook_steps) if hook_steps else self.config.steps
        model.eval()
        with torch.no_grad():
            if hook is not None and 0 in hook_steps:
                hook(0, model)
            transformed = self.apply(model)
            if hook is not None:
                hook(after, transformed)
        return TrainResult(steps=after, history=[{"step": after, "transform": self.name}])


def attack_flags(registry: Registry | None = None) -> dict[str, dict[str, Any]]:
    """Command-line settings of the registered attacks beyond the shared :class:`AttackConfig`
    ones: field name -> ``{"type", "help", "attacks"}`` (``type``: int, float, str or bool;
    an optional field takes the type it is optional of). A field shared by several attacks is
    one flag."""
    import typing

    registry = registry if registry is not None else ATTACKS
    shared = {f.name for f in fields(AttackConfig)}
    flags: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        config_class = registry.get(name).config_class
        hints = typing.get_type_hints(config_class)
        for f in fields(config_class):
            if f.name in shared:
                continue
            kind = hints[f.name]
            options = [a for a in typing.get_args(kind) if a is not type(None)]
            if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(options) == 1:
                kind = options[0]
            if typing.get_origin(kind) is tuple:
                kind = str  # comma-separated on the command line
            if kind not in (int, float, str, bool):
                raise TypeError(f"{config_class.__name__}.{f.name}: flags support int, float, str and bool")
            entry = flags.setdefault(f.name, {"type": kind, "help": f.metadata.get("help", ""), "attacks": []})
            if entry["type"] is not kind:
                raise TypeError(f"attack setting {f.name!r} has type {entry['type'].__name__} in one attack "
                                f"and {kind.__name__} in {name}")
            entry["attacks"].append(name)
    return flags
