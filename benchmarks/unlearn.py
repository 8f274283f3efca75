"""Apply one defense to a model and write the unlearned checkpoint: ``python -m benchmarks.unlearn``.

Examples::

    # the embedded world: unlearn its target with NPO+SAM, offline, on a laptop CPU
    python -m benchmarks.unlearn --defense npo_sam --out ckpt/world-npo-sam

    # a MUSE-News target on a local copy, the NPO+SAM paper's settings (the default preset)
    python -m benchmarks.unlearn --model muse-bench/MUSE-news_target --data ../muse-news \\
        --defense npo_sam --mixed-precision bf16 --dtype bfloat16 --out ckpt/news-npo-sam

    # several processes or GPUs: the same command under accelerate
    accelerate launch --num_processes 2 -m benchmarks.unlearn --defense npo --out ckpt/npo

The output directory is a standard Hugging Face checkpoint (``save_pretrained``, safetensors,
with the tokenizer) plus ``unlearn.yaml``: the command, the defense and every setting, the data
digests, the per-epoch table and which epoch was kept, the environment and timings.

**Settings.** Two presets fill in whatever is not given on the command line: ``paper`` — the
NPO+SAM paper's MUSE-News 7B settings (Fan et al., ICML 2025: AdamW, lr 1e-5 constant, batch
4, 10 epochs, max length 2048, β = 0.1, ρ = 0.01, weights 1.0/1.0) — for any model, and
``world`` — calibrated for the embedded world's tiny target — when the model is the world's
target (no ``--model``). Every field of the chosen defense's config is a flag (``beta`` ->
``--beta``, ``sam_rho`` -> ``--sam-rho``); a flag that the defense does not take is an error.
``--batch-size`` is the number of forget examples per forward pass (per process) and
``--grad-accum`` the number of such micro-batches per optimizer step.

**Utility-constrained epoch selection**, as MUSE papers do by hand: the model is evaluated
before unlearning and after every epoch (KnowMem-retain, and KnowMem-forget / VerbMem-forget
for the record), and the checkpoint kept is the *last* epoch whose KnowMem-retain stays at or
above ``--utility-threshold`` (default 0.9) times the target's. If no epoch qualifies, the
epoch with the highest KnowMem-retain is kept and the file says so. ``--no-eval`` skips the
evaluation and keeps the last epoch.

Every argument is checked before any model is loaded. A NaN or infinite loss stops the run
(exit 3) and leaves ``unlearn.yaml`` with ``status: diverged`` and what was measured, but no
weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.core.errors import TrainingDiverged, UsageError, run_cli, setup_logging

logger = logging.getLogger("benchmarks.unlearn")

PROG = "python -m benchmarks.unlearn"
WORLD = "world"
SCHEMA_VERSION = 1
RESULT_NAME = "unlearn.yaml"
SELECTION_METRIC = "knowmem_retain"
EVAL_METRICS = ("knowmem_retain", "knowmem_forget", "verbmem_forget")

# --------------------------------------------------------------------------- settings


@dataclass
class UnlearnConfig:
    """Optimisation settings of an unlearning run (the defense's own settings live in its
    config dataclass)."""

    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate, constant schedule."})
    epochs: int = field(default=10, metadata={"help": "Passes over the forget set."})
    batch_size: int = field(default=4, metadata={"help": "Forget examples per forward pass (per process)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(default=2048, metadata={"help": "Tokens per training example; longer texts are split."})
    mixed_precision: str = field(default="no", metadata={"help": "'no' (fp32) or 'bf16' autocast."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0 disables)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, pairing and initial RNG state."})
    answer_view: bool = field(
        default=False,
        metadata={"help": "Also train on every forget/retain text tokenized with a cut after each 'Answer: ', "
                          "the second view the embedded world's models learned their facts from "
                          "(benchmarks.world); for the world only."},
    )
    utility_threshold: float = field(
        default=0.9,
        metadata={"help": "Keep the last epoch whose KnowMem-retain is >= this fraction of the target's "
                          "(0 keeps the last epoch)."},
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UsageError(f"batch_size must be an integer >= 1, got {self.batch_size}")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise UsageError(f"max_length must be an integer >= 2, got {self.max_length}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UsageError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if not (math.isfinite(self.utility_threshold) and 0 <= self.utility_threshold <= 1):
            raise UsageError(
                f"utility_threshold must lie in [0, 1], got {self.utility_threshold}; MUSE-style selection uses 0.9"
            )
        self.train_config()  # lr, epochs, grad_accum, mixed_precision checked by the loop's config

    def train_config(self, progress: bool = False):
        from benchmarks.core.training import TrainConfig

        return TrainConfig(
            lr=self.lr,
            epochs=self.epochs,
            grad_accum=self.grad_accum,
            mixed_precision=self.mixed_precision,
            max_grad_norm=self.max_grad_norm or None,
            schedule="constant",
            seed=self.seed,
            progress=progress,
        )


#: The NPO+SAM paper's MUSE-News settings (Fan et al., ICML 2025, §5; 7B models). The
#: defenses' config defaults (β = 0.1, ρ = 0.01, weights 1.0/1.0) are the paper's too.
PAPER_PRESET: dict[str, Any] = {
    "lr": 1e-5, "epochs": 10, "batch_size": 4, "grad_accum": 1, "max_length": 2048,
    "mixed_precision": "no", "max_grad_norm": 1.0, "seed": 0, "answer_view": False, "utility_threshold": 0.9,
}

#: The embedded world's tiny target (4 layers, 128 wide, 20 forget articles): lr 3e-4 moves
#: it within a few epochs (the paper's 1e-5 barely does in 10), and its facts are unlearned
#: from both views it learned them from (``answer_view``). Examples are 32-token windows, about
#: one Question/Answer block: NPO's loss is on *sequence* log-likelihoods and saturates once a
#: sequence is unlikely, which on a whole 250-token article a few crushed tokens achieve --
#: measured on whole articles: forget loss 0.06 by epoch 10 with KnowMem-forget stuck at 58
#: (results/world/unlearn/npo-whole-articles.yaml). Short windows make every fact's sequence
#: count on its own, and KnowMem-forget keeps falling. The defenses' own settings (β, ρ,
#: weights) stay the paper's; a defense may refine them with its class attribute
#: ``world_settings``. results/world/unlearn/ holds the runs behind these numbers and the
#: trade-off they measure.
WORLD_PRESET: dict[str, Any] = {
    "lr": 3e-4, "epochs": 10, "batch_size": 4, "grad_accum": 1, "max_length": 32,
    "mixed_precision": "no", "max_grad_norm": 1.0, "seed": 0, "answer_view": True, "utility_threshold": 0.9,
}

PRESETS = {"paper": PAPER_PRESET, "world": WORLD_PRESET}
_TRAINING_KEYS = tuple(f.name for f in fields(UnlearnConfig))


def preset_settings(defense: str, preset: str = "paper", registry=None) -> dict[str, Any]:
    """Every hyperparameter of ``defense`` under ``preset`` (``paper`` or ``world``; the name
    ``muse-news`` means ``paper``): training settings and the defense config's fields, flat."""
    from defenses import DEFENSES

    name = "paper" if preset == "muse-news" else preset
    if name not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    cls = (registry if registry is not None else DEFENSES).get(defense)
    settings = dict(PRESETS[name])
    settings.update(cls.config_class().to_dict())
    if name == "world":
        settings.update(cls.world_settings)
    return settings


