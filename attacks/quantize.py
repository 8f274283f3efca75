"""Post-training weight quantization as an attack (Zhang et al., ICLR 2025, "Catastrophic
Failure of LLM Unlearning via Quantization": on MUSE-News an unlearned model's KnowMem-forget
goes from 21 % at full precision to 83 % after 4-bit quantization, because unlearning with a
small learning rate moves the weights less than a quantization step, and rounding snaps many of
them back to where the target had them). No training: the model is measured as given (step 0)
and after quantization.

Round-to-nearest (RTN), per output channel or per group of ``quant_group_size`` consecutive
input weights of a row, at ``quant_bits`` bits (8 and 4 are the studied settings):

* symmetric (default): ``Δ = max|w| / (2^(N-1) − 1)``, ``Q(w) = Δ · clamp(round(w/Δ),
  −(2^(N-1) − 1), 2^(N-1) − 1)``, so ``|w − Q(w)| ≤ Δ/2`` and the largest weight is exact;
* asymmetric: ``Δ = (max w − min w) / (2^N − 1)``, zero point ``z = round(−min w / Δ)``,
  ``Q(w) = Δ · (clamp(round(w/Δ) + z, 0, 2^N − 1) − z)``; again ``|w − Q(w)| ≤ Δ/2``.

The model is *fake*-quantized: each weight is replaced in place by its dequantized value
``Q(w)`` in the model's own dtype, so every evaluation path (generation, log-likelihoods, LoRA,
later fine-tuning) runs unchanged and sees exactly the quantized function. What is quantized:
the weights of the ``nn.Linear`` layers inside the decoder (attention and MLP projections), the
layers GPTQ/AWQ/bitsandbytes quantize; embeddings, norms and the output head stay as they are
(``quant_lm_head`` includes the head when it is not tied to the embeddings). A model with LoRA
adapters (``lora+quantize``) is quantized as it would be deployed: a copy with the adapters
merged into the weights.

``quant_backend bitsandbytes`` (CUDA with ``bitsandbytes`` installed) instead reloads the model
through transformers' ``BitsAndBytesConfig`` (LLM.int8 at 8 bits, NF4 at 4 bits): the real
quantized kernels a user would deploy. That path needs a GPU and is not exercised by the test
suite.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from dataclasses import dataclass, field

import torch

from attacks.base import ATTACKS, AttackConfig, WeightTransform
from benchmarks.core.errors import UsageError

logger = logging.getLogger(__name__)

BACKENDS = ("rtn", "bitsandbytes")
SCHEMES = ("symmetric", "asymmetric")


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
                  scheme: str = "symmetric") -> torch.Tensor:
    """RTN quantize-then-dequantize of a 2-D weight ``[out, in]``, per row (``group_size``
    None) or per group of ``group_size`` consecutive entries of a row; computed in float32 and
    returned in the weight's dtype."""
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    if cols % size:
        raise UsageError(f"quant_group_size {size} does not divide a layer's {cols} input features; "
                         "choose a divisor (e.g. 32, 64, 128) or 0 for per-channel scales")
    groups = weight.detach().float().reshape(rows, cols // size, size)
    if scheme == "symmetric":
        top = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=-1, keepdim=True) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
        quantized = torch.clamp(torch.round(groups / scale), -top, top) * scale
    elif scheme == "asymmetric":
        top = 2 ** bits - 1
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = (high - low) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
        quantized = (torch.clamp(torch.round(groups / scale) + zero, 0, top) - zero) * scale
    else:
        raise UsageError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return quantized.reshape(rows, cols).to(weight.dtype)


