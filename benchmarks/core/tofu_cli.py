"""The TOFU side of the command-line tools: shared flags and ``benchmarks.evaluate --data tofu``.

Entry points stay thin: they call :func:`add_tofu_arguments` on their parser and hand a parsed
run whose ``--data`` is TOFU (:func:`benchmarks.core.tofu_data.is_tofu_source`) to the flows
here. Every check runs before a model loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.core.chat_format import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT, PromptSettings
from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.tofu_data import DEFAULT_FORGET_SPLIT, FORGET_SPLITS, TOFU_WORLD, check_forget_split

#: The author world's answers are one short sentence: 48 greedy tokens hold any of them.
WORLD_MAX_NEW_TOKENS = 48

logger = logging.getLogger(__name__)


def add_tofu_arguments(parser: argparse.ArgumentParser) -> None:
    """The TOFU flags (ignored for MUSE data): forget split, prompt settings, parity padding."""
    group = parser.add_argument_group("TOFU (with --data tofu, tofu-world or a TOFU directory)")
    group.add_argument("--forget-split", default=DEFAULT_FORGET_SPLIT,
                       help=f"{', '.join(FORGET_SPLITS)}: picks the matching retain and perturbed configs "
                            f"(default {DEFAULT_FORGET_SPLIT})")
    group.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                       help=f"system turn of the chat template ('' for none; default {DEFAULT_SYSTEM_PROMPT!r})")
    group.add_argument("--date-string", default=DEFAULT_DATE_STRING,
                       help=f"date_string given to the chat template (default {DEFAULT_DATE_STRING!r}, "
                            "open-unlearning's fixed value)")
    group.add_argument("--eot-padding", action="store_true",
                       help="open-unlearning parity: pad with the EOS id and mask every token equal to it out of "
                            "attention, the template's own <|eot_id|> included (reproduces its published figures; "
                            "not the model's real input)")
    group.add_argument("--max-new-tokens", type=int, default=None,
                       help="greedy tokens generated for ROUGE (default 200, open-unlearning's; the author world: 48)")
    group.add_argument("--retrain-result", default=None,
                       help="an earlier TOFU evaluation YAML of the retrain model: its forget truth ratios give "
                            "forget quality without --retrain-model")


def prompt_settings(args: argparse.Namespace) -> PromptSettings:
    return PromptSettings(system_prompt=args.system_prompt, date_string=args.date_string,
                          eot_padding=args.eot_padding)


def read_retrain_truth_ratios(path: str, forget_split: str) -> dict[int, float]:
    """Per-item forget truth ratios of the retrain model from an earlier evaluation file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--retrain-result {path!r} does not exist; evaluate the retrain model with --output first")
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataError(f"--retrain-result {path}: not valid YAML ({err})") from None
    models = (document or {}).get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict) or not models:
        raise DataError(f"--retrain-result {path}: no 'models' section; pass a TOFU evaluation file")
    entry = models.get("retrain") or (next(iter(models.values())) if len(models) == 1 else None)
    if entry is None:
        raise DataError(f"--retrain-result {path}: several models and none with role 'retrain'; name the file of the "
                        "retrain model's evaluation")
    split = ((document.get("data") or {}).get("forget_split"))
    if split is not None and split != forget_split:
        raise UsageError(f"--retrain-result {path} was measured on {split}, this run uses --forget-split {forget_split}")
    ratios = (entry.get("metrics") or {}).get("forget_truth_ratios")
    if not isinstance(ratios, dict) or not ratios:
        raise DataError(f"--retrain-result {path}: the model entry lacks 'metrics.forget_truth_ratios'")
    return {int(k): float(v) for k, v in ratios.items()}


def load_tofu_source(source: str, forget_split: str, cache_dir: str | None = None):
    """``TofuData`` for ``--data``: the author world (built or cached) or a hub/directory source.
    Returns ``(data, world)``, ``world`` being the built world or None."""
    from benchmarks.core.tofu_data import load_tofu

    if source == TOFU_WORLD:
        from benchmarks.core.tofu_world import ensure_tofu_world

        world = ensure_tofu_world()
        return world.data(forget_split), world
    return load_tofu(source, forget_split), None