def resolve_settings(defense: str, settings: Mapping[str, Any]):
    """``(Defense, UnlearnConfig)`` from a flat settings mapping; unknown keys and bad values
    raise :class:`UsageError` (nothing is loaded)."""
    from defenses import DEFENSES

    cls = DEFENSES.get(defense)
    defense_keys = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(settings) - defense_keys - set(_TRAINING_KEYS))
    if unknown:
        raise UsageError(
            f"unknown setting {', '.join(unknown)} for defense {defense!r}; valid: "
            f"{', '.join(sorted(defense_keys | set(_TRAINING_KEYS)))}"
        )
    config = UnlearnConfig(**{k: v for k, v in settings.items() if k in _TRAINING_KEYS})
    instance = cls(cls.config_class(**{k: v for k, v in settings.items() if k in defense_keys}))
    return instance, config


# --------------------------------------------------------------------------- the procedure


@dataclass
class EvalPlan:
    """What to measure before unlearning and after each epoch (the selection rule's threshold
    is the run's ``utility_threshold`` setting)."""

    metrics: tuple[str, ...] = EVAL_METRICS
    batch_size: int = 16


@dataclass
class UnlearnOutcome:
    status: str = "complete"  # complete | diverged
    message: str | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    loss_per_step: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _EpochSelector:
    """Evaluates the model at step 0 and after each epoch, remembering the weights of the last
    epoch that meets the utility bar (and of the best one, as a fallback)."""

    def __init__(self, tokenizer, data, plan: EvalPlan, threshold: float, outcome: UnlearnOutcome) -> None:
        self.tokenizer = tokenizer
        self.data = data
        self.plan = plan
        self.threshold = threshold
        self.outcome = outcome
        self.target_utility: float | None = None
        self.kept: tuple[int, dict] | None = None  # last qualifying epoch
        self.best: tuple[int, float, dict] | None = None  # highest utility, fallback
        self.last_epoch = 0

    def _scores(self, model) -> dict[str, float]:
        from benchmarks.core.metrics import evaluate

        started = time.perf_counter()
        result = evaluate(model, self.tokenizer, self.data, metrics=list(self.plan.metrics),
                          batch_size=self.plan.batch_size)
        self.outcome.timings["evaluation"] = self.outcome.timings.get("evaluation", 0.0) + (
            time.perf_counter() - started
        )
        return result.scores

    @property
    def bar(self) -> float | None:
        if self.target_utility is None:
            return None
        return self.threshold * self.target_utility

    def at_start(self, step: int, model) -> None:
        scores = self._scores(model)
        self.target_utility = scores[SELECTION_METRIC]
        self.outcome.epochs.append({"epoch": 0, "step": step, **scores, "meets_bar": True})
        logger.info("before unlearning: %s", _fmt(scores))

    def after_epoch(self, epoch: int, step: int, model) -> None:
        scores = self._scores(model)
        utility = scores[SELECTION_METRIC]
        meets = utility >= self.bar
        self.outcome.epochs.append({"epoch": epoch, "step": step, **scores, "meets_bar": meets})
        self.last_epoch = epoch
        logger.info("epoch %d: %s (%s the bar %.2f)", epoch, _fmt(scores), "meets" if meets else "below", self.bar)
        if meets:
            self.kept = (epoch, _cpu_state(model))
        elif self.kept is None and (self.best is None or utility > self.best[1]):
            self.best = (epoch, utility, _cpu_state(model))
        # Once a qualifying epoch exists, the fallback is no longer needed.
        if self.kept is not None:
            self.best = None

    def choose(self, model) -> dict[str, Any]:
        """Load the selected epoch's weights into ``model`` and describe the choice."""
        rule = (f"last epoch whose {SELECTION_METRIC} >= {self.threshold} x the target's "
                f"({self.target_utility:.2f} -> bar {self.bar:.2f})")
        if self.kept is not None:
            epoch, state = self.kept
            met = True
        elif self.best is not None:
            epoch, _, state = self.best
            met = False
            logger.warning("no epoch kept %s >= %.2f; keeping epoch %d, the one with the highest %s",
                           SELECTION_METRIC, self.bar, epoch, SELECTION_METRIC)
        else:
            epoch, state, met = self.last_epoch, None, False
        if state is not None and epoch != self.last_epoch:
            model.load_state_dict(state)
        return {
            "metric": SELECTION_METRIC,
            "threshold": self.threshold,
            "target": self.target_utility,
            "bar": self.bar,
            "rule": rule,
            "selected_epoch": epoch,
            "met_threshold": met,
        }


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def unlearn(
    model,
    tokenizer,
    data,
    defense,
    config: UnlearnConfig,
    *,
    evaluation: EvalPlan | None = EvalPlan(),
    accelerator=None,
    progress: bool = False,
) -> UnlearnOutcome:
    """Unlearn ``data``'s raw/forget split from ``model`` with ``defense`` (retain term on
    raw/retain1), in place. With ``evaluation``, the weights left in ``model`` are those of the
    selected epoch. A non-finite loss ends the run with ``status == "diverged"``."""
    import torch

    from benchmarks.core.models import context_length
    from benchmarks.core.training import make_accelerator, steps_per_epoch, train
    from defenses.data import ForgetRetainDataset, reference_loader, tokenize_texts, training_loader

    outcome = UnlearnOutcome()
    train_config = config.train_config(progress=progress)
    accelerator = accelerator or make_accelerator(train_config)

    max_length = min(config.max_length, context_length(model))
    if max_length < config.max_length:
        logger.warning("max_length %d exceeds the model's context; using %d", config.max_length, max_length)
    views = ()
    if config.answer_view:
        from benchmarks.world import encode_cut_after

        views = (lambda text: encode_cut_after(tokenizer, text),)
    forget = tokenize_texts(tokenizer, [r["text"] for r in data.records("raw", "forget")], max_length, views)
    retain = (
        tokenize_texts(tokenizer, [r["text"] for r in data.records("raw", "retain1")], max_length, views)
        if defense.uses_retain else None
    )
    dataset = ForgetRetainDataset(forget, retain, seed=config.seed)
    loader = training_loader(dataset, tokenizer, config.batch_size, seed=config.seed)
    micro_batches = math.ceil(len(dataset) / (config.batch_size * accelerator.num_processes))
    outcome.training = {
        "forget_examples": len(forget),
        "retain_examples": len(retain) if retain is not None else 0,
        "max_length": max_length,
        "processes": accelerator.num_processes,
        "examples_per_step": config.batch_size * config.grad_accum * accelerator.num_processes,
        "steps_per_epoch": steps_per_epoch(micro_batches, config.grad_accum),
    }

    torch.manual_seed(config.seed)
    model.to(accelerator.device)
    started = time.perf_counter()
    defense.setup(
        model,
        accelerator.prepare_data_loader(reference_loader(forget, tokenizer, config.batch_size)),
        len(forget),
        accelerator,
    )
    outcome.timings["reference"] = time.perf_counter() - started

    selector = (
        _EpochSelector(tokenizer, data, evaluation, config.utility_threshold, outcome)
        if evaluation is not None else None
    )
    started = time.perf_counter()
    try:
        result = train(
            model, loader, defense.step_fn(), train_config,
            hook=selector.at_start if selector else None,
            hook_steps=(0,) if selector else (),
            epoch_hook=_seen_through(defense, selector.after_epoch) if selector else None,
            accelerator=accelerator,
        )
    except TrainingDiverged as err:
        outcome.status, outcome.message = "diverged", str(err)
        logger.error("%s", err)
        return outcome
    finally:
        outcome.timings["train"] = time.perf_counter() - started - outcome.timings.get("evaluation", 0.0)
    defense.finish(model)  # e.g. weight averaging: the mean replaces the last weights
    outcome.loss_per_step = [h["loss"] for h in result.history]
    _add_epoch_losses(outcome, result.history)
    outcome.training["steps"] = result.steps
    if selector is not None:
        outcome.selection = selector.choose(model)
    else:
        outcome.selection = {"rule": "last epoch (no evaluation)", "selected_epoch": config.epochs}
    return outcome


