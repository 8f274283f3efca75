"""Apply one defense to a model and write the unlearned checkpoint: ``python -m benchmarks.unlearn``.

Examples::

    # the embedded world: unlearn its target with NPO+SAM, offline, on a laptop CPU
    python -m benchmarks.unlearn --defense npo_sam --out ckpt/world-npo-sam

    # a MUSE-News target on a local copy, the NPO+SAM paper's settings (the default preset)
    python -m benchmarks.unlearn --model muse-bench/MUSE-news_target --data ../muse-news \\
        --defense npo_sam --mixed-precision bf16 --out ckpt/news-npo-sam

    # several GPUs: the same command under accelerate (on CPUs, ACCELERATE_USE_CPU=1 accelerate
    # launch --multi_gpu --num_processes 2 ...: accelerate's --cpu launcher starts one process)
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
``--grad-accum`` the number of such micro-batches per optimizer step. Under ``accelerate
launch`` every process trains and the main process alone evaluates and writes
(:mod:`benchmarks.core.processes`); ``unlearn.yaml`` records the processes and the examples
per optimizer step over all of them.

**Utility-constrained epoch selection**, as MUSE papers do by hand: the model is evaluated
before unlearning and after every epoch (KnowMem-retain, and KnowMem-forget / VerbMem-forget
for the record). The checkpoint kept is the last epoch that meets the utility bar
(KnowMem-retain >= ``--utility-threshold``, default 0.9, times the target's) together with the
epoch before it; without such a plateau, the last epoch that meets the bar alone; if none
does, the epoch with the highest KnowMem-retain, and the file says so
(:data:`benchmarks.core.unlearning.SELECTION_RULE`). ``--no-eval`` skips the evaluation and
keeps the last epoch.

``--dry-run`` prints the settled settings and the estimated peak memory per device (see
:mod:`benchmarks.core.footprint`) and loads nothing. ``--max-steps`` stops the training early,
for smoke tests and memory rehearsals of large models; ``unlearn.yaml`` records it.

Every argument is checked before any model is loaded. A NaN or infinite loss stops the run
(exit 3) and leaves ``unlearn.yaml`` with ``status: diverged`` and what was measured, but no
weights.
"""

from __future__ import annotations

import argparse
import logging
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.core.errors import TrainingDiverged, UsageError, run_cli, setup_logging
from benchmarks.core.unlearning import (
    EVAL_METRICS,
    PAPER_PRESET,
    RESULT_NAME,
    TRAINING_KEYS,
    WORLD,
    WORLD_PRESET,
    EvalPlan,
    UnlearnConfig,
    UnlearnOutcome,
    build_document,
    preset_settings,
    save_checkpoint,
    unlearn,
)

logger = logging.getLogger("benchmarks.unlearn")

PROG = "python -m benchmarks.unlearn"


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
    clash = set(flags) & (set(TRAINING_KEYS) | {"model", "data", "defense", "out"})
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
        extra = {"mixed_precision": {"choices": ["no", "bf16"]}, "schedule": {"choices": ["constant", "linear", "cosine"]}}.get(f.name, {})
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
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute activations in the backward pass (less memory, same numbers)")
    run.add_argument("--max-steps", type=int, default=None,
                     help="stop after this many optimizer steps, mid-epoch if need be (a smoke test or memory "
                          "rehearsal of a large model; recorded in unlearn.yaml)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the settled settings and the estimated peak memory per device, load nothing")
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
    from benchmarks.core.data import resolve_source, world_root_models
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_output_target, check_yaml_target
    from defenses import DEFENSES

    registry = registry if registry is not None else DEFENSES
    cls = registry.get(args.defense)
    world = world_root_models(args.data) if args.data is not None else None  # a built world's root
    if args.model is None and world is not None:
        model_ref, data, preset = check_model_ref(str(world.target)), args.data, "world"
    elif args.model is None:
        if args.data not in (None, WORLD):
            raise UsageError(f"--data {args.data} needs --model (only a world brings its own target)")
        model_ref, data, preset = None, WORLD, "world"
    else:
        if args.data is None:
            raise UsageError("--data is required with --model: 'world', a hub id or a MUSE-News directory")
        model_ref, data = check_model_ref(args.model), args.data
        own_target = world is not None and Path(model_ref).resolve() == world.target
        preset = "world" if own_target or _is_world_target(model_ref) else "paper"
    resolve_source(data)

    defense_keys = {f.name for f in fields(cls.config_class)}
    given = {name for name in defense_flags(registry) if getattr(args, name, None) is not None}
    foreign = sorted(given - defense_keys)
    if foreign:
        users = {n: ", ".join(defense_flags(registry)[n]["defenses"]) for n in foreign}
        raise UsageError("; ".join(f"{_flag(n)} does not apply to defense {args.defense!r} (it is a setting of: "
                                   f"{users[n]})" for n in foreign))
    settings = preset_settings(args.defense, preset, registry)
    for name in list(TRAINING_KEYS) + sorted(defense_keys):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    config = UnlearnConfig(**{k: settings[k] for k in TRAINING_KEYS})
    defense = cls(cls.config_class(**{k: settings[k] for k in defense_keys}))

    from benchmarks.core.precision import check_training_dtype

    check_training_dtype(args.dtype, True, f"defense {args.defense}")
    if args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UsageError(f"--out {out} exists and is not an empty directory; pass --overwrite or choose another")
    check_output_target(out)
    report = None
    if args.report is not None:
        report = check_yaml_target(args.report, "--report", overwrite=args.overwrite)
    retrain_ref = check_model_ref(args.retrain) if args.retrain is not None else None
    if retrain_ref is None and world is not None and not args.no_eval:
        retrain_ref = check_model_ref(str(world.retrain))  # the world's own reference row
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
    from benchmarks.core.world_build import WorldBuildConfig, default_world_dir

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


