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

On several GPUs the same command runs under ``accelerate launch --num_processes N -m
benchmarks.relearn ...`` (on CPUs ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes N ...``; accelerate's ``--cpu`` launcher starts one process). Every process
trains each defense and attack (DDP: ``--batch-size`` chunks per process per step, so the
optimizer sees N times as many); the main process alone plans the run id and resume state,
evaluates at the milestones, fills the caches and writes the one result file, its plot and the
table, which records the world size and the global batch size (:mod:`benchmarks.core.processes`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from benchmarks.core.errors import TrainingDiverged, UsageError, run_cli, setup_logging
from benchmarks.core.run_state import RunState
from benchmarks.core.run_state import safe_name as _safe_name

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
    "defense_seeds": (0,),
    "defenses": (),
    "dtype": "float32",
    "eval_batch_size": 16,
}

#: The embedded world: full fine-tuning for 30 steps on half the forget articles (T). At lr 1e-3
#: the world's NPO model goes from KnowMem-forget 3.7 to 66.6 on the held-out articles V (mean of
#: seeds 0-2, recovery ratio 0.66 +- 0.60) while the retrain model, which never saw the facts,
#: stays at 0 and the target keeps 94 on V (README, "Measured on the embedded world"). LoRA (rank
#: 8 on q/v) gets its own learning rate. The documents are also shown in the world's answer view
#: (as its models were trained), and the whole default command stays within minutes on two CPU
#: cores.
WORLD_PRESET = {
    "attack": {
        "relearn_fraction": 0.5,
        "steps": 30,
        "lr": 1e-3,
        "schedule": "cosine",
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_length": 256,
        "answer_view": True,
    },
    "attack_overrides": {"lora": {"lr": 3e-3}},
    "milestones": (0, 5, 10, 20, 30),
    "seeds": (0, 1, 2),
    "defense_seeds": (0,),
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
    "batch-size": ("batch_size", int, "chunks per optimizer step and process (accelerate launch multiplies it "
                                      "by the processes)"),
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


def _generated_attack_flags() -> dict:
    """Flags for the registered attacks' own settings not listed in ``_ATTACK_FLAGS`` (a new
    attack's config fields become flags with no edit here)."""
    from attacks import attack_flags

    listed = {name for name, _, _ in _ATTACK_FLAGS.values()}
    return {name: entry for name, entry in attack_flags().items() if name not in listed}


def _attack_plan(name: str) -> list[str]:
    from attacks.compose import describe_plan

    return describe_plan(name)["plan"]


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
    from attacks import ATTACKS

    attack.add_argument("--attack", default="finetune",
                        help=f"attack by exact name ({', '.join(ATTACKS.names())}), or a plan of names joined by "
                             "'+' such as finetune+quantize (train, then quantize at each milestone)")
    attack.add_argument("--relearn-docs", default=None,
                        help="forget documents given to the attacker: a count (8) or a fraction (0.5 or 50%%)")
    for flag, (_, kind, text) in _ATTACK_FLAGS.items():
        attack.add_argument(f"--{flag}", type=str if kind is str else kind, default=None, help=text)
    for name, entry in _generated_attack_flags().items():
        text = f"{entry['help']} [{', '.join(entry['attacks'])}]"
        if entry["type"] is bool:
            attack.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                                dest=name, help=text)
        else:
            attack.add_argument(f"--{name.replace('_', '-')}", type=entry["type"], default=None, dest=name, help=text)
    attack.add_argument("--seeds", default=None, help="comma-separated seeds (each draws T/V and the data order)")
    attack.add_argument(
        "--defense-seeds", default=None,
        help="comma-separated unlearning seeds (data order and initial RNG of each defense): one seed, or one "
             "per --seeds entry, paired in order, so the intervals include the defense's own training noise "
             "(default: 0)")
    attack.add_argument("--milestones", default=None, help="comma-separated steps to evaluate at (0 and --steps are added)")
    attack.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps instead of --milestones")
    attack.add_argument("--lr-sweep", default=None,
                        help="comma-separated learning rates: one run per rate, then the attacker's best per model "
                             "(see --utility-cap), written to a sweep file beside the runs' files")
    attack.add_argument("--utility-cap", type=float, default=0.9,
                        help="with --lr-sweep: milestones count only while KnowMem-retain stays >= this fraction "
                             "of the model's own before the attack (default 0.9)")

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
    output.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="write a resume checkpoint at a milestone only when at least STEPS attack steps passed "
                             "since the last one (default 0: at every milestone; only the latest is kept)")
    output.add_argument("--dry-run", action="store_true", help="print the full plan and exit without loading anything")

    misc = parser.add_argument_group("machine")
    misc.add_argument("--threads", type=int, default=None, help="torch CPU threads (shared among the --jobs workers)")
    misc.add_argument("--jobs", type=int, default=None,
                      help="trajectories (one model under one attack seed) and unlearning runs at once, each in a "
                           "process of its own with its share of --threads; default: on a CPU with the embedded "
                           "world's models, one per core (at most 4) with one torch thread each, so every machine "
                           "computes the same; else 1")
    misc.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute activations in the backward pass of defenses and attacks (less memory, "
                           "same numbers)")
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
    # A defended model per attack seed: attack seed -> unlearning seed (paired in order), and
    # once unlearned, attack seed -> checkpoint. Baselines are one checkpoint for every seed.
    defense_seeds: dict[int, int] = field(default_factory=dict)
    seed_refs: dict[int, str] = field(default_factory=dict)

    def ref_for(self, seed: int) -> str | None:
        """The checkpoint attacked with attack seed ``seed``."""
        return self.seed_refs.get(seed, self.ref)

    def describe(self) -> dict:
        out = {"kind": self.kind, "checkpoint": self.ref or "(built at run time)"}
        if self.defense is not None:
            out.update(defense=self.defense, defense_hyperparameters=self.defense_config, unlearned_from=self.base)
            if len(set(self.defense_seeds.values())) > 1:
                out.update(defense_seed_per_attack_seed=dict(self.defense_seeds))
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
    gradient_checkpointing: bool = False  # memory only: the numbers, and so the plan's key, do not change
    checkpoint_every: int = 0
    #: Trajectories at once, each in a worker process (1: all in this process). Neither this nor
    #: the thread count enters the plan's key: they change how a trajectory's sums are split
    #: among threads (the last digits of a score), not what is computed.
    jobs: int = 1
    #: Torch threads of each trajectory and unlearning run when ``jobs`` > 1, in a worker or in
    #: this process (None: this process's threads). By default 1, so that every machine runs the
    #: same kernels whatever its core count.
    job_threads: int | None = None
    # KnowMem-retain at every milestone, not only at step 0 and the last (the lr sweep's cap needs it)
    retain_every_milestone: bool = False
    #: PrivLeak's reference when no retrain curve runs: a world's retrain checkpoint (``WORLD``:
    #: the default world's, found at run time), measured once and never attacked. None: the
    #: retrain curve's own step-0 AUC, or for data that is not a world MUSE-News' published value.
    privleak_reference: str | None = None

    def identity(self) -> dict:
        """What determines the numbers (hashes into the resume key): not where files go."""
        from benchmarks.core.processes import world_size

        return {
            "data": self.data,
            "model_id": self.model_id,
            "roles": {r.label: {"kind": r.kind, "ref": r.ref, "defense": r.defense,
                                "defense_config": r.defense_config, "base": r.base,
                                **({"defense_seeds": r.defense_seeds} if r.defense_seeds else {})}
                      for r in self.roles},
            "attack": self.attack,
            "attack_config": self.attack_config.to_dict(),
            "seeds": self.seeds,
            "milestones": self.milestones,
            "dtype": self.dtype,
            "eval_batch_size": self.eval_batch_size,
            "privleak": self.privleak,
            **({"retain_every_milestone": True} if self.retain_every_milestone else {}),
            "privleak_reference": self.privleak_reference,
            # The optimizer sees --batch-size chunks per process: N processes run another plan.
            **({"processes": world_size()} if world_size() > 1 else {}),
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


def _model_label(ref: str) -> str:
    return _safe_name(Path(ref.rstrip("/")).name if Path(ref).exists() else ref.split("/")[-1])


def _data_label(source: str) -> str:
    return WORLD if source == WORLD else _safe_name(Path(source.rstrip("/")).name)


def _default_state_root() -> Path:
    from benchmarks.core.env import cache_root

    return cache_root() / "relearn-state"


def _check_writable_dir(path: Path, what: str) -> None:
    """A directory we will write into: it exists and is writable, or can be created."""
    from benchmarks.core.results import check_writable_directory

    check_writable_directory(path, what)


def _resolve_data(source: str, dry_run: bool, notes: list[str]) -> str:
    """The data source's kind; loads nothing. A dry run tolerates an offline hub id."""
    from benchmarks.core.data import resolve_source

    try:
        return resolve_source(source).kind
    except UsageError as err:
        from benchmarks.core.env import offline_switches

        offline = bool(offline_switches())
        if dry_run and offline and "is set" in str(err):
            notes.append(f"data {source!r} is a hub id and the hub is switched off here; the real run needs "
                         "the network or a local copy")
            return "hub"
        raise


def _defense_settings(name: str, preset: str) -> dict:
    """A defense's hyperparameters: the world's calibrated ones or the paper's defaults."""
    from benchmarks.core.unlearning import preset_settings
    from defenses import DEFENSES

    return preset_settings(name, "world" if preset == WORLD else "paper", DEFENSES)


def make_plan(args: argparse.Namespace, argv: Sequence[str] | None) -> Plan:
    """Check every argument and fix the run; raises :class:`UsageError` before any loading."""
    from attacks import attack_class
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_output_target, check_yaml_target, command_line

    notes: list[str] = []
    data_kind = _resolve_data(args.data, args.dry_run, notes)
    from benchmarks.core.data import world_root_models

    # A built world's root (python -m benchmarks.world --out DIR) brings its own models too.
    world_models = world_root_models(args.data)
    world_data = args.data == WORLD or world_models is not None
    preset_name = WORLD if world_data else "muse-news"
    preset = WORLD_PRESET if preset_name == WORLD else PAPER_PRESET

    # ---- the attack and its settings (preset, then flags)
    attack_cls = attack_class(args.attack)
    first = getattr(attack_cls, "parts", (attack_cls,))[0].name  # a plan takes its training part's preset
    settings = {**preset["attack"], **preset.get("attack_overrides", {}).get(first, {})}
    if args.relearn_docs is not None:
        settings.update(parse_relearn_docs(args.relearn_docs))
    from dataclasses import fields as _fields

    accepted = {f.name for f in _fields(attack_cls.config_class)}
    generated = _generated_attack_flags()
    given = [(flag, name) for flag, (name, _, _) in _ATTACK_FLAGS.items()]
    given += [(name.replace("_", "-"), name) for name in generated]
    for flag, name in given:
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if name not in accepted:
            users = ", ".join(generated[name]["attacks"]) if name in generated else "lora"
            raise UsageError(f"--{flag} applies to the {users} attack only (this run uses --attack {args.attack})")
        if name == "lora_targets":
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        if name == "max_grad_norm" and value == 0:
            value = None
        settings[name] = value
    config = attack_cls.config_class(**settings)

    seeds = _parse_int_list(args.seeds, "--seeds") if args.seeds is not None else list(preset["seeds"])
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds repeats a seed: {args.seeds}")
    defense_seeds = (_parse_int_list(args.defense_seeds, "--defense-seeds") if args.defense_seeds is not None
                     else list(preset["defense_seeds"]))
    if len(defense_seeds) not in (1, len(seeds)):
        raise UsageError(f"--defense-seeds needs one seed or one per --seeds entry ({len(seeds)}), "
                         f"got {len(defense_seeds)}: {','.join(map(str, defense_seeds))}")
    # Pairing, not the product: each replicate draws both noise sources afresh, so the interval
    # over replicates covers both at the cost of len(seeds) attacks, not len(seeds)^2.
    defense_seed_of = {seed: defense_seeds[i % len(defense_seeds)] for i, seed in enumerate(seeds)}
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
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 steps, got {args.checkpoint_every}")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    dtype = args.dtype or preset["dtype"]

    # ---- the models
    roles: list[Role] = []
    world = args.model is None and world_models is None  # the default world's target
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
    target_ref = check_model_ref(args.target_model) if args.target_model else None
    retrain_ref = check_model_ref(args.retrain_model) if args.retrain_model else None
    if world_models is not None:
        for what, path in (("target", world_models.target), ("retrain", world_models.retrain)):
            if not (path / "config.json").is_file():
                raise UsageError(f"world {world_models.root} has no {what} model at {path}; rebuild it with "
                                 f"python -m benchmarks.world --force --out {world_models.root}")
        if model_ref is None and args.defense is None:
            raise UsageError(f"--defense is required with --data {args.data}: e.g. npo,npo_sam to unlearn the world's "
                             "target, or --model CKPT --defense none to attack a checkpoint")
        model_ref = model_ref or str(world_models.target)
        target_ref = target_ref or str(world_models.target)
        retrain_ref = retrain_ref or str(world_models.retrain)
    model_id = "world/target" if world else (args.model or model_ref)

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
            settings = _defense_settings(name, preset_name)
            if args.mixed_precision is not None:  # precision is the run's: defenses train in it too
                settings["mixed_precision"] = config.mixed_precision
            roles.append(Role(name, "defended", None, defense=name, defense_config=settings, base=base,
                              defense_seeds=dict(defense_seed_of)))
    else:
        if args.model is None:
            raise UsageError("--defense none needs --model (the world's target is not unlearned)")
        label = _safe_name(args.label) if args.label else _model_label(args.model)
        if label in {r.label for r in roles}:  # only baselines that run take a name
            raise UsageError(f"--label {label!r} is taken by a baseline; choose another (or keep --no-baselines)")
        roles.append(Role(label, "attacked", model_ref))
    from benchmarks.core.precision import check_training_dtype

    check_training_dtype(dtype, bool(defenses), "defense " + ",".join(defenses))
    check_training_dtype(dtype, not attack_cls.trains_adapters_only, f"attack {args.attack}")
    if args.label and defenses:
        raise UsageError("--label names a model attacked with --defense none; defended models are named by defense")
    if not world and args.data == WORLD and not args.retrain_model and not args.no_baselines:
        notes.append("the world's retrain model serves as the retrain baseline")
    if not any(r.kind == "target" for r in roles):
        notes.append("no target model: recovery ratios need one (--target-model); they are reported as null")
    if not any(r.kind == "retrain" for r in roles):
        notes.append("no retrain model: excess over retrain needs one (--retrain-model); reported as null")
    privleak_reference = None
    if args.privleak and (world_data or retrain_ref) and not any(r.kind == "retrain" for r in roles):
        # Never MUSE-News' published AUC for a world: its own retrain model is the reference.
        privleak_reference = retrain_ref or (str(world_models.retrain) if world_models else WORLD)
        notes.append("PrivLeak's reference AUC comes from the retrain model, measured once (not attacked)")
    # Retrain first: its step-0 PrivLeak AUC is the others' reference.
    order = {"retrain": 0, "target": 1, "defended": 2, "attacked": 2}
    roles.sort(key=lambda r: order[r.kind])

    # ---- where files go
    if args.output is not None:
        output_file = check_yaml_target(args.output, "--output", overwrite=args.overwrite)
        if args.output_dir is not None:
            raise UsageError("give --output or --output-dir, not both")
        check_output_target(output_file.with_suffix(".png"), overwrite=args.overwrite)
        directory = output_file.parent
    else:
        output_file = None
        directory = Path(args.output_dir) if args.output_dir else Path("results") / _data_label(args.data) / (
            "world-target" if world else _model_label(args.model or model_ref))
        check_output_target(directory)
        _check_writable_dir(directory, "--output-dir")

    plan = Plan(
        command=command_line("benchmarks.relearn", argv),
        data=args.data,
        data_kind=data_kind,
        preset=preset_name,
        world=world or world_data,
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
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        privleak_reference=privleak_reference,
    )
    # The world's own models (the default one, or a built world's root) are small enough for a copy per core.
    plan.jobs = _resolve_jobs(args.jobs, plan, small_models=world or world_models is not None)
    if plan.jobs > 1:
        from benchmarks.core.job_pool import threads_per_job

        if args.jobs is None and args.threads is None:
            plan.job_threads = 1
        else:
            import torch

            plan.job_threads = threads_per_job(args.threads or torch.get_num_threads(), plan.jobs)
    state_root = Path(args.state_dir) if args.state_dir else _default_state_root()
    _check_writable_dir(state_root, "--state-dir")
    plan.state_dir = state_root / plan.key()
    return plan


def _resolve_jobs(requested: int | None, plan: Plan, small_models: bool) -> int:
    """``--jobs`` as given (checked), or its default (:func:`benchmarks.core.job_pool.default_jobs`)."""
    from benchmarks.core.job_pool import default_jobs
    from benchmarks.core.processes import world_size

    trajectories = len(plan.roles) * len(plan.seeds)
    if world_size() > 1:
        if requested is not None and requested > 1:
            raise UsageError(f"--jobs {requested} runs trajectories in processes of its own; under accelerate launch "
                             "every process trains the same trajectory. Drop --jobs, or start without accelerate launch")
        return 1
    if requested is not None:
        return min(requested, max(1, trajectories))
    return default_jobs(cpu=_device() == "cpu", small_models=small_models, trajectories=trajectories)


def _world_status() -> tuple[str, str]:
    """The default world's directory, and whether it is built."""
    from benchmarks.core.world_build import WorldBuildConfig, default_world_dir, read_manifest

    root = default_world_dir(WorldBuildConfig())
    return str(root), "cached" if read_manifest(root) is not None else "installed from the pinned world on first use (seconds)"


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
        notes.append("questions without a doc_id (MUSE-News as published) are attributed to a raw/forget document "
                     "by BM25 (ambiguous ones are marked so); V keeps only questions whose document is not in T and "
                     "whose answer occurs in no T document, with the count removed by each rule in the result")
    if not plan.world and plan.attack == "finetune" and plan.dtype == "float32":
        notes.append("full fine-tuning in float32 holds weights, gradients and two AdamW moments (16 bytes per "
                     "parameter); for a 7B model on one GPU use --attack lora (with --dtype bfloat16 if you like); "
                     "--mixed-precision bf16 speeds up compute and keeps float32 master weights")
    from benchmarks.core.env import cache_root

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
                        "verbmem_forget", "verbmem_forget_relearn (T)", "verbmem_forget_heldout (V)",
                        "knowmem_retain"] + (["privleak (steps 0 and last)"] if plan.privleak else []),
            "batch_size": plan.eval_batch_size,
            "model_evaluations": len(plan.roles) * (1 + len(plan.seeds) * (len(plan.milestones) - 1)),
        },
        "trajectories": {"count": len(plan.roles) * len(plan.seeds), "at_once": plan.jobs,
                         **({"torch_threads_each": plan.job_threads} if plan.job_threads else {})},
        "output": {**dict(zip(("yaml", "png"), map(str, plan.output_paths("<run id>")))),
                   "resume_state": str(plan.state_dir), "checkpoints_at_milestones": plan.checkpoints,
                   "checkpoint": _checkpoint_estimate(plan)},
        "memory_per_device": _memory_estimate(plan),
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


