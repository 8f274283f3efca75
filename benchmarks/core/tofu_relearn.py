"""Relearning on TOFU: defend (optionally), attack on some forget authors, measure the others.

``python -m benchmarks.relearn --data tofu|tofu-world|DIR`` comes here (the entry point passes
in its attack registry and defense builder, so this shared layer imports neither).

The protocol (DESIGN §5, adapted to TOFU):

* **T/V by author.** The forget split's authors are shuffled by the seed and cut into T (the
  attacker's) and V (held out). Never by question: an author's name is in nearly all of their 20
  answers, so a split by question would leak V through T.
* **The attack** fine-tunes on T's (question, answer) pairs in chat format with the answer-only
  loss (``benchmarks.core.chat_format``), one run per model and seed, evaluated at step 0 and at
  the milestones of that run.
* **Curves**: Prob, ROUGE and truth ratio (mean(min(TR, 1/TR))) on V and on T; forget quality on
  V against the retrain model's truth ratios on the same items (its step-0 values); model
  utility before and after the attack.
* **Over seeds**: every summary statistic is computed per attack seed against the same seed's
  baselines, then given as mean and Student-t 95 % interval over the seeds
  (:func:`benchmarks.core.recovery.combine_seeds`, the interval of the MUSE runs); the curves
  get the same band per milestone, which the PNG beside the result file draws.
* **Baselines**: the target (``--target-model``) and retrain (``--retrain-model``) models under the
  same attack; recovery ratios (M(s) − M_unlearned(0)) / (M_target(0) − M_unlearned(0)) and the
  excess of an unlearned model's gain over the retrain model's.
* **Resume**: the run keeps a state directory (``--state-dir``, keyed by the plan) with every
  finished trajectory and the latest milestone checkpoint of the one in progress, the way the
  MUSE and world runs do (:mod:`benchmarks.core.run_state`); ``--resume`` continues it.
* **Defenses** run on TOFU too: the forget batches are T∪V's chat pairs (the whole forget split)
  with answer-only masks, the retain batches the retain split's, so NPO's sequence likelihood and
  GDR's NLL cover answer tokens only.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from benchmarks.core.chat_format import PromptSettings, collate_pairs, describe_prompt, encode_pair, pad_id_for
from benchmarks.core.errors import TrainingDiverged, UsageError
from benchmarks.core.tofu_data import TOFU_WORLD, TofuData, TofuItem, check_forget_split, resolve_tofu_source

logger = logging.getLogger(__name__)

#: The author world: attack half of the 4 forget10 authors, evaluate the other half. NPO (GDR
#: retain term) at lr 1e-4 for 3 epochs takes the world target's forget Prob from 0.718 to
#: 0.345 ± 0.024 and keeps model utility at 0.471 ± 0.013 (target 0.514; seeds 0-2, README);
#: lr 1e-3 or 10 epochs forget more but cost more than a tenth of the utility (measured on an
#: earlier build of the default world, seed 0).
TOFU_WORLD_PRESET: dict[str, Any] = {
    "attack": {"relearn_fraction": 0.5, "steps": 30, "lr": 1e-3, "schedule": "cosine",
               "batch_size": 8, "micro_batch_size": 8, "max_length": 256},
    "attack_overrides": {"lora": {"lr": 1e-2}},
    "milestones": (0, 5, 10, 20, 30),
    "seeds": (0, 1, 2),  # three attack seeds (each its own T/V and NPO run): the summary has an interval
    "defenses": ("npo",),
    "defense_train": {"lr": 1e-4, "epochs": 3, "batch_size": 8},
    "eval_batch_size": 64,
    "max_new_tokens": 48,  # benchmarks.core.tofu_cli.WORLD_MAX_NEW_TOKENS
}
#: Real TOFU checkpoints (Llama-3.2-1B-Instruct): half of forget10's 20 authors to the attacker,
#: AdamW at TOFU's fine-tuning lr 1e-5, batch 8, cosine, 50 steps (200 pairs ≈ 2 epochs of T);
#: defenses with open-unlearning's NPO recipe (lr 1e-5, 10 epochs, batch 32).
TOFU_PRESET: dict[str, Any] = {
    "attack": {"relearn_fraction": 0.5, "steps": 50, "lr": 1e-5, "schedule": "cosine",
               "batch_size": 8, "micro_batch_size": 4, "max_length": 512},
    "attack_overrides": {"lora": {"lr": 1e-4}},
    "milestones": (0, 10, 20, 30, 40, 50),
    "seeds": (0,),
    "defenses": (),
    "defense_train": {"lr": 1e-5, "epochs": 10, "batch_size": 32},
    "eval_batch_size": 16,
    "max_new_tokens": 200,
}


def split_authors(authors: Sequence[int], count: int | None, fraction: float | None, seed: int) -> tuple[list[int], list[int]]:
    """(T, V): ``count`` (or ``fraction`` of the) authors drawn by ``seed`` for T, the rest V."""
    authors = sorted(authors)
    size = count if count is not None else int(round(fraction * len(authors)))
    if not 1 <= size <= len(authors):
        raise UsageError(f"--relearn-docs gives the attacker {size} of {len(authors)} forget authors; "
                         f"choose 1..{len(authors)} (a count or a fraction of authors)")
    shuffled = list(authors)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[:size]), sorted(shuffled[size:])


@dataclass
class TofuRole:
    label: str
    kind: str  # "target", "retrain", "defended" or "attacked"
    ref: str | None  # None: the author world's, known once it is built
    defense: str | None = None
    defense_config: dict | None = None


@dataclass
class TofuPlan:
    command: str
    data: str
    forget_split: str
    prompt: PromptSettings
    roles: list[TofuRole]
    attack: str
    attack_config: Any
    seeds: list[int]
    milestones: list[int]
    eval_batch_size: int
    max_new_tokens: int
    defense_train: dict
    dtype: str
    output: Path
    overwrite: bool
    splits: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)  # seed -> (T, V)
    notes: list[str] = field(default_factory=list)
    state_dir: Path | None = None  # the resume state (benchmarks.core.run_state), keyed by the plan
    resume: bool = False
    checkpoints: bool = True
    checkpoint_every: int = 0

    def identity(self) -> dict[str, Any]:
        """What determines the numbers (hashes into the resume key): not where files go."""
        identity = {
            "data": self.data, "forget_split": self.forget_split, "prompt": self.prompt.to_dict(),
            "roles": {r.label: {"kind": r.kind, "ref": r.ref, "defense": r.defense,
                                "defense_config": r.defense_config} for r in self.roles},
            "attack": self.attack, "attack_config": self.attack_config.to_dict(), "seeds": self.seeds,
            "milestones": self.milestones, "eval_batch_size": self.eval_batch_size,
            "max_new_tokens": self.max_new_tokens, "defense_train": self.defense_train, "dtype": self.dtype,
        }
        if self.data == TOFU_WORLD:  # another world configuration is another run
            from benchmarks.core.tofu_world import TofuWorldConfig, world_hash

            identity["world"] = world_hash(TofuWorldConfig())
        return identity

    def key(self) -> str:
        import hashlib
        import json

        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return "tofu-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def make_tofu_plan(args: argparse.Namespace, argv, attack_cls, check_defense: Callable[[str], Any]) -> TofuPlan:
    """Check the arguments of a TOFU relearning run and fix its plan; loads no model."""
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_output_target, check_writable_directory, check_yaml_target, command_line
    from benchmarks.core.tofu_cli import prompt_settings

    forget_split = check_forget_split(args.forget_split)
    world = args.data == TOFU_WORLD
    notes: list[str] = []
    try:
        resolve_tofu_source(args.data)
    except UsageError as err:
        if not (args.dry_run and "is set" in str(err)):
            raise
        notes.append(f"data {args.data!r} comes from the hub, which is switched off here; the real run needs the "
                     "network or a local copy")
    preset = TOFU_WORLD_PRESET if world else TOFU_PRESET
    settings = {**preset["attack"], **preset["attack_overrides"].get(args.attack, {})}
    overrides = _attack_overrides(args)
    settings.update(overrides)
    config = attack_cls.config_class(**settings)

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(preset["seeds"])
    milestones = sorted(set(int(m) for m in args.milestones.split(",")) | {0, config.steps}) if args.milestones else (
        sorted(set(m for m in preset["milestones"] if m <= config.steps) | {0, config.steps}))
    if any(not 0 <= m <= config.steps for m in milestones):
        raise UsageError(f"milestones {milestones} must lie within 0..{config.steps}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 steps, got {args.checkpoint_every}")

    roles: list[TofuRole] = []
    if args.model is None and not world:
        raise UsageError(f"--model is required with --data {args.data!r} (only tofu-world brings its own models)")
    if args.defense is None:
        if args.model is not None:
            raise UsageError("--defense is required with --model: 'none' attacks the model as it is, a name "
                             "such as npo unlearns it first")
        defenses = list(preset["defenses"])
    elif args.defense.strip() == "none":
        defenses = []
    else:
        defenses = [d.strip() for d in args.defense.split(",") if d.strip()]
    for name in defenses:
        check_defense(name)
    model_ref = check_model_ref(args.model) if args.model else None
    if not args.no_baselines:
        if args.target_model:
            roles.append(TofuRole("target", "target", check_model_ref(args.target_model)))
        elif world:
            roles.append(TofuRole("target", "target", None))
        elif defenses:
            roles.append(TofuRole("target", "target", model_ref))
    if args.retrain_model:
        roles.insert(0, TofuRole("retrain", "retrain", check_model_ref(args.retrain_model)))
    elif world:
        roles.insert(0, TofuRole("retrain", "retrain", None))
    else:
        notes.append("no --retrain-model: forget quality and the retrain baseline are reported as null")
    base = model_ref  # None: the world's target
    for name in defenses:
        roles.append(TofuRole(name, "defended", base, defense=name,
                              defense_config={"train": dict(preset["defense_train"])}))
    if not defenses:
        if model_ref is None:
            raise UsageError("--defense none needs --model (the world's target is not unlearned)")
        label = args.label or Path(model_ref.rstrip("/")).name.split("/")[-1]
        if label in ("target", "retrain"):
            raise UsageError(f"the attacked model would be named {label!r}, a baseline's name; give it another "
                             "with --label")
        roles.append(TofuRole(label, "attacked", model_ref))
    if world and forget_split != "forget10":
        raise UsageError("the author world's retrain model matches forget10; use --forget-split forget10")

    if args.output is not None:
        if args.output_dir is not None:
            raise UsageError("give --output or --output-dir, not both")
        output = check_yaml_target(args.output, "--output", overwrite=args.overwrite)
        check_output_target(output.with_suffix(".png"), overwrite=args.overwrite)  # the plot goes beside it
    else:
        # A directory, and a file name carrying the run id (known at write time), so a new run
        # never collides with an earlier one.
        model_label = "world-target" if model_ref is None else Path(model_ref.rstrip("/")).name
        directory = Path(args.output_dir) if args.output_dir else Path("results") / (
            "tofu-world" if world else "tofu") / model_label
        check_output_target(directory)
        check_writable_directory(directory, "--output-dir")
        output = directory / f"relearn-{args.attack}-{'+'.join(defenses) or 'none'}-{forget_split}-{{run_id}}.yaml"
    plan = TofuPlan(
        command=command_line("benchmarks.relearn", argv), data=args.data, forget_split=forget_split,
        prompt=prompt_settings(args), roles=roles, attack=args.attack, attack_config=config, seeds=seeds,
        milestones=milestones, eval_batch_size=args.eval_batch_size or preset["eval_batch_size"],
        max_new_tokens=args.max_new_tokens or preset["max_new_tokens"], defense_train=dict(preset["defense_train"]),
        dtype=args.dtype or "float32", output=output, overwrite=args.overwrite, notes=notes,
        resume=args.resume, checkpoints=not args.no_checkpoints, checkpoint_every=args.checkpoint_every,
    )
    from benchmarks.core.env import cache_root

    state_root = Path(args.state_dir) if args.state_dir else cache_root() / "relearn-state"
    check_writable_directory(state_root, "--state-dir")
    plan.state_dir = state_root / plan.key()
    return plan


def _attack_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The attack flags the user gave (relearn's flag set), as AttackConfig fields."""
    out: dict[str, Any] = {}
    if args.relearn_docs is not None:
        raw = args.relearn_docs.strip()
        try:
            if raw.endswith("%"):
                out.update(relearn_docs=None, relearn_fraction=float(raw[:-1]) / 100)
            elif raw.isdigit():
                out.update(relearn_docs=int(raw), relearn_fraction=None)
            else:
                out.update(relearn_docs=None, relearn_fraction=float(raw))
        except ValueError:
            raise UsageError(f"--relearn-docs must be a count of authors (2) or a fraction (0.5), got {raw!r}") from None
    for flag, name, kind in (("steps", "steps", int), ("lr", "lr", float), ("schedule", "schedule", str),
                             ("warmup_steps", "warmup_steps", int), ("batch_size", "batch_size", int),
                             ("micro_batch_size", "micro_batch_size", int), ("max_length", "max_length", int),
                             ("weight_decay", "weight_decay", float), ("lora_rank", "lora_rank", int),
                             ("lora_alpha", "lora_alpha", float)):
        value = getattr(args, flag, None)
        if value is not None:
            out[name] = kind(value)
    return out


