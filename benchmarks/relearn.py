"""Relearning benchmark: defend, attack, draw knowledge-recovery curves: ``python -m benchmarks.relearn``.

With no arguments it runs the embedded world end to end, offline, on a CPU: the world's target
and retrain models (built once and cached), the target unlearned by NPO and by NPO+SAM (cached
too), and one relearning attack on each of the four, evaluated at step 0 and at milestones of
that single run. It writes one YAML result file and one PNG under ``results/world/...`` and
prints a table: knowledge before the attack, after it, and how much of it came back on forget
documents the attacker never saw (V).

Examples::

    python -m benchmarks.relearn                                   # the embedded world
    python -m benchmarks.relearn --attack lora --relearn-docs 5    # LoRA, 5 documents in T
    # a published unlearned model, attacked as it is, with MUSE-News's references:
    python -m benchmarks.relearn --model OPTML-Group/NPO-SAM-MUSE-NEWS --defense none \\
        --target-model muse-bench/MUSE-news_target --retrain-model muse-bench/MUSE-news_retrain \\
        --data muse-bench/MUSE-News --relearn-docs 0.5
    # unlearn a model first, and check the whole plan without loading anything:
    python -m benchmarks.relearn --model muse-bench/MUSE-news_target --defense npo_sam \\
        --data muse-bench/MUSE-News --dry-run

Every argument is checked before a model is loaded. ``--resume`` continues an interrupted run
from its last completed milestone (the run keeps a small state directory while it runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.core.errors import TrainingDiverged, UsageError, run_cli, setup_logging

logger = logging.getLogger("benchmarks.relearn")

PROG = "python -m benchmarks.relearn"
WORLD = "world"
NONE = "none"

# --------------------------------------------------------------------------- presets

#: The NPO+SAM paper's MUSE-News relearning attack (Fan et al., ICML 2025, §5): AdamW, lr 1e-5,
#: batch 4, cosine schedule, 100/125/150 steps over the forget corpus in 2048-token chunks.
#: One run of 150 steps evaluated at 100, 125 and 150 replaces the paper's three runs (DESIGN §5:
#: one trajectory per curve), so the 100- and 125-step points sit on a 150-step cosine schedule.
PAPER_PRESET = {
    "attack": {},  # AttackConfig's own defaults are the paper's
    "milestones": (0, 25, 50, 75, 100, 125, 150),
    "seeds": (0,),
    "defenses": (),
    "dtype": "float32",
    "eval_batch_size": 16,
}

#: The embedded world: full fine-tuning at lr 3e-4 for 30 steps takes the world's NPO model from
#: KnowMem-forget 54.5 to 72.5 (mean of seeds 0-2; T's questions from 57 to 86) while the retrain
#: model, which never saw the facts, stays at 0 and KnowMem-retain holds within a few points
#: (results/world/world-target/). LoRA (rank 8 on q/v of a 128-wide model) gets lr 3e-3, ten
#: times as high, and still moves less: `--attack lora --seeds 0` takes the NPO model from 54.5
#: to 62.5, where full fine-tuning with seed 0 reaches 71.4.
#: The documents are also shown in the world's answer view (as its models were trained), and
#: the whole default command stays within minutes on two CPU cores. Half the forget articles
#: go to the attacker (T), half are held out (V).
WORLD_PRESET = {
    "attack": {
        "relearn_fraction": 0.5,
        "steps": 30,
        "lr": 3e-4,
        "schedule": "cosine",
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_length": 256,
        "answer_view": True,
    },
    "attack_overrides": {"lora": {"lr": 3e-3}},
    "milestones": (0, 5, 10, 20, 30),
    "seeds": (0, 1, 2),
    "defenses": ("npo", "npo_sam"),
    "dtype": "float32",
    "eval_batch_size": 64,
}

# Attack knobs exposed as flags: flag name -> (config field, type, help).
_ATTACK_FLAGS = {
    "steps": ("steps", int, "optimizer steps of the attack"),
    "lr": ("lr", float, "peak learning rate"),
    "schedule": ("schedule", str, "learning-rate schedule: constant, linear or cosine"),
    "warmup-steps": ("warmup_steps", int, "linear warmup steps"),
    "batch-size": ("batch_size", int, "chunks per optimizer step"),
    "micro-batch-size": ("micro_batch_size", int, "chunks per forward pass (gradient accumulation)"),
    "max-length": ("max_length", int, "tokens per training chunk"),
    "weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "max-grad-norm": ("max_grad_norm", float, "gradient-norm clip (0 disables)"),
    "mixed-precision": ("mixed_precision", str, "'no' or 'bf16'"),
    "lora-rank": ("lora_rank", int, "LoRA rank (lora attack)"),
    "lora-alpha": ("lora_alpha", float, "LoRA alpha (lora attack)"),
    "lora-dropout": ("lora_dropout", float, "LoRA dropout (lora attack)"),
    "lora-targets": ("lora_targets", str, "comma-separated module names to adapt (lora attack)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``), exit 2, like every usage error."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Unlearn (optionally), attack by relearning, and measure how much forgotten knowledge comes back.",
    )
    what = parser.add_argument_group("models and data")
    what.add_argument("--model", default=None,
                      help="checkpoint directory or hub id to defend/attack (default: the embedded world's target)")
    what.add_argument("--defense", default=None,
                      help="comma-separated defenses applied to --model first, or 'none' to attack --model as it is "
                           "(default for the world: npo,npo_sam; required with --model)")
    what.add_argument("--label", default=None, help="how results name the model attacked with --defense none")
    what.add_argument("--target-model", default=None,
                      help="un-unlearned reference, attacked too (default: the world's target; with --defense NAME: --model)")
    what.add_argument("--retrain-model", default=None,
                      help="reference never trained on the forget set, attacked too (default: the world's retrain)")
    what.add_argument("--no-baselines", action="store_true", help="do not attack the target and retrain references")
    what.add_argument("--data", default=WORLD,
                      help="'world' (default), a hub id such as muse-bench/MUSE-News, or a directory in hub or MUSE layout")
    what.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="model weights dtype")

    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack", default="finetune", help="relearning attack by exact name: finetune or lora")
    attack.add_argument("--relearn-docs", default=None,
                        help="forget documents given to the attacker: a count (8) or a fraction (0.5 or 50%%)")
    for flag, (_, kind, text) in _ATTACK_FLAGS.items():
        attack.add_argument(f"--{flag}", type=str if kind is str else kind, default=None, help=text)
    attack.add_argument("--seeds", default=None, help="comma-separated seeds (each draws T/V and the data order)")
    attack.add_argument("--milestones", default=None, help="comma-separated steps to evaluate at (0 and --steps are added)")
    attack.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps instead of --milestones")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--privleak", action="store_true", help="also measure PrivLeak before and after the attack")
    evaluation.add_argument("--eval-batch-size", type=int, default=None, help="prompts per generation batch")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=None,
                        help="directory of the result YAML and PNG (default: results/<data>/<model>)")
    output.add_argument("--output", default=None, help="exact path of the result YAML (the PNG goes beside it)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    output.add_argument("--resume", action="store_true", help="continue an interrupted run of the same plan")
    output.add_argument("--state-dir", default=None,
                        help="where a running run keeps its resume state (default: the cache, keyed by the plan)")
    output.add_argument("--no-checkpoints", action="store_true",
                        help="keep no weights at milestones (a resumed run then restarts the attack it was in)")
    output.add_argument("--dry-run", action="store_true", help="print the full plan and exit without loading anything")

    misc = parser.add_argument_group("machine")
    misc.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    misc.add_argument("--no-progress", action="store_true", help="no progress bars")
    misc.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from benchmarks.core.tofu_cli import add_tofu_arguments

    add_tofu_arguments(parser)  # --data tofu / tofu-world / a TOFU directory: relearning by author
    return parser


# --------------------------------------------------------------------------- the plan


@dataclass
class Role:
    """One curve of the run: a model, how it came to be, and its part in the comparison."""

    label: str  # the key in curves/summary and the plot legend
    kind: str  # "target", "retrain", "defended" or "attacked"
    ref: str | None  # checkpoint dir or hub id; None until the world/defense provides it
    defense: str | None = None
    defense_config: dict | None = None
    base: str | None = None  # a defended model's starting point (a role label or a ref)

    def describe(self) -> dict:
        out = {"kind": self.kind, "checkpoint": self.ref or "(built at run time)"}
        if self.defense is not None:
            out.update(defense=self.defense, defense_hyperparameters=self.defense_config, unlearned_from=self.base)
        return out


@dataclass
class Plan:
    """Everything a run will do, fixed before any model loads (what ``--dry-run`` prints)."""

    command: str
    data: str
    data_kind: str
    preset: str
    world: bool
    model_id: str
    model_ref: str | None  # checkpoint behind model_id; None: the world's target
    roles: list[Role]
    attack: str
    attack_config: Any
    seeds: list[int]
    milestones: list[int]
    dtype: str
    eval_batch_size: int
    privleak: bool
    output_file: Path | None  # the YAML the user named (--output), else None
    output_dir: Path  # where a YAML named by run id goes otherwise
    output_prefix: str
    overwrite: bool
    state_dir: Path
    resume: bool
    checkpoints: bool
    progress: bool
    notes: list[str] = field(default_factory=list)

    def identity(self) -> dict:
        """What determines the numbers (hashes into the resume key): not where files go."""
        return {
            "data": self.data,
            "model_id": self.model_id,
            "roles": {r.label: {"kind": r.kind, "ref": r.ref, "defense": r.defense,
                                "defense_config": r.defense_config, "base": r.base} for r in self.roles},
            "attack": self.attack,
            "attack_config": self.attack_config.to_dict(),
            "seeds": self.seeds,
            "milestones": self.milestones,
            "dtype": self.dtype,
            "eval_batch_size": self.eval_batch_size,
            "privleak": self.privleak,
        }

    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def output_paths(self, run_id: str) -> tuple[Path, Path]:
        """The result YAML and its PNG: as named by ``--output``, else carrying the run id so
        that a new run never collides with an earlier one."""
        yaml_path = self.output_file or self.output_dir / f"{self.output_prefix}-{run_id}.yaml"
        return yaml_path, yaml_path.with_suffix(".png")

    def roles_of(self, kind: str) -> list[Role]:
        return [r for r in self.roles if r.kind == kind]


def _parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty; give e.g. 0,1,2")
    return values


def parse_relearn_docs(text: str) -> dict:
    """``"8"`` -> a count, ``"0.5"``/``"50%"`` -> a fraction (``AttackConfig`` fields)."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            return {"relearn_docs": None, "relearn_fraction": float(raw[:-1]) / 100.0}
        if re.fullmatch(r"[0-9]+", raw):
            return {"relearn_docs": int(raw), "relearn_fraction": None}
        return {"relearn_docs": None, "relearn_fraction": float(raw)}
    except ValueError:
        raise UsageError(f"--relearn-docs must be a count (8) or a fraction (0.5, 50%), got {text!r}") from None