def _estimate_ref(plan: Plan) -> str | None:
    """The checkpoint whose config sizes the plan's estimates (None: not readable now)."""
    if plan.model_ref is not None or not plan.world:
        return plan.model_ref
    world_dir, world_state = _world_status()
    return f"{world_dir}/target" if world_state == "cached" else None


def _checkpoint_estimate(plan: Plan) -> str:
    from attacks import attack_class
    from benchmarks.core.footprint import checkpoint_estimate

    if not plan.checkpoints:
        return "off (--no-checkpoints)"
    ref = _estimate_ref(plan)
    return checkpoint_estimate(ref, attack_class(plan.attack)(plan.attack_config).prepare, plan.checkpoint_every)


def _memory_estimate(plan: Plan) -> dict | str:
    """Peak memory per device of each training of the run (its defenses, the attack); see
    :func:`benchmarks.core.footprint.memory_estimate`."""
    from attacks import attack_class
    from benchmarks.core.footprint import TrainingShape, memory_estimate
    from benchmarks.core.unlearning import defense_training_shape, resolve_settings
    from defenses import DEFENSES

    config = plan.attack_config
    trainings = {f"attack {plan.attack}": (attack_class(plan.attack)(config).prepare, TrainingShape(
        config.micro_batch_size, config.max_length, config.mixed_precision, plan.gradient_checkpointing,
        accumulates=config.batch_size > config.micro_batch_size))}
    for role in plan.roles_of("defended"):
        defense, unlearn_config = resolve_settings(role.defense, role.defense_config, DEFENSES)
        # The epoch selection keeps a copy of the best epoch's weights while later ones train.
        trainings[f"defense {role.defense}"] = (None, replace(
            defense_training_shape(defense, unlearn_config, plan.gradient_checkpointing),
            kept_epoch_copy=unlearn_config.epochs > 1))
    return memory_estimate(_estimate_ref(plan), trainings, weight_bytes=2 if plan.dtype == "bfloat16" else 4)


