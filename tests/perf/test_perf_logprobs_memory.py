"""Peak memory of the log-likelihood path at Llama-3's vocabulary (128256), the chunked
:func:`benchmarks.core.logprobs.token_logps` against a float32 ``cross_entropy`` over all
logits, each measured in its own process (``logprobs_memory.py``; torch's allocations are
invisible to tracemalloc).

What is asserted is the point of the change: the chunked path never holds a float32 copy of
the ``[B, T, V]`` logits — scoring needs almost nothing beyond the logits, training only the
gradient of the logits (in their dtype) — while the full path needs two to three such copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
VOCAB = 128256
BATCH, LENGTH = 2, 256


def _measure(impl: str, mode: str, dtype: str) -> dict:
    # A fixed mmap threshold: glibc otherwise raises it after the first large free, and then
    # keeps freed chunk-sized blocks in its heap, which the high-water mark counts as if live.
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(
        [sys.executable, str(HERE / "logprobs_memory.py"), impl, mode, dtype, str(BATCH), str(LENGTH), str(VOCAB)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["score", "train"])
def test_no_full_vocabulary_float32_copy(mode, dtype, capsys):
    full, chunked = _measure("full", mode, dtype), _measure("chunked", mode, dtype)
    copy_mb = full["fp32_copy_mb"]
    with capsys.disabled():
        print(f"\nlog-likelihood peak above the logits, {mode}, {dtype} logits [{BATCH}, {LENGTH}, {VOCAB}] "
              f"(one fp32 copy = {copy_mb} MB): full {full['peak_above_start_mb']} MB, "
              f"chunked {chunked['peak_above_start_mb']} MB")
    assert chunked["checksum"] == pytest.approx(full["checksum"], abs=1e-3)
    # The gradient of the logits (training) is the only logits-sized tensor left.
    grad_mb = chunked["logits_mb"] if mode == "train" else 0.0
    assert chunked["peak_above_start_mb"] < grad_mb + 0.5 * copy_mb
    assert full["peak_above_start_mb"] > grad_mb + 1.5 * copy_mb
