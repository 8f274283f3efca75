"""Unlearning with a defense: settings and presets, the training run with utility-constrained
epoch selection, the record of a run, and the cache of unlearned checkpoints.

Shared by ``python -m benchmarks.unlearn`` (one defense, one checkpoint) and
``python -m benchmarks.relearn`` (defend, then attack). The defense registry is passed in by the
caller (``benchmarks.core`` never imports ``defenses``).

**Utility-constrained epoch selection**, as MUSE papers do by hand: the model is evaluated
before unlearning and after every epoch (KnowMem-retain, and KnowMem-forget / VerbMem-forget
for the record), and the checkpoint kept follows :data:`SELECTION_RULE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from benchmarks.core.errors import TrainingDiverged, UsageError

logger = logging.getLogger(__name__)

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

    lr: float = field(default=1e-5, metadata={"help": "AdamW (peak) learning rate."})
    schedule: str = field(default="constant", metadata={"help": "Learning-rate schedule: constant, linear or cosine."})
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
        metadata={"help": "Utility bar of the epoch selection: KnowMem-retain >= this fraction of the target's "
                          "(0 keeps the last epoch; see SELECTION_RULE)."},
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
            schedule=self.schedule,
            seed=self.seed,
            progress=progress,
        )


#: The NPO+SAM paper's MUSE-News settings (Fan et al., ICML 2025, §5; 7B models). The
#: defenses' config defaults (β = 0.1, ρ = 0.01, weights 1.0/1.0) are the paper's too.
PAPER_PRESET: dict[str, Any] = {
    "lr": 1e-5, "schedule": "constant", "epochs": 10, "batch_size": 4, "grad_accum": 1, "max_length": 2048,
    "mixed_precision": "no", "max_grad_norm": 1.0, "seed": 0, "answer_view": False, "utility_threshold": 0.9,
}

#: The embedded world's tiny target (4 layers, 128 wide, 20 forget articles of one subject):
#: lr 6e-4, decayed linearly over 6 epochs, moves it (the paper's 1e-5 barely does; the decay
#: settles the last epochs, which the plateau rule compares), and its facts are unlearned
#: from both views it learned them from (``answer_view``). Examples are 32-token windows, about
#: one Question/Answer block: NPO's loss is on *sequence* log-likelihoods and saturates once a
#: sequence is unlikely, which on a whole 250-token article a few crushed tokens achieve, while
#: short windows make every fact's sequence count on its own. NPO and its variants refine the
#: retain term for the world in their ``world_settings`` (KLR, β 0.04, weights 1.5/2; see
#: :class:`defenses.npo.NPO`). results/world/unlearn/ holds the runs behind these choices.
WORLD_PRESET: dict[str, Any] = {
    "lr": 6e-4, "schedule": "linear", "epochs": 6, "batch_size": 4, "grad_accum": 1, "max_length": 32,
    "mixed_precision": "no", "max_grad_norm": 1.0, "seed": 0, "answer_view": True, "utility_threshold": 0.9,
}

PRESETS = {"paper": PAPER_PRESET, "world": WORLD_PRESET}
TRAINING_KEYS = tuple(f.name for f in fields(UnlearnConfig))


def preset_settings(defense: str, preset: str, registry) -> dict[str, Any]:
    """Every hyperparameter of ``defense`` (looked up in ``registry``) under ``preset``
    (``paper`` or ``world``; the name ``muse-news`` means ``paper``): training settings and the
    defense config's fields, flat."""
    name = "paper" if preset == "muse-news" else preset
    if name not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    cls = registry.get(defense)
    settings = dict(PRESETS[name])
    settings.update(cls.config_class().to_dict())
    if name == "world":
        settings.update(cls.world_settings)
    return settings


def resolve_settings(defense: str, settings: Mapping[str, Any], registry):
    """``(Defense, UnlearnConfig)`` from a flat settings mapping; unknown keys and bad values
    raise :class:`UsageError` (nothing is loaded)."""
    cls = registry.get(defense)
    defense_keys = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(settings) - defense_keys - set(TRAINING_KEYS))
    if unknown:
        raise UsageError(
            f"unknown setting {', '.join(unknown)} for defense {defense!r}; valid: "
            f"{', '.join(sorted(defense_keys | set(TRAINING_KEYS)))}"
        )
    config = UnlearnConfig(**{k: v for k, v in settings.items() if k in TRAINING_KEYS})
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