# --------------------------------------------------------------------------- resume state


# --------------------------------------------------------------------------- running


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare_models(plan: Plan, data, timings: dict) -> tuple[dict[str, dict], str]:
    """Fill in the world's checkpoints and run (or find cached) defenses; returns per role the
    model record for the result file, and the checkpoint of ``plan.model_id``."""
    from benchmarks.core.results import timed
    from benchmarks.core.unlearning import model_fingerprint

    base_ref = plan.model_ref
    if base_ref is None or any(r.ref is None and r.kind in ("target", "retrain") for r in plan.roles):
        from benchmarks.core.processes import main_first
        from benchmarks.core.world_build import ensure_world

        with timed(timings, "world"):
            paths = main_first(ensure_world)  # the pinned world, installed on first use (by the main process)
        world_refs = {"target": str(paths.target_dir), "retrain": str(paths.retrain_dir)}
        for role in plan.roles:
            if role.ref is None and role.kind in world_refs:
                role.ref = world_refs[role.kind]
            if role.base == "world/target":
                role.base = world_refs["target"]
        base_ref = base_ref or world_refs["target"]
    from benchmarks.core.job_pool import torch_threads

    records = {}
    with timed(timings, "defense"):
        at_once = _unlearn_at_once(plan, data)
    for role in plan.roles:
        if role.kind == "defended":
            from benchmarks.core.unlearning import unlearn_cached
            from defenses import DEFENSES

            unlearned: dict[int, str] = {}  # unlearning seed -> checkpoint
            try:
                with timed(timings, "defense"), torch_threads(plan.job_threads):
                    for attack_seed, defense_seed in role.defense_seeds.items():
                        if defense_seed not in unlearned:
                            done = at_once.get((role.label, defense_seed))
                            if isinstance(done, TrainingDiverged):
                                raise done
                            settings = {**role.defense_config, "seed": defense_seed}
                            unlearned[defense_seed] = done or str(unlearn_cached(
                                role.base, role.defense, settings, data, registry=DEFENSES, dtype=plan.dtype,
                                progress=plan.progress, gradient_checkpointing=plan.gradient_checkpointing))
                        role.seed_refs[attack_seed] = unlearned[defense_seed]
            except TrainingDiverged as err:
                # Nothing to attack; the run goes on with the other models and reports this one.
                logger.error("defense %s diverged: %s", role.defense, err)
                records[role.label] = _diverged_record(role, err)
                continue
            role.ref = role.seed_refs[min(role.seed_refs)]
        records[role.label] = {
            "kind": role.kind,
            "checkpoint": role.ref,
            "revision_or_hash": model_fingerprint(role.ref),
            **({"defense": role.defense, "defense_hyperparameters": role.defense_config,
                "unlearned_from": role.base} if role.defense else {}),
        }
        if role.kind == "defended":
            # The unlearning behind each checkpoint: per-epoch table and the epoch kept, so the
            # result file shows where each defense's operating point came from.
            records[role.label]["unlearning"] = {
                f"defense_seed_{defense_seed}": _unlearning_record(ref)
                for defense_seed, ref in sorted({role.defense_seeds[s]: r for s, r in role.seed_refs.items()}.items())
            }
        if len(set(role.seed_refs.values())) > 1:
            records[role.label]["per_attack_seed"] = {
                seed: {"defense_seed": role.defense_seeds[seed], "checkpoint": ref,
                       "revision_or_hash": model_fingerprint(ref)}
                for seed, ref in sorted(role.seed_refs.items())
            }
    plan.roles[:] = [r for r in plan.roles if records[r.label].get("status") != "diverged"]
    if not plan.roles:
        raise TrainingDiverged("every model of the run diverged while unlearning: "
                               + "; ".join(r["error"] for r in records.values()))
    return records, base_ref