@dataclass
class QuantizeConfig(AttackConfig):
    """Post-training quantization. The training settings of :class:`AttackConfig` do not apply;
    ``steps`` is fixed at 1, the "after" point of the curve."""

    quant_bits: int = field(default=4, metadata={"help": "Bits per weight, 2-8 (Zhang et al. 2025 study 8 and 4)."})
    quant_group_size: int = field(
        default=0,
        metadata={"help": "Weights per quantization group along a row; 0: one scale per output channel."},
    )
    quant_scheme: str = field(default="symmetric", metadata={"help": "RTN grid: symmetric (absmax) or asymmetric (min-max)."})
    quant_backend: str = field(
        default="rtn",
        metadata={"help": "rtn (fake-quantize in place, any device) or bitsandbytes (reload with its 8/4-bit "
                          "kernels; CUDA and bitsandbytes needed)."},
    )
    quant_lm_head: bool = field(default=False, metadata={"help": "Also quantize an untied output head."})

    def __post_init__(self) -> None:
        self.steps = 1
        super().__post_init__()
        if not (isinstance(self.quant_bits, int) and 2 <= self.quant_bits <= 8):
            raise UsageError(f"quant_bits must be an integer from 2 to 8, got {self.quant_bits}; e.g. --quant-bits 4")
        if not (isinstance(self.quant_group_size, int) and self.quant_group_size >= 0):
            raise UsageError(f"quant_group_size must be an integer >= 0 (0: per channel), got {self.quant_group_size}")
        if self.quant_scheme not in SCHEMES:
            raise UsageError(f"unknown quant_scheme {self.quant_scheme!r}; valid: {', '.join(SCHEMES)}")
        if self.quant_backend not in BACKENDS:
            raise UsageError(f"unknown quant_backend {self.quant_backend!r}; valid: {', '.join(BACKENDS)}")
        if self.quant_backend == "bitsandbytes":
            if self.quant_bits not in (4, 8):
                raise UsageError(f"bitsandbytes quantizes to 4 or 8 bits, got quant_bits {self.quant_bits}")
            if self.quant_group_size or self.quant_scheme != "symmetric":
                raise UsageError("quant_group_size and quant_scheme set the rtn backend; bitsandbytes uses its own "
                                 "(block-wise NF4 at 4 bits, LLM.int8 at 8)")


def _is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def quantize_layer(layer: torch.nn.Module, bits: int, group_size: int | None, scheme: str) -> None:
    """Fake-quantize one layer's weight in place, per output channel. ``nn.Linear`` stores
    ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``, so its weight is quantized transposed."""
    if _is_conv1d(layer):
        layer.weight.copy_(fake_quantize(layer.weight.t(), bits, group_size, scheme).t())
    else:
        layer.weight.copy_(fake_quantize(layer.weight, bits, group_size, scheme))


def quantized_linears(model: torch.nn.Module, include_head: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers RTN quantizes (``nn.Linear``, and GPT-2's ``Conv1D``): those inside the
    decoder, plus an untied output head when asked (a head tied to the input embeddings is never
    quantized here)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    chosen = []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or _is_conv1d(module)):
            continue
        if module is head and (tied or not include_head):
            continue
        chosen.append((name, module))
    if not chosen:
        raise UsageError(f"found no linear layers to quantize in {type(model).__name__}")
    return chosen


@ATTACKS.register("quantize")
class QuantizeAttack(WeightTransform):
    """Round-to-nearest weight quantization (or bitsandbytes' kernels), measured once."""

    name = "quantize"
    config_class = QuantizeConfig

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        config = self.config
        if _has_adapters(model):
            # LoRA adapters (a lora+quantize plan): a deployed model has them merged into its
            # weights before quantizing, so a merged copy is quantized and the adapters stay.
            model = copy.deepcopy(model).merge_and_unload()
        if config.quant_backend == "bitsandbytes":
            return _bitsandbytes_copy(model, config.quant_bits)
        group = config.quant_group_size or None
        layers = quantized_linears(model, config.quant_lm_head)
        for _, layer in layers:
            quantize_layer(layer, config.quant_bits, group, config.quant_scheme)
        logger.info("quantized %d linear layers to %d bits (%s, %s)", len(layers), config.quant_bits,
                    config.quant_scheme, f"groups of {group}" if group else "per channel")
        return model


    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The quantized model for the block; only the weights RTN changes are saved (on the
        CPU) and put back, not the whole state."""
        if self.config.quant_backend == "bitsandbytes" or _has_adapters(model):  # a copy: nothing to restore
            yield self.apply(model)
            return
        layers = quantized_linears(model, self.config.quant_lm_head)
        saved = [layer.weight.detach().to("cpu", copy=True) for _, layer in layers]
        try:
            yield self.apply(model)
        finally:
            with torch.no_grad():
                for (_, layer), weight in zip(layers, saved):
                    layer.weight.copy_(weight.to(layer.weight.device))


def _has_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries peft adapters that merge into its weights."""
    return callable(getattr(model, "merge_and_unload", None))


def _bitsandbytes_copy(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """The model reloaded with bitsandbytes' 8-bit (LLM.int8) or 4-bit (NF4) weights on CUDA."""
    if not torch.cuda.is_available():
        raise UsageError("quant_backend bitsandbytes needs a CUDA device; use quant_backend rtn on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("quant_backend bitsandbytes needs the bitsandbytes package (pip install bitsandbytes); "
                         "or use quant_backend rtn") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=next(model.parameters()).dtype))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        quantized = AutoModelForCausalLM.from_pretrained(directory, quantization_config=settings, device_map="cuda")
    return quantized.eval()
