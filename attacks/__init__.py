"""Relearning attacks, by exact name: ``ATTACKS.get("finetune")``, or a composed plan such as
``attack_class("finetune+quantize")`` (see :mod:`attacks.compose`).

Adding an attack is one module in this package: a config dataclass (subclassing
:class:`AttackConfig` if it needs more knobs) and an :class:`Attack` subclass registered with
``@ATTACKS.register(name)``. Every module of the package is imported here, so the new name is
available at once, with its config fields as ``python -m benchmarks.relearn`` flags
(:func:`attack_flags`). Attacks never import ``defenses``.
"""

import importlib
import pkgutil

from attacks.base import (
    ATTACKS,
    Attack,
    AttackConfig,
    WeightTransform,
    attack_flags,
    pack_documents,
    relearn_loader,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from attacks.compose import attack_class  # noqa: E402  (after the attacks it composes are registered)
from attacks.lora import LoraAttackConfig  # noqa: E402

__all__ = ["ATTACKS", "Attack", "AttackConfig", "LoraAttackConfig", "WeightTransform", "attack_class",
           "attack_flags", "make_attack", "pack_documents", "relearn_loader"]


def make_attack(name: str, **settings) -> Attack:
    """The attack ``name`` (or a composed plan ``a+b``) with its config built from ``settings``
    (checked on creation)."""
    cls = attack_class(name)
    return cls(cls.config_class(**settings))