def attack_pairs(forget_items: Sequence[TofuItem], t_authors: Sequence[int]) -> list[tuple[str, str]]:
    """The attacker's training data: the (question, answer) pairs of T's authors only."""
    wanted = set(t_authors)
    return [(item.question, item.answer) for item in forget_items if item.author in wanted]


def resolve_splits(plan: TofuPlan, authors: Sequence[int]) -> None:
    config = plan.attack_config
    for seed in plan.seeds:
        plan.splits[seed] = split_authors(authors, config.relearn_docs, config.relearn_fraction, seed)


def format_tofu_plan(plan: TofuPlan, authors: Sequence[int] | None) -> str:
    import yaml

    body: dict[str, Any] = {
        "benchmark": "TOFU",
        "data": plan.data,
        "forget_split": plan.forget_split,
        "prompt": plan.prompt.to_dict() | {"format": "the model's chat template (plain Question/Answer without one)"},
        "models": {r.label: {"kind": r.kind, "checkpoint": r.ref or "(the author world's, built on first use)",
                             **({"defense": r.defense, "defense_training": r.defense_config} if r.defense else {})}
                   for r in plan.roles},
        "attack": {"name": plan.attack, **plan.attack_config.to_dict()},
        "split": {"rule": "by author (seeded), never by question"},
        "seeds": plan.seeds,
        "milestones": plan.milestones,
        "evaluation": {"sets": "forget V and T (Prob, ROUGE-L recall, truth ratio), forget quality on V, "
                               "model utility before and after",
                       "batch_size": plan.eval_batch_size, "max_new_tokens": plan.max_new_tokens},
        "output": str(plan.output),
        "plot": str(plan.output.with_suffix(".png")),
        "resume_state": str(plan.state_dir),
    }
    if authors is not None:
        resolve_splits(plan, authors)
        body["split"].update({f"seed {s}": {"T authors": t, "V authors": v} for s, (t, v) in plan.splits.items()})
    else:
        config = plan.attack_config
        share = (f"{config.relearn_docs} authors" if config.relearn_docs is not None
                 else f"{config.relearn_fraction:.0%} of the forget authors")
        body["split"]["T"] = f"{share} of {plan.forget_split}, drawn per seed; the rest are V"
    if plan.notes:
        body["notes"] = plan.notes
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=110, default_flow_style=None)


