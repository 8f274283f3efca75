"""What the pinned worlds share: a directory of files shipped with the package, a manifest
recording the sha256 of each, verification before use, and atomic replacement when re-pinned.

Two worlds are pinned: the MUSE-style world (:mod:`benchmarks.core.pinned_world`) and the TOFU
author world (:mod:`benchmarks.core.pinned_tofu_world`). Both train tiny models whose bytes
differ between machines (float rounding in BLAS kernels and thread counts), so their default
configurations ship the models themselves; these helpers handle the files, the worlds the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from benchmarks.core.errors import DataError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_or_none(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing or unreadable (a world whose
    build was interrupted has none: it is rebuilt, not trusted)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def format_comparison(scores, manifest, roles, metrics, rounded) -> str:
    """A table of rebuilt ``scores[role][metric]`` beside the pinned ones in ``manifest``
    (``rounded`` formats the difference)."""
    from tabulate import tabulate

    pinned = (manifest or {}).get("scores", {})
    rows = []
    for role in roles:
        for metric in metrics:
            old = pinned.get(role, {}).get(metric)
            new = scores[role][metric]
            rows.append([role, metric, new, "" if old is None else old, "" if old is None else rounded(new - old)])
    return tabulate(rows, headers=["model", "metric", "rebuilt", "pinned", "rebuilt - pinned"], tablefmt="github")


def read_pinned_manifest(directory: Path) -> dict | None:
    """The manifest of the pinned directory, or None when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is unreadable ({err}); reinstall the package") from None


def check_files(directory: Path, files: Mapping[str, str], fix: str, what: str = "pinned world file") -> None:
    """Each ``name -> sha256`` of ``files`` must be a file under ``directory`` with that digest."""
    for name, expected in sorted(files.items()):
        path = Path(directory) / name
        if not path.is_file():
            raise DataError(f"{what} {path} is missing; {fix}")
        actual = sha256_file(path)
        if actual != expected:
            raise DataError(f"{what} {path} has sha256 {actual[:12]}…, expected {expected[:12]}…; {fix}")


def copy_files(source: Path, names: Iterable[str], destination: Path) -> None:
    """Copy the named files (paths relative to both directories) from ``source`` to ``destination``."""
    for name in names:
        target = Path(destination) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / name, target)


def pin_manifest(built: Mapping, *, command: str, scores: Mapping[str, Mapping[str, float]], roles,
                 built_by: str, **data_digests) -> dict:
    """The manifest of a world being pinned, from the manifest it was built with: its hash and
    configuration, the command that pins it and the one that built it, how it was built, the
    scores of its ``roles``, and the digests of the data it is generated with (``corpus=`` for
    the MUSE-style world, ``data=`` for the author world)."""
    return {
        "hash": built["hash"],
        "config": built["config"],
        "command": command,
        "built_by": built.get("built_by", built_by),
        "built_with": {"versions": built.get("versions"), "torch_threads": built.get("torch_threads"),
                       "timings": built.get("timings")},
        "scores": {role: dict(scores[role]) for role in roles},
        **data_digests,
    }


def write_pinned(directory: Path, sources: Mapping[str, Path], manifest: Mapping) -> Path:
    """Make ``directory`` hold exactly ``sources`` (``name -> file``) and ``manifest`` with a
    ``files`` entry of their digests. Assembled beside it and renamed in, so a failure leaves
    the old pinned files in place."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.pinning.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[str, str] = {}
    try:
        for name, source in sources.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            files[name] = sha256_file(target)
        (staging / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n", encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