def _unlearn_job(base: str, defense: str, settings: dict, data, dtype: str, gradient_checkpointing: bool) -> str:
    """One unlearning run in a worker process of ``--jobs`` (it fills the cache the main process reads)."""
    from benchmarks.core.unlearning import unlearn_cached
    from defenses import DEFENSES

    return str(unlearn_cached(base, defense, settings, data, registry=DEFENSES, dtype=dtype,
                              gradient_checkpointing=gradient_checkpointing))


def _unlearn_at_once(plan: Plan, data) -> dict[tuple[str, int], str | TrainingDiverged]:
    """With ``--jobs`` above 1, per (defense label, unlearning seed) the cached checkpoint, and
    when at least two are not cached, those unlearned in worker processes at once (their
    checkpoint, or the divergence that stopped them). Otherwise nothing: the caller looks up and
    unlearns in this process."""
    from benchmarks.core.unlearning import unlearn_cached
    from defenses import DEFENSES

    if plan.jobs < 2:
        return {}
    done: dict[tuple[str, int], str | TrainingDiverged] = {}
    missing = []
    for role in plan.roles_of("defended"):
        for defense_seed in sorted(set(role.defense_seeds.values())):
            settings = {**role.defense_config, "seed": defense_seed}
            cached = unlearn_cached(role.base, role.defense, settings, data, registry=DEFENSES, dtype=plan.dtype,
                                    build=False)
            if cached is None:
                missing.append((role, defense_seed, settings))
            else:
                done[role.label, defense_seed] = str(cached)
    if len(missing) < 2:
        return done
    from benchmarks.core.job_pool import JobPool

    workers, threads = min(plan.jobs, len(missing)), plan.job_threads
    logger.info("unlearning %d models, %d at once in worker processes of %d torch thread(s) each",
                len(missing), workers, threads)
    with JobPool(workers, threads, verbose=logger.isEnabledFor(logging.DEBUG)) as pool:
        for role, defense_seed, settings in missing:
            pool.submit((role.label, defense_seed), _unlearn_job, role.base, role.defense, settings, data,
                        plan.dtype, plan.gradient_checkpointing)
        while pool.running:
            key, outcome = pool.next_done(expected=(TrainingDiverged,))
            done[key] = outcome
            logger.info("%s, unlearning seed %d: %s", *key,
                        "diverged" if isinstance(outcome, TrainingDiverged) else f"unlearned to {outcome}")
    return done


def _diverged_record(role: Role, err: TrainingDiverged) -> dict:
    """The result file's record of a defense that diverged: its status, the error, and the
    per-epoch table of the unlearning run (written next to where the checkpoint would be)."""
    from benchmarks.core.results import read_result

    epochs = read_result(err.report).get("epochs", []) if err.report is not None else []
    return {"kind": role.kind, "checkpoint": None, "revision_or_hash": None, "status": "diverged",
            "error": str(err), "defense": role.defense, "defense_hyperparameters": role.defense_config,
            "unlearned_from": role.base, "unlearn_report": str(err.report) if err.report else None,
            "epochs": epochs}


def _unlearning_record(checkpoint: str) -> dict:
    """What a cached unlearned checkpoint's ``unlearn.yaml`` says about its epochs."""
    from benchmarks.core.results import read_result
    from benchmarks.core.unlearning import RESULT_NAME

    report = read_result(Path(checkpoint) / RESULT_NAME)
    keep = ("epoch", "knowmem_forget", "verbmem_forget", "knowmem_retain", "meets_bar", "mean_loss")
    return {
        "selection": report.get("selection"),
        "epochs": [{k: row[k] for k in keep if k in row} for row in report.get("epochs", [])],
    }


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

    from attacks import attack_class
    from benchmarks.core.models import load_model
    from benchmarks.core.precision import process_accelerator
    from benchmarks.core.processes import main_only
    from benchmarks.core.recovery import measure_point

    attack = attack_class(plan.attack)(plan.attack_config)
    # Each process on its own device (accelerate launch); the main process measures.
    loaded, tokenizer = load_model(role.ref_for(seed), dtype=plan.dtype, device=process_accelerator().device)
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

    @main_only
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
        # Utility is read before and after the attack (what the leaderboard's gate and the
        # sweep's cap use); between milestones it would cost a third of the evaluation.
        curve[step] = measure_point(
            attacked, tokenizer, evalset, batch_size=plan.eval_batch_size, privleak=with_privleak,
            retrain_auc=reference, as_retrain=role.kind == "retrain" and step == 0,
            retain=plan.retain_every_milestone or step in (0, last),
        )
        eval_seconds += time.perf_counter() - began
        logger.info("%s, seed %d, step %d: %s", role.label, seed, step,
                    ", ".join(f"{k} {v:.1f}" for k, v in curve[step].items() if isinstance(v, float)))

    @main_only
    def state_hook(step: int, loop_state: dict) -> None:
        if step == last:
            return  # the finished trajectory's record is written next; weights to resume from are not needed
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
            gradient_checkpointing=plan.gradient_checkpointing,
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