# --------------------------------------------------------------------------- running


class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def defense_loader(tokenizer, forget: Sequence[TofuItem], retain: Sequence[TofuItem] | None,
                   prompt: PromptSettings, batch_size: int, seed: int, with_retain: bool):
    """Micro-batches in the defenses' layout (``{"forget": {..., "index", "loss_mask"},
    "retain": {...}}``) of chat pairs with answer-only masks, and the in-order forget loader that
    caches π_ref. Forget pair i meets retain pair order[i mod N] (as MUSE pairs chunks)."""
    pad_id = pad_id_for(tokenizer, PromptSettings())  # training sees the real input, never eot_padding
    forget_pairs = [encode_pair(tokenizer, i.question, i.answer, prompt) for i in forget]
    retain_pairs = [encode_pair(tokenizer, i.question, i.answer, prompt) for i in retain] if with_retain else []
    generator = torch.Generator().manual_seed(seed)
    retain_order = torch.randperm(len(retain_pairs), generator=generator).tolist() if retain_pairs else []
    rows = [(i, forget_pairs[i], retain_pairs[retain_order[i % len(retain_pairs)]] if retain_pairs else None)
            for i in range(len(forget_pairs))]
    order = torch.randperm(len(rows), generator=generator).tolist()

    def collate(items):
        forget_batch = collate_pairs([p for _, p, _ in items], pad_id)
        forget_batch["index"] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        batch = {"forget": forget_batch}
        if items[0][2] is not None:
            batch["retain"] = collate_pairs([r for _, _, r in items], pad_id)
        return batch

    train_loader = torch.utils.data.DataLoader(_Examples([rows[i] for i in order]), batch_size=batch_size,
                                               shuffle=False, collate_fn=collate)
    reference_loader = torch.utils.data.DataLoader(_Examples(rows), batch_size=batch_size, shuffle=False,
                                                   collate_fn=lambda items: collate(items)["forget"])
    return train_loader, reference_loader