def _seen_through(defense, epoch_hook):
    """``epoch_hook`` run on the weights the defense would return at that point (for weight
    averaging, its running mean), so the epoch kept is judged on what it returns."""

    def hook(epoch: int, step: int, model) -> None:
        with defense.evaluation_weights(model):
            epoch_hook(epoch, step, model)

    return hook


def _add_epoch_losses(outcome: UnlearnOutcome, history: list[dict]) -> None:
    """Mean training losses of each epoch, merged into the per-epoch table."""
    by_epoch: dict[int, dict[str, list[float]]] = {}
    for row in history:
        for key in ("loss", "forget_loss", "retain_loss"):
            if key in row:
                by_epoch.setdefault(row["epoch"], {}).setdefault(key, []).append(row[key])
    rows = {row["epoch"]: row for row in outcome.epochs}
    for epoch, losses in sorted(by_epoch.items()):
        row = rows.get(epoch)
        if row is None:
            row = {"epoch": epoch}
            outcome.epochs.append(row)
        for key, values in losses.items():
            row[f"mean_{key}"] = sum(values) / len(values)
    outcome.epochs.sort(key=lambda r: r["epoch"])


# --------------------------------------------------------------------------- files


def model_fingerprint(ref: str) -> str:
    """sha256 over a local checkpoint's config and weight files, or the hub id itself."""
    path = Path(ref)
    if not path.is_dir():
        return f"hub:{ref}"
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.suffix in (".safetensors", ".bin") or file.name == "config.json":
            digest.update(file.name.encode("utf-8"))
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def data_record(data) -> dict[str, Any]:
    """Source and the digests of the splits an unlearning run reads."""
    described = data.describe()
    return {
        "source": described["source"],
        "kind": described["kind"],
        "splits": {
            key: {"n": value["records"], "sha256": value["sha256"]}
            for key, value in described["splits"].items()
            if key.split("/")[0] in ("raw", "knowmem", "verbmem")
        },
    }


