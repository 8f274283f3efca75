"""Composed attack plans: ``finetune+quantize`` is "relearn, then quantize", one named attack.

A plan is ``+``-joined exact attack names: at most one attack that trains, first, followed by
weight transforms (:class:`attacks.base.WeightTransform`, such as ``quantize``), each at most
once. The trajectory is the training attack's one run; at step 0 the model is measured as given
(the same starting point as every other attack), and at every later milestone the transforms
are applied to a copy of the weights at that step, measured, and undone, so the training goes on
in full precision. The point at step s is thus what an attacker gets by training s steps and then
transforming. A plan of transforms only (``quantize``) has the points 0 and "after".

The plan's config carries every setting of its parts, flat (the result file records them all
under the plan's name); a setting two parts share takes the first part's default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import torch

from attacks.base import ATTACKS, Attack, AttackConfig, WeightTransform
from benchmarks.core.errors import UsageError
from benchmarks.core.training import TrainResult

SEPARATOR = "+"


def attack_class(name: str) -> type[Attack]:
    """The attack registered as ``name``, or the composed plan ``a+b+...`` of registered ones."""
    if SEPARATOR not in name:
        return ATTACKS.get(name)
    return _composed(tuple(part.strip() for part in name.split(SEPARATOR)))


@functools.lru_cache(maxsize=None)
def _composed(names: tuple[str, ...]) -> type[Attack]:
    if any(not n for n in names):
        raise UsageError(f"empty attack name in plan {SEPARATOR.join(names)!r}; e.g. finetune{SEPARATOR}quantize")
    parts = [ATTACKS.get(n) for n in names]  # unknown part -> the list of valid names
    if len(set(names)) != len(names):
        raise UsageError(f"attack plan {SEPARATOR.join(names)!r} repeats an attack")
    trainers = [i for i, cls in enumerate(parts) if cls.trains]
    if len(trainers) > 1 or (trainers and trainers[0] != 0):
        raise UsageError(f"attack plan {SEPARATOR.join(names)!r}: at most one training attack, and it comes first "
                         f"(e.g. finetune{SEPARATOR}quantize); the rest must be weight transforms")
    config_class = _merged_config(SEPARATOR.join(names), [cls.config_class for cls in parts])
    return type(f"Composed_{'_'.join(names)}", (ComposedAttack,),
                {"name": SEPARATOR.join(names), "config_class": config_class, "parts": tuple(parts),
                 "trains": bool(trainers)})


def _merged_config(name: str, classes: Sequence[type[AttackConfig]]) -> type[AttackConfig]:
    """A config dataclass with every field of ``classes`` (first one's default for a shared
    field) that builds and checks each part's own config in ``__post_init__``."""
    merged: dict[str, dataclasses.Field] = {}
    for cls in classes:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if f.name not in merged:
                default = (dataclasses.field(default=f.default, metadata=f.metadata)
                           if f.default is not dataclasses.MISSING
                           else dataclasses.field(default_factory=f.default_factory, metadata=f.metadata))
                merged[f.name] = (f.name, hints[f.name], default)

    def __post_init__(self) -> None:
        settings = {k: getattr(self, k) for k in merged}
        self.part_configs = [cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls)}) for cls in classes]
        # The training part's checks may normalise shared fields (e.g. relearn_docs over fraction).
        first = self.part_configs[0]
        for f in dataclasses.fields(type(first)):
            object.__setattr__(self, f.name, getattr(first, f.name))

    def __reduce__(self):
        # Built at run time, the class has no importable name: a copy in another process
        # (benchmarks.relearn --jobs) is rebuilt from the plan's name and the settings.
        return _rebuilt_config, (name, {k: getattr(self, k) for k in merged})

    return dataclasses.make_dataclass(
        f"{name}Config", list(merged.values()), bases=(AttackConfig,),
        namespace={"__post_init__": __post_init__, "__reduce__": __reduce__,
                   "__doc__": f"Settings of the attack plan {name}."},
    )


def _rebuilt_config(name: str, settings: dict) -> AttackConfig:
    return attack_class(name).config_class(**settings)


class ComposedAttack(Attack):
    """A training attack followed by weight transforms, or transforms alone (see the module)."""

    parts: tuple[type[Attack], ...] = ()

    def __init__(self, config: AttackConfig | None = None) -> None:
        super().__init__(config)
        self.attacks = [cls(part) for cls, part in zip(self.parts, self.config.part_configs)]
        self.trainer = self.attacks[0] if self.attacks[0].trains else None
        self.transforms: list[WeightTransform] = [a for a in self.attacks if not a.trains]

    def documents(self, attacker_documents, data, seed):
        return self.attacks[0].documents(attacker_documents, data, seed)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        for attack in self.attacks[:1] if self.trainer else self.attacks:
            model = attack.prepare(model)
        return model

    def trainable_state(self, model):
        return (self.trainer or super()).trainable_state(model)

    def load_trainable_state(self, model, state):
        (self.trainer or super()).load_trainable_state(model, state)

    @contextlib.contextmanager
    def _transformed(self, model):
        with contextlib.ExitStack() as stack:
            for transform in self.transforms:
                model = stack.enter_context(transform.applied(model))
            yield model

    def run(self, model, tokenizer, documents, *, seed, hook=None, hook_steps=(), state_hook=None,
            resume_state=None, progress=True, gradient_checkpointing=False) -> TrainResult:
        if self.trainer is None:
            after = max(hook_steps) if hook_steps else 1
            with torch.no_grad():
                if hook is not None and 0 in hook_steps:
                    hook(0, model)
                for transform in self.transforms:
                    model = transform.apply(model)
                if hook is not None:
                    hook(after, model)
            return TrainResult(steps=after, history=[{"step": after, "transform": self.name}])

        def transformed_hook(step: int, trained) -> None:
            if hook is None:
                return
            if step == 0:
                hook(0, trained)  # the model as given: the common starting point
                return
            with self._transformed(trained) as measured:
                hook(step, measured)

        return self.trainer.run(model, tokenizer, documents, seed=seed, hook=transformed_hook,
                                hook_steps=hook_steps, state_hook=state_hook, resume_state=resume_state,
                                progress=progress, gradient_checkpointing=gradient_checkpointing)


def describe_plan(name: str) -> dict[str, Any]:
    """The parts of an attack plan in order, for result files."""
    cls = attack_class(name)
    parts = getattr(cls, "parts", (cls,))
    return {"plan": [p.name for p in parts], "trains": cls.trains}