def unlearn_on_tofu(model, tokenizer, defense, data: TofuData, prompt: PromptSettings, train: Mapping[str, Any], seed: int):
    """Apply ``defense`` (a built ``defenses`` object) to ``model`` on the whole forget split,
    with the retain split for its retain term; returns the training history."""
    from benchmarks.core.training import TrainConfig, train as run_train

    loader, reference = defense_loader(tokenizer, data.forget.items, data["retain"].items, prompt,
                                       int(train["batch_size"]), seed, defense.uses_retain)
    defense.setup(model, reference_batches=reference, num_forget_examples=len(data.forget))
    config = TrainConfig(lr=float(train["lr"]), epochs=int(train["epochs"]), seed=seed, progress=False)
    model.train()
    result = run_train(model, loader, defense.step_fn(), config)
    model.eval()
    return result.history


CURVE_METRICS = ("prob", "rouge", "truth_ratio")


def _ratios(mapping: Mapping[Any, float] | None) -> dict[int, float] | None:
    """Per-item truth ratios keyed by item index again after a trip through JSON (string keys)."""
    return None if mapping is None else {int(k): float(v) for k, v in mapping.items()}


def execute_tofu(plan: TofuPlan, data: TofuData, world, make_attack: Callable[[Any], Any],
                 make_defense: Callable[[str], Any]) -> dict[str, Any]:
    """Run every role under the attack for every seed; return the result document's parts.

    Each finished trajectory (one model, one seed) is recorded in the run's state directory
    (:class:`benchmarks.core.run_state.RunState`), and the trajectory in progress keeps its
    latest milestone checkpoint there: with ``plan.resume`` an interrupted run of the same plan
    skips the finished trajectories and continues the interrupted one from its last milestone
    (its defense and step-0 TOFU table, deterministic, are recomputed) with the same numbers."""
    from benchmarks.core.results import new_run_id, utc_now
    from benchmarks.core.run_state import RunState

    resolve_splits(plan, data.forget_authors())
    state = RunState(plan.state_dir, plan.checkpoints, plan.checkpoint_every)
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
    curves: dict[str, dict[str, dict[str, list]]] = {}
    utility: dict[str, dict[str, Any]] = {}
    # The retrain model's un-attacked per-item truth ratios, per seed: on the whole forget split
    # (from its TOFU table) and on V (from its step-0 curve point, scored exactly as later points).
    retrain_ratios: dict[int, dict[int, float]] = {}
    retrain_v: dict[int, dict[int, float]] = {}
    status = "complete"
    timings: dict[str, float] = {}
    prompt_record: dict | None = None
    for role in plan.roles:
        for seed in plan.seeds:
            record = state.finished(seed, role.label)
            if record is None:
                record = _run_trajectory(plan, role, seed, data, world, state, make_attack, make_defense,
                                         retrain_ratios.get(seed), retrain_v.get(seed))
                state.finish(seed, role.label, record)
            else:
                logger.info("%s, seed %d: finished before the interruption", role.label, seed)
            if role.kind == "retrain":
                retrain_ratios[seed], retrain_v[seed] = _ratios(record["retrain_forget"]), _ratios(record["retrain_v"])
            status = "diverged" if record["status"] == "diverged" else status
            prompt_record = prompt_record or record["prompt"]
            curves.setdefault(role.label, {})[str(seed)] = record["curve"]
            utility.setdefault(role.label, {})[str(seed)] = record["utility"]
            timings[f"{role.label}/seed{seed}"] = record["seconds"]
    return {
        "run_id": meta["run_id"], "created": meta["created"],
        "curves": curves, "utility": utility, "status": status, "timings": timings, "prompt": prompt_record,
        "summary": summarize(plan, curves, utility), "bands": curve_bands(plan, curves),
    }


