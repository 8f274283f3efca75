"""Unlearning defenses, one method per module, chosen by exact name from :data:`DEFENSES`.

Every module of this package is imported here, so a module that registers a defense with
``@register_defense("name")`` (see :mod:`defenses.base`) is available by that name, with its
config fields as ``python -m benchmarks.unlearn`` flags, and nothing else has to change.
"""

from __future__ import annotations

import importlib
import pkgutil

from defenses.base import DEFENSES, Defense, DefenseConfig, build_defense, register_defense
from defenses.retain import RETAIN_LOSSES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFENSES", "RETAIN_LOSSES", "Defense", "DefenseConfig", "build_defense", "register_defense"]
