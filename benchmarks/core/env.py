"""Switches read from the environment, parsed one way everywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

# The spellings huggingface_hub and accelerate accept as "on".
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})

# The variables that switch the Hugging Face hub (models) and datasets off.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` is set to one of :data:`TRUE_VALUES`."""
    environ = os.environ if environ is None else environ
    return environ.get(name, "").strip().upper() in TRUE_VALUES


def offline_switches(environ: Mapping[str, str] | None = None) -> list[str]:
    """The hub-offline variables that are on, in :data:`OFFLINE_VARIABLES` order."""
    return [name for name in OFFLINE_VARIABLES if env_flag(name, environ)]


# Where the installed worlds, unlearned models, attribution and relearning state are kept.
CACHE_ENV = "RELEARN_BENCH_CACHE"


def cache_root() -> Path:
    """``$RELEARN_BENCH_CACHE``, else ``~/.cache/relearn-bench``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "relearn-bench").expanduser()
