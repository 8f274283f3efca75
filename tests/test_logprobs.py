"""Token log-probabilities computed chunk by chunk equal a float32 log-softmax over the whole
vocabulary, in value and in gradient, for float32 and bf16 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.core.logprobs import sequence_logps, token_logps


def reference_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The straightforward definition: log-softmax of all float32 logits, then gather."""
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _case(dtype, batch=3, length=9, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=g) * 4).to(dtype).requires_grad_(True)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return logits, ids


@pytest.mark.parametrize("chunk_entries", [1, 120, 1 << 24])  # one position per chunk, a few, all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_the_full_log_softmax(dtype, chunk_entries):
    logits, ids = _case(dtype)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(1))

    before = logits.detach().clone()
    got = token_logps(logits, ids, chunk_entries=chunk_entries)
    (got * weights).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    assert torch.equal(logits.detach(), before)  # the backward pass leaves the logits alone
    expected = reference_token_logps(logits, ids)
    (expected * weights).sum().backward()

    assert got.dtype == torch.float32 and got.shape == (3, 8)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-6)
    assert got_grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded once
    assert torch.allclose(got_grad.float(), logits.grad.float(), atol=tolerance)
    assert torch.count_nonzero(got_grad[:, -1]) == 0  # the last position predicts nothing


def test_hand_computed_value():
    """Two tokens, vocabulary 2: logits (0, ln 3) after the first token, target 1 ->
    log p = ln 3 − ln(1 + 3) = ln 0.75."""
    logits = torch.tensor([[[0.0, float(torch.log(torch.tensor(3.0)))], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1]])
    assert token_logps(logits, ids).item() == pytest.approx(float(torch.log(torch.tensor(0.75))), abs=1e-7)


def test_model_sequence_logps_gradients_match_reference(tiny_model, tiny_tokenizer):
    ids = torch.randint(3, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    tiny_model.train()
    sequence_logps(tiny_model, ids, mask).sum().backward()
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logits = tiny_model(input_ids=ids, attention_mask=mask).logits
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    (reference_token_logps(logits, ids) * valid).sum().backward()
    for name, p in tiny_model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6, rtol=1e-5), name
