"""Performance suite (pytest-benchmark): the project's code side by side with straightforward
reference implementations in the same run, on the world-shaped tiny Llama, 2 torch threads.

It is left out of the default test run (``addopts = --ignore=tests/perf`` in pyproject.toml).
Run it with::

    .venv/bin/python -m pytest tests/perf -p no:cacheprovider -o addopts=""

(``-o addopts=""`` drops the ``--ignore``). Save a baseline and compare a later run with it::

    .venv/bin/python -m pytest tests/perf -p no:cacheprovider -o addopts="" --benchmark-autosave
    .venv/bin/python -m pytest tests/perf -p no:cacheprovider -o addopts="" \\
        --benchmark-compare --benchmark-compare-fail=mean:10%

Nothing here asserts a time. Ratios the project aims for are printed in a summary at the end
of the run ("relearn-bench performance ratios"), computed from the medians of this run;
correctness that the comparisons rest on (batched and one-by-one evaluation give the same
scores, cached and recomputed reference log-likelihoods agree) is asserted.
"""

from __future__ import annotations

import pytest
import torch

from perf_support import THREADS, PerfWorld, load_perf_world

torch.set_num_threads(THREADS)

#: Figures of every benchmark of this run, by short name ("npo_cached[forget]"), for the summary.
RESULTS: dict[str, dict] = {}


def pytest_configure(config) -> None:
    # The repository conftest sets threads too; fix the count here whatever it chose.
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def perf_world() -> PerfWorld:
    torch.set_num_threads(THREADS)
    return load_perf_world()


@pytest.fixture
def record(benchmark, perf_world):
    """``record(key, rates=None, **extra)``: after ``benchmark.pedantic``, store the timing
    figures and ``extra`` in ``benchmark.extra_info`` (saved with ``--benchmark-autosave`` or
    ``--benchmark-json``) and in the summary under ``key``. ``rates`` maps a name to an amount
    per call (FLOPs, ...) and is stored as amount per second of the median call; tokens per
    second are derived from ``tokens_per_step``/``tokens_per_call``. Returns the median
    seconds per call (None when timing is disabled)."""

    def store(key: str, rates: dict[str, float] | None = None, **extra) -> float | None:
        extra.setdefault("threads", torch.get_num_threads())
        extra.setdefault("model_source", perf_world.model_source)
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        median = minimum = None
        if stats is not None and stats.rounds:
            median, minimum = stats.median, stats.min
            tokens = extra.get("tokens_per_step") or extra.get("tokens_per_call")
            if tokens:
                extra["tokens_per_s"] = round(tokens / median, 1)
            for name, amount in (rates or {}).items():
                extra[name] = amount / median
        benchmark.extra_info.update(extra)
        RESULTS[key] = {"median": median, "min": minimum, "group": benchmark.group, **extra}
        return median

    return store


# --------------------------------------------------------------------------- summary


def _ratio(numerator: str, denominator: str, field: str = "median") -> float | None:
    a, b = RESULTS.get(numerator, {}).get(field), RESULTS.get(denominator, {}).get(field)
    if a is None or not b:
        return None
    return a / b


def _line(label: str, value: float | None, second: float | None, target: str, ok) -> str:
    if value is None:
        return f"  {label:<58} not measured"
    extra = f" (min {second:.2f}x)" if second is not None else ""
    verdict = "" if ok is None else ("  meets" if ok(value) else "  MISSES")
    return f"  {label:<58} {value:5.2f}x{extra:<14} target {target}{verdict}"


def summary_lines() -> list[str]:
    """The ratios the issue states targets for, from the medians of this run (and, for
    times, from the minima in parentheses). No assertion: a shared machine is noisy."""
    lines = []
    for objective in ("forget", "gdr"):
        if f"npo_cached[{objective}]" not in RESULTS:
            continue
        cached, reference, sam = (f"{name}[{objective}]" for name in ("npo_cached", "npo_reference", "npo_sam"))
        lines.append(f" NPO step, objective {objective!r}:")
        lines.append(_line("npo_reference / npo_cached time (speed-up of the cache)",
                           _ratio(reference, cached), _ratio(reference, cached, "min"), ">= 1.25x",
                           lambda r: r >= 1.25))
        lines.append(_line("npo_sam / npo_cached time", _ratio(sam, cached), _ratio(sam, cached, "min"),
                           "<= 2.2x", lambda r: r <= 2.2))
        for name in (cached, reference):
            ratio = _ratio(name, "relearn_finetune", "peak_tensor_mib")
            lines.append(_line(f"{name.split('[')[0]} peak memory / relearn_finetune peak", ratio, None,
                               "<= 1.15x" if name == cached else "(reference)",
                               (lambda r: r <= 1.15) if name == cached else None))
    if "relearn_finetune" in RESULTS:
        lines.append(" Relearning step:")
        lines.append(_line("relearn_lora / relearn_finetune time", _ratio("relearn_lora", "relearn_finetune"),
                           _ratio("relearn_lora", "relearn_finetune", "min"), "(none)", None))
        lines.append(_line("relearn_lora / relearn_finetune peak memory",
                           _ratio("relearn_lora", "relearn_finetune", "peak_tensor_mib"), None, "(none)", None))
    if "knowmem_batched" in RESULTS or "min_k_batched" in RESULTS:
        lines.append(" Evaluation:")
        lines.append(_line("knowmem_sequential / knowmem_batched time", _ratio("knowmem_sequential", "knowmem_batched"),
                           _ratio("knowmem_sequential", "knowmem_batched", "min"), ">= 4x", lambda r: r >= 4))
        lines.append(_line("min_k_sequential / min_k_batched time", _ratio("min_k_sequential", "min_k_batched"),
                           _ratio("min_k_sequential", "min_k_batched", "min"), "(none)", None))
    matmul = RESULTS.get("matmul", {})
    if matmul.get("median"):
        lines.append(" Throughput against plain matmul at the model's shapes (same run):")
        lines.append(f"  matmul: {matmul['flop_per_s'] / 1e9:.2f} GFLOP/s")
        for name in ("relearn_finetune", "npo_cached[forget]"):
            info = RESULTS.get(name, {})
            if info.get("median") and info.get("step_matmul_flops"):
                achieved = info["step_matmul_flops"] / info["median"]
                lines.append(
                    f"  {name}: {info['tokens_per_s']:.0f} tokens/s, {achieved / 1e9:.2f} GFLOP/s of linear-layer "
                    f"matmuls = {achieved / matmul['flop_per_s']:.0%} of the matmul figure"
                )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS:
        return
    terminalreporter.write_sep("-", "relearn-bench performance ratios (median of this run; no timed assertions)")
    if all(info.get("median") is None for info in RESULTS.values()):
        terminalreporter.write_line("  timing was disabled (--benchmark-disable); nothing to compare")
        return
    source = next(iter(RESULTS.values())).get("model_source", "")
    terminalreporter.write_line(f" model: {source}; torch threads: {torch.get_num_threads()}")
    for line in summary_lines():
        terminalreporter.write_line(line)