def resolve_milestones(steps: int, milestones: Sequence[int] | None, every: int | None) -> list[int]:
    """Sorted unique evaluation steps within [0, steps], always with 0 and ``steps``."""
    if milestones is not None and every is not None:
        raise UsageError("give --milestones or --eval-every, not both")
    if every is not None:
        if every < 1:
            raise UsageError(f"--eval-every must be >= 1, got {every}")
        chosen = list(range(0, steps + 1, every))
    else:
        chosen = list(milestones)
    for step in chosen:
        if not 0 <= step <= steps:
            raise UsageError(
                f"milestone {step} lies outside the attack's 0..{steps} steps; choose milestones "
                f"within 0..{steps} or raise --steps"
            )
    return sorted(set(chosen) | {0, steps})


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def _model_label(ref: str) -> str:
    return _safe_name(Path(ref.rstrip("/")).name if Path(ref).exists() else ref.split("/")[-1])


def _data_label(source: str) -> str:
    return WORLD if source == WORLD else _safe_name(Path(source.rstrip("/")).name)


def _default_state_root() -> Path:
    from benchmarks.world import cache_root

    return cache_root() / "relearn-state"


def _check_writable_dir(path: Path, what: str) -> None:
    """A directory we will write into: it exists and is writable, or can be created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not a writable directory; choose another path")


def _resolve_data(source: str, dry_run: bool, notes: list[str]) -> str:
    """The data source's kind; loads nothing. A dry run tolerates an offline hub id."""
    from benchmarks.core.data import resolve_source

    try:
        return resolve_source(source).kind
    except UsageError as err:
        offline = any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if dry_run and offline and "is set" in str(err):
            notes.append(f"data {source!r} is a hub id and the hub is switched off here; the real run needs "
                         "the network or a local copy")
            return "hub"
        raise


