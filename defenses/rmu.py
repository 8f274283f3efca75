"""RMU, Representation Misdirection for Unlearning (Li et al., 2024, "The WMDP Benchmark:
Measuring and Reducing Malicious Use With Unlearning", §5, Eqs. 1-2).

RMU works on the activations h^(ℓ) that layer ℓ outputs (the residual stream after decoder
layer ℓ), not on likelihoods. On forget data it pushes them toward a fixed random direction
scaled by c; on retain data it keeps them where the frozen model before unlearning puts them:

    L_forget = mean_t (1/d) ‖h_θ^(ℓ)(x_f)_t − c·u‖₂²                 (Eq. 1)
    L_retain = mean_t (1/d) ‖h_θ^(ℓ)(x_r)_t − h_frozen^(ℓ)(x_r)_t‖₂²   (Eq. 2)
    L = w_f · L_forget + α · L_retain

over the non-padding tokens t of the batch, d the hidden size (the 1/d is the element mean of
``F.mse_loss`` in the authors' code). u is drawn once per run, uniformly from [0, 1)^d and
normalised to unit length, as the authors' code draws it. Scrambling the forget activations
this way makes later layers see noise on forget inputs.

What trains: as in the authors' code (``--layer_ids 5,6,7 --param_ids 6`` on Zephyr-7B), only
chosen parameters of a few layers up to ℓ -- by default the MLP down-projection weight
(``mlp.down_proj.weight``) of layers ℓ−2, ℓ−1, ℓ; ``rmu_params`` may name other parameters
of those layers (e.g. ``mlp`` for the whole MLP). Everything else is frozen when training
starts. The paper's defaults (Zephyr-7B): ℓ = 7, c = 6.5, α = 1200, lr 5e-5; for the embedded
world's 4-layer target the ``world`` preset steers layer 2 with c = 300 (see ``world_settings``).

The MUSE retain term (``retain_loss``) is off by default; RMU's own retain term is weighted by
``rmu_alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from benchmarks.core.errors import UsageError
from defenses.base import Defense, DefenseConfig, register_defense


def rmu_forget_loss(activations: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean over real tokens of the per-element squared distance to ``control`` (``[d]``).

    ``activations``: ``[B, T, d]``; ``mask``: ``[B, T]``, 1 for real tokens."""
    per_token = (activations.float() - control.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def rmu_retain_loss(activations: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean over real tokens of the per-element squared distance to the frozen model's
    activations."""
    per_token = (activations.float() - frozen.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def random_control_vector(hidden_size: int, coefficient: float, seed: int) -> torch.Tensor:
    """c · u with u uniform on [0, 1)^d normalised to unit length (the authors' draw)."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return coefficient * u / u.norm()


def layer_activations(model, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """h^(ℓ): the hidden states after decoder layer ``layer`` (0-based), ``[B, T, d]``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    # hidden_states[0] is the embedding output; hidden_states[ℓ + 1] follows layer ℓ.
    return out.hidden_states[layer + 1]


def _parse_layers(text: str) -> tuple[int, ...] | None:
    if text.strip() == "auto":
        return None
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"rmu_train_layers must be 'auto' or comma-separated layer numbers, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise UsageError(f"rmu_train_layers must name layers >= 0, got {text!r}")
    return layers


@dataclass
class RMUConfig(DefenseConfig):
    retain_loss: str = field(
        default="none",
        metadata={"help": "Retain term: gdr (NLL on a retain batch), klr (KL to the model before "
                          "unlearning on a retain batch) or none."},
    )
    rmu_layer: int = field(default=7, metadata={"help": "RMU: layer ℓ (0-based) whose output activations are steered (paper: 7)."})
    rmu_steering_coeff: float = field(
        default=6.5, metadata={"help": "RMU: scale c > 0 of the random control vector (paper: 6.5 on Zephyr-7B)."}
    )
    rmu_alpha: float = field(
        default=1200.0, metadata={"help": "RMU: weight α >= 0 of the activation-matching retain term (paper: 1200)."}
    )
    rmu_train_layers: str = field(
        default="auto", metadata={"help": "RMU: comma-separated layers whose parameters train ('auto': ℓ-2, ℓ-1, ℓ)."}
    )
    rmu_params: str = field(
        default="mlp.down_proj.weight",
        metadata={"help": "RMU: comma-separated parameter names (or prefixes, e.g. mlp) within each trained layer."},
    )
    rmu_seed: int = field(default=0, metadata={"help": "RMU: seed of the random direction u."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.rmu_layer, int) and self.rmu_layer >= 0):
            raise UsageError(f"rmu_layer must be an integer >= 0, got {self.rmu_layer}")
        if not (math.isfinite(self.rmu_steering_coeff) and self.rmu_steering_coeff > 0):
            raise UsageError(f"rmu_steering_coeff must be a finite number > 0, got {self.rmu_steering_coeff}")
        if not (math.isfinite(self.rmu_alpha) and self.rmu_alpha >= 0):
            raise UsageError(f"rmu_alpha must be a finite number >= 0, got {self.rmu_alpha}")
        layers = _parse_layers(self.rmu_train_layers)
        if layers is not None and max(layers) > self.rmu_layer:
            raise UsageError(f"rmu_train_layers {self.rmu_train_layers!r} go past the steered layer {self.rmu_layer}: "
                             "a layer after ℓ cannot change h^(ℓ)")
        if not [p for p in self.rmu_params.split(",") if p.strip()]:
            raise UsageError("rmu_params must name at least one parameter, e.g. mlp.down_proj.weight")

    @property
    def train_layers(self) -> tuple[int, ...]:
        layers = _parse_layers(self.rmu_train_layers)
        return layers if layers is not None else tuple(range(max(0, self.rmu_layer - 2), self.rmu_layer + 1))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama-style)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UsageError(f"RMU cannot find the decoder layers of {type(model).__name__} (expected .model.layers)")
    return layers


@register_defense("rmu")
class RMU(Defense):
    """Steer layer ℓ's activations on forget data to c·u; keep them on retain data."""

    config_class = RMUConfig
    needs_reference_model = True  # the frozen model's retain activations
    # The embedded world's residual stream has per-token norms of the order of 100 (Zephyr's c = 6.5 is
    # small beside them), and its down-projections alone at lr 6e-4 with α 1200 left every score
    # at 100. c = 300, α = 100, the whole MLP of layers 0-2 and lr 3e-3 is the best point
    # found: KnowMem-forget 18.8 at KnowMem-retain 91.3 (epoch 4); no setting tried reached
    # KnowMem-forget <= 10 with KnowMem-retain >= 90 (results/world/unlearn/README.md).
    world_settings = {"rmu_layer": 2, "rmu_steering_coeff": 300.0, "rmu_alpha": 100.0, "rmu_params": "mlp",
                      "lr": 3e-3}

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.control: torch.Tensor | None = None

    @property
    def uses_retain(self) -> bool:
        return self.config.rmu_alpha > 0 or super().uses_retain

    def setup(self, model, reference_batches=None, num_forget_examples=None, accelerator=None) -> None:
        layers = decoder_layers(model)
        config = self.config
        if config.rmu_layer >= len(layers):
            raise UsageError(f"rmu_layer {config.rmu_layer} does not exist: the model has {len(layers)} layers "
                             f"(0-{len(layers) - 1}); pass --rmu-layer")
        super().setup(model, reference_batches, num_forget_examples, accelerator)
        wanted = [p.strip() for p in config.rmu_params.split(",") if p.strip()]
        model.requires_grad_(False)
        chosen = []
        for index in config.train_layers:
            for name, param in layers[index].named_parameters():
                if any(name == w or name.startswith(w + ".") for w in wanted):
                    param.requires_grad_(True)
                    chosen.append(f"{index}.{name}")
        if not chosen:
            raise UsageError(f"rmu_params {config.rmu_params!r} match no parameter of layers {config.train_layers}; "
                             f"a layer has: {', '.join(n for n, _ in layers[0].named_parameters())}")
        self.trained = chosen
        hidden = model.config.hidden_size
        self.control = random_control_vector(hidden, config.rmu_steering_coeff, config.rmu_seed).to(
            next(model.parameters()).device
        )

    def forget_loss(self, model, forget):
        if self.control is None:
            raise RuntimeError("RMU needs its control vector; call setup() before training")
        activations = layer_activations(model, forget, self.config.rmu_layer)
        return rmu_forget_loss(activations, self.control, forget["attention_mask"])

    def activation_retain_loss(self, model, retain) -> torch.Tensor:
        with torch.no_grad():
            frozen = layer_activations(self.reference_model, retain, self.config.rmu_layer)
        activations = layer_activations(model, retain, self.config.rmu_layer)
        return rmu_retain_loss(activations, frozen, retain["attention_mask"])

    def total_loss(self, model, batch):
        """``w_f · L_forget + α · L_retain(activations)`` (+ ``w_r`` times the MUSE retain term if set)."""
        forget = self.forget_loss(model, batch["forget"])
        metrics = {"forget_loss": forget.detach().float().item()}
        loss = self.config.forget_weight * forget
        if self.config.rmu_alpha > 0:
            retain = self.activation_retain_loss(model, batch["retain"])
            metrics["retain_loss"] = retain.detach().float().item()
            loss = loss + self.config.rmu_alpha * retain
        if self.retain_term.active and self.config.retain_weight > 0:
            extra = self.retain_loss(model, batch["retain"])
            metrics["retain_nll_or_kl"] = extra.detach().float().item()
            loss = loss + self.config.retain_weight * extra
        return loss, metrics