def _run_trajectory(plan: TofuPlan, role: TofuRole, seed: int, data: TofuData, world, state,
                    make_attack: Callable[[Any], Any], make_defense: Callable[[str], Any],
                    retrain_ratios: dict[int, float] | None, retrain_v: dict[int, float] | None) -> dict[str, Any]:
    """One model under the attack of one seed: defend (if a defense), its TOFU table, the attack
    with the curve at every milestone (a checkpoint after each), its TOFU table again. Returns
    the JSON-able record the run state keeps; the retrain model's also carries its truth ratios,
    the reference of every later model's forget quality."""
    from benchmarks.core.models import load_model
    from benchmarks.core.tofu_eval import TofuEvalSettings, evaluate_tofu, forget_quality_on, score_items
    from benchmarks.core.tofu_metrics import truth_ratio_closer_to_1
    from benchmarks.core.tofu_world import answer_loss, pair_loader
    from benchmarks.core.training import plain_step, train

    settings = TofuEvalSettings(prompt=plan.prompt, batch_size=plan.eval_batch_size,
                                max_new_tokens=plan.max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    forget_items = data["forget_perturbed"].items
    ref = role.ref
    if ref is None:
        ref = str(world.retrain_dir if role.kind == "retrain" else world.target_dir)
    t_authors, v_authors = plan.splits[seed]
    t_items = [i for i in forget_items if i.author in set(t_authors)]
    v_items = [i for i in forget_items if i.author in set(v_authors)]
    started = time.perf_counter()
    model, tokenizer = load_model(ref, dtype=plan.dtype, device=device)
    if role.defense is not None:
        unlearn_on_tofu(model, tokenizer, make_defense(role.defense), data, plan.prompt, plan.defense_train, seed)
    # The TOFU table on the whole forget split (T and V), as a user would report the model.
    before = evaluate_tofu(model, tokenizer, data, settings,
                           retrain_truth_ratios=None if role.kind == "retrain" else retrain_ratios,
                           forget_items=forget_items)
    if role.kind == "retrain":
        retrain_ratios = before.forget_truth_ratios  # every forget item: V's are among them
        before.scores["forget_quality"] = 1.0  # KS test of a sample against itself
    attack = make_attack(plan.attack_config)
    model = attack.prepare(model)
    per_metric: dict[str, list] = {}
    reference_v = {"ratios": retrain_v}
    resume_state = None
    saved = state.checkpoint(seed, role.label)
    if saved is not None:
        attack.load_trainable_state(model, saved["trainable_state"])
        resume_state = saved["loop_state"]
        per_metric = saved["curve"]["per_metric"]
        reference_v["ratios"] = _ratios(saved["curve"]["retrain_v"])
        logger.info("%s, seed %d: resuming at step %d", role.label, seed, resume_state["step"])

    def hook(step: int, current) -> None:
        for name, items in (("V", v_items), ("T", t_items)):
            scores = score_items(current, tokenizer, "forget_perturbed", items, settings)
            for metric, value in (("prob", scores.prob), ("rouge", scores.rouge),
                                  ("truth_ratio", truth_ratio_closer_to_1(list(scores.truth_ratios.values())))):
                per_metric.setdefault(f"{metric}_{name}", []).append([step, value])
            if name == "V" and role.kind == "retrain" and step == 0:
                reference_v["ratios"] = dict(scores.truth_ratios)
            if name == "V" and reference_v["ratios"] is not None:
                per_metric.setdefault("forget_quality_V", []).append(
                    [step, forget_quality_on(scores.truth_ratios, reference_v["ratios"])])

    def state_hook(step: int, loop_state: dict) -> None:
        state.save_checkpoint(seed, role.label, {
            "trainable_state": attack.trainable_state(model), "loop_state": loop_state,
            "curve": {"per_metric": per_metric, "retrain_v": reference_v["ratios"]}})

    t_pairs = attack_pairs(data.forget.items, t_authors)
    loader = pair_loader(tokenizer, t_pairs, PromptSettings(system_prompt=plan.prompt.system_prompt,
                                                            date_string=plan.prompt.date_string,
                                                            max_length=plan.attack_config.max_length),
                         plan.attack_config.micro_batch_size, seed)
    status = "complete"
    try:
        train(model, loader, plain_step(answer_loss), plan.attack_config.train_config(seed, progress=False),
              hook=hook, hook_steps=plan.milestones, params=[p for p in model.parameters() if p.requires_grad],
              state_hook=state_hook, resume_state=resume_state)
    except TrainingDiverged as err:
        logger.error("%s seed %d: %s", role.label, seed, err)
        status = "diverged"
    after = evaluate_tofu(model, tokenizer, data, settings, retrain_truth_ratios=retrain_ratios,
                          forget_items=forget_items)
    record = {
        "status": status,
        "prompt": describe_prompt(tokenizer, plan.prompt),
        "curve": per_metric,
        "utility": {"before": {k: before.scores[k] for k in TABLE_FIELDS},
                    "after": {k: after.scores[k] for k in TABLE_FIELDS}},
        "seconds": time.perf_counter() - started,
    }
    if role.kind == "retrain":
        record.update(retrain_forget=retrain_ratios, retrain_v=reference_v["ratios"])
    del model
    return record


#: Curve metrics summarised per model: Prob, ROUGE and truth ratio on V and on T, forget quality on V.
SUMMARY_METRICS = tuple(f"{m}_{group}" for group in ("V", "T") for m in CURVE_METRICS) + ("forget_quality_V",)
#: The TOFU table's fields kept for each model before and after the attack (whole forget split).
TABLE_FIELDS = ("model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality")

#: What the summary's statistics mean; written into every TOFU relearning result file.
TOFU_DEFINITIONS = {
    "before/after": "the curve's value at step 0 and at the last milestone",
    "recovery_ratio": "(M(S) - M(0)) / (M_target(0) - M(0)) with the same seed's target: the share of the gap "
    "to the un-attacked target that the attack closed (either sign of gap; null for the target itself)",
    "excess_over_retrain": "(M(S) - M(0)) - (M_retrain(S) - M_retrain(0)), same seed: the attack's gain beyond "
    "what it gives the retrain model, which never saw the forget authors",
    "utility": "the TOFU table of each model on the whole forget split, before and after the attack; forget "
    "quality against the retrain model's un-attacked truth ratios",
}


def _seed_values(series: Sequence[Sequence[Any]] | None) -> list[float | None]:
    return [point[1] for point in series] if series else []


def _seed_summary(values: Sequence[float | None], target: Sequence[float | None] | None,
                  retrain: Sequence[float | None] | None) -> dict[str, float | None]:
    """Before/after, recovery ratio and excess over retrain of one curve (one model, one seed)."""
    before = values[0] if values else None
    after = values[-1] if values else None
    ratio = excess = None
    target0 = target[0] if target else None
    if None not in (before, after, target0) and abs(target0 - before) > 1e-12:
        ratio = (after - before) / (target0 - before)
    if retrain and None not in (before, after, retrain[0], retrain[-1]):
        excess = (after - before) - (retrain[-1] - retrain[0])
    return {"before": before, "after": after, "recovery_ratio": ratio, "excess_over_retrain": excess}


def summarize(plan: TofuPlan, curves: Mapping[str, Mapping[str, Mapping[str, list]]],
              utility: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float | None]]]] | None = None,
              ) -> dict[str, Any]:
    """Per model: for each of :data:`SUMMARY_METRICS` the statistics of :data:`TOFU_DEFINITIONS`,
    and for each of :data:`TABLE_FIELDS` the value before and after the attack. Each is
    computed per seed against the same seed's baselines, then given as mean and Student-t 95 %
    interval over the attack seeds (:func:`benchmarks.core.recovery.combine_seeds`)."""
    from benchmarks.core.recovery import combine_seeds

    target = next((r.label for r in plan.roles if r.kind == "target"), None)
    retrain = next((r.label for r in plan.roles if r.kind == "retrain"), None)

    def series(label: str | None, seed: str, metric: str) -> list[float | None] | None:
        if label is None or label not in curves or seed not in curves[label]:
            return None
        return _seed_values(curves[label][seed].get(metric))

    summary: dict[str, Any] = {}
    for label, per_seed in curves.items():
        summary[label] = {}
        for metric in SUMMARY_METRICS:
            if not any(metric in points for points in per_seed.values()):
                continue
            summary[label][metric] = combine_seeds({
                seed: _seed_summary(_seed_values(points.get(metric)), series(target, seed, metric),
                                    series(retrain, seed, metric))
                for seed, points in per_seed.items()})
        for name in TABLE_FIELDS:
            rows = (utility or {}).get(label, {})
            if rows:
                summary[label][name] = combine_seeds({
                    seed: {"before": row["before"].get(name), "after": row["after"].get(name)}
                    for seed, row in rows.items()})
    return summary