def _defense_settings(name: str, preset: str) -> dict:
    """A defense's hyperparameters: the world's calibrated ones or the paper's defaults."""
    from benchmarks.unlearn import preset_settings

    return preset_settings(name, "world" if preset == WORLD else "paper")


def make_plan(args: argparse.Namespace, argv: Sequence[str] | None) -> Plan:
    """Check every argument and fix the run; raises :class:`UsageError` before any loading."""
    from attacks import ATTACKS
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_output_target, command_line

    notes: list[str] = []
    data_kind = _resolve_data(args.data, args.dry_run, notes)
    preset_name = WORLD if args.data == WORLD else "muse-news"
    preset = WORLD_PRESET if preset_name == WORLD else PAPER_PRESET

    # ---- the attack and its settings (preset, then flags)
    attack_cls = ATTACKS.get(args.attack)
    settings = {**preset["attack"], **preset.get("attack_overrides", {}).get(args.attack, {})}
    if args.relearn_docs is not None:
        settings.update(parse_relearn_docs(args.relearn_docs))
    for flag, (name, kind, _) in _ATTACK_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if name.startswith("lora_") and args.attack != "lora":
            raise UsageError(f"--{flag} applies to the lora attack only (this run uses --attack {args.attack})")
        if name == "lora_targets":
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        if name == "max_grad_norm" and value == 0:
            value = None
        settings[name] = value
    config = attack_cls.config_class(**settings)

    seeds = _parse_int_list(args.seeds, "--seeds") if args.seeds is not None else list(preset["seeds"])
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds repeats a seed: {args.seeds}")
    if args.milestones is None and args.eval_every is None:
        # The preset's milestones fit its own step count; for another count, thin them out.
        if config.steps == preset["attack"].get("steps", 150):
            milestones = resolve_milestones(config.steps, preset["milestones"], None)
        else:
            milestones = resolve_milestones(config.steps, None, max(1, config.steps // 5))
    else:
        listed = _parse_int_list(args.milestones, "--milestones") if args.milestones is not None else None
        milestones = resolve_milestones(config.steps, listed, args.eval_every)
    eval_batch_size = args.eval_batch_size if args.eval_batch_size is not None else preset["eval_batch_size"]
    if eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be >= 1, got {eval_batch_size}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    dtype = args.dtype or preset["dtype"]

    # ---- the models
    roles: list[Role] = []
    world = args.model is None
    if world and args.data != WORLD:
        raise UsageError(f"--model is required with --data {args.data!r} (only the world brings its own models)")
    if args.defense is None:
        if not world:
            raise UsageError("--defense is required with --model: 'none' attacks the model as it is, "
                             "a name such as npo_sam unlearns it first")
        defenses = list(preset["defenses"])
    elif args.defense.strip() == NONE:
        defenses = []
    else:
        defenses = [d.strip() for d in args.defense.split(",") if d.strip()]
        if NONE in defenses:
            raise UsageError("--defense 'none' cannot be combined with other defenses")
    if defenses:
        from defenses import DEFENSES

        for name in defenses:
            DEFENSES.get(name)  # unknown -> the list of valid names
        if len(set(defenses)) != len(defenses):
            raise UsageError(f"--defense repeats a defense: {args.defense}")
    model_ref = check_model_ref(args.model) if args.model is not None else None
    model_id = "world/target" if world else args.model
    target_ref = check_model_ref(args.target_model) if args.target_model else None
    retrain_ref = check_model_ref(args.retrain_model) if args.retrain_model else None

    if not args.no_baselines:
        if target_ref is not None:
            roles.append(Role("target", "target", target_ref))
        elif world:
            roles.append(Role("target", "target", None))
        elif defenses:
            roles.append(Role("target", "target", model_ref))  # the model being unlearned is the target
        if retrain_ref is not None:
            roles.append(Role("retrain", "retrain", retrain_ref))
        elif world or args.data == WORLD:
            roles.append(Role("retrain", "retrain", None))
    if defenses:
        base = "world/target" if world else model_ref
        for name in defenses:
            roles.append(Role(name, "defended", None, defense=name,
                              defense_config=_defense_settings(name, preset_name), base=base))
    else:
        if world:
            raise UsageError("--defense none needs --model (the world's target is not unlearned)")
        label = _safe_name(args.label) if args.label else _model_label(args.model)
        if label in ("target", "retrain"):
            raise UsageError(f"--label {label!r} is taken by a baseline; choose another")
        roles.append(Role(label, "attacked", model_ref))
    if args.label and defenses:
        raise UsageError("--label names a model attacked with --defense none; defended models are named by defense")
    if not world and args.data == WORLD and not args.retrain_model and not args.no_baselines:
        notes.append("the world's retrain model serves as the retrain baseline")
    if not any(r.kind == "target" for r in roles):
        notes.append("no target model: recovery ratios need one (--target-model); they are reported as null")
    if not any(r.kind == "retrain" for r in roles):
        notes.append("no retrain model: excess over retrain needs one (--retrain-model); reported as null")
    # Retrain first: its step-0 PrivLeak AUC is the others' reference.
    order = {"retrain": 0, "target": 1, "defended": 2, "attacked": 2}
    roles.sort(key=lambda r: order[r.kind])

    # ---- where files go
    if args.output is not None:
        output_file = check_output_target(args.output, overwrite=args.overwrite)
        if output_file.suffix not in (".yaml", ".yml"):
            raise UsageError(f"--output {args.output!r} should name a .yaml file")
        if args.output_dir is not None:
            raise UsageError("give --output or --output-dir, not both")
        check_output_target(output_file.with_suffix(".png"), overwrite=args.overwrite)
        directory = output_file.parent
    else:
        output_file = None
        directory = Path(args.output_dir) if args.output_dir else Path("results") / _data_label(args.data) / (
            "world-target" if world else _model_label(args.model))
        check_output_target(directory)
        _check_writable_dir(directory, "--output-dir")

    plan = Plan(
        command=command_line("benchmarks.relearn", argv),
        data=args.data,
        data_kind=data_kind,
        preset=preset_name,
        world=world or args.data == WORLD,
        model_id=model_id,
        model_ref=model_ref,
        roles=roles,
        attack=args.attack,
        attack_config=config,
        seeds=seeds,
        milestones=milestones,
        dtype=dtype,
        eval_batch_size=eval_batch_size,
        privleak=args.privleak,
        output_file=output_file,
        output_dir=directory,
        output_prefix=f"relearn-{args.attack}-{_safe_name('+'.join(defenses) if defenses else NONE)}",
        overwrite=args.overwrite,
        state_dir=Path("."),
        resume=args.resume,
        checkpoints=not args.no_checkpoints,
        progress=not args.no_progress,
        notes=notes,
    )
    state_root = Path(args.state_dir) if args.state_dir else _default_state_root()
    _check_writable_dir(state_root, "--state-dir")
    plan.state_dir = state_root / plan.key()
    return plan


def _world_status() -> tuple[str, str]:
    """The default world's directory, and whether it is built."""
    from benchmarks.world import WorldBuildConfig, default_world_dir, read_manifest

    root = default_world_dir(WorldBuildConfig())
    return str(root), "cached" if read_manifest(root) is not None else "built on first use (minutes)"


def format_plan(plan: Plan) -> str:
    """The plan as text: models, data, every hyperparameter, files."""
    import yaml

    config = plan.attack_config
    notes = list(plan.notes)
    if config.relearn_docs is None and config.relearn_fraction == 1.0:
        notes.append("every forget document goes to the attacker (the paper's setting): V is empty, so held-out "
                     "recovery is not measured; pass e.g. --relearn-docs 0.5 to hold half out")
    if plan.preset != WORLD:
        notes.append("attack preset: the NPO+SAM paper's MUSE-News relearning (Fan et al., ICML 2025): AdamW, lr 1e-5, "
                     "batch 4, cosine, 2048-token chunks; its 100/125/150-step attacks are read off one 150-step run "
                     "(one trajectory per curve), so those points share the 150-step cosine schedule")
    if plan.data_kind == "hub" or (plan.data_kind != "world" and not plan.world):
        notes.append("questions without a doc_id (MUSE-News as published) make T/V recovery unavailable; it is "
                     "reported as such, never guessed")
    if not plan.world and plan.attack == "finetune" and plan.dtype == "float32":
        notes.append("full fine-tuning in float32 holds weights, gradients and two AdamW moments (16 bytes per "
                     "parameter); for a 7B model on one GPU use --attack lora, or --dtype bfloat16 "
                     "--mixed-precision bf16")
    from benchmarks.world import cache_root

    models = {r.label: r.describe() for r in plan.roles}
    world_dir, world_state = _world_status() if plan.world else (None, None)
    for role in plan.roles:
        if role.ref is None and role.kind in ("target", "retrain"):
            models[role.label]["checkpoint"] = f"{world_dir}/{role.kind} (the world's {role.kind}, {world_state})"
        elif role.kind == "defended":
            models[role.label]["checkpoint"] = (f"{cache_root()}/unlearned/{role.defense}-<hash of model, settings, "
                                                "data> (reused when present)")
    doc = {
        "data": {"source": plan.data, "kind": plan.data_kind, "preset": plan.preset},
        "model": {"id": plan.model_id, "dtype": plan.dtype},
        "curves": models,
        "attack": {
            "name": plan.attack,
            "hyperparameters": config.to_dict(),
            "gradient_accumulation": config.grad_accum,
            "seeds": plan.seeds,
            "milestones": plan.milestones,
            "documents": "per seed, T = the relearn documents with the smallest sha256(seed, doc id); V = the rest",
        },
        "evaluation": {
            "metrics": ["knowmem_forget", "knowmem_forget_relearn (T)", "knowmem_forget_heldout (V)",
                        "verbmem_forget", "knowmem_retain"] + (["privleak (steps 0 and last)"] if plan.privleak else []),
            "batch_size": plan.eval_batch_size,
            "model_evaluations": len(plan.roles) * (1 + len(plan.seeds) * (len(plan.milestones) - 1)),
        },
        "output": {**dict(zip(("yaml", "png"), map(str, plan.output_paths("<run id>")))),
                   "resume_state": str(plan.state_dir), "checkpoints_at_milestones": plan.checkpoints},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def flow_lists(dumper, data):
        flow = all(isinstance(v, (int, float, str)) for v in data) and len(data) < 20
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, flow_lists)
    Dumper.add_representer(tuple, flow_lists)
    text = yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=110, allow_unicode=True)
    return "dry run: nothing was loaded.\n" + "".join(f"note: {n}\n" for n in notes) + text


# --------------------------------------------------------------------------- resume state


class RunState:
    """A running run's state directory: run metadata, finished trajectories and the latest
    milestone checkpoint of the trajectory in progress. Every file is written to a temporary
    name and renamed, so a kill at any moment leaves the last complete version."""

    def __init__(self, directory: Path, checkpoints: bool) -> None:
        self.directory = directory
        self.checkpoints = checkpoints

    def exists(self) -> bool:
        return (self.directory / "run.json").is_file()

    def start(self, meta: dict) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._write_json("run.json", meta)

    def meta(self) -> dict:
        return json.loads((self.directory / "run.json").read_text(encoding="utf-8"))

    def update_meta(self, **items) -> None:
        meta = self.meta()
        meta.update(items)
        self._write_json("run.json", meta)

    def _name(self, seed: int, label: str) -> str:
        return f"seed{seed}-{_safe_name(label)}"

    def finished(self, seed: int, label: str) -> dict | None:
        path = self.directory / f"{self._name(seed, label)}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def finish(self, seed: int, label: str, record: dict) -> None:
        self._write_json(f"{self._name(seed, label)}.json", record)
        (self.directory / f"{self._name(seed, label)}.pt").unlink(missing_ok=True)

    def checkpoint(self, seed: int, label: str) -> dict | None:
        import torch

        path = self.directory / f"{self._name(seed, label)}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def save_checkpoint(self, seed: int, label: str, payload: dict) -> None:
        import torch

        if not self.checkpoints:
            return
        path = self.directory / f"{self._name(seed, label)}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_json(self, name: str, data: dict) -> None:
        path = self.directory / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)


