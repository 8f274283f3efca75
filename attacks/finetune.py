"""Full fine-tuning: every weight of the model trains with AdamW (Fan et al., ICML 2025, §5)."""

from __future__ import annotations

import torch

from attacks.base import ATTACKS, Attack, AttackConfig


@ATTACKS.register("finetune")
class FinetuneAttack(Attack):
    """Relearning by full fine-tuning on the attacker's forget documents."""

    name = "finetune"
    config_class = AttackConfig

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