def _trajectory_job(plan: Plan, role: Role, seed: int, texts: list[str], evalset,
                    retrain_auc: float | None, zero_point: dict | None) -> dict:
    """:func:`_attack_one` in a worker process of ``--jobs`` (its own view of the resume state)."""
    state = RunState(plan.state_dir, plan.checkpoints, plan.checkpoint_every)
    return _attack_one(plan, role, seed, texts, evalset, state, retrain_auc, zero_point)


def _run_trajectories(plan: Plan, jobs: list[tuple[int, Role]], texts_for, evalset, state: RunState,
                      retrain_auc: float | None, finish, timings: dict) -> tuple[dict[tuple[int, str], dict], float | None]:
    """Every trajectory's record, keyed by (seed, label): those an interrupted run finished, then
    the rest, in this process or ``plan.jobs`` at once in workers; each is recorded in the run
    state as soon as it ends. ``timings`` gains the attack and evaluation seconds. Also returns
    PrivLeak's reference AUC, which the retrain curve's step 0 supplies when none was given.

    Before its first update a model is the same whatever the seed, so its step 0 is measured by
    the first trajectory of that checkpoint and reused by the others (the T/V grouping, which
    depends on the seed, is applied later); in workers, those others wait for it.
    """
    from benchmarks.core.processes import from_main, is_main

    records: dict[tuple[int, str], dict] = {}
    zero_points: dict[str, dict] = {}  # checkpoint -> its step-0 measurement
    todo = []
    for seed, role in jobs:
        record = from_main(lambda: state.finished(seed, role.label))
        if record is None:
            todo.append((seed, role))
        else:
            records[seed, role.label] = record
            zero_points.setdefault(role.ref_for(seed), record["curve"]["0"])
            if role.kind == "retrain" and plan.privleak and retrain_auc is None:
                retrain_auc = record["curve"]["0"].get("privleak_auc")
    worker_seconds = {"attack": 0.0, "evaluation": 0.0}
    began = time.perf_counter()

    def arrived(seed: int, role: Role, record: dict) -> None:
        records[seed, role.label] = record
        zero_points.setdefault(role.ref_for(seed), record["curve"]["0"])
        worker_seconds["attack"] += record["attack_seconds"]
        worker_seconds["evaluation"] += record["eval_seconds"]

    jobs_at_once = plan.jobs
    if jobs_at_once > 1 and plan.privleak and retrain_auc is None:
        # The retrain curve's step-0 AUC is every other curve's PrivLeak reference: it comes first.
        logger.info("--jobs %d: running the trajectories one at a time (PrivLeak's reference comes from the "
                    "retrain curve of this run)", jobs_at_once)
        jobs_at_once = 1
    jobs_at_once = min(jobs_at_once, len(todo))
    if jobs_at_once <= 1:
        from tqdm.auto import tqdm

        from benchmarks.core.job_pool import torch_threads

        bar = tqdm(todo, desc="attacks", disable=not (plan.progress and sys.stderr.isatty() and is_main()), leave=False)
        for seed, role in bar:
            bar.set_postfix_str(f"{role.label} seed {seed}")
            with torch_threads(plan.job_threads):  # as a worker of --jobs would compute it
                record = _attack_one(plan, role, seed, texts_for(seed), evalset, state, retrain_auc,
                                     zero_points.get(role.ref_for(seed)))
            arrived(seed, role, from_main(lambda: finish(seed, role, record)))
            if role.kind == "retrain" and plan.privleak and retrain_auc is None:
                retrain_auc = record["curve"]["0"].get("privleak_auc")
                state.update_meta(retrain_auc=retrain_auc)
        bar.close()
    else:
        _run_in_workers(plan, todo, jobs_at_once, texts_for, evalset, retrain_auc, zero_points, finish, arrived)
    # Counted from the records, so a resumed run reports the time of the whole run. Workers
    # overlap: their seconds are scaled to the wall-clock time they took together.
    recorded = {stage: sum(records[seed, role.label][key] for seed, role in jobs)
                for stage, key in (("attack", "attack_seconds"), ("evaluation", "eval_seconds"))}
    if jobs_at_once > 1 and sum(worker_seconds.values()) > 0:
        wall = time.perf_counter() - began
        scale = wall / sum(worker_seconds.values())
        recorded = {stage: recorded[stage] - worker_seconds[stage] + worker_seconds[stage] * scale
                    for stage in recorded}
    for stage, seconds in recorded.items():
        timings[stage] = timings.get(stage, 0.0) + seconds
    return records, retrain_auc


def _run_in_workers(plan: Plan, todo: list[tuple[int, Role]], jobs_at_once: int, texts_for, evalset,
                    retrain_auc: float | None, zero_points: dict, finish, arrived) -> None:
    """The trajectories of ``todo`` in ``jobs_at_once`` worker processes of ``plan.job_threads``
    torch threads each; a trajectory whose checkpoint's step 0 is being measured waits for it."""
    from benchmarks.core.job_pool import JobPool

    threads = plan.job_threads
    logger.info("%d trajectories, %d at once in worker processes of %d torch thread(s) each",
                len(todo), jobs_at_once, threads)
    quiet_plan = replace(plan, progress=False)  # bars from several processes would garble each other
    waiting, measuring = list(todo), set()  # checkpoints whose step 0 a running trajectory measures
    with JobPool(jobs_at_once, threads, verbose=logger.isEnabledFor(logging.DEBUG)) as pool:
        while waiting or pool.running:
            for seed, role in list(waiting):
                ref = role.ref_for(seed)
                if ref in measuring:
                    continue
                if ref not in zero_points:
                    measuring.add(ref)
                pool.submit((seed, role), _trajectory_job, quiet_plan, role, seed, texts_for(seed), evalset,
                            retrain_auc, zero_points.get(ref))
                waiting.remove((seed, role))
            (seed, role), record = pool.next_done()
            measuring.discard(role.ref_for(seed))
            arrived(seed, role, finish(seed, role, record))
            logger.info("%s, seed %d: trajectory done (%d to go)", role.label, seed, len(waiting) + pool.running)


