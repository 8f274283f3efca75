"""MUSE metrics for one checkpoint (and its retrain reference): ``python -m benchmarks.evaluate``.

Examples::

    # the embedded world: its target and retrain models, offline, on a laptop CPU
    python -m benchmarks.evaluate

    # an unlearned checkpoint on a local MUSE-News copy, with the MUSE-News retrain model
    python -m benchmarks.evaluate --model ckpt/npo --data ../muse-news \\
        --retrain-model muse-bench/MUSE-news_retrain --output npo.yaml --log-samples

Prints the MUSE table (VerbMem-forget, KnowMem-forget, KnowMem-retain, PrivLeak) and, with
``--output``, writes a YAML file with the scores, PrivLeak's AUCs, the data digests, the
environment and (with ``--log-samples``) every prompt, generation, reference and score.

PrivLeak needs the retrain model's AUC: from ``--retrain-model`` when given, from the world's
retrain model for ``--data world`` or a built world's directory (``python -m benchmarks.world
--out DIR``), else the published MUSE-News value 0.4772.
Every argument is checked before a model is loaded.

Under ``accelerate launch --num_processes N`` (on CPUs ``ACCELERATE_USE_CPU=1 accelerate launch
--multi_gpu --num_processes N``) every process checks the arguments, the main process alone
evaluates, prints and writes the one result file (which records the world size), and the others
wait for it and exit with its status: evaluating one model is not split across processes
(:mod:`benchmarks.core.processes`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from benchmarks.core.errors import UsageError, run_cli, setup_logging

logger = logging.getLogger("benchmarks.evaluate")

WORLD = "world"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``) like every other usage error."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see python -m benchmarks.evaluate --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m benchmarks.evaluate",
        description="MUSE metrics (VerbMem, KnowMem, PrivLeak) for a checkpoint.",
    )
    parser.add_argument(
        "--model", default=None,
        help="checkpoint directory or hub id; default with --data world: the world's target and retrain models",
    )
    parser.add_argument(
        "--data", default=WORLD,
        help="'world' (default), a hub id such as muse-bench/MUSE-News, or a directory in hub or MUSE layout",
    )
    parser.add_argument(
        "--metrics", default=None,
        help="comma-separated metric names (default: verbmem_forget,knowmem_forget,knowmem_retain,privleak)",
    )
    parser.add_argument("--output", default=None, help="write the results to this YAML file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--log-samples", action="store_true", help="include every item in the YAML file")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts/texts per forward batch (default 16)")
    parser.add_argument(
        "--retrain-model", default=None,
        help="retrain checkpoint (never saw the forget set): evaluated too, and its AUC is PrivLeak's reference",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    from benchmarks.core.tofu_cli import add_tofu_arguments

    add_tofu_arguments(parser)  # --data tofu / tofu-world / a TOFU directory: the TOFU table
    return parser


@dataclass(frozen=True)
class ModelToRun:
    role: str  # "target", "retrain" or "model"
    ref: str | None  # checkpoint path or hub id; None: the world's, known once it is built
    label: str  # how the table names it


def plan_models(args) -> list[ModelToRun]:
    """Which models to evaluate, retrain reference first (its AUC feeds the others' PrivLeak)."""
    from benchmarks.core.data import world_root_models
    from benchmarks.core.models import check_model_ref

    # A built world's root (python -m benchmarks.world --out DIR) brings its target and retrain.
    world = world_root_models(args.data)
    if args.model is None and args.data != WORLD and world is None:
        raise UsageError("--model is required unless --data is 'world' or a built world's directory "
                         "(which bring their own target model)")
    plan = []
    if args.retrain_model is not None:
        plan.append(ModelToRun("retrain", check_model_ref(args.retrain_model), args.retrain_model))
    elif args.data == WORLD:
        plan.append(ModelToRun("retrain", None, "world/retrain"))
    elif world is not None:  # PrivLeak's reference is the world's retrain, never MUSE-News' 0.4772
        plan.append(ModelToRun("retrain", check_model_ref(str(world.retrain)), f"{world.root.name}/retrain"))
    if args.model is None and world is not None:
        plan.append(ModelToRun("target", check_model_ref(str(world.target)), f"{world.root.name}/target"))
    elif args.model is None:
        plan.append(ModelToRun("target", None, "world/target"))
    else:
        plan.append(ModelToRun("model", check_model_ref(args.model), args.model))
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from benchmarks.core.processes import from_main, quiet_other_processes
    from benchmarks.core.tofu_data import is_tofu_source

    quiet_other_processes()
    if is_tofu_source(args.data):
        from benchmarks.core.tofu_cli import run_evaluate

        return from_main(lambda: run_evaluate(args, argv))  # the main process evaluates

    # ---- validate everything before a model is loaded
    from benchmarks.core.data import resolve_source
    from benchmarks.core.metrics import DEFAULT_METRICS, parse_metric_names
    from benchmarks.core.results import check_yaml_target

    metric_names = parse_metric_names(args.metrics if args.metrics is not None else DEFAULT_METRICS)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    resolve_source(args.data)
    plan = plan_models(args)
    if args.output is not None:
        check_yaml_target(args.output, "--output", overwrite=args.overwrite)
    if args.log_samples and args.output is None:
        raise UsageError("--log-samples needs --output (the items go into the YAML file)")
    return from_main(lambda: _evaluate(args, argv, metric_names, plan))  # the main process evaluates


def _evaluate(args, argv, metric_names: list[str], plan: list[ModelToRun]) -> int:
    """Load the data (and the world's models), evaluate ``plan`` retrain first, print the table
    and write ``--output``."""
    from benchmarks.core.data import load_data
    from benchmarks.core.metrics import required_splits

    timings: dict[str, float] = {}
    started = time.perf_counter()
    splits = required_splits(metric_names)
    data = load_data(args.data, subsets=sorted({subset for subset, _ in splits}))
    for subset, split in splits:
        data.split(subset, split)  # a missing split fails here, with its name, before any model loads
    timings["data"] = time.perf_counter() - started

    if any(entry.ref is None for entry in plan):
        from benchmarks.core.world_build import ensure_world  # builds (or finds cached) world models

        started = time.perf_counter()
        world = ensure_world()
        timings["world"] = time.perf_counter() - started
        paths = {"target": str(world.target_dir), "retrain": str(world.retrain_dir)}
        plan = [
            ModelToRun(entry.role, paths[entry.role], entry.label) if entry.ref is None else entry
            for entry in plan
        ]

    # ---- evaluate, retrain first
    from benchmarks.core.metrics import evaluate
    from benchmarks.core.models import load_model
    from benchmarks.core.precision import process_accelerator

    device = process_accelerator().device
    outcomes = {}
    retrain_auc = None
    for entry in plan:
        started = time.perf_counter()
        model, tokenizer = load_model(entry.ref, dtype=args.dtype, device=device)
        result = evaluate(
            model, tokenizer, data, metric_names,
            batch_size=args.batch_size,
            retrain_auc=retrain_auc,
            as_retrain=entry.role == "retrain",
            progress=args.progress,
        )
        if entry.role == "retrain" and "privleak" in result.results:
            retrain_auc = result.results["privleak"].details["auc"]
        outcomes[entry.role] = (entry, result)
        del model
        timings[f"evaluate_{entry.role}"] = time.perf_counter() - started

    print(format_table(outcomes, metric_names))
    if args.output is not None:
        document = build_document(args, argv, data, metric_names, outcomes, device, timings)
        from benchmarks.core.results import write_yaml_atomic

        write_yaml_atomic(args.output, document, overwrite=args.overwrite)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def format_table(outcomes, metric_names: Sequence[str]) -> str:
    """The MUSE table: one row per model, one column per metric (0–100 scale)."""
    from tabulate import tabulate

    from benchmarks.core.metrics import METRICS

    arrows = {"lower": "↓", "higher": "↑", "closer to 0": "→0"}
    headers = ["role", "model"] + [
        f"{METRICS.get(n).label} {arrows[METRICS.get(n).goal]}" for n in metric_names
    ]
    # As in MUSE's tables: the evaluated model first, the retrain reference below it.
    ordered = sorted(outcomes.values(), key=lambda outcome: outcome[0].role == "retrain")
    rows = [
        [entry.role, entry.label] + [result.scores[n] for n in metric_names]
        for entry, result in ordered
    ]
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=".2f")