def build_document(*, command, model_ref, dtype, preset, defense, config, data, outcome, references,
                   device, timings) -> dict[str, Any]:
    from benchmarks.core.metrics import METRICS
    from benchmarks.core.results import environment_info, new_run_id, utc_now

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "unlearn",
        "run_id": new_run_id(),
        "command": command,
        "created": utc_now(),
        "status": outcome.status,
        **({"message": outcome.message} if outcome.message else {}),
        "model": {"id": model_ref, "revision_or_hash": model_fingerprint(model_ref), "dtype": dtype,
                  "preset": preset},
        "defense": {"name": defense.name, "hyperparameters": {**asdict(config), **defense.config.to_dict()}},
        "data": data_record(data),
        "training": outcome.training,
        "selection": outcome.selection,
        "epochs": outcome.epochs,
        "references": references,
        "loss_per_step": outcome.loss_per_step,
        "higher_is_better": {
            name: {"higher": True, "lower": False}.get(METRICS.get(name).goal) for name in EVAL_METRICS
        },
        "environment": environment_info(device),
        "timings": {**timings, **outcome.timings},
    }


def save_checkpoint(model, tokenizer, document: Mapping[str, Any] | None, out: Path, overwrite: bool) -> Path:
    """Write the checkpoint (when given a model) and ``unlearn.yaml`` into ``out`` atomically:
    everything goes into a temporary sibling directory that is renamed into place."""
    from benchmarks.core.results import write_yaml_atomic

    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model is not None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if document is not None:
            write_yaml_atomic(tmp / RESULT_NAME, document)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise UsageError(f"{out} is not empty; pass --overwrite to replace it")
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, aside / out.name)
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unlearn_cached(
    base_ref: str,
    defense: str,
    settings: Mapping[str, Any] | None = None,
    data: Any = WORLD,
    *,
    dtype: str = "float32",
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    evaluation: EvalPlan | None = EvalPlan(),
) -> Path:
    """The checkpoint of ``base_ref`` unlearned by ``defense`` with ``settings`` (default: the
    world preset for the world's data, else the paper's) on ``data`` (a source string or a
    loaded ``MuseData``), built on first use and cached under ``<cache>/unlearned/`` keyed by
    the base model's hash, the defense, every setting and the data digests."""
    from benchmarks.core.data import load_data
    from benchmarks.core.models import load_model
    from benchmarks.core.results import read_result
    from benchmarks.world import cache_root

    if isinstance(data, str):
        data = load_data(data, subsets=("raw", "knowmem", "verbmem"))
    preset = "world" if data.kind == "world" else "paper"
    # Whatever is not given comes from the preset, so the cache key and the record are complete.
    settings = {**preset_settings(defense, preset), **(settings or {})}
    instance, config = resolve_settings(defense, settings)
    key = hashlib.sha256(json.dumps({
        "schema": SCHEMA_VERSION,
        "base": model_fingerprint(base_ref),
        "defense": defense,
        "settings": {**asdict(config), **instance.config.to_dict()},
        "data": data_record(data)["splits"],
        "dtype": dtype,
        "evaluation": asdict(evaluation) if evaluation is not None else None,
    }, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "unlearned"
    out = out / f"{defense}-{key}"
    if (out / RESULT_NAME).is_file() and (out / "config.json").is_file():
        if read_result(out / RESULT_NAME).get("status") == "complete":
            logger.info("using the cached unlearned model %s", out)
            return out
    started = time.perf_counter()
    model, tokenizer = load_model(base_ref, dtype)
    timings = {"load": time.perf_counter() - started}
    outcome = unlearn(model, tokenizer, data, instance, config, evaluation=evaluation, progress=progress)
    document = build_document(
        command=None, model_ref=base_ref, dtype=dtype, preset=preset, defense=instance, config=config,
        data=data, outcome=outcome, references={}, device=str(next(model.parameters()).device), timings=timings,
    )
    if outcome.status != "complete":
        raise TrainingDiverged(outcome.message or f"unlearning with {defense} diverged")
    return save_checkpoint(model, tokenizer, document, out, overwrite=True)


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``), exit 2, like every usage error."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {PROG} --help)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def defense_flags(registry=None) -> dict[str, dict[str, Any]]:
    """Command-line flags for every field of every registered defense's config: field name ->
    ``{"type", "help", "defenses"}``. A field shared by several defenses is one flag."""
    from defenses import DEFENSES

    registry = registry if registry is not None else DEFENSES
    flags: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        config_class = registry.get(name).config_class
        hints = typing.get_type_hints(config_class)
        for f in fields(config_class):
            kind = hints[f.name]
            if kind not in (float, int, str, bool):
                raise TypeError(f"{config_class.__name__}.{f.name}: flags support float, int, str and bool")
            entry = flags.setdefault(f.name, {"type": kind, "help": f.metadata.get("help", ""), "defenses": []})
            if entry["type"] is not kind:
                raise TypeError(f"setting {f.name!r} has type {entry['type'].__name__} in one defense and "
                                f"{kind.__name__} in {name}")
            entry["defenses"].append(name)
    clash = set(flags) & (set(_TRAINING_KEYS) | {"model", "data", "defense", "out"})
    if clash:
        raise TypeError(f"defense settings {sorted(clash)} clash with the command's own flags")
    return flags


def build_parser(registry=None) -> argparse.ArgumentParser:
    from defenses import DEFENSES

    registry = registry if registry is not None else DEFENSES
    parser = _Parser(
        prog=PROG,
        description="Apply one unlearning defense to a model and write a Hugging Face checkpoint plus "
                    "unlearn.yaml (settings, per-epoch evaluation, the epoch kept).",
        epilog="Presets: without --model the embedded world's target is unlearned with the 'world' preset; "
               "any other model gets the 'paper' preset (NPO+SAM paper, MUSE-News 7B: lr 1e-5 constant, batch 4, "
               "10 epochs, max length 2048). Flags override the preset. The kept epoch is the last whose "
               "KnowMem-retain is >= --utility-threshold x the target's.",
    )
    what = parser.add_argument_group("what to unlearn")
    what.add_argument("--model", default=None,
                      help="checkpoint directory or hub id (default: the embedded world's target)")
    what.add_argument("--data", default=None,
                      help="'world', a hub id such as muse-bench/MUSE-News, or a directory in hub or MUSE "
                           "layout (default: 'world' when --model is not given)")
    what.add_argument("--defense", required=True, help=f"one of: {', '.join(registry.names())}")
    what.add_argument("--out", required=True, help="output directory (a Hugging Face checkpoint + unlearn.yaml)")
    what.add_argument("--overwrite", action="store_true", help="replace a non-empty --out / existing --report")
    what.add_argument("--report", default=None, help="also write unlearn.yaml to this path (e.g. under results/)")
    what.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype to load the model in")

    training = parser.add_argument_group("training (default: the preset; see below)")
    for f in fields(UnlearnConfig):
        kind = typing.get_type_hints(UnlearnConfig)[f.name]
        text = f"{f.metadata['help']} [paper preset: {PAPER_PRESET[f.name]}, world preset: {WORLD_PRESET[f.name]}]"
        if kind is bool:
            training.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, dest=f.name,
                                  help=text)
            continue
        extra = {"choices": ["no", "bf16"]} if f.name == "mixed_precision" else {}
        training.add_argument(_flag(f.name), type=kind, default=None, dest=f.name, help=text, **extra)

    settings = parser.add_argument_group("defense settings (default: the defense's own; [the defenses that take it])")
    for name, entry in defense_flags(registry).items():
        used_by = ", ".join(entry["defenses"])
        if entry["type"] is bool:
            settings.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, dest=name,
                                  help=f"{entry['help']} [{used_by}]")
        else:
            settings.add_argument(_flag(name), type=entry["type"], default=None, dest=name,
                                  help=f"{entry['help']} [{used_by}]")

    run = parser.add_argument_group("evaluation and run")
    run.add_argument("--no-eval", action="store_true", help="skip per-epoch evaluation; keep the last epoch")
    run.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    run.add_argument("--retrain", default=None,
                     help="retrain model evaluated once as a reference row (default with the world: its retrain)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--progress", action="store_true", help="show a progress bar")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