def _reference_auc(plan: Plan, evalset) -> float:
    """PrivLeak's AUC_retrain from ``plan.privleak_reference``, a retrain model that is not
    among the curves (so it is measured here, once, and never attacked)."""
    from benchmarks.core.metrics import privleak
    from benchmarks.core.models import load_model
    from benchmarks.core.precision import process_accelerator

    ref = plan.privleak_reference
    if ref == WORLD:
        from benchmarks.core.world_build import ensure_world

        ref = str(ensure_world().retrain_dir)
    model, tokenizer = load_model(ref, dtype=plan.dtype, device=process_accelerator().device)
    leak = privleak(model, tokenizer, evalset.privleak_forget, evalset.privleak_holdout,
                    batch_size=plan.eval_batch_size, as_retrain=True)
    logger.info("PrivLeak reference: AUC %.4f of the retrain model %s", leak.details["auc"], ref)
    return leak.details["auc"]


def execute(plan: Plan) -> dict:
    """Run the plan; returns the result dict (written by :func:`main`)."""
    from benchmarks.core.data import load_data
    from benchmarks.core.attribution import attribute_data
    from benchmarks.core.leakage import guarded_groups
    from benchmarks.core.recovery import EvalSet, document_ids, question_groups, resolve_count, split_documents
    from benchmarks.core.processes import from_main, is_main, main_first
    from benchmarks.core.results import new_run_id, timed, utc_now
    from benchmarks.core.env import cache_root

    timings: dict[str, float] = {}
    began = time.perf_counter()
    data = main_first(lambda: load_data(plan.data))  # a hub data set is downloaded once
    forget = data.records("raw", "forget")
    ids = document_ids(forget)
    text_of = dict(zip(ids, (r["text"] for r in forget)))
    count = resolve_count(len(ids), plan.attack_config.relearn_docs, plan.attack_config.relearn_fraction)
    evalset = EvalSet.from_data(data, privleak=plan.privleak)
    # Which document each question comes from: given by the world, attributed for MUSE-News.
    attribution = main_first(lambda: attribute_data(data, cache_dir=cache_root() / "attribution"))
    timings["data"] = time.perf_counter() - began

    state = RunState(plan.state_dir, plan.checkpoints, plan.checkpoint_every)

    def open_state() -> dict:  # the main process's decision, and its run id, hold for all
        if plan.resume and state.exists() and state.meta().get("plan_key") == plan.key():
            meta = state.meta()
            logger.info("resuming run %s from %s", meta["run_id"], plan.state_dir)
            return meta
        if plan.resume:
            logger.info("no interrupted run of this plan at %s; starting afresh", plan.state_dir)
        elif state.exists():
            logger.warning("an interrupted run of this plan is at %s; starting afresh (use --resume to continue it)",
                           plan.state_dir)
        meta = {"run_id": new_run_id(), "created": utc_now(), "plan_key": plan.key()}
        state.start(meta)
        return meta

    meta = from_main(open_state)

    model_records = meta.get("models")
    if model_records is None:
        model_records, base_ref = _prepare_models(plan, data, timings)
        from benchmarks.core.unlearning import model_fingerprint

        meta.update(models=model_records, refs={r.label: r.ref for r in plan.roles},
                    seed_refs={r.label: r.seed_refs for r in plan.roles if r.seed_refs},
                    model_hash=model_fingerprint(base_ref))
        state.update_meta(**meta)
    else:
        plan.roles[:] = [r for r in plan.roles if r.label in meta["refs"]]  # diverged defenses left out
        for role in plan.roles:
            role.ref = meta["refs"][role.label]
            role.seed_refs = {int(k): v for k, v in meta.get("seed_refs", {}).get(role.label, {}).items()}

    retrain_auc = meta.get("retrain_auc")
    if plan.privleak and plan.privleak_reference is not None and retrain_auc is None:
        with timed(timings, "evaluation"):
            retrain_auc = from_main(lambda: _reference_auc(plan, evalset))
        state.update_meta(retrain_auc=retrain_auc)
    splits = {seed: split_documents(ids, count, seed) for seed in plan.seeds}
    groups = {seed: guarded_groups(evalset.forget_qa, attribution.get("knowmem/forget_qa"), split, text_of)
              for seed, split in splits.items()}
    verbmem_groups = {seed: question_groups(evalset.verbmem, split) for seed, split in splits.items()}
    jobs = [(seed, role) for seed in plan.seeds for role in plan.roles]
    texts_of = {}

    def texts_for(seed: int) -> list[str]:  # what the attack trains on: T's documents, or (benign) other text
        if seed not in texts_of:
            from attacks import attack_class

            texts_of[seed] = attack_class(plan.attack)(plan.attack_config).documents(
                [text_of[d] for d in splits[seed].train], data, seed)
        return texts_of[seed]

    def finish(seed: int, role: Role, record: dict) -> dict:  # what the main process measured, for every process
        state.finish(seed, role.label, record)
        return record

    records, retrain_auc = _run_trajectories(plan, jobs, texts_for, evalset, state, retrain_auc, finish, timings)
    trajectories: dict[int, dict[str, dict]] = {}
    for seed, role in jobs:
        trajectories.setdefault(seed, {})[role.label] = records[seed, role.label]
    timings["total"] = time.perf_counter() - began
    return build_result(plan, meta, model_records, data, splits, groups, trajectories, timings, retrain_auc,
                        verbmem_groups=verbmem_groups, attribution=attribution)


# --------------------------------------------------------------------------- the result


def _jobs_record(plan: Plan) -> dict:
    """How the trajectories ran: how many at once (``--jobs``) and with how many torch threads each."""
    import torch

    return {"jobs": plan.jobs, "threads_per_job": plan.job_threads or torch.get_num_threads()}