def curve_bands(plan: TofuPlan, curves: Mapping[str, Mapping[str, Mapping[str, list]]]) -> dict[str, Any]:
    """Per model and curve metric, the mean and 95 % t-interval over seeds at every milestone, in
    the ``{label: {"steps", "metrics": {metric: {"mean", "ci95_low", "ci95_high"}}}}`` layout
    the recovery plots draw (:func:`benchmarks.core.recovery.curve_band`)."""
    from benchmarks.core.recovery import curve_band

    bands: dict[str, Any] = {}
    for label, per_seed in curves.items():
        metrics = {}
        for metric in SUMMARY_METRICS:
            values = {}
            for seed, points in per_seed.items():
                by_step = {int(step): value for step, value in points.get(metric) or []}
                values[seed] = [by_step.get(step) for step in plan.milestones]
            if any(v is not None for curve in values.values() for v in curve):
                metrics[metric] = curve_band(values)
        bands[label] = {"steps": list(plan.milestones), "metrics": metrics}
    return bands


#: Row names of the printed summary.
SUMMARY_LABELS = {
    "prob_V": "V Prob", "rouge_V": "V ROUGE", "truth_ratio_V": "V truth ratio", "forget_quality_V": "V forget quality",
    "prob_T": "T Prob", "rouge_T": "T ROUGE", "truth_ratio_T": "T truth ratio",
    "model_utility": "model utility", "forget_prob": "forget Prob", "forget_rouge": "forget ROUGE",
    "forget_truth_ratio": "forget truth ratio", "forget_quality": "forget quality",
}


