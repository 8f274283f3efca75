"""LoRA relearning: low-rank adapters train, the base weights stay frozen (Hu et al., 2022,
"LoRA: Low-Rank Adaptation of Large Language Models"; the cheap attacker of Hu et al., 2024,
"Jogging the Memory of Unlearned LLMs").

The adapters come from ``peft``. Evaluation sees the adapted model (base + B·A·alpha/r); at step
0 the adapters are zero (B starts at 0), so the model is exactly the one under attack.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from attacks.base import ATTACKS, Attack, AttackConfig
from benchmarks.core.errors import UsageError


@dataclass
class LoraAttackConfig(AttackConfig):
    """Relearning through LoRA adapters.

    The learning rate defaults to 1e-4 rather than full fine-tuning's 1e-5: adapters start at
    zero and have few parameters, and LoRA is commonly run an order of magnitude hotter.
    """

    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate for the adapters."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (update = B A alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    lora_targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Module names to adapt (e.g. q_proj,v_proj); None: peft's default for the architecture."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 1:
            raise UsageError(f"LoRA rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise UsageError(f"LoRA alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"LoRA dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(str(t) for t in self.lora_targets)
            if not self.lora_targets or any(not t for t in self.lora_targets):
                raise UsageError("LoRA targets must be non-empty module names, e.g. q_proj,v_proj")


@ATTACKS.register("lora")
class LoraAttack(Attack):
    """Relearning by training LoRA adapters on the attacker's forget documents."""

    name = "lora"
    config_class = LoraAttackConfig
    trains_adapters_only = True  # peft keeps the adapters in float32 on a bf16 base

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        config = self.config
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets) if config.lora_targets else None,
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():
                # Notices from peft/transformers internals that say nothing about this run
                # (a deprecated property peft reads; GPT-2's Conv1D layers, which peft handles).
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
                # get_peft_model freezes every base weight and leaves only the adapters trainable.
                return get_peft_model(model, lora)
        except ValueError as err:
            raise UsageError(
                f"LoRA cannot adapt this model ({err}); name its linear layers with --lora-targets"
            ) from None

    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def load_trainable_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"adapter checkpoint does not fit the model: unexpected keys {unexpected[:3]}")