def run_evaluate(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``python -m benchmarks.evaluate --data tofu|tofu-world|DIR``: the TOFU table."""
    from benchmarks.core.models import check_model_ref
    from benchmarks.core.results import check_yaml_target
    from benchmarks.core.tofu_data import resolve_tofu_source
    from benchmarks.core.tofu_eval import ROUGE_MAX_NEW_TOKENS, TofuEvalSettings

    forget_split = check_forget_split(args.forget_split)
    settings = TofuEvalSettings(prompt=prompt_settings(args), batch_size=args.batch_size, progress=args.progress,
                                max_new_tokens=args.max_new_tokens or (
                                    WORLD_MAX_NEW_TOKENS if args.data == TOFU_WORLD else ROUGE_MAX_NEW_TOKENS))
    resolve_tofu_source(args.data)
    world_data = args.data == TOFU_WORLD
    if world_data and forget_split != "forget10" and args.retrain_model is None:
        raise UsageError(f"the author world's retrain model is trained without forget10's authors; with "
                         f"--forget-split {forget_split} pass --retrain-model, or use forget10")
    if args.model is None and not world_data:
        raise UsageError("--model is required unless --data is 'tofu-world' (which brings its own target model)")
    if args.metrics is not None:
        raise UsageError("--metrics applies to MUSE data; a TOFU evaluation always computes the TOFU table")
    plan: list[tuple[str, str | None, str]] = []  # (role, ref, label); None: the world's
    if args.retrain_model is not None:
        plan.append(("retrain", check_model_ref(args.retrain_model), args.retrain_model))
    elif world_data and args.retrain_result is None:
        plan.append(("retrain", None, "tofu-world/retrain"))
    plan.append(("target", None, "tofu-world/target") if args.model is None
                else ("model", check_model_ref(args.model), args.model))
    retrain_ratios = None
    if args.retrain_result is not None:
        if args.retrain_model is not None:
            raise UsageError("give --retrain-model or --retrain-result, not both")
        retrain_ratios = read_retrain_truth_ratios(args.retrain_result, forget_split)
    if args.output is not None:
        check_yaml_target(args.output, "--output", overwrite=args.overwrite)
    if args.log_samples and args.output is None:
        raise UsageError("--log-samples needs --output (the items go into the YAML file)")

    timings: dict[str, float] = {}
    started = time.perf_counter()
    data, world = load_tofu_source(args.data, forget_split)
    timings["data"] = time.perf_counter() - started
    if world is not None:
        paths = {"target": str(world.target_dir), "retrain": str(world.retrain_dir)}
        plan = [(role, ref if ref is not None else paths[role], label) for role, ref, label in plan]

    import torch

    from benchmarks.core.chat_format import describe_prompt
    from benchmarks.core.models import load_model
    from benchmarks.core.tofu_eval import evaluate_tofu, format_tofu_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    outcomes: dict[str, tuple[str, str, Any]] = {}
    prompt_record = None
    for role, ref, label in plan:
        started = time.perf_counter()
        model, tokenizer = load_model(ref, dtype=args.dtype, device=device)
        result = evaluate_tofu(model, tokenizer, data, settings, retrain_truth_ratios=retrain_ratios)
        if role == "retrain":
            retrain_ratios = result.forget_truth_ratios
            result.scores["forget_quality"] = 1.0  # KS test of a sample against itself
        prompt_record = prompt_record or describe_prompt(tokenizer, settings.prompt)
        outcomes[role] = (ref, label, result)
        del model
        timings[f"evaluate_{role}"] = time.perf_counter() - started
    ordered = sorted(outcomes.items(), key=lambda kv: kv[0] == "retrain")
    print(format_tofu_table([(role, label, result.scores) for role, (_, label, result) in ordered]))
    if args.output is not None:
        from benchmarks.core.results import command_line, environment_info, new_run_id, utc_now, write_yaml_atomic

        document = {
            "schema_version": 1,
            "kind": "evaluation",
            "benchmark": "tofu",
            "run_id": new_run_id(),
            "command": command_line("benchmarks.evaluate", argv),
            "created": utc_now(),
            "data": data.describe(),
            "settings": {"prompt": prompt_record, "batch_size": args.batch_size, "dtype": args.dtype,
                         "max_new_tokens": settings.max_new_tokens,
                         "retrain_reference": args.retrain_model or args.retrain_result},
            "models": {
                role: {"model": {"id": label, "path": ref, "dtype": args.dtype}, "scores": result.scores,
                       "metrics": result.to_dict(with_items=args.log_samples)}
                for role, (ref, label, result) in outcomes.items()
            },
            "higher_is_better": {"forget_prob": False, "forget_rouge": False, "forget_truth_ratio": None,
                                 "forget_quality": True, "model_utility": True},
            "environment": environment_info(device),
            "timings": timings,
        }
        write_yaml_atomic(args.output, document, overwrite=args.overwrite)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0

