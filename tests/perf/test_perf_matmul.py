"""What the machine does in plain matmuls at the model's shapes, in the same run: every
linear-layer matmul of one forward pass over one training batch (``BATCH_SIZE * SEQ_LEN``
tokens), as bare ``F.linear`` calls. Training throughput is read against this figure in the
summary (a training step is 3x these FLOPs: forward, and the backward's two products)."""

from __future__ import annotations

import pytest

from perf_support import BATCH_SIZE, SEQ_LEN, forward_matmul_flops, linear_shapes, matmul_workload


@pytest.mark.benchmark(group="matmul at the model's shapes")
def test_matmul(benchmark, record, perf_world):
    tokens = BATCH_SIZE * SEQ_LEN
    workload = matmul_workload(perf_world.model, tokens)
    benchmark.pedantic(workload, rounds=20, warmup_rounds=3, iterations=1)
    flops = forward_matmul_flops(perf_world.model, tokens)
    record(
        "matmul",
        rates={"flop_per_s": flops},
        tokens=tokens,
        flops_per_call=flops,
        shapes=sorted({f"[{tokens}x{i}]x[{i}x{o}]" for i, o in linear_shapes(perf_world.model)}),
    )