# --------------------------------------------------------------------------- running


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare_models(plan: Plan, data, timings: dict) -> tuple[dict[str, dict], str]:
    """Fill in the world's checkpoints and run (or find cached) defenses; returns per role the
    model record for the result file, and the checkpoint of ``plan.model_id``."""
    from benchmarks.core.results import timed
    from benchmarks.unlearn import model_fingerprint

    base_ref = plan.model_ref
    if base_ref is None or any(r.ref is None and r.kind in ("target", "retrain") for r in plan.roles):
        from benchmarks.world import ensure_world

        with timed(timings, "world"):
            paths = ensure_world()  # built on first use, then cached
        world_refs = {"target": str(paths.target_dir), "retrain": str(paths.retrain_dir)}
        for role in plan.roles:
            if role.ref is None and role.kind in world_refs:
                role.ref = world_refs[role.kind]
            if role.base == "world/target":
                role.base = world_refs["target"]
        base_ref = base_ref or world_refs["target"]
    records = {}
    for role in plan.roles:
        if role.kind == "defended":
            from benchmarks import unlearn

            with timed(timings, "defense"):
                role.ref = str(unlearn.unlearn_cached(role.base, role.defense, role.defense_config, data,
                                                      dtype=plan.dtype, progress=plan.progress))
        records[role.label] = {
            "kind": role.kind,
            "checkpoint": role.ref,
            "revision_or_hash": model_fingerprint(role.ref),
            **({"defense": role.defense, "defense_hyperparameters": role.defense_config,
                "unlearned_from": role.base} if role.defense else {}),
        }
    return records, base_ref


