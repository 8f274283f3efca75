"""Shared fixtures: a tiny tokenizer and 2-layer, 64-wide Llama models built in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.core.models import TinyLlamaSpec, tiny_llama
from benchmarks.core.tokenizer import train_tokenizer

# Tiny models gain nothing from intra-op threads, and one thread per process keeps tests
# that start subprocesses (accelerate launch) from oversubscribing small machines.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_MUSE_NEWS = ROOT.parent / "shared" / "muse-news"

TINY_TEXTS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
    "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick\n\n",
    "Question: How many boats sailed in the regatta?\nAnswer: 417\n\n",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
] * 20


def pytest_collection_modifyitems(config, items):
    """Files holding a test marked ``minutes`` (the world rebuilds) go first, the rest keep their
    order: with one worker per core (pyproject's addopts), a file that runs for minutes started
    last would leave the other workers idle until it ends."""
    long_files = {item.path for item in items if item.get_closest_marker("minutes")}
    items.sort(key=lambda item: item.path not in long_files)  # stable: False sorts first


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY_TEXTS, vocab_size=300)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh 2-layer, 64-wide Llama (random weights, fixed seed) in fp32, eval mode."""
    model = tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def muse_news_dir():
    if not SHARED_MUSE_NEWS.is_dir():
        pytest.skip(f"MUSE-News copy not found at {SHARED_MUSE_NEWS} (needs ../shared/muse-news)")
    return SHARED_MUSE_NEWS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch_two_processes():
    """``launch(module, args, env=None)``: ``python -m <module> <args>`` (or, for a ``Path``,
    that script) as two real CPU processes under ``accelerate launch``, returning the finished
    ``CompletedProcess``.

    accelerate 1.15 starts one process for ``--cpu --num_processes 2`` (its simple launcher);
    two CPU processes take its multi-process launcher with ``ACCELERATE_USE_CPU`` set, talking
    over gloo. One thread each keeps two processes from oversubscribing a small machine.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable: two CPU processes cannot talk")

    def launch(module: str | Path, args, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
        target = [str(module)] if isinstance(module, Path) else ["-m", module]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *target, *map(str, args)]
        environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                       **(env or {})}
        return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)

    return launch