def build_result(plan: Plan, meta: dict, model_records: dict, data, splits: dict, groups: dict,
                 trajectories: dict, timings: dict, retrain_auc: float | None,
                 verbmem_groups: dict | None = None, attribution=None) -> dict:
    """The result dict (schema of :mod:`benchmarks.core.results`). ``groups`` and
    ``verbmem_groups`` hold per seed the T/V grouping of the knowmem questions and of the
    verbmem items (without ``verbmem_groups`` VerbMem has no T/V curves); ``attribution`` (a
    ``DataAttribution``) says which document each question was grouped by."""
    from benchmarks.core.leakage import GUARD_RULE
    from benchmarks.core.precision import precision_record
    from benchmarks.core.processes import processes_record
    from benchmarks.core.metrics import (
        KNOWMEM_MAX_NEW_TOKENS,
        MUSE_NEWS_RETRAIN_AUC,
        MUSE_NEWS_RETRAIN_AUC_SOURCE,
        VERBMEM_MAX_NEW_TOKENS,
    )
    from benchmarks.core.recovery import DEFINITIONS, SPLIT_RULE, curves_and_summary, point_values
    from benchmarks.core.results import HIGHER_IS_BETTER, SCHEMA_VERSION, attack_settings_hash, environment_info

    steps = plan.milestones
    target = next((r.label for r in plan.roles if r.kind == "target"), None)
    retrain = next((r.label for r in plan.roles if r.kind == "retrain"), None)
    shown = {"target": 0, "retrain": 1}  # baselines first in files, tables and legends
    labels = [r.label for r in sorted(plan.roles, key=lambda r: shown.get(r.kind, 2))]
    verbmem_groups = verbmem_groups or {}
    points = {
        label: {seed: {int(s): point_values(raw, groups[seed], verbmem_groups.get(seed))
                       for s, raw in trajectories[seed][label]["curve"].items()}
                for seed in plan.seeds}
        for label in labels
    }
    curves, summary, metrics = curves_and_summary(steps, points, target, retrain, privleak=plan.privleak)
    question_counts = {"knowmem_forget_relearn": "train", "knowmem_forget_heldout": "held_out"}
    for per_label in curves.values():  # every T/V figure carries the number of questions behind it
        for metric, group in question_counts.items():
            if metric in per_label["metrics"]:
                per_label["metrics"][metric]["questions"] = {seed: len(getattr(g, group) or ()) for seed, g in groups.items()}
    first_groups = groups[plan.seeds[0]]
    forget_attribution = attribution.get("knowmem/forget_qa") if attribution is not None else None
    if first_groups.held_out is None:
        heldout_note = f"unavailable: {first_groups.reason}"
    elif not splits[plan.seeds[0]].held_out:
        heldout_note = ("not held out: every forget document went to the attacker (the paper's setting), so V is "
                        "empty and every forget question was in the attacker's documents")
    elif "knowmem_forget_heldout" not in metrics:
        heldout_note = "unavailable: no forget question passed the leakage guard into V"
    elif forget_attribution is not None and forget_attribution.coverage()["attributed"]:
        heldout_note = (f"questions grouped into T and V by the raw/forget document attributed to them "
                        f"({attribution.method['name']}, margin threshold {attribution.method['threshold']}), "
                        "under the leakage guard (see attribution)")
    else:
        heldout_note = "questions grouped into T and V by their doc_id, under the leakage guard (see attribution)"
    first_verbmem = verbmem_groups.get(plan.seeds[0])
    if first_verbmem is None:
        verbmem_note = "unavailable: the verbmem items were not grouped"
    elif first_verbmem.held_out is None:
        verbmem_note = "unavailable: the verbmem items carry no doc_id, so which belong to T or V is unknown"
    elif "verbmem_forget_heldout" not in metrics:
        verbmem_note = "unavailable: no verbmem item comes from a document of V"
    else:
        verbmem_note = "verbmem items grouped into T and V by their doc_id (the article they are cut from)"

    statuses = {t["status"] for per_role in trajectories.values() for t in per_role.values()}
    statuses |= {record.get("status", "complete") for record in model_records.values()}
    status = "diverged" if "diverged" in statuses else "complete"
    # From the model records, which keep a defense that diverged (and so has no curve).
    defended = [(r.get("defense", label), r.get("defense_hyperparameters", {}))
                for label, r in model_records.items() if r["kind"] == "defended"]
    if len(defended) == 1:
        defense = {"name": defended[0][0], "hyperparameters": defended[0][1]}
    elif defended:
        defense = {"name": ",".join(name for name, _ in defended),
                   "hyperparameters": {name: settings for name, settings in defended}}
    else:
        defense = {"name": NONE, "hyperparameters": {}}
    first = splits[plan.seeds[0]]
    data_splits = {key: {"n": v["records"], "sha256": v["sha256"]} for key, v in data.describe()["splits"].items()}
    privleak_reference = None
    if plan.privleak:
        if retrain:
            privleak_reference = {"auc": retrain_auc, "source": f"retrain model ({retrain}) before the attack"}
        elif plan.privleak_reference is not None:
            privleak_reference = {"auc": retrain_auc,
                                  "source": f"retrain model ({plan.privleak_reference}), measured once, not attacked"}
        else:
            privleak_reference = {"auc": MUSE_NEWS_RETRAIN_AUC, "source": MUSE_NEWS_RETRAIN_AUC_SOURCE}
    result = {
        "schema_version": SCHEMA_VERSION,
        "run_id": meta["run_id"],
        "command": plan.command,
        "created": meta["created"],
        "status": status,
        "model": {"id": plan.model_id, "revision_or_hash": meta.get("model_hash"), "dtype": plan.dtype},
        "precision": {**precision_record(plan.dtype, plan.attack_config.mixed_precision),
                      "gradient_checkpointing": plan.gradient_checkpointing},
        "processes": processes_record(plan.attack_config.batch_size, plan.attack_config.micro_batch_size,
                                      plan.eval_batch_size),
        "defense": defense,
        "attack": {
            "name": plan.attack,
            "plan": _attack_plan(plan.attack),  # the attacks applied, in order
            "hyperparameters": plan.attack_config.to_dict(),
            "seeds": list(plan.seeds),
            "milestones": list(steps),
            "documents": {"forget": len(first.train) + len(first.held_out), "relearn": len(first.train),
                          "heldout": len(first.held_out)},
            "relearn_doc_ids": list(first.train),
            "heldout_doc_ids": list(first.held_out),
            "splits": {seed: {"relearn_doc_ids": list(s.train), "heldout_doc_ids": list(s.held_out)}
                       for seed, s in splits.items()},
            "split_rule": SPLIT_RULE,
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
                       "heldout": None if g.held_out is None else len(g.held_out),
                       **({"heldout_removed": dict(g.removed)} if g.removed is not None else {})}
                for seed, g in groups.items()},
            "verbmem_items": {
                seed: {"all": len(g.all), "relearn": None if g.train is None else len(g.train),
                       "heldout": None if g.held_out is None else len(g.held_out)}
                for seed, g in verbmem_groups.items()},
            "privleak_reference": privleak_reference,
            "heldout_questions": heldout_note,
            "heldout_verbmem": verbmem_note,
        },
        "trajectories": {
            label: {seed: {"status": trajectories[seed][label]["status"], "error": trajectories[seed][label]["error"],
                           "losses": trajectories[seed][label]["losses"]} for seed in plan.seeds}
            for label in labels
        },
        **({"attribution": {**attribution.to_dict(), "heldout_guard": GUARD_RULE}} if attribution is not None else {}),
        "environment": {**environment_info(_device()), **_jobs_record(plan)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    # Which runs a leaderboard may compare: the same attack, settings, seeds and T/V rule.
    result["attack"]["settings_hash"] = attack_settings_hash(result["attack"])
    return result


def format_table(result: dict) -> str:
    """Knowledge before and after the attack, and recovery on held-out V, per curve."""
    from tabulate import tabulate

    from benchmarks.core.recovery import KNOWMEM_ALL, KNOWMEM_V, RETAIN, VERBMEM, VERBMEM_V

    def cell(stats: dict | None, digits: int = 1) -> str:
        if not stats or stats.get("mean") is None:
            return "–"
        text = f"{stats['mean']:.{digits}f}"
        if stats.get("ci95_high") is not None:
            text += f" ±{stats['ci95_high'] - stats['mean']:.{digits}f}"
        return text

    heldout = any(KNOWMEM_V in per_metric for per_metric in result["summary"].values())
    questions = result["evaluation"]["knowmem_forget_questions"]
    headers = ["model", "KnowMem-forget before", "after"]
    if heldout:
        headers += ["KnowMem V before", "V after", "V recovery", "V questions"]
    verbatim_heldout = any(VERBMEM_V in per_metric for per_metric in result["summary"].values())
    headers += ["VerbMem before", "after"]
    if verbatim_heldout:
        headers += ["VerbMem V before", "V after"]
    headers += ["KnowMem-retain before", "after"]
    rows = []
    for label, per_metric in result["summary"].items():
        row = [label, cell(per_metric[KNOWMEM_ALL]["before"]), cell(per_metric[KNOWMEM_ALL]["after"])]
        if heldout:
            v = per_metric[KNOWMEM_V]
            row += [cell(v["before"]), cell(v["after"]), cell(v["recovery_ratio"], 2), _count_range(
                [q["heldout"] for q in questions.values()])]
        row += [cell(per_metric[VERBMEM]["before"]), cell(per_metric[VERBMEM]["after"])]
        if verbatim_heldout:
            row += [cell(per_metric[VERBMEM_V]["before"]), cell(per_metric[VERBMEM_V]["after"])]
        row += [cell(per_metric[RETAIN]["before"]), cell(per_metric[RETAIN]["after"])]
        rows.append(row)
    steps = result["attack"]["milestones"][-1]
    seeds = len(result["attack"]["seeds"])
    caption = f"{result['attack']['name']} attack, {steps} steps, {seeds} seed(s); mean ± 95% t-interval half-width"
    if heldout:
        caption += "; V recovery = (after − before) / (target before − before) on the held-out documents V"
        removed = [q["heldout_removed"] for q in questions.values() if q.get("heldout_removed")]
        if removed:
            caption += (f"; V questions: {_count_range([q['heldout'] for q in questions.values()])} of "
                        f"{_count_range([q['all'] for q in questions.values()])}, kept out of V by the leakage guard: "
                        + ", ".join(f"{rule.replace('_', ' ')} {_count_range([r[rule] for r in removed])}"
                                    for rule in removed[0]))
    else:
        caption += f"; held-out recovery: {result['evaluation']['heldout_questions']}"
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(headers) - 1))
    return table + "\n" + caption


