"""SAM's ‖g‖ under sharded gradients (FSDP): two real processes (gloo, CPU), each holding a
disjoint half of the gradient, perturb by the ε of the whole gradient, the same on both.

Here the shards are plain tensors (FSDP1's flat shards) handed to the two processes;
``tests/test_sam_fsdp.py`` runs the whole NPO+SAM step under FSDP2 (DTensor shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.core.sam import gradients_are_sharded, perturb

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from benchmarks.core.sam import perturb

    def shards():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(5, 3, generator=g) for _ in range(4)], [torch.randn(5, 3, generator=g) for _ in range(4)]

    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        weights, grads = shards()
        mine = range(rank * 2, rank * 2 + 2)  # rank 0 holds tensors 0-1, rank 1 tensors 2-3
        params = [torch.nn.Parameter(weights[i].clone()) for i in mine]
        for p, i in zip(params, mine):
            p.grad = grads[i].clone()
        result = perturb(params, 0.05, sharded=True)
        moved = [(p.detach() - weights[i]).tolist() for p, i in zip(params, mine)]
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"grad_norm": result.grad_norm, "scale": result.scale, "moved": moved}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
''')


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_gradient_shards_perturb_by_the_whole_gradients_epsilon(tmp_path):
    script = tmp_path / "sharded_sam.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], check=True, env=env, timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # One process with the whole gradient: the reference.
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 3, generator=g) for _ in range(4)]
    grads = [torch.randn(5, 3, generator=g) for _ in range(4)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    whole = perturb(params, 0.05)
    for rank in ranks:
        assert rank["grad_norm"] == pytest.approx(whole.grad_norm, rel=1e-6)
        assert rank["scale"] == pytest.approx(whole.scale, rel=1e-6)
    moved = ranks[0]["moved"] + ranks[1]["moved"]
    for p, w, m in zip(params, weights, moved):
        assert torch.allclose(p.detach() - w, torch.tensor(m), atol=1e-7)
    # Without the sum, each rank would have used its own shard's norm:
    assert ranks[0]["grad_norm"] > torch.sqrt(sum((x ** 2).sum() for x in grads[:2])).item() * 1.05


def test_only_fsdp_counts_as_sharded():
    from accelerate.utils import DistributedType

    class View:
        def __init__(self, kind, n):
            self.distributed_type, self.num_processes = kind, n

    assert gradients_are_sharded(View(DistributedType.FSDP, 2))
    assert not gradients_are_sharded(View(DistributedType.MULTI_CPU, 2))  # DDP: whole gradients
    assert not gradients_are_sharded(View(DistributedType.FSDP, 1))
    assert not gradients_are_sharded(object())  # a plain stand-in: one process


def test_a_training_the_main_process_runs_alone_is_not_sharded(monkeypatch):
    # Under FSDP, a training started by the main process alone (inside from_main) holds whole
    # gradients, and an all-reduce there would wait for processes that are not listening.
    from accelerate.utils import DistributedType

    import benchmarks.core.processes as processes

    class View:
        distributed_type, num_processes = DistributedType.FSDP, 2

    monkeypatch.setattr(processes, "_alone", 1)
    assert not gradients_are_sharded(View())
    monkeypatch.setattr(processes, "_alone", 0)
    assert gradients_are_sharded(View())
