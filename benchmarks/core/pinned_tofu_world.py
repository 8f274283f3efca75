"""The pinned author world: the default TOFU-style world's target and retrain models, shipped
with the package (the TOFU counterpart of :mod:`benchmarks.core.pinned_world`).

The author world's tiny models train deterministically on one machine, but float rounding
differs between machines and the target's forget Prob moved by several points between two of
them under one configuration hash. So the default configuration's models ship as files.

``benchmarks/core/pinned_tofu_world/`` holds::

    manifest.json        configuration hash and description, the commands that built and pinned
                         the models, their TOFU scores, the sha256 of every model file and of
                         every generated data file
    target/  retrain/    model (safetensors), config and tokenizer files

:func:`install` writes a world root: the data generated from the configuration's seed (its file
digests must equal the manifest's), the model files copied after their digests are checked.
:func:`verify_installed` checks an installed pinned world again each time it is used.
``python -m benchmarks.world --tofu --rebuild`` trains from the recipe and compares scores;
``--pin`` makes such a rebuild the pinned world (:func:`pin`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.pinning import check_files, copy_files, pin_manifest, read_pinned_manifest, write_pinned
from benchmarks.core.pinning import format_comparison as pinning_table

logger = logging.getLogger(__name__)

PINNED_DIR = Path(__file__).resolve().parent / "pinned_tofu_world"
ROLES = ("target", "retrain")
#: The TOFU scores recorded for each model on forget10 (names of :func:`evaluate_tofu`'s scores).
SCORE_METRICS = ("forget_prob", "forget_truth_ratio", "forget_quality", "retain_prob", "model_utility")
#: How far a rebuilt model's scores (all in [0, 1]) may sit from the pinned ones; forget quality
#: (a p-value spanning orders of magnitude) is compared on a log scale instead.
REBUILD_TOLERANCE = 0.05


def pinned_manifest(directory: Path | None = None) -> dict | None:
    """The pinned author world's manifest (``directory`` default: the package's), or None."""
    return read_pinned_manifest(directory or PINNED_DIR)


def install(config, root: Path, directory: Path | None = None):
    """Write the pinned author world for ``config`` at ``root`` (which must not exist)."""
    from benchmarks.core.tofu_world import (ROOT_MANIFEST, TofuWorld, _staged, data_digests, generate_world,
                                            world_hash, write_configs)

    directory = directory or PINNED_DIR
    manifest = pinned_manifest(directory)
    if manifest is None or manifest.get("hash") != world_hash(config):
        raise UsageError(f"the package pins no author world of configuration {world_hash(config)}")
    check_files(directory, manifest["files"],
                "reinstall the package, or train the world with python -m benchmarks.world --tofu --rebuild",
                what="pinned author world file")
    with _staged(Path(root), "installing") as staging:
        write_configs(generate_world(config), staging / "data")
        digests = data_digests(staging / "data")
        for name in sorted(set(digests) | set(manifest["data"])):
            if digests.get(name) != manifest["data"].get(name):
                raise DataError(f"the author world's generated {name} differs from the pinned world's; the "
                                "generator must be pure and deterministic: report this as a bug")
        copy_files(directory, manifest["files"], staging)
        world = {
            "hash": manifest["hash"], "config": manifest["config"], "pinned": True, "files": manifest["files"],
            "data": digests, "built_by": manifest.get("built_by"), "pinned_by": manifest["command"],
            "scores": manifest["scores"],
        }
        (staging / ROOT_MANIFEST).write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
    logger.info("installed the pinned author world %s at %s", manifest["hash"], root)
    return TofuWorld(Path(root), config)


def verify_installed(world) -> None:
    """Check the model files of an installed pinned author world against its recorded digests."""
    from benchmarks.core.tofu_world import read_root_manifest

    manifest = read_root_manifest(world.root) or {}
    check_files(world.root, {**manifest.get("files", {}), **manifest.get("data", {})},
                f"the author world at {world.root} was modified; delete it and run again to reinstall it",
                what="pinned author world file")


def score_tofu_world(world) -> dict[str, dict[str, float]]:
    """TOFU scores (forget10) of the world's target and retrain models, as ``role -> metric -> value``,
    measured as ``python -m benchmarks.evaluate --data tofu-world`` measures them."""
    import torch

    from benchmarks.core.models import load_model
    from benchmarks.core.tofu_cli import WORLD_MAX_NEW_TOKENS
    from benchmarks.core.tofu_eval import TofuEvalSettings, evaluate_tofu

    data = world.data("forget10")
    settings = TofuEvalSettings(max_new_tokens=WORLD_MAX_NEW_TOKENS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores: dict[str, dict[str, float]] = {}
    retrain_ratios = None
    for role in ("retrain", "target"):  # the retrain model's truth ratios are forget quality's reference
        model, tokenizer = load_model(str(getattr(world, f"{role}_dir")), dtype="float32", device=device)
        result = evaluate_tofu(model, tokenizer, data, settings, retrain_truth_ratios=retrain_ratios)
        if role == "retrain":
            retrain_ratios = result.forget_truth_ratios
            result.scores["forget_quality"] = 1.0  # KS test of a sample against itself
        scores[role] = {name: float(f"{float(result.scores[name]):.4g}") for name in SCORE_METRICS}
        del model
    return {role: scores[role] for role in ROLES}


def format_comparison(scores: Mapping[str, Mapping[str, float]], manifest: Mapping | None) -> str:
    """A table of the rebuilt scores beside the pinned ones (when a pinned world exists)."""
    return pinning_table(scores, manifest, ROLES, SCORE_METRICS, lambda d: float(f"{d:.3g}"))


def pin(world, scores: Mapping[str, Mapping[str, float]], command: str, directory: Path | None = None) -> Path:
    """Make the author world ``world`` the pinned one: copy every file of its two model
    directories into ``directory`` with a manifest of digests, scores and commands."""
    from benchmarks.core.tofu_world import read_root_manifest

    built = read_root_manifest(world.root) or {}
    sources = {f"{role}/{path.name}": path for role in ROLES
               for path in sorted(getattr(world, f"{role}_dir").iterdir()) if path.is_file()}
    manifest = pin_manifest(built, command=command, scores=scores, roles=ROLES,
                            built_by="python -m benchmarks.world --tofu --rebuild", data=built["data"])
    return write_pinned(directory or PINNED_DIR, sources, manifest)


def make_from_cli(out: str | None, rebuild: bool, pin_it: bool, force: bool, command: str) -> list[str]:
    """What ``python -m benchmarks.world --tofu`` does: install (or find) the author world, or
    rebuild it from the recipe and score it, or pin a rebuild; returns the lines to print."""
    from benchmarks.core.tofu_world import (TofuWorld, TofuWorldConfig, default_tofu_world_dir,
                                            ensure_tofu_world, read_root_manifest, world_hash)

    config = TofuWorldConfig()
    root = Path(out).expanduser().resolve() if out is not None else default_tofu_world_dir(config)
    if rebuild and out is None:
        root = root.with_name(root.name + "-rebuild")
    if pin_it and not rebuild:
        manifest = read_root_manifest(root)
        if manifest is None or manifest.get("pinned") or manifest.get("hash") != world_hash(config):
            raise UsageError(f"--pin: {root} holds no author world of the default configuration trained from its "
                             "recipe; make one with python -m benchmarks.world --tofu --rebuild --out DIR")
        world = TofuWorld(root, config)
    else:
        world = ensure_tofu_world(config, root, rebuild=rebuild, force=force or rebuild)
        if rebuild:  # the world records the command that trained it (pin copies it on)
            path = world.root / "manifest.json"
            manifest = json.loads(path.read_text(encoding="utf-8"))
            manifest["built_by"] = command
            path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [f"world:   {world.root}", f"data:    {world.data_dir}", f"target:  {world.target_dir}",
             f"retrain: {world.retrain_dir}"]
    if rebuild or pin_it:
        scores = score_tofu_world(world)
        lines.append(format_comparison(scores, pinned_manifest()))
        if pin_it:
            lines.append(f"pinned:  {pin(world, scores, command=command)}")
    return lines