@dataclass
class Request:
    """A fully checked command: nothing loaded yet."""

    model_ref: str | None  # None: the world's target
    data: str
    preset: str
    defense: Any
    config: UnlearnConfig
    out: Path
    report: Path | None
    retrain_ref: str | None  # None with world: the world's retrain (when evaluating)
    evaluation: EvalPlan | None


def plan_request(args: argparse.Namespace, registry=None) -> Request:
    """Check every argument and settle every setting; raises UsageError, loads nothing."""
    from benchmarks.core.data import resolve_source
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_output_target
    from defenses import DEFENSES

    registry = registry if registry is not None else DEFENSES
    cls = registry.get(args.defense)
    if args.model is None:
        if args.data not in (None, WORLD):
            raise UsageError(f"--data {args.data} needs --model (only the world brings its own target)")
        model_ref, data, preset = None, WORLD, "world"
    else:
        if args.data is None:
            raise UsageError("--data is required with --model: 'world', a hub id or a MUSE-News directory")
        model_ref, data = check_model_ref(args.model), args.data
        preset = "world" if _is_world_target(model_ref) else "paper"
    resolve_source(data)

    defense_keys = {f.name for f in fields(cls.config_class)}
    given = {name for name in defense_flags(registry) if getattr(args, name, None) is not None}
    foreign = sorted(given - defense_keys)
    if foreign:
        users = {n: ", ".join(defense_flags(registry)[n]["defenses"]) for n in foreign}
        raise UsageError("; ".join(f"{_flag(n)} does not apply to defense {args.defense!r} (it is a setting of: "
                                   f"{users[n]})" for n in foreign))
    settings = preset_settings(args.defense, preset, registry)
    for name in list(_TRAINING_KEYS) + sorted(defense_keys):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    config = UnlearnConfig(**{k: settings[k] for k in _TRAINING_KEYS})
    defense = cls(cls.config_class(**{k: settings[k] for k in defense_keys}))

    if args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UsageError(f"--out {out} exists and is not an empty directory; pass --overwrite or choose another")
    check_output_target(out)
    report = None
    if args.report is not None:
        report = check_output_target(args.report, overwrite=args.overwrite)
        if report.suffix not in (".yaml", ".yml"):
            raise UsageError(f"--report {args.report!r} should be a .yaml file")
    retrain_ref = check_model_ref(args.retrain) if args.retrain is not None else None
    evaluation = None if args.no_eval else EvalPlan(batch_size=args.eval_batch_size)
    return Request(model_ref, data, preset, defense, config, out, report, retrain_ref, evaluation)