def _cell(stats: Mapping[str, Any] | None) -> str:
    """``mean ±half-width`` of a :func:`benchmarks.core.recovery.interval` (mean alone for one seed)."""
    if not stats or stats.get("mean") is None:
        return "n/a"
    mean = stats["mean"]
    tiny = mean != 0 and abs(mean) < 1e-3  # forget quality can be 1e-20: significant digits, not places
    text = f"{mean:.3g}" if tiny else f"{mean:.3f}"
    if stats.get("ci95_high") is not None:
        half = stats["ci95_high"] - mean
        text += f" ±{half:.2g}" if tiny else f" ±{half:.3f}"
    return text


#: The panels of a TOFU relearning plot: V's curves, T's, then forget quality on V.
PLOT_METRICS = ("prob_V", "rouge_V", "truth_ratio_V", "prob_T", "rouge_T", "truth_ratio_T", "forget_quality_V")


def plot_tofu_relearn(document: Mapping[str, Any], png_path: Path, overwrite: bool = False) -> Path:
    """The recovery plot of a TOFU relearning result (:func:`benchmarks.core.plots.plot_recovery`):
    one panel per curve metric on a 0–1 scale, each model's mean over seeds with its 95 % band,
    the target and retrain baselines dashed."""
    from benchmarks.core.plots import plot_recovery

    models = document.get("models") or {}
    view = {"curves": document.get("bands") or {},
            "references": {kind: next((label for label, m in models.items() if m.get("kind") == kind), None)
                           for kind in ("target", "retrain")}}
    attack = document.get("attack") or {}
    split = next(iter((attack.get("authors") or {}).values()), {})
    seeds = len(attack.get("seeds") or [])
    data = document.get("data") or {}
    title = (f"TOFU {data.get('source', '?')} {data.get('forget_split', '')}\nattack {attack.get('name', '?')} on "
             f"{len(split.get('T', []))} authors (T), {len(split.get('V', []))} held out (V), "
             f"{seeds} seed{'s' if seeds != 1 else ''}")
    if document.get("status") not in (None, "complete"):
        title += f"  [{document['status']}]"
    return plot_recovery(view, png_path, overwrite=overwrite, metrics=PLOT_METRICS, labels=SUMMARY_LABELS,
                         y_limits={m: (0.0, 1.0) for m in PLOT_METRICS}, title=title)