def _attack_one(plan: Plan, role: Role, seed: int, texts: list[str], evalset, state: RunState,
                retrain_auc: float | None, zero_point: dict | None) -> dict:
    """One trajectory: load the model, attack it once, measure at step 0 and every milestone.

    ``zero_point`` is the model's step-0 measurement from an earlier seed: before the first
    update the model is the same whatever the seed, so it is measured once (the T/V grouping,
    which does depend on the seed, is applied later). At each milestone after 0 the trainable
    weights, the loop state and the curve so far are saved, so an interrupted trajectory
    resumes from its last milestone with the same numbers.
    """
    import torch

    from attacks import ATTACKS
    from benchmarks.core.models import load_model
    from benchmarks.core.recovery import measure_point

    attack = ATTACKS.get(plan.attack)(plan.attack_config)
    loaded, tokenizer = load_model(role.ref, dtype=plan.dtype, device=_device())
    model = attack.prepare(loaded)
    last = plan.milestones[-1]
    curve: dict[int, dict] = {}
    resume_state = None
    saved = state.checkpoint(seed, role.label)
    if saved is not None:
        attack.load_trainable_state(model, saved["trainable_state"])
        resume_state = saved["loop_state"]
        curve = {int(k): v for k, v in saved["curve"].items()}
        logger.info("%s, seed %d: resuming at step %d", role.label, seed, resume_state["step"])
    eval_seconds = 0.0

    def hook(step: int, attacked) -> None:
        nonlocal eval_seconds
        if step == 0 and zero_point is not None:
            curve[0] = zero_point
            return
        began = time.perf_counter()
        with_privleak = plan.privleak and step in (0, last)
        reference = retrain_auc
        if role.kind == "retrain" and step > 0 and with_privleak:
            reference = curve[0]["privleak_auc"]  # the retrain model before the attack is the reference
        curve[step] = measure_point(
            attacked, tokenizer, evalset, batch_size=plan.eval_batch_size, privleak=with_privleak,
            retrain_auc=reference, as_retrain=role.kind == "retrain" and step == 0,
        )
        eval_seconds += time.perf_counter() - began
        logger.info("%s, seed %d, step %d: %s", role.label, seed, step,
                    ", ".join(f"{k} {v:.1f}" for k, v in curve[step].items() if isinstance(v, float)))

    def state_hook(step: int, loop_state: dict) -> None:
        state.save_checkpoint(seed, role.label, {
            "trainable_state": attack.trainable_state(model),
            "loop_state": loop_state,
            "curve": curve,
        })

    started = time.perf_counter()
    status, error, history = "complete", None, []
    try:
        result = attack.run(
            model, tokenizer, texts, seed=seed, hook=hook, hook_steps=plan.milestones,
            state_hook=state_hook, resume_state=resume_state, progress=plan.progress,
        )
        history = result.history
    except TrainingDiverged as err:
        # Keep what was measured; the steps after the divergence stay null.
        status, error = "diverged", str(err)
        logger.error("%s, seed %d: %s", role.label, seed, err)
    seconds = time.perf_counter() - started
    del model, loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "status": status,
        "error": error,
        "curve": {str(k): v for k, v in sorted(curve.items())},
        "losses": [h.get("loss") for h in history],
        "attack_seconds": seconds - eval_seconds,
        "eval_seconds": eval_seconds,
    }