#: How the kept epoch is chosen (recorded in every unlearn.yaml).
SELECTION_RULE = (
    "the last epoch that meets the utility bar (KnowMem-retain >= threshold x the target's) together with "
    "the epoch before it (a plateau of two); else the last epoch that meets it alone; else the epoch with "
    "the highest KnowMem-retain"
)


class _EpochSelector:
    """Evaluates the model at step 0 and after each epoch and keeps the weights of the epoch
    :data:`SELECTION_RULE` chooses.

    Why a plateau: a bar met by one epoch between two that miss it is met by noise -- another
    seed or machine moves that epoch below the bar and the kept model (and every number after
    it) jumps. Two epochs in a row above the bar put the kept model where the trade-off is flat.
    """

    def __init__(self, tokenizer, data, plan: EvalPlan, threshold: float, outcome: UnlearnOutcome) -> None:
        self.tokenizer = tokenizer
        self.data = data
        self.plan = plan
        self.threshold = threshold
        self.outcome = outcome
        self.target_utility: float | None = None
        self.plateau: tuple[int, dict] | None = None  # last epoch meeting the bar after one that did
        self.single: tuple[int, dict] | None = None  # last epoch meeting the bar
        self.best: tuple[int, float, dict] | None = None  # highest utility, the last fallback
        self.last_epoch = 0
        self.previous_met = False
        self.stopped: tuple[float, bool] | None = None  # (fractional epoch, met the bar) of a cut run

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
            state = _cpu_state(model)
            self.single = (epoch, state)
            if self.previous_met:
                self.plateau = (epoch, state)
        elif self.single is None and (self.best is None or utility > self.best[1]):
            self.best = (epoch, utility, _cpu_state(model))
        self.previous_met = meets
        # Once a qualifying epoch exists, the last fallback is no longer needed.
        if self.single is not None:
            self.best = None

    def after_stop(self, step: int, steps_per_epoch: int, model) -> None:
        """Measure the weights of a run that ``max_steps`` cut mid-epoch. They are what is kept:
        a cut run is a smoke test or a rehearsal, and reporting an earlier epoch as kept (epoch 0,
        the untouched model, when the cut falls inside the first) would misname what is saved."""
        scores = self._scores(model)
        meets = scores[SELECTION_METRIC] >= self.bar
        epoch = round(step / steps_per_epoch, 2)
        self.outcome.epochs.append({"epoch": epoch, "step": step, **scores, "meets_bar": meets,
                                    "stopped_by": "max_steps"})
        self.stopped = (epoch, meets)
        logger.info("stopped by max_steps at step %d (epoch %.2f): %s", step, epoch, _fmt(scores))

    def choose(self, model) -> dict[str, Any]:
        """Load the selected epoch's weights into ``model`` and describe the choice."""
        bar = f"({self.target_utility:.2f} x {self.threshold} -> bar {self.bar:.2f})"
        rule = f"{SELECTION_RULE} {bar}"
        if self.stopped is not None:
            (epoch, met), state, how = self.stopped, None, "stopped by max_steps (the weights where it stopped)"
            rule = f"none: max_steps cut the run {bar}"
        elif self.plateau is not None:
            (epoch, state), met, how = self.plateau, True, "plateau"
        elif self.single is not None:
            (epoch, state), met, how = self.single, True, "single epoch"
            logger.warning("no two epochs in a row met the bar %.2f; keeping epoch %d, the last that met it",
                           self.bar, epoch)
        elif self.best is not None:
            epoch, _, state = self.best
            met, how = False, "highest utility"
            logger.warning("no epoch kept %s >= %.2f; keeping epoch %d, the one with the highest %s",
                           SELECTION_METRIC, self.bar, epoch, SELECTION_METRIC)
        else:
            epoch, state, met, how = self.last_epoch, None, False, "last epoch"
        if state is not None and epoch != self.last_epoch:
            model.load_state_dict(state)
        return {
            "metric": SELECTION_METRIC,
            "threshold": self.threshold,
            "target": self.target_utility,
            "bar": self.bar,
            "rule": rule,
            "selected_by": how,
            "selected_epoch": epoch,
            "met_threshold": met,
        }