def build_document(args, argv, data, metric_names, outcomes, device, timings) -> dict:
    from benchmarks.core.metrics import (
        KNOWMEM_MAX_NEW_TOKENS,
        METRICS,
        MIN_K_FRACTION,
        VERBMEM_MAX_NEW_TOKENS,
    )
    from benchmarks.core.processes import world_size
    from benchmarks.core.results import command_line, environment_info, new_run_id, utc_now

    goal_to_bool = {"lower": False, "higher": True, "closer to 0": None}
    return {
        "schema_version": 1,
        "kind": "evaluation",
        "run_id": new_run_id(),
        "command": command_line("benchmarks.evaluate", argv),
        "created": utc_now(),
        "data": data.describe(),
        "settings": {
            "metrics": list(metric_names),
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "knowmem_max_new_tokens": KNOWMEM_MAX_NEW_TOKENS,
            "verbmem_max_new_tokens": VERBMEM_MAX_NEW_TOKENS,
            "min_k_fraction": MIN_K_FRACTION,
        },
        # Evaluation is not split: one process ran every batch of batch_size prompts.
        "processes": {"world_size": world_size(), "evaluated_by": "main process only",
                      "global_batch_size": args.batch_size},
        "models": {
            role: {
                "model": {"id": entry.label, "path": entry.ref, "dtype": args.dtype},
                "scores": result.scores,
                "metrics": result.to_dict(with_items=args.log_samples),
            }
            for role, (entry, result) in outcomes.items()
        },
        "higher_is_better": {n: goal_to_bool[METRICS.get(n).goal] for n in metric_names},
        "environment": environment_info(str(device)),
        "timings": timings,
    }


if __name__ == "__main__":
    run_cli(main)