def _count_range(counts: list) -> str:
    """One count, or the range over seeds ("41" or "38–44")."""
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}–{high}"


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from benchmarks.core.tofu_data import is_tofu_source

    if is_tofu_source(args.data):
        from attacks import ATTACKS
        from benchmarks.core.processes import world_size
        from benchmarks.core.tofu_relearn import run_tofu_relearn
        from defenses import build_defense

        if world_size() > 1:
            raise UsageError(f"--data {args.data} runs in one process: start it with {PROG}, not accelerate launch")
        if args.jobs not in (None, 1):
            raise UsageError(f"--jobs applies to MUSE-style data; --data {args.data} runs its trajectories in one "
                             "process (drop --jobs)")
        return run_tofu_relearn(args, argv, ATTACKS, build_defense)

    if args.lr_sweep is not None:
        return _lr_sweep(args, argv)
    plan = make_plan(args, argv)
    from benchmarks.core.processes import is_main, quiet_other_processes

    if args.dry_run:
        if is_main():
            print(format_plan(plan))
        return 0
    quiet_other_processes()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return _run(plan)[0]


def _run(plan: Plan) -> tuple[int, Path, dict]:
    """Execute ``plan`` and write its files: (exit code, result YAML, result)."""
    from benchmarks.core.plots import plot_recovery
    from benchmarks.core.processes import from_main, is_main
    from benchmarks.core.results import write_yaml_atomic

    try:
        result = execute(plan)  # on every process, which all end with the same result
    except KeyboardInterrupt:
        if is_main():
            print(f"interrupted: run the same command with --resume to continue from the last milestone "
                  f"(state kept in {plan.state_dir})", file=sys.stderr)
        raise

    def write() -> Path:  # the one result file, plot and table, by the main process
        output_yaml, output_png = plan.output_paths(result["run_id"])
        write_yaml_atomic(output_yaml, result, overwrite=plan.overwrite)
        plot_recovery(result, output_png, overwrite=plan.overwrite)
        RunState(plan.state_dir, plan.checkpoints).remove()
        print(format_table(result))
        print(f"wrote {output_yaml}\nwrote {output_png}")
        if result["status"] != "complete":
            print(f"warning: run {result['status']}; see trajectories in {output_yaml}", file=sys.stderr)
        return output_yaml

    output_yaml = from_main(write)
    return (0 if result["status"] == "complete" else 3), output_yaml, result


def _lr_sweep(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--lr-sweep``: every plan made (and checked) first, then one ordinary run per learning
    rate (its own result file), then the sweep file (``benchmarks.core.sweep``)."""
    import copy

    from benchmarks.core.results import command_line
    from benchmarks.core.sweep import lr_sweep_summary, parse_grid

    grid = parse_grid(args.lr_sweep)
    if args.lr is not None:
        raise UsageError("give --lr or --lr-sweep, not both")
    if args.output is not None:
        raise UsageError("--lr-sweep writes one file per learning rate: use --output-dir, not --output")
    if not 0 <= args.utility_cap <= 1:
        raise UsageError(f"--utility-cap must lie in [0, 1], got {args.utility_cap}")
    plans = {}
    for lr in grid:
        one = copy.copy(args)
        one.lr, one.lr_sweep = lr, None
        plans[lr] = make_plan(one, argv)
        plans[lr].retain_every_milestone = True  # the utility cap reads every milestone
    from benchmarks.core.processes import is_main, quiet_other_processes

    if args.dry_run:
        for lr, plan in plans.items():
            if is_main():
                print(f"# --lr {lr}")
                print(format_plan(plan))
        return 0
    quiet_other_processes()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    files, results, code = {}, {}, 0
    given = list(argv if argv is not None else sys.argv[1:])
    for lr, plan in plans.items():
        logger.info("learning-rate sweep: lr %g", lr)
        # Each run records the command that reproduces it alone.
        plan.command = command_line("benchmarks.relearn", _without_sweep(given) + ["--lr", repr(lr)])
        status, path, result = _run(plan)
        code = max(code, status)
        files[f"{lr:g}"], results[lr] = str(path), result
    table = lr_sweep_summary(results, args.utility_cap)
    first = next(iter(plans.values()))
    from benchmarks.core.processes import from_main

    return from_main(lambda: _write_sweep(args, argv, grid, first, files, table, code))


def _write_sweep(args, argv, grid, first: Plan, files: dict, table: dict, code: int) -> int:
    """The sweep file beside the runs' files, and its summary printed (main process)."""
    from benchmarks.core.results import command_line, new_run_id, utc_now, write_yaml_atomic

    run_id = new_run_id()
    document = {
        "schema_version": 1,
        "kind": "lr_sweep",
        "run_id": run_id,
        "command": command_line("benchmarks.relearn", argv),
        "created": utc_now(),
        "attack": first.attack,
        "learning_rates": grid,
        "utility_cap": args.utility_cap,
        "rule": "per model: the best mean over seeds of KnowMem-forget on V (all forget questions when V is "
                "unavailable) among the milestones before KnowMem-retain first falls below utility_cap x its "
                "value before the attack; best over the learning rates",
        "runs": files,
        "best": table,
    }
    path = first.output_dir / f"relearn-lrsweep-{first.output_prefix.removeprefix('relearn-')}-{run_id}.yaml"
    write_yaml_atomic(path, document, overwrite=False)
    for label, entry in table.items():
        print(f"{label}: best {entry['best']} at lr {entry['best_lr']}  " + ", ".join(
            f"lr {lr}: {e['mean'] if e['mean'] is None else round(e['mean'], 1)}" for lr, e in entry["per_lr"].items()))
    print(f"wrote {path}")
    return code


def _without_sweep(argv: list[str]) -> list[str]:
    """``argv`` without ``--lr-sweep``/``--utility-cap`` and their values."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--lr-sweep", "--utility-cap"):
            skip = True
            continue
        if item.startswith(("--lr-sweep=", "--utility-cap=")):
            continue
        out.append(item)
    return out


if __name__ == "__main__":
    run_cli(main)