def check_data(data, defense, evaluation: EvalPlan | None) -> None:
    """Fail before any model is loaded when ``data`` lacks a split the run will read."""
    from benchmarks.core.metrics import required_splits

    needed = [("raw", "forget")] + ([("raw", "retain1")] if defense.uses_retain else [])
    if evaluation is not None:
        needed += required_splits(list(evaluation.metrics))
    for subset, split in needed:
        data.split(subset, split)  # DataError naming the split and the source


def _is_world_target(ref: str) -> bool:
    """Whether ``ref`` is the default world's target directory (then the world preset applies)."""
    from benchmarks.world import WorldBuildConfig, default_world_dir

    try:
        return Path(ref).resolve() == (default_world_dir(WorldBuildConfig()) / "target").resolve()
    except OSError:
        return False


def _print_table(outcome: UnlearnOutcome, references: Mapping[str, Mapping[str, float]]) -> None:
    from tabulate import tabulate

    metrics = [m for m in EVAL_METRICS if any(m in row for row in outcome.epochs)]
    rows = [[f"{name} (reference)", *[scores.get(m) for m in metrics], "", ""] for name, scores in references.items()]
    chosen = outcome.selection.get("selected_epoch")
    for row in outcome.epochs:
        mark = "<- kept" if row["epoch"] == chosen else ""
        rows.append([f"epoch {row['epoch']}", *[row.get(m) for m in metrics], row.get("mean_loss"), mark])
    print(tabulate(rows, headers=["", *metrics, "mean loss", ""], floatfmt=".2f"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    request = plan_request(args)
    from benchmarks.core.results import command_line

    command = command_line("benchmarks.unlearn", argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from benchmarks.core.data import load_data
    from benchmarks.core.metrics import evaluate
    from benchmarks.core.models import load_model
    from benchmarks.core.training import make_accelerator

    accelerator = make_accelerator(request.config.train_config())
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports
    timings: dict[str, float] = {}
    model_ref, retrain_ref = request.model_ref, request.retrain_ref
    world_reference = request.evaluation is not None and retrain_ref is None and request.data == WORLD
    if model_ref is None or world_reference:
        from benchmarks.world import ensure_world

        started = time.perf_counter()
        with accelerator.main_process_first():  # one process builds the world, the others wait
            paths = ensure_world()
        timings["world"] = time.perf_counter() - started
        model_ref = model_ref or str(paths.target_dir)
        if world_reference:
            retrain_ref = str(paths.retrain_dir)
    data = load_data(request.data, subsets=("raw", "knowmem", "verbmem"))
    check_data(data, request.defense, request.evaluation)

    references: dict[str, dict[str, float]] = {}
    if retrain_ref is not None and request.evaluation is not None:
        started = time.perf_counter()
        retrain, retrain_tokenizer = load_model(retrain_ref, args.dtype, accelerator.device)
        references["retrain"] = evaluate(retrain, retrain_tokenizer, data, metrics=list(EVAL_METRICS),
                                         batch_size=request.evaluation.batch_size).scores
        del retrain
        timings["retrain_evaluation"] = time.perf_counter() - started

    started = time.perf_counter()
    model, tokenizer = load_model(model_ref, args.dtype)
    timings["load"] = time.perf_counter() - started
    outcome = unlearn(model, tokenizer, data, request.defense, request.config,
                      evaluation=request.evaluation, accelerator=accelerator, progress=args.progress)
    document = build_document(
        command=command, model_ref=model_ref, dtype=args.dtype, preset=request.preset, defense=request.defense,
        config=request.config, data=data, outcome=outcome, references=references,
        device=str(accelerator.device), timings=timings,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from benchmarks.core.results import write_yaml_atomic

        complete = outcome.status == "complete"
        save_checkpoint(model if complete else None, tokenizer, document, request.out, args.overwrite)
        if request.report is not None:
            write_yaml_atomic(request.report, document, overwrite=args.overwrite)
        if complete:
            _print_table(outcome, references)
            print(f"checkpoint: {request.out} (epoch {outcome.selection.get('selected_epoch')} kept)")
    accelerator.wait_for_everyone()
    if outcome.status != "complete":
        raise TrainingDiverged(f"{outcome.message}; what was measured is in {request.out / RESULT_NAME}")
    return 0


if __name__ == "__main__":
    run_cli(main)
