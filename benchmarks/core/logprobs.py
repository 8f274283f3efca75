"""Token and sequence log-probabilities: the one implementation every loss and metric uses.

A sequence log-likelihood is log π(x) = Σ_t log p(x_t | x_<t) over the non-padding target
tokens (NPO, Zhang et al. 2024, §3). Padding never enters a sum: positions whose attention
mask is 0 (and, optionally, positions marked by a ``loss_mask`` of 0, such as a prompt) are
excluded.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F


#: Rows of logits turned into float32 at a time: 2**22 entries (16 MB) whatever the
#: vocabulary, e.g. 32 positions at Llama-3's 128256 tokens.
CHUNK_ENTRIES = 1 << 22


def _chunks(logits: torch.Tensor, chunk_entries: int):
    """``(b, start, end)`` covering positions 0..T-2 of every row, ``end - start`` bounded so
    that a float32 copy of ``logits[b, start:end]`` holds about ``chunk_entries`` numbers."""
    batch, length, vocab = logits.shape
    step = max(1, chunk_entries // vocab)
    for b in range(batch):
        for start in range(0, length - 1, step):
            yield b, start, min(start + step, length - 1)


class _TokenLogps(torch.autograd.Function):
    """log p(x_t | x_<t) = z_t[x_t] − logsumexp(z_t), one chunk of positions at a time.

    ``F.cross_entropy`` on ``logits.float()`` would hold a float32 copy of all logits and keep
    its full-vocabulary log-softmax for the backward pass (about 4 GB at batch 4 × 2048 tokens
    × 128k vocabulary, on top of the logits). Here the forward keeps only the per-position
    logsumexp, and the backward recomputes each chunk's softmax: ∂/∂z_t = g_t (onehot(x_t) −
    softmax(z_t)), written straight into a gradient in the logits' own dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_entries):
        batch, length, _ = logits.shape
        out = torch.empty((batch, length - 1), dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b, start, end in _chunks(logits, chunk_entries):
            chunk = logits[b, start:end].float()
            lse[b, start:end] = torch.logsumexp(chunk, dim=-1)
            out[b, start:end] = chunk.gather(-1, targets[b, start:end, None]).squeeze(-1) - lse[b, start:end]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_entries = chunk_entries
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position predicts nothing: its gradient is 0
        for b, start, end in _chunks(logits, ctx.chunk_entries):
            g = grad_out[b, start:end, None].float()
            # −softmax(z) · g, in place on one float32 copy of the chunk (a copy even when the
            # logits are float32 already: they must stay as they are)
            chunk = logits[b, start:end].to(torch.float32, copy=True)
            chunk.sub_(lse[b, start:end, None]).exp_().mul_(-g)
            chunk.scatter_add_(-1, targets[b, start:end, None], g)
            grad[b, start:end] = chunk.to(grad.dtype)
        return grad, None, None


_TWICE_DIFFERENTIABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("twice_differentiable", default=False)


@contextlib.contextmanager
def twice_differentiable_logps():
    """Context in which :func:`token_logps` takes the plain path, whose backward can itself be
    differentiated (``torch.autograd.grad(..., create_graph=True)`` for gradient penalties);
    the chunked path's hand-written backward cannot."""
    token = _TWICE_DIFFERENTIABLE.set(True)
    try:
        yield
    finally:
        _TWICE_DIFFERENTIABLE.reset(token)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, chunk_entries: int = CHUNK_ENTRIES) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1: shape ``[B, T-1]`` (first token has no prediction).

    Computed in float32 whatever the logits' dtype (float64 logits: in float64), so bf16 runs
    do not lose the small differences NPO works with, but never as a float32 copy of the whole
    ``[B, T, V]`` logits: see :class:`_TokenLogps` (the same numbers as a float32 log-softmax,
    to rounding).
    """
    targets = input_ids[:, 1:].contiguous()
    if logits.dtype == torch.float64 or _TWICE_DIFFERENTIABLE.get():
        # The plain path: float64 keeps every digit (finite-difference checks), and its backward
        # is itself differentiable (gradient penalties); it does hold a full log-softmax.
        shifted = logits[:, :-1, :]
        shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))
        return -F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                                reduction="none").view_as(targets)
    if logits.shape[1] < 2:
        return torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    return _TokenLogps.apply(logits, targets, chunk_entries)


def target_mask(attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the T-1 predicted positions count: the target and its context are both real
    tokens (this also handles left padding), and ``loss_mask`` (if given) marks the target."""
    mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if loss_mask is not None:
        mask &= loss_mask[:, 1:].bool()
    return mask


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_t log p(x_t | x_<t) over non-padding target tokens for each sequence: shape ``[B]``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = token_logps(logits, input_ids)
    mask = target_mask(attention_mask, loss_mask)
    return (per_token * mask).sum(dim=-1)


def masked_mean_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the non-padding target tokens of the
    batch (the usual language-modelling loss; pads excluded)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = token_logps(logits, input_ids)
    mask = target_mask(attention_mask, loss_mask)
    return -(per_token * mask).sum() / mask.sum().clamp(min=1)
