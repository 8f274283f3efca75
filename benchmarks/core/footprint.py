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
    largest: int = 0  # entries of the largest trainable tensor (0: unknown, taken as ``trainable``)


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
        largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    return ModelSize(parameters=total, trainable=trainable, config=config, largest=largest)


@dataclass(frozen=True)
class TrainingShape:
    """What sets a training's memory, besides the model."""

    micro_batch: int  # sequences per forward pass, per process
    max_length: int  # tokens per sequence
    mixed_precision: str = "no"  # "bf16": activations and logits in bf16
    gradient_checkpointing: bool = False
    sam: bool = False  # SAM keeps a copy of the trainable weights during its second pass
    reference_model: bool = False  # a frozen copy of the model (KL retain term, MUSE NPO)
    # benchmarks.unlearn's epoch selection keeps a CPU copy of the weights of the epoch it may
    # return, while the later epochs train: host memory (on a GPU, not the device's)
    kept_epoch_copy: bool = False
    # a backward pass adds into gradients already there (SAM's second pass and the retain
    # pass after it, gradient accumulation), rather than creating them
    accumulates: bool = False


def _activation_elements_per_token_per_layer(config) -> int:
    """Tensors a Llama-style decoder layer keeps for its backward pass, per token: the two
    RMSNorm inputs and outputs, q/k/v, the attention output and o-projection input, and the
    SwiGLU MLP's gate, up, activation and product (attention scores are not kept with SDPA)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    return 6 * hidden + 2 * kv * head_dim + 4 * intermediate


#: Parts held in host memory, not on the device: counted in a CPU process's total only.
HOST_PARTS = ("kept_epoch_copy",)


def estimate_peak_bytes(size: ModelSize, shape: TrainingShape, weight_bytes: int = 4, processes: int = 1,
                        sharded: bool = False, on_cpu: bool = False) -> dict[str, int]:
    """Approximate peak memory of one training process, by component, in bytes.

    Weights in ``weight_bytes`` each; float32 gradients and AdamW's two float32 moments for the
    trainable parameters, and the temporaries of its step; SAM's saved copy; the reference model; the activations kept for the
    backward pass at ``max_length`` (only each layer's input with gradient checkpointing, plus
    one layer recomputed); the logits and their gradient. The total counts the larger of the
    backward phase (activations and logits, and SAM's copy) and the optimizer step, which
    never coexist.
    ``processes`` > 1 with ``sharded``
    (FSDP full shard) divides weights, gradients, optimizer state and SAM's copy among them;
    without it (DDP) every process holds them all, plus DDP's gradient buckets. ``on_cpu``: the
    device is the host, so the host-memory parts (:data:`HOST_PARTS`: the kept epoch's weights
    of an unlearning run, held by the main process) count in the total too.
    """
    config = size.config
    tokens = shape.micro_batch * shape.max_length
    act_bytes = 2 if shape.mixed_precision == "bf16" else 4
    layers = config.num_hidden_layers
    per_layer = _activation_elements_per_token_per_layer(config) * tokens * act_bytes
    if shape.gradient_checkpointing:
        activations = layers * tokens * config.hidden_size * 4 + per_layer
    else:
        activations = layers * per_layer
    share = processes if (sharded and processes > 1) else 1
    parts = {
        "weights": size.parameters * weight_bytes // share,
        "gradients": size.trainable * 4 // share,
        "optimizer": size.trainable * 8 // share,
        # AdamW's step builds its denominator sqrt(v)/c + eps: on a GPU with the foreach
        # kernels, sqrt(v) for every parameter at once, divided in place; on a CPU (torch's
        # single-tensor loop) one parameter at a time, but as two temporaries, sqrt(v) and
        # sqrt(v)/c, so the largest tensor (a 128k-vocabulary embedding) counts twice.
        "optimizer_step": (2 * (size.largest or size.trainable) * 4 if on_cpu else size.trainable * 4 // share),
        "sam_copy": size.trainable * 4 // share if shape.sam else 0,
        "reference_model": size.parameters * weight_bytes // share if shape.reference_model else 0,
        "activations": activations,
        "logits": 2 * tokens * config.vocab_size * act_bytes,  # the logits and their gradient
    }
    if processes > 1 and not sharded:
        parts["ddp_buckets"] = size.trainable * 4
    parts["kept_epoch_copy"] = size.parameters * weight_bytes if shape.kept_epoch_copy else 0
    # The backward pass materialises the embedding-sized gradients before they reach .grad:
    # untied, the output head's and the input embedding's (each is the new .grad, or, when a
    # gradient is already there, a temporary added into it); tied, a third, their sum in
    # autograd's buffer, and the head's part waits in that buffer through the whole backward.
    # Counted in multiples of the embedding (tests/test_footprint.py measures them).
    embedding_entries = config.vocab_size * config.hidden_size
    embedding = embedding_entries * 4 // share
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if (size.largest or size.trainable) < embedding_entries:  # the embedding is frozen (LoRA)
        parts["embedding_grad_transients"], waiting = 0, 0
    elif tied:
        parts["embedding_grad_transients"] = (3 if shape.accumulates else 2) * embedding
        waiting = embedding
    else:
        parts["embedding_grad_transients"] = 2 * embedding if shape.accumulates else 0
        waiting = 0
    # Activations and logits are gone before the optimizer steps, and so is SAM's copy of the
    # weights (held from the ascent step through the step function's passes, dropped when it
    # returns, benchmarks.core.sam): the peak is the larger phase.
    # Within the backward phase, the activations and logits are needed at its start, the
    # embedding's gradients are complete at its end.
    backward = parts["sam_copy"] + max(parts["activations"] + parts["logits"] + waiting,
                                       parts["embedding_grad_transients"])
    phases = max(backward, parts["optimizer_step"])
    skipped = ("sam_copy", "activations", "logits", "embedding_grad_transients", "optimizer_step") + (
        () if on_cpu else HOST_PARTS)
    parts["total"] = sum(v for k, v in parts.items() if k not in skipped) + phases
    return parts


#: The multi-GPU case a plan estimates memory for, beside one GPU.
ESTIMATE_GPUS = 8


def checkpoint_estimate(ref: str | None, prepare: Callable | None, every: int = 0) -> str:
    """One line for a plan: the size of a resume checkpoint of a training of ``ref``."""
    from benchmarks.core.checkpoints import estimate_checkpoint_bytes, format_bytes

    size = model_size(ref, prepare) if ref else None
    spacing = f"every {every}+ steps" if every else "at every milestone"
    if size is None:
        return f"12 bytes per trainable parameter (model config not readable now), {spacing}, latest only"
    return (f"{format_bytes(estimate_checkpoint_bytes(size.trainable))} ({size.trainable:,} trainable parameters "
            f"x 12 bytes: float32 weights and AdamW's two moments), {spacing}, latest only")


def memory_estimate(ref: str | None, trainings: dict[str, tuple[Callable | None, TrainingShape]],
                    weight_bytes: int = 4, gpus: int = ESTIMATE_GPUS) -> dict | str:
    """For a plan: per training (``name -> (prepare, shape)``; ``prepare`` None trains every
    weight), the estimated peak per device on one GPU and on ``gpus`` under DDP and FSDP."""
    from benchmarks.core.checkpoints import format_bytes

    full = model_size(ref) if ref else None
    if full is None:
        return "unknown: the model's config is not readable now (a hub id not in the local cache, or an unbuilt world)"
    out: dict = {"note": "estimate: weights, float32 gradients, AdamW moments and step temporaries, SAM's copy, "
                         "reference model, activations at the maximum length, logits and their gradient, "
                         "the embedding-sized gradients the backward pass builds; "
                         "on a CPU, AdamW's step one tensor at a time (two temporaries of the largest) and "
                         "what the run keeps in host memory (the kept epoch's weights); "
                         "not the Python process itself (libraries, data, tokenizer)"}
    for name, (prepare, shape) in trainings.items():
        size = model_size(ref, prepare) if prepare is not None else full
        cases = {"1 CPU process": estimate_peak_bytes(size, shape, weight_bytes, on_cpu=True),
                 "1 GPU": estimate_peak_bytes(size, shape, weight_bytes),
                 f"{gpus} GPUs DDP": estimate_peak_bytes(size, shape, weight_bytes, gpus),
                 f"{gpus} GPUs FSDP": estimate_peak_bytes(size, shape, weight_bytes, gpus, sharded=True)}
        out[name] = {case: format_bytes(parts["total"]) for case, parts in cases.items()}
        out[name]["1 GPU parts"] = ", ".join(f"{k} {format_bytes(v)}" for k, v in cases["1 GPU"].items()
                                            if v and k != "total" and k not in HOST_PARTS)
        host = {k: v for k, v in cases["1 GPU"].items() if k in HOST_PARTS and v}
        if host:
            out[name]["host memory besides"] = ", ".join(f"{k} {format_bytes(v)}" for k, v in host.items())
    return out
