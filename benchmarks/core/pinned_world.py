"""The pinned world: the default world's target and retrain models, shipped with the package.

Training the world from its recipe is deterministic on one machine but not across machines
(thread counts, BLAS kernels and CPU instruction sets change the float rounding), and the
unlearning operating point downstream amplifies such differences. So the default world's two
models are shipped as files -- the same bytes everywhere -- and the default run trains nothing.

``benchmarks/core/pinned_world/`` holds::

    manifest.json        configuration hash and description, the command that built the models,
                         their scores, the sha256 of every file and of every corpus split
    target/  retrain/    model (safetensors), config and tokenizer files

:func:`install` writes a world root from it: the corpus generated from the configuration's
seed (its split digests must equal the manifest's: the generator is pure Python), the model
files copied after their digests are checked. :func:`verify_installed` checks the digests of an
installed pinned world again each time it is used. ``python -m benchmarks.world --rebuild``
retrains from the recipe and compares scores (:func:`score_world`, :func:`format_comparison`);
``--pin`` makes a rebuild the pinned world (:func:`pin`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.pinning import MANIFEST, check_files, copy_files, pin_manifest, read_pinned_manifest, write_pinned
from benchmarks.core.pinning import format_comparison as pinning_table

logger = logging.getLogger(__name__)

PINNED_DIR = Path(__file__).resolve().parent / "pinned_world"
ROLES = ("target", "retrain")
#: The scores recorded for each model (metric names of :mod:`benchmarks.core.metrics`).
SCORE_METRICS = ("knowmem_forget", "verbmem_forget", "knowmem_retain", "privleak")
# Files of a saved model that a world needs; anything else save_pretrained writes is left out.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def pinned_manifest(directory: Path | None = None) -> dict | None:
    """The pinned world's manifest (``directory`` default: the package's), or None when there is none."""
    return read_pinned_manifest(directory or PINNED_DIR)


def install(config, root: Path, directory: Path | None = None):
    """Write the pinned world for ``config`` at ``root`` (which must not exist) and return its paths."""
    directory = directory or PINNED_DIR
    from benchmarks.core.data import load_data, write_hub_layout
    from benchmarks.core.world_build import MANIFEST as WORLD_MANIFEST
    from benchmarks.core.world_build import WorldPaths, staged_world, world_hash

    manifest = pinned_manifest(directory)
    if manifest is None or manifest.get("hash") != world_hash(config):
        raise UsageError(f"the package pins no world of configuration {world_hash(config)}")
    fix = "reinstall the package, or train the world with python -m benchmarks.world --rebuild"
    check_files(directory, manifest["files"], fix)

    root = Path(root)
    with staged_world(root, "installing") as staging:
        paths = WorldPaths.at(staging)
        data = load_data("world", world_config=config.corpus)
        splits = data.describe()["splits"]
        if _split_digests(splits) != _split_digests(manifest["corpus"]):
            raise DataError(
                "the corpus generated here differs from the pinned world's (split digests disagree); "
                "the generator must be pure and deterministic: report this as a bug"
            )
        write_hub_layout(data, paths.corpus_dir)
        copy_files(directory, [name for name in manifest["files"] if name.split("/")[0] in ROLES], staging)
        world = {
            "hash": manifest["hash"],
            "config": manifest["config"],
            "pinned": True,
            "files": manifest["files"],
            "built_by": manifest.get("built_by"),
            "pinned_by": manifest["command"],
            "scores": manifest["scores"],
            "corpus": splits,
        }
        (staging / WORLD_MANIFEST).write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
    logger.info("installed the pinned world %s at %s", manifest["hash"], root)
    return WorldPaths.at(root)


def _split_digests(splits: Mapping[str, Any]) -> dict[str, str]:
    return {name: info["sha256"] for name, info in splits.items()}


def verify_installed(paths) -> None:
    """Check the model files of an installed pinned world against its recorded digests."""
    manifest = json.loads((paths.root / "world.json").read_text(encoding="utf-8"))
    check_files(
        paths.root, manifest["files"],
        f"the world at {paths.root} was modified; delete it and run again to reinstall it",
    )


def score_world(paths) -> dict[str, dict[str, float]]:
    """MUSE scores of a world's target and retrain models (retrain first: its AUC is
    PrivLeak's reference), as ``role -> metric -> value``."""
    from benchmarks.core.data import load_data
    from benchmarks.core.metrics import evaluate
    from benchmarks.core.models import load_model

    data = load_data(str(paths.corpus_dir))
    scores: dict[str, dict[str, float]] = {}
    retrain_auc = None
    for role in ("retrain", "target"):
        model, tokenizer = load_model(str(getattr(paths, f"{role}_dir")), dtype="float32", device="cpu")
        result = evaluate(
            model, tokenizer, data, list(SCORE_METRICS), retrain_auc=retrain_auc, as_retrain=role == "retrain"
        )
        if role == "retrain":
            retrain_auc = result.results["privleak"].details["auc"]
        scores[role] = {name: round(float(result.results[name].score), 2) for name in SCORE_METRICS}
        del model
    return {role: scores[role] for role in ROLES}


def format_comparison(scores: Mapping[str, Mapping[str, float]], manifest: Mapping | None) -> str:
    """A table of the rebuilt scores beside the pinned ones (when a pinned world exists)."""
    return pinning_table(scores, manifest, ROLES, SCORE_METRICS, lambda d: round(d, 2))


def pin(paths, scores: Mapping[str, Mapping[str, float]], command: str, directory: Path | None = None) -> Path:
    """Make the world at ``paths`` the pinned world: copy its model files into ``directory``
    with a manifest of digests, scores and the command that built it."""
    world = json.loads((paths.root / "world.json").read_text(encoding="utf-8"))
    sources = {
        f"{role}/{name}": getattr(paths, f"{role}_dir") / name
        for role in ROLES for name in _MODEL_FILES if (getattr(paths, f"{role}_dir") / name).is_file()
    }
    manifest = pin_manifest(world, command=command, scores=scores, roles=ROLES,
                            built_by="python -m benchmarks.world --rebuild", corpus=world["corpus"])
    return write_pinned(directory or PINNED_DIR, sources, manifest)
