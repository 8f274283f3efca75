"""One optimizer step (forward + backward + clip + AdamW) of each training method, on the same
batch shape (``BATCH_SIZE`` chunks of ``SEQ_LEN`` tokens per forget/retain batch).

* ``npo_cached``: :class:`defenses.npo.NPO`, whose log π_ref values are computed once
  before training (``benchmarks.core.reference``);
* ``npo_reference``: the same loss with a frozen reference model run every step, as the MUSE
  and NPO+SAM code does (:class:`perf_support.ReferenceModelNPO`);
* ``npo_sam``: :class:`defenses.npo_sam.NPOSAM` (two forget passes, one retain pass);
* ``plain_finetune``: plain fine-tuning (next-token NLL) on the same batches, the baseline
  for the memory of an NPO step;
* ``relearn_finetune`` / ``relearn_lora``: the relearning attacks' steps;
* ``defense_step[NAME]``: the other registered defenses (randomized smoothing with its 3 draws,
  the gradient and curvature penalties, weight averaging, SimNPO, RMU), each timed back to
  back with ``npo_cached``: what a step costs relative to NPO's.

The NPO cases and their baseline run twice: with the forget term alone (``forget``: isolates
what the cache saves) and with MUSE-News's default GDR retain term (``gdr``, a retain batch of
the same shape in every step). Every case also records the peak tensor memory of one step
(:class:`perf_support.TensorMemoryTracker`).
"""

from __future__ import annotations

import pytest
import torch

from attacks import make_attack
from attacks.base import lm_loss
from benchmarks.core.logprobs import masked_mean_nll
from benchmarks.core.training import plain_step
from defenses import build_defense
from perf_support import (
    BATCH_SIZE,
    NPO_BETA,
    SEQ_LEN,
    ReferenceModelNPO,
    TrainingUnit,
    forward_matmul_flops,
    matmul_workload,
    measure_step_memory,
    packed_batch,
    paired_ratio,
    unlearning_batch,
)

ROUNDS = 10
WARMUP_ROUNDS = 2
#: Back-to-back pairs of steps for the paired ratios (see perf_support.paired_ratio).
PAIRED_ROUNDS = 6
MIB = 2**20
OBJECTIVES = {"forget": "none", "gdr": "gdr"}  # case id -> retain loss
NPO_GROUPS = {"forget": "npo step: forget term only", "gdr": "npo step: forget + GDR retain"}


def _tokens(batch) -> int:
    parts = [batch[k] for k in ("forget", "retain") if k in batch] or [batch]
    return sum(int(part["attention_mask"].sum()) for part in parts)