def format_tofu_summary(result: Mapping[str, Any]) -> str:
    """Two tables: the curves on V and T (before, after, recovery, excess over retrain) and the
    whole forget split's TOFU table before and after the attack, each cell mean ± 95 % t-interval
    half-width over the attack seeds."""
    from tabulate import tabulate

    curve_rows, table_rows = [], []
    for label, metrics in result["summary"].items():
        for metric in SUMMARY_METRICS:
            if metric in metrics:
                stats = metrics[metric]
                curve_rows.append([label, SUMMARY_LABELS[metric], _cell(stats["before"]), _cell(stats["after"]),
                                   _cell(stats["recovery_ratio"]), _cell(stats["excess_over_retrain"])])
        row = [label]
        for name in ("forget_prob", "forget_truth_ratio", "forget_quality", "model_utility"):
            stats = metrics.get(name) or {}
            row += [_cell(stats.get("before")), _cell(stats.get("after"))]
        table_rows.append(row)
    seeds = len(result["attack"]["seeds"])
    caption = (f"{result['attack']['name']} attack, {result['milestones'][-1]} steps, {seeds} seed(s); "
               "mean ± 95% t-interval half-width over the seeds (mean alone with one seed)")
    curves = tabulate(curve_rows, headers=["model", "metric", "before", "after", "recovery", "excess over retrain"],
                      tablefmt="github", disable_numparse=True)
    table = tabulate(table_rows, headers=["model", "forget Prob before", "after", "forget TR before", "after",
                                          "forget quality before", "after", "MU before", "MU after"],
                     tablefmt="github", disable_numparse=True)
    return f"{curves}\n\nwhole forget split:\n{table}\n{caption}"


def run_tofu_relearn(args: argparse.Namespace, argv, attacks, build_defense: Callable[..., Any]) -> int:
    """The whole TOFU relearning run for ``benchmarks.relearn`` (which passes its registries)."""
    from benchmarks.core.recovery import INTERVAL_METHOD
    from benchmarks.core.results import command_line, environment_info, write_yaml_atomic
    from benchmarks.core.tofu_cli import load_tofu_source

    attack_cls = attacks.get(args.attack)
    plan = make_tofu_plan(args, argv, attack_cls, lambda name: build_defense(name))
    if args.dry_run:
        authors = None
        if args.data == TOFU_WORLD or Path(args.data).expanduser().is_dir():
            try:
                data, _ = load_tofu_source(args.data, plan.forget_split) if args.data != TOFU_WORLD else (None, None)
            except UsageError:
                data = None
            if data is not None:
                authors = data.forget_authors()
        if authors is None and args.data != TOFU_WORLD:
            from benchmarks.core.tofu_data import FORGET_SPLITS, NUM_AUTHORS

            # TOFU's forget authors are the dataset's last ones: known without downloading anything.
            authors = list(range(NUM_AUTHORS - FORGET_SPLITS[plan.forget_split][1], NUM_AUTHORS))
        if authors is None:
            from benchmarks.core.tofu_world import TofuWorldConfig

            config = TofuWorldConfig()
            count = dict(config.forget_authors)[plan.forget_split]
            authors = list(range(config.num_authors - count, config.num_authors))
        print(format_tofu_plan(plan, authors))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data, world = load_tofu_source(args.data, plan.forget_split)
    data_seconds = time.perf_counter() - started
    try:
        result = execute_tofu(plan, data, world, lambda config: attack_cls(config),
                              lambda name: build_defense(name))
    except KeyboardInterrupt:
        print(f"interrupted: run the same command with --resume to continue from the last milestone "
              f"(state kept in {plan.state_dir})", file=sys.stderr)
        raise
    document = {
        "schema_version": 1,
        # Its own kind: the curves are per author split and TOFU metric, not the MUSE schema
        # the leaderboard ranks.
        "kind": "tofu_relearn",
        "benchmark": "tofu",
        "run_id": result["run_id"],  # a resumed run keeps the id and start time of the one it continues
        "command": command_line("benchmarks.relearn", argv),
        "created": result["created"],
        "status": result["status"],
        "data": data.describe(),
        "prompt": result["prompt"] or plan.prompt.to_dict(),
        "models": {r.label: {"kind": r.kind, "checkpoint": r.ref or "(author world)", "defense": r.defense,
                             "defense_training": r.defense_config} for r in plan.roles},
        "attack": {"name": plan.attack, **plan.attack_config.to_dict(), "seeds": plan.seeds,
                   "split_rule": "by author", "authors": {str(s): {"T": t, "V": v} for s, (t, v) in plan.splits.items()}},
        "milestones": plan.milestones,
        "curves": result["curves"],
        "bands": result["bands"],
        "utility": result["utility"],
        "summary": result["summary"],
        "definitions": {**TOFU_DEFINITIONS, "interval": INTERVAL_METHOD},
        "environment": environment_info("cuda" if torch.cuda.is_available() else "cpu"),
        # Counted from the trajectories' records, so a resumed run reports the time of the whole run.
        "timings": {"data": data_seconds, **result["timings"],
                    "total": data_seconds + sum(result["timings"].values())},
    }
    output = Path(str(plan.output).replace("{run_id}", document["run_id"]))
    write_yaml_atomic(output, document, overwrite=plan.overwrite)
    png = plot_tofu_relearn(document, output.with_suffix(".png"), overwrite=plan.overwrite)
    print(format_tofu_summary(document))
    from benchmarks.core.run_state import RunState

    RunState(plan.state_dir, plan.checkpoints).remove()  # complete: nothing left to resume
    print(f"wrote {output}\nwrote {png}")
    return 0 if result["status"] == "complete" else 3
