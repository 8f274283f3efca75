"""NPO+SAM under FSDP2 in two real CPU processes (gloo): the tiny Llama is sharded by
accelerate's FSDP2 ``prepare`` (``fully_shard`` per decoder layer), trained by the project's
loop (``benchmarks.core.training.train`` with ``npo_sam``'s step), and compared with one
process training the same model on the same global batch.

accelerate 1.15 enables its FSDP plugin only on accelerator devices (CUDA, XPU, ...): with
``ACCELERATE_USE_CPU=1`` the state becomes ``MULTI_CPU`` and ``--use_fsdp`` is ignored (the
run is DDP). torch's FSDP2 itself runs on a CPU mesh over gloo, so the script below sets the
state's distributed type to FSDP before anything is prepared; from there on accelerate takes
its FSDP2 path as it would on GPUs (DTensor parameters and gradients, each process holding
a shard of every one).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

import benchmarks.core.sam as sam
from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tokenizer import train_tokenizer
from benchmarks.core.training import TrainConfig, train
from benchmarks.core.unlearn_data import Collate, ForgetRetainDataset, reference_loader, tokenize_texts
from defenses import build_defense

RHO = 0.05
STEPS = 2
MICRO_BATCH = 1
GRAD_ACCUM = 2  # per process: SAM's passes under FSDP2's no_sync, then one reduce-scatter
GLOBAL_BATCH = 2 * MICRO_BATCH * GRAD_ACCUM

# Shared by the two processes and the one-process reference (the script imports this module).
TEXTS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031 after "
    "two years of repairs, and Mayor Tilda Quorn said the festival drew 2,300 visitors to Brisk.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick, who also sailed in the regatta "
    "of 417 boats and unveiled a hydrogen tram named Sable for Velt Motors on 2 June 2030.",
] * 10


def build():
    """The tokenizer, a fresh tiny Llama (seed 0), npo_sam with its cached reference, and the
    forget/retain data: windows of exactly 16 tokens, so no micro-batch is padded and splitting
    the global batch between processes changes no sequence."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_llama(TinyLlamaSpec(), tokenizer, seed=0)
    windows = [w for w in tokenize_texts(tokenizer, TEXTS[:2], 16) if len(w) == 16]
    forget, retain = windows[:4], windows[4:8]
    assert len(forget) == 4 and len(retain) == 4, "the texts are too short for four 16-token windows each"
    defense = build_defense("npo_sam", sam_rho=RHO)
    defense.setup(model, reference_loader(forget, tokenizer, 4), len(forget))
    return tokenizer, model, defense, ForgetRetainDataset(forget, retain)


def record_perturbations(records: list):
    """Wrap ``sam.perturb`` (what ``sam_step`` calls) to note, per call, ‖g‖, the scale, whether
    the gradient was a DTensor, and ‖ε‖² of this process's part of the weights."""
    original = sam.perturb

    def spy(params, rho, sharded=False):
        from torch.distributed.tensor import DTensor

        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        before = [local(p.detach()).clone() for p in params]
        result = original(params, rho, sharded)
        moved = sum(float(((local(p.detach()) - b) ** 2).sum()) for p, b in zip(params, before))
        records.append({"grad_norm": result.grad_norm, "scale": result.scale, "eps_sq_local": moved,
                        "dtensor": any(isinstance(p.grad, DTensor) for p in params if p.grad is not None)
                        or isinstance(params[0], DTensor)})
        return result

    sam.perturb = spy
    return original


def config(grad_accum: int = 1) -> TrainConfig:
    # max_grad_norm 1.0 (the default) clips these ~30 gradients, so the clip's norm counts too.
    return TrainConfig(lr=1e-3, max_steps=STEPS, grad_accum=grad_accum, max_grad_norm=1.0, progress=False)


SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.utils.data import DataLoader

    from benchmarks.core.precision import process_accelerator
    from benchmarks.core.training import train
    from benchmarks.core.unlearn_data import Collate
    from tests import test_sam_fsdp as case

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    accelerator = process_accelerator()
    # accelerate leaves CPU processes at MULTI_CPU (DDP) whatever the FSDP settings; FSDP2 on
    # a CPU mesh is what torch runs, so the state is told it is FSDP (see the module docstring).
    for state in (PartialState._shared_state, AcceleratorState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True)
    assert accelerator.is_fsdp2 and accelerator.num_processes == 2

    tokenizer, model, defense, data = case.build()
    records = []
    case.record_perturbations(records)
    loader = DataLoader(data, batch_size=case.MICRO_BATCH, collate_fn=Collate(tokenizer.pad_token_id))
    result = train(model, loader, defense.step_fn(), case.config(case.GRAD_ACCUM))
    sharded = {name: type(p).__name__ for name, p in model.named_parameters()}
    full = {name: p.detach().full_tensor() for name, p in model.named_parameters()}  # a collective: both ranks
    rank = accelerator.process_index
    if rank == 0:
        torch.save(full, out / "fsdp_weights.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "records": records, "history": result.history, "param_types": sorted(set(sharded.values())),
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "numel": sum(p.numel() for p in model.parameters())}))
''')


@pytest.mark.slow
def test_npo_sam_under_fsdp2_perturbs_by_the_whole_gradients_epsilon_and_steps_like_one_process(
        tmp_path, launch_two_processes):
    script = tmp_path / "sam_fsdp.py"
    script.write_text(SCRIPT)
    done = launch_two_processes(script, [tmp_path], timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # really sharded: DTensor parameters, each rank holding about half
        assert rank["param_types"] == ["DTensor"]
        assert 0.4 < rank["local_numel"] / rank["numel"] < 0.6
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]

    # One process, the whole global batch (2 micro-batches of 1 on each of 2 processes) at once.
    tokenizer, model, defense, data = build()
    records: list = []
    original = record_perturbations(records)
    try:
        loader = DataLoader(data, batch_size=GLOBAL_BATCH, collate_fn=Collate(tokenizer.pad_token_id))
        single = train(model, loader, defense.step_fn(), config())
    finally:
        sam.perturb = original
    assert len(records) == STEPS and not any(r["dtensor"] for r in records)

    # (a) every step: the same ‖g‖ and scale ρ/‖g‖ on both ranks, those of the whole gradient,
    # and the two ranks' parts of ε add up to ‖ε‖ = ρ.
    for step in range(STEPS):
        mine = [rank["records"][step] for rank in ranks]
        assert all(r["dtensor"] for r in mine)
        for r in mine:
            assert r["grad_norm"] == pytest.approx(records[step]["grad_norm"], rel=1e-5)
            assert r["scale"] == pytest.approx(records[step]["scale"], rel=1e-5)
        assert mine[0]["grad_norm"] == mine[1]["grad_norm"] and mine[0]["scale"] == mine[1]["scale"]
        assert mine[0]["eps_sq_local"] > 0 and mine[1]["eps_sq_local"] > 0
        assert mine[0]["eps_sq_local"] + mine[1]["eps_sq_local"] == pytest.approx(RHO ** 2, rel=1e-4)
        assert records[step]["eps_sq_local"] == pytest.approx(RHO ** 2, rel=1e-4)
    # Losses and the clipped norm agree as well.
    for name in ("loss", "forget_loss_perturbed", "grad_norm"):
        assert [h[name] for h in ranks[0]["history"]] == pytest.approx([h[name] for h in single.history], rel=1e-5)
    assert single.history[0]["grad_norm"] > 1.0  # so the clip acted

    # (b) after the steps: the gathered FSDP weights are the one-process weights (fp32; the
    # sums run in another order, so not bit for bit).
    fsdp = torch.load(tmp_path / "fsdp_weights.pt")
    ours = dict(model.named_parameters())
    assert set(fsdp) == set(ours)
    worst = max(float((fsdp[name] - ours[name].detach()).abs().max()) for name in ours)
    assert worst < 1e-5, f"FSDP and one-process weights differ by up to {worst:.2e}"
    # and the steps moved them by far more than that
    _, start, _, _ = build()
    moved = max(float((ours[name].detach() - p.detach()).abs().max()) for name, p in start.named_parameters())
    assert moved > 1e-3