def _measure(benchmark, record, key: str, unit: TrainingUnit, full_training_flops: bool = False,
             close: bool = True) -> dict:
    """Time ``unit.step`` (pedantic: warmup rounds, then ROUNDS timed steps), then measure the
    memory of one more step, and record both."""
    benchmark.pedantic(unit.step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    memory = measure_step_memory(unit)
    extra = {
        "tokens_per_step": unit.tokens_per_step,
        "batch_shape": [BATCH_SIZE, SEQ_LEN],
        "peak_tensor_mib": round(memory.peak_bytes / MIB, 2),
        "owned_tensor_mib": round(memory.owned_bytes / MIB, 2),
        "memory_measure": "peak bytes of live tensor storage during one step, incl. weights, grads, "
                          "AdamW state, batch and any reference model or cache (dispatch-mode tracker)",
    }
    if full_training_flops:
        # Forward + backward of every linear layer over the step's tokens: 3x the forward's
        # matmul FLOPs (the "6 N D" count; attention scores excluded).
        extra["step_matmul_flops"] = 3 * forward_matmul_flops(unit.model, unit.tokens_per_step)
    record(key, **extra)
    if close:
        unit.close()
    return extra


def _plain_loss(model, batch) -> torch.Tensor:
    """Next-token NLL of every batch in the micro-batch, summed (plain gradient descent)."""
    return sum(masked_mean_nll(model, part["input_ids"], part["attention_mask"]) for part in batch.values())


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_plain_finetune(benchmark, record, perf_world, objective):
    benchmark.group = NPO_GROUPS[objective]
    model = perf_world.fresh_model()
    batch = unlearning_batch(perf_world, with_retain=objective == "gdr")
    batch = {name: {k: v for k, v in part.items() if k != "index"} for name, part in batch.items()}
    unit = TrainingUnit(model, plain_step(_plain_loss), [batch], list(model.parameters()), _tokens(batch))
    _measure(benchmark, record, f"plain_finetune[{objective}]", unit, full_training_flops=True, close=False)
    if objective == "forget" and benchmark.enabled:
        # Back to back with the matmuls of one forward pass over the same tokens (the
        # ``matmul`` case), for the fraction of the machine's matmul speed training reaches.
        matmuls = matmul_workload(unit.model, unit.tokens_per_step)
        ratio = paired_ratio(matmuls, unit.step, PAIRED_ROUNDS)
        record(f"plain_finetune[{objective}]", paired={"matmul": ratio}, paired_rounds=PAIRED_ROUNDS)
    unit.close()


def _npo_unit(perf_world, objective: str, defense_name: str) -> TrainingUnit:
    """A step of the registered defense ``defense_name`` (npo or npo_sam) with its reference
    log-likelihoods cached by ``Defense.setup``, as ``benchmarks.unlearn`` prepares it."""
    model = perf_world.fresh_model()
    batch = unlearning_batch(perf_world, with_retain=objective == "gdr")
    defense = build_defense(defense_name, beta=NPO_BETA, retain_loss=OBJECTIVES[objective])
    defense.setup(model, reference_batches=[batch["forget"]], num_forget_examples=BATCH_SIZE)
    return TrainingUnit(
        model, defense.step_fn(), [batch], list(model.parameters()), _tokens(batch),
        extra_owned=[defense.reference_logps.values],
    )


def _paired_with_npo_cached(record, perf_world, objective: str, key: str, unit: TrainingUnit) -> None:
    """Also time ``unit`` back to back with an ``npo_cached`` step (paired ratio)."""
    cached = _npo_unit(perf_world, objective, "npo")
    cached.step()  # AdamW state, first-call costs
    ratio = paired_ratio(cached.step, unit.step, PAIRED_ROUNDS)
    cached.close()
    record(key, paired={f"npo_cached[{objective}]": ratio}, paired_rounds=PAIRED_ROUNDS)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_npo_cached(benchmark, record, perf_world, objective):
    benchmark.group = NPO_GROUPS[objective]
    unit = _npo_unit(perf_world, objective, "npo")
    _measure(benchmark, record, f"npo_cached[{objective}]", unit, full_training_flops=True)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_npo_reference(benchmark, record, perf_world, objective):
    benchmark.group = NPO_GROUPS[objective]
    model = perf_world.fresh_model()
    batch = unlearning_batch(perf_world, with_retain=objective == "gdr")
    reference = ReferenceModelNPO(model, with_retain=objective == "gdr", beta=NPO_BETA)
    owned = list(reference.reference_model.parameters()) + list(reference.reference_model.buffers())
    unit = TrainingUnit(model, plain_step(reference), [batch], list(model.parameters()), _tokens(batch), owned)
    _measure(benchmark, record, f"npo_reference[{objective}]", unit, close=False)
    if benchmark.enabled:
        _paired_with_npo_cached(record, perf_world, objective, f"npo_reference[{objective}]", unit)
    unit.close()

    # Both compute the same loss: the cached table (from a copy of the model before any
    # update) equals the reference model's log-likelihoods, at the policy's current weights.
    cached = build_defense("npo", beta=NPO_BETA, retain_loss="none")
    cached.setup(perf_world.fresh_model(), reference_batches=[batch["forget"]], num_forget_examples=BATCH_SIZE)
    with torch.no_grad():
        cached_loss, _ = cached.forget_loss(unit.model, batch["forget"])
        reference_loss = reference.forget_loss(unit.model, batch["forget"])
    torch.testing.assert_close(cached_loss, reference_loss)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_npo_sam(benchmark, record, perf_world, objective):
    benchmark.group = NPO_GROUPS[objective]
    unit = _npo_unit(perf_world, objective, "npo_sam")
    _measure(benchmark, record, f"npo_sam[{objective}]", unit, close=False)
    if benchmark.enabled:
        _paired_with_npo_cached(record, perf_world, objective, f"npo_sam[{objective}]", unit)
    unit.close()


@pytest.mark.benchmark(group="relearning attack step")
def test_relearn_finetune(benchmark, record, perf_world):
    model = make_attack("finetune").prepare(perf_world.fresh_model())
    batch = packed_batch(perf_world.tokenizer, [r["text"] for r in perf_world.data.records("raw", "forget")])
    params = [p for p in model.parameters() if p.requires_grad]
    unit = TrainingUnit(model, plain_step(lm_loss), [batch], params, _tokens(batch))
    _measure(benchmark, record, "relearn_finetune", unit, full_training_flops=True)


@pytest.mark.benchmark(group="relearning attack step")
def test_relearn_lora(benchmark, record, perf_world):
    model = make_attack("lora").prepare(perf_world.fresh_model())
    batch = packed_batch(perf_world.tokenizer, [r["text"] for r in perf_world.data.records("raw", "forget")])
    params = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in params) < sum(p.numel() for p in model.parameters()) / 10
    unit = TrainingUnit(model, plain_step(lm_loss), [batch], params, _tokens(batch))
    _measure(benchmark, record, "relearn_lora", unit)
    benchmark.extra_info["trainable_parameters"] = sum(p.numel() for p in params)


#: Defenses timed against npo_cached, with settings that exercise their extra work.
DEFENSE_STEPS = {
    "npo_rs": {"beta": NPO_BETA, "rs_sigma": 1e-3, "rs_samples": 3},
    "npo_gp": {"beta": NPO_BETA, "gp_weight": 0.01},
    "npo_cr": {"beta": NPO_BETA, "cr_weight": 0.01},
    "npo_wa": {"beta": NPO_BETA},
    "simnpo": {},
    "rmu": {"rmu_layer": 2},
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("name", list(DEFENSE_STEPS))
def test_defense_step(benchmark, record, perf_world, objective, name):
    benchmark.group = NPO_GROUPS[objective]
    model = perf_world.fresh_model()
    # RMU's own retain term (activation matching) needs retain chunks whatever the objective.
    batch = unlearning_batch(perf_world, with_retain=objective == "gdr" or name == "rmu")
    settings = dict(DEFENSE_STEPS[name])
    if name == "rmu":
        settings["rmu_alpha"] = 1200.0 if objective == "gdr" else 0.0
    else:
        settings["retain_loss"] = OBJECTIVES[objective]
    defense = build_defense(name, **settings)
    defense.setup(model, reference_batches=[batch["forget"]], num_forget_examples=BATCH_SIZE)
    params = [p for p in model.parameters() if p.requires_grad]
    owned = [defense.reference_logps.values] if defense.reference_logps is not None else []
    if defense.reference_model is not None:
        owned += list(defense.reference_model.parameters())
    unit = TrainingUnit(model, defense.step_fn(), [batch], params, _tokens(batch), extra_owned=owned)
    key = f"{name}[{objective}]"
    _measure(benchmark, record, key, unit, close=False)
    if benchmark.enabled:
        _paired_with_npo_cached(record, perf_world, objective, key, unit)
    unit.close()
