"""``benchmarks.core.processes`` in two real CPU processes (accelerate launch, gloo): what the
main process computes reaches both, its errors too, a cache it writes first is there for the
other, measuring hooks run once, a training started by the main process alone runs
without DDP while a training on both averages their gradients, and each process closes its
process group before the interpreter shuts down."""

from __future__ import annotations

import json
import textwrap

import pytest

from benchmarks.core.processes import (
    close_process_group,
    from_main,
    main_first,
    main_only,
    processes_record,
    running_alone,
    world_size,
)

SCRIPT = textwrap.dedent('''
    import atexit, json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    # Registered before the accelerator exists, so it runs after the accelerator's own exit
    # handler (atexit is last in, first out): it sees whether the group was closed in time.
    def note_group_at_exit():
        (Path(sys.argv[1]) / f"exit{RANK[0]}.json").write_text(json.dumps({"group_open": dist.is_initialized()}))
    RANK = [None]
    atexit.register(note_group_at_exit)

    from benchmarks.core.errors import UsageError
    from benchmarks.core.processes import from_main, is_main, main_first, main_only, running_alone, world_size
    from benchmarks.core.training import TrainConfig, plain_step, train

    out = Path(sys.argv[1])
    seen = {"world_size": world_size(), "main": is_main()}
    rank = 0 if is_main() else 1
    RANK[0] = rank
    assert dist.is_initialized()

    # A value computed on the main process only (its rank) reaches both.
    seen["from_main"] = from_main(lambda: {"rank": rank, "alone": running_alone()})

    # The main process's usage error is raised on both, with its message.
    def refuse():
        raise UsageError("--thing 3 is wrong; pass --thing 2")
    try:
        from_main(refuse)
    except UsageError as err:
        seen["error"] = str(err)

    # A file the main process writes first is there when the other reads it.
    def write_then_read():
        cache = out / "cache.txt"
        if not cache.exists():
            cache.write_text(f"written by {rank}")
        return cache.read_text()
    seen["main_first"] = main_first(write_then_read)

    calls = []
    main_only(lambda: calls.append(running_alone()))()
    seen["main_only_calls"] = calls

    def model_and_data(step_rows):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        g = torch.Generator().manual_seed(1)
        rows = [{"x": torch.randn(3, generator=g), "y": torch.randn(1, generator=g)} for _ in range(step_rows)]
        return model, DataLoader(rows, batch_size=1)

    def loss(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    config = TrainConfig(lr=0.1, max_steps=2, max_grad_norm=0.5, progress=False)
    # On both processes (DDP): 4 rows in micro-batches of 1, one per process per step.
    model, data = model_and_data(4)
    result = train(model, data, plain_step(loss), config)
    seen["ddp"] = {"weight": model.weight.detach().flatten().tolist(), "losses": [h["loss"] for h in result.history]}
    seen["ddp_grad_norms"] = [h["grad_norm"] for h in result.history]

    # On the main process alone, while the other waits: no collective may run.
    def alone():
        model, data = model_and_data(4)
        result = train(model, data, plain_step(loss), TrainConfig(lr=0.1, max_steps=2, max_grad_norm=0.5,
                                                                  grad_accum=2, progress=False))
        seen["alone_grad_norms"] = [h["grad_norm"] for h in result.history]
        return {"weight": model.weight.detach().flatten().tolist(), "losses": [h["loss"] for h in result.history]}
    seen["alone"] = from_main(alone)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
''')


def test_closing_the_process_group_destroys_it_once(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert close_process_group() is True
        assert not dist.is_initialized()
        assert close_process_group() is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_what_the_main_process_computes(tmp_path, launch_two_processes):
    script = tmp_path / "processes_check.py"
    script.write_text(SCRIPT)
    done = launch_two_processes(script, [tmp_path])
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["world_size"] == other["world_size"] == 2 and main["main"] and not other["main"]
    assert main["from_main"] == other["from_main"] == {"rank": 0, "alone": True}
    assert main["error"] == other["error"] == "--thing 3 is wrong; pass --thing 2"
    assert main["main_first"] == other["main_first"] == "written by 0"
    # Each process destroyed its process group at exit, before the interpreter shut down.
    assert [json.loads((tmp_path / f"exit{r}.json").read_text()) for r in (0, 1)] == [{"group_open": False}] * 2
    assert main["main_only_calls"] == [True] and other["main_only_calls"] == []
    # DDP: the same weights on both; the loss of each step is the mean over the two processes.
    assert main["ddp"] == other["ddp"]
    # The training on the main process alone (2 micro-batches of 1 per step, accumulated) is
    # the DDP training's computation on one process, so it ends at the same weights.
    assert main["alone"] == other["alone"]
    assert main["alone"]["weight"] == pytest.approx(main["ddp"]["weight"], rel=1e-6)
    assert main["alone"]["losses"] == pytest.approx(main["ddp"]["losses"], rel=1e-6)
    # Clipped by the norm of the whole (averaged) gradient in both.
    assert main["alone_grad_norms"] == pytest.approx(main["ddp_grad_norms"], rel=1e-6)
    assert max(main["ddp_grad_norms"]) > 0.5  # so the clip acted


def test_one_process_calls_through():
    assert world_size() == 1
    assert from_main(lambda: 7) == 7
    assert main_first(lambda: "x") == "x"
    calls = []
    main_only(calls.append)(1)
    assert calls == [1] and not running_alone()

    def fail():
        raise ValueError("kept as it is")

    with pytest.raises(ValueError, match="kept as it is"):
        from_main(fail)


def test_the_processes_record_names_the_global_batch():
    record = processes_record(4, 2, 16)
    assert record == {"world_size": 1, "distributed_type": "NO", "batch_size_per_process": 4, "micro_batch_size": 2,
                      "gradient_accumulation": 2, "global_batch_size": 4,
                      "evaluation": {"processes": "main process only", "batch_size": 16}}


def test_closing_the_process_group_frees_a_ddp_wrapper_left_in_a_reference_cycle(tmp_path):
    # A DDP wrapper holds the gloo group; in a reference cycle it would outlive the group's
    # destruction until interpreter shutdown. Whether a trained wrapper is in one by itself
    # depends on what ran before in the process, so the test makes the cycle. Closing collects
    # it while Python is whole.
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gc.disable()  # so that only close_process_group can collect the cycle
    try:
        wrapper = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapper(torch.ones(3, 2)).sum().backward()  # one step, as every trained wrapper has taken
        wrapper.itself = [wrapper]  # the cycle
        alive = weakref.ref(wrapper)
        del wrapper
        assert alive() is not None  # only a collection frees it
        assert close_process_group() is True
        assert alive() is None
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
