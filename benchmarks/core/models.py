"""Loading checkpoints and building the tiny Llama architecture used by the embedded world.

Checkpoints are standard Hugging Face directories or hub ids, loaded with plain
``AutoModelForCausalLM`` / ``AutoTokenizer``. ``trust_remote_code`` stays off unless the user
asks for it (DESIGN §8).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.core.errors import UsageError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hub repository ids: ``owner/name``, or a bare ``name`` for the hub's canonical models (``gpt2``).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_ref(ref: str) -> str:
    """Validate a model reference before anything loads: an existing checkpoint directory
    (with a ``config.json``) or something shaped like a hub id (``owner/name`` or ``gpt2``)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model path {ref!r} has no config.json; point --model at a Hugging Face "
                "checkpoint directory (one written by save_pretrained)"
            )
        return str(path)
    if (ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1) or not _HUB_ID.match(ref)
            or "--" in ref or ".." in ref or len(ref) > 96 or ref.endswith(".git")):
        raise UsageError(
            f"model {ref!r} is neither an existing directory nor a hub id like 'owner/name' or 'gpt2'; "
            "check the path"
        )
    return ref


def load_model(
    ref: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` for a checkpoint directory or hub id, in eval mode.

    The tokenizer gets a pad token (its EOS) if it has none, since batched scoring and
    generation need one; padding side is left to the caller.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = check_model_ref(ref)
    logger.info("loading %s (%s)", ref, dtype)
    tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Straight onto the device in the requested dtype: no float32 copy on the CPU first.
    model = AutoModelForCausalLM.from_pretrained(
        ref, dtype=resolve_dtype(dtype), device_map=torch.device(device), trust_remote_code=trust_remote_code
    )
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the tiny Llama models trained from scratch on the embedded world."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UsageError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )


def tiny_llama(spec: TinyLlamaSpec, tokenizer, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` of the given shape for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def context_length(model) -> int:
    """The longest sequence the model accepts (``max_position_embeddings``, else 2048)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)
