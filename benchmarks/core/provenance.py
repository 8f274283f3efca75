"""Which exact weights a number came from: hub models by their commit, local checkpoints by a
sha256 of their files, computed once per process.

* A hub model is recorded as ``hub:<id>@<commit>``. The commit comes from the hub when it can
  be reached, else from the local ``huggingface_hub`` cache, whose layout is
  ``models--<owner>--<name>/refs/<revision>`` (a file holding the commit) beside
  ``snapshots/<commit>/``: the snapshot ``from_pretrained`` loads offline. ``hub:<id>@unknown``
  says that neither was available. Keyed on the commit, a cached unlearned model goes stale
  when the repository changes, as it should.
* A local checkpoint is ``sha256:<hex>`` over its config and weight files. Hashing 14 GB of a
  7B model takes a minute, so the digest is kept for the process, keyed by the files' names,
  sizes and modification times (a rewritten checkpoint is hashed again).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from benchmarks.core.env import env_flag

logger = logging.getLogger(__name__)

_FINGERPRINTS: dict[tuple, str] = {}


def _offline() -> bool:
    return env_flag("HF_HUB_OFFLINE")


def cached_commit(repo_id: str, revision: str = "main", cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit of ``repo_id`` at ``revision`` in the local hub cache, or None."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (repo / "snapshots" / commit).is_dir():
            return commit
    if (repo / "snapshots" / revision).is_dir():  # a revision given as a commit
        return revision
    return None


def hub_commit(repo_id: str, revision: str = "main", cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit of ``repo_id``: asked of the hub unless it is switched off, else the cache's."""
    if not _offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
        except Exception as err:  # no network, a private repository, ...: fall back to the cache
            logger.info("could not ask the hub for %s's commit (%s); using the local cache", repo_id, err)
    return cached_commit(repo_id, revision, cache_dir)


def _weight_files(path: Path) -> list[Path]:
    return [f for f in sorted(path.iterdir())
            if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "config.json")]


def model_fingerprint(ref: str) -> str:
    """``sha256:<hex>`` of a local checkpoint's config and weights, or ``hub:<id>@<commit>``."""
    path = Path(ref)
    if not path.is_dir():
        key = ("hub", ref)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = f"hub:{ref}@{hub_commit(ref) or 'unknown'}"
        return _FINGERPRINTS[key]
    files = _weight_files(path)
    key = (str(path.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode("utf-8"))
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        _FINGERPRINTS[key] = "sha256:" + digest.hexdigest()
    return _FINGERPRINTS[key]