def _print_plan(request: Request, args: argparse.Namespace) -> None:
    import yaml

    from benchmarks.core.unlearning import unlearn_plan

    plan = unlearn_plan(model_ref=request.model_ref, data=request.data, preset=request.preset,
                        defense=request.defense, config=request.config, dtype=args.dtype,
                        gradient_checkpointing=args.gradient_checkpointing, evaluation=request.evaluation,
                        out=request.out, max_steps=args.max_steps)
    print("dry run: nothing was loaded.")
    print(yaml.safe_dump(plan, sort_keys=False, width=110, allow_unicode=True), end="")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    request = plan_request(args)
    if args.dry_run:
        _print_plan(request, args)
        return 0
    from benchmarks.core.results import command_line

    command = command_line("benchmarks.unlearn", argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from benchmarks.core.data import load_data
    from benchmarks.core.metrics import evaluate
    from benchmarks.core.models import load_model
    from benchmarks.core.processes import from_main, main_first, quiet_other_processes
    from benchmarks.core.training import make_accelerator

    accelerator = make_accelerator(request.config.train_config())
    quiet_other_processes()  # one process reports
    timings: dict[str, float] = {}
    model_ref, retrain_ref = request.model_ref, request.retrain_ref
    world_reference = request.evaluation is not None and retrain_ref is None and request.data == WORLD
    if model_ref is None or world_reference:
        from benchmarks.core.world_build import ensure_world

        started = time.perf_counter()
        paths = main_first(ensure_world)  # one process installs the world, the others wait
        timings["world"] = time.perf_counter() - started
        model_ref = model_ref or str(paths.target_dir)
        if world_reference:
            retrain_ref = str(paths.retrain_dir)
    data = main_first(lambda: load_data(request.data, subsets=("raw", "knowmem", "verbmem")))  # hub downloads once
    check_data(data, request.defense, request.evaluation)

    references: dict[str, dict[str, float]] = {}
    if retrain_ref is not None and request.evaluation is not None:
        started = time.perf_counter()

        def retrain_scores() -> dict[str, float]:  # measured on the main process only
            retrain, retrain_tokenizer = load_model(retrain_ref, args.dtype, accelerator.device)
            return evaluate(retrain, retrain_tokenizer, data, metrics=list(EVAL_METRICS),
                            batch_size=request.evaluation.batch_size).scores

        references["retrain"] = from_main(retrain_scores)
        timings["retrain_evaluation"] = time.perf_counter() - started

    started = time.perf_counter()
    model, tokenizer = load_model(model_ref, args.dtype, accelerator.device)
    timings["load"] = time.perf_counter() - started
    outcome = unlearn(model, tokenizer, data, request.defense, request.config,
                      evaluation=request.evaluation, accelerator=accelerator, progress=args.progress,
                      gradient_checkpointing=args.gradient_checkpointing, max_steps=args.max_steps)
    document = build_document(
        command=command, model_ref=model_ref, dtype=args.dtype, preset=request.preset, defense=request.defense,
        config=request.config, data=data, outcome=outcome, references=references,
        device=str(accelerator.device), timings=timings,
    )

    def write() -> None:  # the main process's model holds the selected epoch's weights
        from benchmarks.core.results import write_yaml_atomic

        complete = outcome.status == "complete"
        save_checkpoint(model if complete else None, tokenizer, document, request.out, args.overwrite)
        if request.report is not None:
            write_yaml_atomic(request.report, document, overwrite=args.overwrite)
        if complete:
            _print_table(outcome, references)
            print(f"checkpoint: {request.out} (epoch {outcome.selection.get('selected_epoch')} kept)")

    from_main(write)  # an error writing reaches every process
    if outcome.status != "complete":
        raise TrainingDiverged(f"{outcome.message}; what was measured is in {request.out / RESULT_NAME}")
    return 0


if __name__ == "__main__":
    run_cli(main)