def execute(plan: Plan) -> dict:
    """Run the plan; returns the result dict (written by :func:`main`)."""
    from benchmarks.core.data import load_data
    from benchmarks.core.recovery import EvalSet, document_ids, question_groups, resolve_count, split_documents
    from benchmarks.core.results import new_run_id, utc_now

    timings: dict[str, float] = {}
    began = time.perf_counter()
    data = load_data(plan.data)
    forget = data.records("raw", "forget")
    ids = document_ids(forget)
    text_of = dict(zip(ids, (r["text"] for r in forget)))
    count = resolve_count(len(ids), plan.attack_config.relearn_docs, plan.attack_config.relearn_fraction)
    evalset = EvalSet.from_data(data, privleak=plan.privleak)
    timings["data"] = time.perf_counter() - began

    state = RunState(plan.state_dir, plan.checkpoints)
    if plan.resume and state.exists() and state.meta().get("plan_key") == plan.key():
        meta = state.meta()
        logger.info("resuming run %s from %s", meta["run_id"], plan.state_dir)
    else:
        if plan.resume:
            logger.info("no interrupted run of this plan at %s; starting afresh", plan.state_dir)
        elif state.exists():
            logger.warning("an interrupted run of this plan is at %s; starting afresh (use --resume to continue it)",
                           plan.state_dir)
        meta = {"run_id": new_run_id(), "created": utc_now(), "plan_key": plan.key()}
        state.start(meta)

    model_records = meta.get("models")
    if model_records is None:
        model_records, base_ref = _prepare_models(plan, data, timings)
        from benchmarks.unlearn import model_fingerprint

        meta.update(models=model_records, refs={r.label: r.ref for r in plan.roles},
                    model_hash=model_fingerprint(base_ref))
        state.update_meta(**meta)
    else:
        for role in plan.roles:
            role.ref = meta["refs"][role.label]

    splits = {seed: split_documents(ids, count, seed) for seed in plan.seeds}
    groups = {seed: question_groups(evalset.forget_qa, split) for seed, split in splits.items()}
    trajectories: dict[int, dict[str, dict]] = {}
    zero_points: dict[str, dict] = {}
    retrain_auc = meta.get("retrain_auc")
    from tqdm.auto import tqdm

    jobs = [(seed, role) for seed in plan.seeds for role in plan.roles]
    bar = tqdm(jobs, desc="attacks", disable=not (plan.progress and sys.stderr.isatty()), leave=False)
    for seed, role in bar:
        bar.set_postfix_str(f"{role.label} seed {seed}")
        record = state.finished(seed, role.label)
        if record is None:
            texts = [text_of[d] for d in splits[seed].train]
            record = _attack_one(plan, role, seed, texts, evalset, state, retrain_auc, zero_points.get(role.label))
            state.finish(seed, role.label, record)
        # Counted from the records, so a resumed run reports the time of the whole run.
        timings["attack"] = timings.get("attack", 0.0) + record["attack_seconds"]
        timings["evaluation"] = timings.get("evaluation", 0.0) + record["eval_seconds"]
        zero_points.setdefault(role.label, record["curve"]["0"])
        if role.kind == "retrain" and plan.privleak and retrain_auc is None:
            retrain_auc = record["curve"]["0"].get("privleak_auc")
            state.update_meta(retrain_auc=retrain_auc)
        trajectories.setdefault(seed, {})[role.label] = record
    bar.close()
    timings["total"] = time.perf_counter() - began
    return build_result(plan, meta, model_records, data, splits, groups, trajectories, timings, retrain_auc)


