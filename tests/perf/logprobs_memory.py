"""Peak memory of the log-likelihood path at a given vocabulary, measured in a fresh process.

Run as ``python tests/perf/logprobs_memory.py IMPL MODE DTYPE BATCH LENGTH VOCAB``, it prints one
JSON line: the process's peak resident memory above what it held just before the call
(``resource.getrusage`` high-water mark minus the resident size with the logits already in
memory), and the size of one float32 ``[B, T, V]`` copy for scale.

* IMPL ``chunked``: :func:`benchmarks.core.logprobs.token_logps`;
  ``full``: the straightforward float32 ``cross_entropy`` over all logits (what it replaced).
* MODE ``train``: values and the backward pass into the logits (training losses);
  ``score``: values under ``torch.inference_mode`` (Min-K% scoring).
* DTYPE of the logits: ``float32`` (fp32 model) or ``bfloat16`` (a model under bf16 autocast).

tracemalloc does not see torch's allocations, hence a whole process per measurement. Set
``MALLOC_MMAP_THRESHOLD_=1048576`` so that glibc returns freed large blocks to the system
(otherwise its adaptive threshold keeps freed chunk-sized blocks resident and the high-water
mark counts them).
"""

from __future__ import annotations

import json
import resource
import sys


def full_token_logps(logits, input_ids):
    import torch.nn.functional as F

    logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    return -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(impl: str, mode: str, dtype: str, batch: int, length: int, vocab: int) -> dict:
    import torch

    from benchmarks.core.logprobs import token_logps

    torch.set_num_threads(1)
    fn = {"chunked": token_logps, "full": full_token_logps}[impl]
    generator = torch.Generator().manual_seed(0)
    # Drawn in the target dtype directly: a float32 draw converted afterwards would leave a
    # float32-sized high-water mark behind before the measurement starts.
    logits = torch.empty(batch, length, vocab, dtype=getattr(torch, dtype)).normal_(generator=generator)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    if mode == "train":
        logits.requires_grad_(True)
    before = _rss_bytes()
    if mode == "train":
        fn(logits, ids).sum().backward()
        result = logits.grad
    else:
        with torch.inference_mode():
            result = fn(logits, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    checksum = float(result[0, :4].double().sum())  # after the peak is read: no large temporaries
    return {
        "impl": impl, "mode": mode, "dtype": dtype, "batch": batch, "length": length, "vocab": vocab,
        "peak_above_start_mb": round(max(0, peak - before) / 2**20, 1),
        "logits_mb": round(logits.numel() * logits.element_size() / 2**20, 1),
        "fp32_copy_mb": round(batch * length * vocab * 4 / 2**20, 1),
        "checksum": checksum,
    }


if __name__ == "__main__":
    impl, mode, dtype, batch, length, vocab = sys.argv[1:7]
    print(json.dumps(measure(impl, mode, dtype, int(batch), int(length), int(vocab))))
