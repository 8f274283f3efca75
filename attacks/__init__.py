"""Relearning attacks, by exact name: ``ATTACKS.get("finetune")`` or ``ATTACKS.get("lora")``.

Adding an attack is one module: a config dataclass (subclassing :class:`AttackConfig` if it
needs more knobs) and an :class:`Attack` subclass registered with ``@ATTACKS.register(name)``,
imported below. Attacks never import ``defenses``.
"""

from attacks.base import ATTACKS, Attack, AttackConfig, pack_documents, relearn_loader
from attacks import finetune, lora  # noqa: F401  (registers the attacks)
from attacks.lora import LoraAttackConfig

__all__ = ["ATTACKS", "Attack", "AttackConfig", "LoraAttackConfig", "pack_documents", "relearn_loader", "make_attack"]


def make_attack(name: str, **settings) -> Attack:
    """The attack ``name`` with its config built from ``settings`` (checked on creation)."""
    cls = ATTACKS.get(name)
    return cls(cls.config_class(**settings))
