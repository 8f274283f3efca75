"""How big a model is, read from its config alone (no weights are loaded): for the plan that
``--dry-run`` prints (checkpoint sizes, parameter counts).

The model is instantiated on PyTorch's ``meta`` device, where tensors have shapes but no
storage, so counting the parameters of a 7B model costs a second and no memory; the attack's
own :meth:`prepare` runs on it too, so LoRA's adapters are counted as they will be created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    parameters: int  # distinct parameters (tied embeddings counted once)
    trainable: int  # what the attack trains
    config: object  # the transformers config


def model_size(ref: str, prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> ModelSize | None:
    """Parameter counts of the checkpoint ``ref`` (a directory, or a hub id whose config is in
    the local cache: a plan reaches no network), after ``prepare`` (an attack's); None when its
    config cannot be read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError) as err:
        logger.debug("no config for %s: %s", ref, err)
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        if prepare is not None:
            model = prepare(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSize(parameters=total, trainable=trainable, config=config)