# --------------------------------------------------------------------------- the result


def build_result(plan: Plan, meta: dict, model_records: dict, data, splits: dict, groups: dict,
                 trajectories: dict, timings: dict, retrain_auc: float | None) -> dict:
    """The result dict (schema of :mod:`benchmarks.core.results`)."""
    from benchmarks.core.metrics import KNOWMEM_MAX_NEW_TOKENS, MUSE_NEWS_RETRAIN_AUC_SOURCE, VERBMEM_MAX_NEW_TOKENS
    from benchmarks.core.recovery import DEFINITIONS, curves_and_summary, point_values
    from benchmarks.core.results import HIGHER_IS_BETTER, SCHEMA_VERSION, environment_info

    steps = plan.milestones
    target = next((r.label for r in plan.roles if r.kind == "target"), None)
    retrain = next((r.label for r in plan.roles if r.kind == "retrain"), None)
    shown = {"target": 0, "retrain": 1}  # baselines first in files, tables and legends
    labels = [r.label for r in sorted(plan.roles, key=lambda r: shown.get(r.kind, 2))]
    points = {
        label: {seed: {int(s): point_values(raw, groups[seed]) for s, raw in trajectories[seed][label]["curve"].items()}
                for seed in plan.seeds}
        for label in labels
    }
    curves, summary, metrics = curves_and_summary(steps, points, target, retrain, privleak=plan.privleak)
    first_groups = groups[plan.seeds[0]]
    if first_groups.held_out is None:
        heldout_note = f"unavailable: {first_groups.reason}"
    elif "knowmem_forget_heldout" not in metrics:
        heldout_note = "unavailable: V is empty (every forget document went to the attacker)"
    else:
        heldout_note = "questions grouped into T and V by their doc_id"

    statuses = {t["status"] for per_role in trajectories.values() for t in per_role.values()}
    status = "diverged" if "diverged" in statuses else "complete"
    defended = plan.roles_of("defended")
    if len(defended) == 1:
        defense = {"name": defended[0].defense, "hyperparameters": defended[0].defense_config}
    elif defended:
        defense = {"name": ",".join(r.defense for r in defended),
                   "hyperparameters": {r.defense: r.defense_config for r in defended}}
    else:
        defense = {"name": NONE, "hyperparameters": {}}
    first = splits[plan.seeds[0]]
    data_splits = {key: {"n": v["records"], "sha256": v["sha256"]} for key, v in data.describe()["splits"].items()}
    privleak_reference = None
    if plan.privleak:
        privleak_reference = ({"auc": retrain_auc, "source": f"retrain model ({retrain}) before the attack"}
                              if retrain else {"auc": None, "source": MUSE_NEWS_RETRAIN_AUC_SOURCE})
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": meta["run_id"],
        "command": plan.command,
        "created": meta["created"],
        "status": status,
        "model": {"id": plan.model_id, "revision_or_hash": meta.get("model_hash"), "dtype": plan.dtype},
        "defense": defense,
        "attack": {
            "name": plan.attack,
            "hyperparameters": plan.attack_config.to_dict(),
            "seeds": list(plan.seeds),
            "milestones": list(steps),
            "documents": {"forget": len(first.train) + len(first.held_out), "relearn": len(first.train),
                          "heldout": len(first.held_out)},
            "relearn_doc_ids": list(first.train),
            "heldout_doc_ids": list(first.held_out),
            "splits": {seed: {"relearn_doc_ids": list(s.train), "heldout_doc_ids": list(s.held_out)}
                       for seed, s in splits.items()},
            "split_rule": "per seed: T = the documents with the smallest sha256('relearn-bench/T-split/<seed>/<doc_id>'); "
                          "relearn_doc_ids/heldout_doc_ids above are those of the first seed",
        },
        "data": {"source": plan.data, "kind": plan.data_kind, "splits": data_splits,
                 "missing": data.describe()["missing"]},
        "models": model_records,
        "curves": curves,
        "summary": summary,
        "definitions": DEFINITIONS,
        "higher_is_better": {m: HIGHER_IS_BETTER.get(m) for m in metrics},
        "references": {"target": target, "retrain": retrain},
        "evaluation": {
            "batch_size": plan.eval_batch_size,
            "knowmem_max_new_tokens": KNOWMEM_MAX_NEW_TOKENS,
            "verbmem_max_new_tokens": VERBMEM_MAX_NEW_TOKENS,
            "milestones": "one attack run per model and seed, evaluated at step 0 and at each milestone "
                          "(step 0 once per model: it precedes any seed-dependent update)",
            "knowmem_forget_questions": {
                seed: {"all": len(g.all), "relearn": None if g.train is None else len(g.train),
                       "heldout": None if g.held_out is None else len(g.held_out)}
                for seed, g in groups.items()},
            "privleak_reference": privleak_reference,
            "heldout_questions": heldout_note,
        },
        "trajectories": {
            label: {seed: {"status": trajectories[seed][label]["status"], "error": trajectories[seed][label]["error"],
                           "losses": trajectories[seed][label]["losses"]} for seed in plan.seeds}
            for label in labels
        },
        "environment": environment_info(_device()),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def format_table(result: dict) -> str:
    """Knowledge before and after the attack, and recovery on held-out V, per curve."""
    from tabulate import tabulate

    from benchmarks.core.recovery import KNOWMEM_ALL, KNOWMEM_V, RETAIN, VERBMEM

    def cell(stats: dict | None, digits: int = 1) -> str:
        if not stats or stats.get("mean") is None:
            return "–"
        text = f"{stats['mean']:.{digits}f}"
        if stats.get("ci95_high") is not None:
            text += f" ±{stats['ci95_high'] - stats['mean']:.{digits}f}"
        return text

    heldout = any(KNOWMEM_V in per_metric for per_metric in result["summary"].values())
    headers = ["model", "KnowMem-forget before", "after"]
    if heldout:
        headers += ["KnowMem V before", "V after", "V recovery"]
    headers += ["VerbMem before", "after", "KnowMem-retain before", "after"]
    rows = []
    for label, per_metric in result["summary"].items():
        row = [label, cell(per_metric[KNOWMEM_ALL]["before"]), cell(per_metric[KNOWMEM_ALL]["after"])]
        if heldout:
            v = per_metric[KNOWMEM_V]
            row += [cell(v["before"]), cell(v["after"]), cell(v["recovery_ratio"], 2)]
        row += [cell(per_metric[VERBMEM]["before"]), cell(per_metric[VERBMEM]["after"]),
                cell(per_metric[RETAIN]["before"]), cell(per_metric[RETAIN]["after"])]
        rows.append(row)
    steps = result["attack"]["milestones"][-1]
    seeds = len(result["attack"]["seeds"])
    caption = f"{result['attack']['name']} attack, {steps} steps, {seeds} seed(s); mean ± 95% t-interval half-width"
    if heldout:
        caption += "; V recovery = (after − before) / (target before − before) on the held-out documents V"
    else:
        caption += f"; held-out recovery: {result['evaluation']['heldout_questions']}"
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(headers) - 1))
    return table + "\n" + caption


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from benchmarks.core.tofu_data import is_tofu_source

    if is_tofu_source(args.data):
        from attacks import ATTACKS
        from benchmarks.core.tofu_relearn import run_tofu_relearn
        from defenses import build_defense

        return run_tofu_relearn(args, argv, ATTACKS, build_defense)
    plan = make_plan(args, argv)
    if args.dry_run:
        print(format_plan(plan))
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from benchmarks.core.plots import plot_recovery
    from benchmarks.core.results import write_yaml_atomic

    try:
        result = execute(plan)
    except KeyboardInterrupt:
        print(f"interrupted: run the same command with --resume to continue from the last milestone "
              f"(state kept in {plan.state_dir})", file=sys.stderr)
        raise
    output_yaml, output_png = plan.output_paths(result["run_id"])
    write_yaml_atomic(output_yaml, result, overwrite=plan.overwrite)
    plot_recovery(result, output_png, overwrite=plan.overwrite)
    RunState(plan.state_dir, plan.checkpoints).remove()
    print(format_table(result))
    print(f"wrote {output_yaml}\nwrote {output_png}")
    if result["status"] != "complete":
        print(f"warning: run {result['status']}; see trajectories in {output_yaml}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    run_cli(main)
