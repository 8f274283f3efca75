"""The Hugging Face hub layout of a MUSE-format dataset: reading its README and writing one.

A hub-layout directory holds data files and a ``README.md`` whose YAML front matter declares
one config per subset and the data files of each split::

    ---
    configs:
    - config_name: knowmem
      data_files:
      - split: forget_qa
        path: knowmem/forget_qa.jsonl
    ---

``datasets.load_dataset(directory, subset, split=...)`` reads such a directory offline, and
so does :func:`benchmarks.core.data.load_data`. :func:`write_hub_layout` writes one (JSON lines,
one file per split) from loaded data; the embedded world uses it to publish its corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from benchmarks.core.errors import DataError, UsageError

if TYPE_CHECKING:  # data.py imports this module; the type is only needed for annotations
    from benchmarks.core.data import MuseData

logger = logging.getLogger(__name__)

README = "README.md"
_GLOB_CHARS = set("*?[")


def read_front_matter(readme: Path) -> dict | None:
    """The YAML front matter of ``readme`` as a dict, or None when it has none.

    Malformed YAML is a :class:`DataError` naming the file, since the directory then cannot
    be read by ``datasets`` either.
    """
    text = readme.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise DataError(f"file {readme}: YAML front matter opened with '---' is never closed") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as err:
        raise DataError(f"file {readme}: front matter is not valid YAML ({err})") from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"file {readme}: front matter must be a YAML mapping, got {type(meta).__name__}")
    return meta


def has_hub_configs(directory: Path) -> bool:
    """Whether ``directory`` has a README.md whose front matter declares ``configs:``."""
    readme = directory / README
    if not readme.is_file():
        return False
    meta = read_front_matter(readme)
    return bool(meta) and "configs" in meta


def read_hub_configs(directory: Path) -> dict[str, dict[str, list[str]]]:
    """subset -> split -> data-file patterns, as declared by the README of a hub-layout directory.

    Only the per-split form of ``data_files`` (a list of ``{split, path}`` entries, or a
    split -> path mapping) names splits; a config given as bare paths has only the implicit
    ``train`` split. Patterns are relative to ``directory`` and may be globs, as on the hub.
    """
    readme = directory / README
    meta = read_front_matter(readme) or {}
    configs = meta.get("configs")
    if not isinstance(configs, list):
        raise DataError(f"file {readme}: field 'configs' must be a list of {{config_name, data_files}} entries")
    layout: dict[str, dict[str, list[str]]] = {}
    for entry in configs:
        if not isinstance(entry, dict) or not isinstance(entry.get("config_name"), str):
            raise DataError(f"file {readme}: every entry of 'configs' needs a string field 'config_name'")
        subset = entry["config_name"]
        data_files = entry.get("data_files")
        # Bring the hub's three spellings to a list of {split, path} entries.
        if isinstance(data_files, str) or (
            isinstance(data_files, list) and data_files and all(isinstance(x, str) for x in data_files)
        ):
            data_files = [{"split": "train", "path": data_files}]
        elif isinstance(data_files, dict):
            data_files = [{"split": k, "path": v} for k, v in data_files.items()]
        if not isinstance(data_files, list):
            raise DataError(f"file {readme}: config {subset!r} needs a field 'data_files'")
        splits: dict[str, list[str]] = {}
        for item in data_files:
            if not isinstance(item, dict) or "split" not in item or "path" not in item:
                raise DataError(
                    f"file {readme}: config {subset!r}: each data_files entry needs fields 'split' and 'path'"
                )
            patterns = item["path"] if isinstance(item["path"], list) else [item["path"]]
            splits[str(item["split"])] = [str(p) for p in patterns]
        layout[subset] = splits
    return layout


def find_data_files(directory: Path, patterns: list[str]) -> tuple[list[Path], str | None]:
    """The files ``patterns`` name in ``directory``, and a note on the first pattern that names
    none (None when all are there): a partly downloaded hub copy lacks some listed files."""
    found: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in directory.glob(pattern) if p.is_file())
            if not matches:
                return found, f"README.md lists data_files {pattern!r}, which match no file"
            found.extend(matches)
        elif (directory / pattern).is_file():
            found.append(directory / pattern)
        else:
            return found, f"README.md lists data file {directory / pattern}, which does not exist"
    return found, None


def write_hub_layout(data: MuseData, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as a hub-layout directory: ``<subset>/<split>.jsonl`` plus README.md.

    ``datasets.load_dataset(out_dir, subset, split=name)`` reads it offline, and
    :func:`~benchmarks.core.data.load_data` loads it back to the same records (same sha256).
    The directory is assembled next to ``out_dir`` and moved into place at the end, so an
    interrupted write leaves no half directory. An existing non-empty ``out_dir`` is replaced
    only with ``overwrite=True``.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output directory {out} is not empty; remove it or pass overwrite=True")
    splits = list(data)
    if not splits:
        raise UsageError(f"data from {data.source} holds no splits; nothing to write")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        configs: dict[str, list[dict]] = {}
        for split in splits:
            relative = f"{split.subset}/{split.name}.jsonl"
            (staging / split.subset).mkdir(exist_ok=True)
            with open(staging / relative, "w", encoding="utf-8") as handle:
                for record in split.records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            configs.setdefault(split.subset, []).append({"split": split.name, "path": relative})
        (staging / README).write_text(_readme(data, configs), encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d splits from %s to %s", len(splits), data.source, out)
    return out


def _readme(data: MuseData, configs: dict[str, list[dict]]) -> str:
    front = yaml.safe_dump(
        {"configs": [{"config_name": s, "data_files": files} for s, files in configs.items()]},
        sort_keys=False,
        allow_unicode=True,
    )
    rows = "\n".join(
        f"| {s.subset} | {s.name} | {len(s.records)} | `{s.sha256}` |" for s in data
    )
    missing = "".join(f"- {key}: {reason}\n" for key, reason in data.missing.items())
    return (
        f"---\n{front}---\n\n"
        "# MUSE-News-format data\n\n"
        f"Written by relearn-bench from `{data.source}` ({data.kind}). Read it with\n"
        "`datasets.load_dataset(<this directory>, <subset>, split=<split>)` or with\n"
        "`benchmarks.core.data.load_data(<this directory>)`.\n\n"
        "The sha256 is that of the canonical JSON of the split's records "
        "(`benchmarks.core.data.records_sha256`).\n\n"
        "| subset | split | records | sha256 |\n|---|---|---|---|\n"
        f"{rows}\n"
        + (f"\nSplits the source lacked:\n\n{missing}" if missing else "")
    )
