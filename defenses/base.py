"""What a defense is: a config dataclass, a forget loss, and the step function that applies it.

A defense module registers a :class:`Defense` subclass under an exact name::

    @dataclass
    class MyConfig(DefenseConfig):
        sigma: float = field(default=0.01, metadata={"help": "noise scale"})

    @register_defense("my_defense")
    class MyDefense(Defense):
        config_class = MyConfig

        def forget_loss(self, model, forget):
            ...                      # a scalar, or (scalar, {metric: float})

        def step_fn(self):           # only if the plain step does not fit (SAM, smoothing, ...)
            ...

Dropping that file into ``defenses/`` is the whole change: ``defenses/__init__`` imports every
module in the package, and ``python -m benchmarks.unlearn`` turns each config field into a
command-line flag (``sigma`` -> ``--sigma``).

Micro-batches, as the unlearning data pipeline (:mod:`benchmarks.core.unlearn_data`) builds them::

    {"forget": {"input_ids", "attention_mask", "index"},   # index: example id in the forget set
     "retain": {"input_ids", "attention_mask"}}            # absent when the retain loss is "none"

The objective is ``w_forget · L_forget + w_retain · L_retain`` (DESIGN §4).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable

import torch

from benchmarks.core.errors import UsageError
from benchmarks.core.reference import ReferenceLogps, compute_reference_logps
from benchmarks.core.registry import Registry
from benchmarks.core.training import StepFn, plain_step
from defenses.retain import RETAIN_LOSSES, RetainLoss

logger = logging.getLogger(__name__)

def _check_weight(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {value}")


@dataclass
class DefenseConfig:
    """Settings every defense shares: how the forget and retain terms are weighted."""

    forget_weight: float = field(
        default=1.0, metadata={"help": "Weight w_forget of the forget loss (MUSE-News default 1.0)."}
    )
    retain_weight: float = field(
        default=1.0, metadata={"help": "Weight w_retain of the retain loss (MUSE-News default 1.0)."}
    )
    retain_loss: str = field(
        default="gdr",
        metadata={"help": "Retain term: gdr (NLL on a retain batch), klr (KL to the model before "
                          "unlearning on a retain batch) or none."},
    )

    def __post_init__(self) -> None:
        _check_weight("forget_weight", self.forget_weight)
        _check_weight("retain_weight", self.retain_weight)
        RETAIN_LOSSES.get(self.retain_loss)  # unknown name -> UsageError listing the valid ones
        if self.forget_weight == 0:
            raise UsageError("forget_weight must be > 0: with 0 the defense unlearns nothing")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Defense:
    """One unlearning method. Subclasses set ``config_class`` and implement :meth:`forget_loss`;
    they override :meth:`step_fn` when an optimizer step is more than one backward pass.

    Class attributes say what the method needs prepared before training:
    ``needs_reference_logps`` (log π_ref of every forget example, cached once) and
    ``needs_reference_model`` (a frozen copy of the model before unlearning, e.g. for a loss
    over the whole vocabulary that cannot be cached per example); ``world_settings`` holds
    the method's calibrated settings for the embedded world, if they differ from the paper's.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    needs_reference_logps: ClassVar[bool] = False
    needs_reference_model: ClassVar[bool] = False
    #: Settings (config fields or training settings) that replace the defaults when unlearning
    #: the embedded world's tiny target (``benchmarks.unlearn``'s ``world`` preset).
    world_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: DefenseConfig | None = None) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.retain_term: RetainLoss = RETAIN_LOSSES.get(config.retain_loss)()
        self.reference_logps: ReferenceLogps | None = None
        self.reference_model: torch.nn.Module | None = None

    # ------------------------------------------------------------------ preparation

    @property
    def uses_retain(self) -> bool:
        """Whether the objective has a retain term (and the batches need retain examples)."""
        return self.retain_term.active and self.config.retain_weight > 0

    def setup(
        self,
        model: torch.nn.Module,
        reference_batches: Iterable[dict[str, Any]] | None = None,
        num_forget_examples: int | None = None,
        accelerator=None,
    ) -> None:
        """Prepare what training needs from the model *before* any update: the cached
        reference log-likelihoods of the forget set (from ``reference_batches``, forget-only
        micro-batches with ``index``) and/or a frozen reference copy."""
        if self.needs_reference_logps:
            if reference_batches is None or num_forget_examples is None:
                raise ValueError(f"{self.name or type(self).__name__} needs reference_batches to cache log π_ref")
            self.reference_logps = compute_reference_logps(
                model, reference_batches, num_forget_examples, accelerator
            )
        if self.needs_reference_model or (self.uses_retain and self.retain_term.needs_reference_model):
            self.reference_model = frozen_copy(model)

    # ------------------------------------------------------------------ losses

    def forget_loss(self, model: torch.nn.Module, forget: dict[str, torch.Tensor]):
        """L_forget on a forget micro-batch: a scalar tensor or ``(tensor, {metric: float})``."""
        raise NotImplementedError

    def retain_loss(self, model: torch.nn.Module, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.retain_term(model, retain, self.reference_model)

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]):
        """:meth:`forget_loss` on the forget part of a micro-batch (what step functions call)."""
        return self.forget_loss(model, batch["forget"])

    def retain_term_loss(self, model: torch.nn.Module, batch: dict[str, Any]):
        loss = self.retain_loss(model, batch["retain"])
        return loss, {"retain_loss": loss.detach().float().item()}

    def total_loss(self, model: torch.nn.Module, batch: dict[str, Any]):
        """``w_forget · L_forget + w_retain · L_retain`` on one micro-batch, with both terms
        reported as metrics."""
        forget, metrics = _split(self.forget_term(model, batch))
        metrics = {"forget_loss": forget.detach().float().item(), **metrics}
        loss = self.config.forget_weight * forget
        if self.uses_retain:
            retain = self.retain_loss(model, batch["retain"])
            metrics["retain_loss"] = retain.detach().float().item()
            loss = loss + self.config.retain_weight * retain
        return loss, metrics

    # ------------------------------------------------------------------ the step

    def step_fn(self) -> StepFn:
        """The step function for the shared loop; by default one backward pass of
        :meth:`total_loss` per micro-batch."""
        return plain_step(self.total_loss)

    def evaluation_weights(self, model: torch.nn.Module):
        """Context in which ``model`` holds the weights the defense would return at this point
        of training (what per-epoch evaluation should see). By default the model's own weights;
        weight averaging swaps its running mean in and restores the trajectory afterwards."""
        return contextlib.nullcontext()

    def finish(self, model: torch.nn.Module) -> None:
        """Called once after the last step: leave in ``model`` the weights the defense returns
        (by default, those training ended with)."""

    def describe(self) -> dict[str, Any]:
        """Name and every setting, for result files."""
        return {"name": self.name, **self.config.to_dict()}


def _split(output) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, tuple):
        return output[0], dict(output[1])
    return output, {}


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with gradients off: π_ref for losses that need its
    full output distribution (KLR, the MUSE-compatible NPO)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(name: str):
    """``@register_defense("npo")``: register a :class:`Defense` subclass and give it its name."""

    def add(cls: type[Defense]) -> type[Defense]:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"defense {name!r} must be a Defense subclass")
        cls.name = name
        return DEFENSES.register(name)(cls)

    return add


def build_defense(name: str, **settings: Any) -> Defense:
    """The defense ``name`` with its config built from ``settings`` (unknown setting ->
    UsageError naming the ones the defense takes). Validation happens here, before any model
    is loaded."""
    cls = DEFENSES.get(name)
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(
            f"defense {name!r} takes no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known))}"
        )
    return cls(cls.config_class(**settings))