def _cpu_state(model) -> dict:
    from benchmarks.core.checkpoints import cpu_copy

    return cpu_copy(model.state_dict())  # tied weights copied once


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
    gradient_checkpointing: bool = False,
    max_steps: int | None = None,
) -> UnlearnOutcome:
    """Unlearn ``data``'s raw/forget split from ``model`` with ``defense`` (retain term on
    raw/retain1), in place. With ``evaluation``, the weights left in ``model`` are those of the
    selected epoch. A non-finite loss ends the run with ``status == "diverged"``. ``max_steps``
    stops the training after that many optimizer steps, wherever the epoch is (a smoke test or
    a memory rehearsal of a large model, not an unlearning to keep); the file records it."""
    import torch

    from benchmarks.core.models import context_length
    from benchmarks.core.precision import PrecisionView
    from benchmarks.core.processes import from_main, main_only
    from benchmarks.core.training import make_accelerator, steps_per_epoch, train
    from benchmarks.core.unlearn_data import ForgetRetainDataset, reference_loader, tokenize_texts, training_loader

    outcome = UnlearnOutcome()
    train_config = replace(config.train_config(progress=progress), gradient_checkpointing=gradient_checkpointing)
    accelerator = accelerator or make_accelerator(train_config)

    max_length = min(config.max_length, context_length(model))
    if max_length < config.max_length:
        logger.warning("max_length %d exceeds the model's context; using %d", config.max_length, max_length)
    views = ()
    if config.answer_view:
        from benchmarks.core.tokenizer import encode_cut_after

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
    if max_steps is not None:  # never more than the epochs would take (max_steps cycles the data)
        outcome.training["max_steps"] = max_steps
        train_config = replace(train_config, max_steps=min(
            max_steps, config.epochs * outcome.training["steps_per_epoch"]))

    torch.manual_seed(config.seed)
    model.to(accelerator.device)
    started = time.perf_counter()
    defense.setup(
        model,
        accelerator.prepare_data_loader(reference_loader(forget, tokenizer, config.batch_size)),
        len(forget),
        PrecisionView(accelerator, train_config.mixed_precision),  # log π_ref in the training's precision
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
            # Measured on the main process only (benchmarks.core.processes).
            hook=main_only(selector.at_start) if selector else None,
            hook_steps=(0,) if selector else (),
            epoch_hook=main_only(_seen_through(defense, selector.after_epoch)) if selector else None,
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
    outcome.training["steps"] = result.steps
    if selector is not None and result.steps % outcome.training["steps_per_epoch"]:
        # max_steps ended the run inside an epoch: no epoch hook measured these weights.
        main_only(selector.after_stop)(result.steps, outcome.training["steps_per_epoch"], model)
    _add_epoch_losses(outcome, result.history)
    if selector is not None:
        # The main process measured and chooses; every process gets its table and choice. Only
        # the main process's model holds the chosen epoch's weights (it is the one saved).
        outcome.epochs, outcome.selection = from_main(lambda: (outcome.epochs, selector.choose(model)))
    else:
        outcome.selection = {"rule": "last epoch (no evaluation)", "selected_epoch": config.epochs}
    return outcome


def defense_training_shape(defense, config: UnlearnConfig, gradient_checkpointing: bool = False):
    """What sets the memory of ``defense``'s training under ``config`` (for ``--dry-run``):
    its micro-batch and length, precision, SAM's saved copy, and a frozen reference model."""
    from benchmarks.core.footprint import TrainingShape

    reference = defense.needs_reference_model or (defense.uses_retain and defense.retain_term.needs_reference_model)
    sam = float(getattr(defense.config, "sam_rho", 0) or 0) > 0
    return TrainingShape(config.batch_size, config.max_length, config.mixed_precision, gradient_checkpointing,
                         sam=sam, reference_model=reference,
                         accumulates=sam or defense.uses_retain or config.grad_accum > 1)


def unlearn_plan(*, model_ref: str | None, data: str, preset: str, defense, config: UnlearnConfig, dtype: str,
                 gradient_checkpointing: bool, evaluation: EvalPlan | None, out: Path,
                 max_steps: int | None = None) -> dict[str, Any]:
    """What ``benchmarks.unlearn`` will do, settled and sized before anything loads (its
    ``--dry-run``): settings, the output, and the estimated peak memory per device."""
    from benchmarks.core.footprint import memory_estimate

    if model_ref is None:  # the world's target: sized from its config once the world is installed
        from benchmarks.core.world_build import WorldBuildConfig, default_world_dir

        target = default_world_dir(WorldBuildConfig()) / "target"
        ref = str(target) if (target / "config.json").exists() else None
    else:
        ref = model_ref
    # The kept epoch's weights outlive it only when another epoch trains after it.
    shape = replace(defense_training_shape(defense, config, gradient_checkpointing),
                    kept_epoch_copy=evaluation is not None and config.epochs > 1)
    memory = memory_estimate(ref, {f"defense {defense.name}": (None, shape)},
                             weight_bytes=2 if dtype == "bfloat16" else 4)
    return {
        "model": {"id": model_ref or "world/target", "dtype": dtype},
        "data": data,
        "preset": preset,
        "defense": defense.describe(),
        "training": {**asdict(config), "gradient_checkpointing": gradient_checkpointing,
                     **({"max_steps": max_steps} if max_steps is not None else {})},
        "evaluation": ({"metrics": list(evaluation.metrics), "batch_size": evaluation.batch_size}
                       if evaluation is not None else "off (last epoch kept)"),
        "output": str(out),
        "memory_per_device": memory,
    }


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
    # A run cut mid-epoch has a fractional last row (1.5): the losses of epoch 2 so far are its.
    rows = {math.ceil(row["epoch"]): row for row in outcome.epochs}
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
    """sha256 over a local checkpoint's config and weight files (once per process), or the hub
    id with its commit (see :mod:`benchmarks.core.provenance`)."""
    from benchmarks.core.provenance import model_fingerprint as fingerprint

    return fingerprint(ref)


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
    registry,
    dtype: str = "float32",
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    evaluation: EvalPlan | None = EvalPlan(),
    gradient_checkpointing: bool = False,
    build: bool = True,
) -> Path | None:
    """The checkpoint of ``base_ref`` unlearned by ``defense`` with ``settings`` (default: the
    world preset for the world's data, else the paper's) on ``data`` (a source string or a
    loaded ``MuseData``), built on first use and cached under ``<cache>/unlearned/`` keyed by
    the base model's hash, the defense, every setting and the data digests. With
    ``build=False`` only the cache is looked up: None when the model is not there."""
    from benchmarks.core.data import WORLD_KINDS, load_data
    from benchmarks.core.models import load_model
    from benchmarks.core.processes import from_main, world_size
    from benchmarks.core.results import read_result
    from benchmarks.core.env import cache_root

    if isinstance(data, str):
        data = load_data(data, subsets=("raw", "knowmem", "verbmem"))
    preset = "world" if data.kind in WORLD_KINDS else "paper"
    # Whatever is not given comes from the preset, so the cache key and the record are complete.
    settings = {**preset_settings(defense, preset, registry), **(settings or {})}
    instance, config = resolve_settings(defense, settings, registry)
    key = hashlib.sha256(json.dumps({
        "schema": SCHEMA_VERSION,
        "base": model_fingerprint(base_ref),
        "defense": defense,
        "settings": {**asdict(config), **instance.config.to_dict()},
        "data": data_record(data)["splits"],
        "dtype": dtype,
        "evaluation": asdict(evaluation) if evaluation is not None else None,
        # Processes multiply the examples per step (batch_size is per process), so a checkpoint
        # unlearned by N processes is another model; one process keeps the keys it always had.
        **({"processes": world_size()} if world_size() > 1 else {}),
    }, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "unlearned"
    out = out / f"{defense}-{key}"

    def cached() -> bool:
        return ((out / RESULT_NAME).is_file() and (out / "config.json").is_file()
                and read_result(out / RESULT_NAME).get("status") == "complete")

    # Under accelerate launch every process trains (DDP); the main process looks up and writes
    # the cache, and the others return once it is written.
    if from_main(cached):
        logger.info("using the cached unlearned model %s", out)
        return out
    if not build:
        return None
    started = time.perf_counter()
    model, tokenizer = load_model(base_ref, dtype)
    timings = {"load": time.perf_counter() - started}
    outcome = unlearn(model, tokenizer, data, instance, config, evaluation=evaluation, progress=progress,
                      gradient_checkpointing=gradient_checkpointing)
    document = build_document(
        command=None, model_ref=base_ref, dtype=dtype, preset=preset, defense=instance, config=config,
        data=data, outcome=outcome, references={}, device=str(next(model.parameters()).device), timings=timings,
    )
    if outcome.status != "complete":
        # No weights, but the per-epoch table and the message stay (not taken for a cached model:
        # there is no config.json beside them).
        from_main(lambda: save_checkpoint(None, tokenizer, document, out, overwrite=True))
        raise TrainingDiverged(f"{outcome.message or f'unlearning with {defense} diverged'}; "
                               f"the per-epoch table is in {out / RESULT_NAME}", report=out / RESULT_NAME)
    return from_main(lambda: save_checkpoint(model, tokenizer, document, out, overwrite=True))
