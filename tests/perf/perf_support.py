"""What the performance suite measures with: the model, the batches, one optimizer step as a
unit of work, a tensor-memory tracker, and the straightforward reference implementations the
project's code is compared against (DESIGN §7: ratios in the same run, never timed assertions).

Everything here runs on the world-shaped tiny Llama. When the default embedded world is
already built and cached, its target model and tokenizer are used; otherwise the suite builds
an untrained Llama of exactly the world's shape (``benchmarks.core.world_build.default_model_spec``) with
a tokenizer trained on the world corpus, which costs seconds, instead of building the world
(minutes). Speed depends on shapes, not on what the weights have learned; only the generation
lengths in the KnowMem benchmark do (an untrained model rarely stops early), which is noted in
the results as ``model_source``.
"""

from __future__ import annotations

import os

import copy
import gc
import statistics
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attacks.base import pack_documents
from benchmarks.core.logprobs import masked_mean_nll, sequence_logps, token_logps
from benchmarks.core.metrics import knowmem_prompt, min_k_score, rouge_l_f1, truncate_answer
from benchmarks.core.training import TrainConfig, make_accelerator
from defenses.npo import npo_loss

#: torch intra-op threads for every measurement (fixed, so runs compare).
THREADS = int(os.environ.get("RELEARN_BENCH_PERF_THREADS", "2"))  # torch threads of the suite
#: Every training unit steps on this batch shape: BATCH_SIZE packed chunks of SEQ_LEN tokens
#: (no padding, so tokens per step = BATCH_SIZE * SEQ_LEN).
BATCH_SIZE = 4
SEQ_LEN = 128
#: Small, so the weights barely move over the timed rounds and every round does the same work.
LR = 1e-5
MAX_GRAD_NORM = 1.0  # the loop's default clip, applied as train() applies it
NPO_BETA = 0.1
#: KnowMem questions timed (the issue's "100 questions") and the default evaluation batch size.
NUM_QUESTIONS = 100
EVAL_BATCH_SIZE = 16
KNOWMEM_NEW_TOKENS = 32


# --------------------------------------------------------------------------- the model


@dataclass
class PerfWorld:
    """The world-shaped model (eval mode, never trained by the suite), its tokenizer and the
    world corpus (a ``MuseData``). ``model_source`` says which model it is."""

    model: torch.nn.Module
    tokenizer: Any
    data: Any
    model_source: str

    def fresh_model(self) -> torch.nn.Module:
        """An independent copy of the model, in train mode, for one training unit."""
        model = copy.deepcopy(self.model)
        model.train()
        return model


def load_perf_world() -> PerfWorld:
    """The cached default world's target model if it is built, else an untrained tiny Llama
    of the world's shape; the world corpus either way (generating it takes a fraction of a
    second). The world itself is never built here."""
    from benchmarks.core.data import load_data
    from benchmarks.core.models import load_model, tiny_llama
    from benchmarks.core.world_corpus import RAW_SPLITS
    from benchmarks.core.world_build import (
        WorldBuildConfig, WorldPaths, default_world_dir, read_manifest, train_world_tokenizer, world_hash,
    )

    config = WorldBuildConfig()
    data = load_data("world", world_config=config.corpus)
    root = default_world_dir(config)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("hash") == world_hash(config):
        model, tokenizer = load_model(str(WorldPaths.at(root).target_dir))
        source = f"cached world target ({root})"
    else:
        texts = [r["text"] for split in RAW_SPLITS for r in data.records("raw", split)]
        tokenizer = train_world_tokenizer(texts, config.vocab_size)
        model = tiny_llama(config.model, tokenizer, seed=config.seed)
        source = "untrained tiny Llama of the world's shape (world not cached)"
    model.eval()
    return PerfWorld(model=model, tokenizer=tokenizer, data=data, model_source=source)


def knowmem_questions(world: PerfWorld, count: int = NUM_QUESTIONS) -> tuple[list[dict], list[dict]]:
    """``count`` KnowMem questions in the world's format and the forget ICL examples: the
    world's forget_qa then retain_qa, topped up when the world has fewer with the questions of
    world corpora drawn with the next seeds (distinct articles, same generator)."""
    from dataclasses import replace

    from benchmarks.core.data import load_data
    from benchmarks.core.world_build import WorldBuildConfig

    questions = world.data.records("knowmem", "forget_qa") + world.data.records("knowmem", "retain_qa")
    corpus = WorldBuildConfig().corpus
    while len(questions) < count:
        corpus = replace(corpus, seed=corpus.seed + 1)
        more = load_data("world", subsets=("knowmem",), world_config=corpus)
        questions += more.records("knowmem", "forget_qa") + more.records("knowmem", "retain_qa")
    return questions[:count], world.data.records("knowmem", "forget_qa_icl")


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer one forward pass multiplies by,
    the output head included (tied or not, it is one matmul per token)."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def forward_matmul_flops(model: torch.nn.Module, tokens: int) -> int:
    """FLOPs of the linear-layer matmuls of one forward pass over ``tokens`` tokens
    (2 · in · out per token per layer). Attention-score matmuls are not counted."""
    return sum(2 * tokens * fan_in * fan_out for fan_in, fan_out in linear_shapes(model))


# --------------------------------------------------------------------------- batches


def packed_batch(tokenizer, texts: Sequence[str], batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> dict:
    """``batch_size`` full chunks of ``seq_len`` tokens packed from ``texts`` the way the
    relearning attack packs documents (``attacks.base.pack_documents``): no padding."""
    chunks = [c for c in pack_documents(tokenizer, texts, seq_len) if len(c) == seq_len][:batch_size]
    if len(chunks) < batch_size:
        raise ValueError(f"the texts give only {len(chunks)} full chunks of {seq_len} tokens, need {batch_size}")
    input_ids = torch.tensor(chunks, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def unlearning_batch(world: PerfWorld, with_retain: bool) -> dict:
    """A defense micro-batch (``defenses.base`` layout): forget chunks with their ``index``
    and, with a retain term, retain chunks of the same shape."""
    forget = packed_batch(world.tokenizer, [r["text"] for r in world.data.records("raw", "forget")])
    forget["index"] = torch.arange(forget["input_ids"].size(0))
    batch = {"forget": forget}
    if with_retain:
        batch["retain"] = packed_batch(world.tokenizer, [r["text"] for r in world.data.records("raw", "retain1")])
    return batch


# --------------------------------------------------------------------------- one optimizer step


@dataclass
class TrainingUnit:
    """One optimizer step as the shared loop (``benchmarks.core.training.train``) takes it:
    the step function (forward + backward), gradient clipping, AdamW step, zero_grad -- on
    the same micro-batches every time. Built once, so the timed call is the step alone."""

    model: torch.nn.Module
    step_fn: Callable
    micro_batches: list
    params: list[torch.nn.Parameter]
    tokens_per_step: int
    #: tensors the unit keeps between steps besides model, gradients and optimizer state
    #: (a reference model's weights, a table of cached log-likelihoods).
    extra_owned: list[torch.Tensor] = field(default_factory=list)
    accelerator: Any = None
    optimizer: Any = None

    def __post_init__(self) -> None:
        self.accelerator = make_accelerator(TrainConfig(lr=LR, progress=False))
        optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.model.train()

    def step(self) -> dict:
        metrics = self.step_fn(self.model, self.micro_batches, self.accelerator)
        self.accelerator.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def owned_tensors(self) -> list[torch.Tensor]:
        """Everything the unit holds between steps: weights and buffers, gradients, AdamW
        state, the batch, and ``extra_owned``."""
        owned = list(self.model.parameters()) + list(self.model.buffers())
        owned += [p.grad for p in self.params if p.grad is not None]
        for state in self.optimizer.state_dict()["state"].values():
            owned += [v for v in state.values() if isinstance(v, torch.Tensor)]
        owned += [t for t in tree_leaves(self.micro_batches) if isinstance(t, torch.Tensor)]
        return owned + list(self.extra_owned)

    def close(self) -> None:
        self.accelerator.free_memory()


def paired_seconds(pairs: Sequence[tuple[Callable[[], Any], Callable[[], Any]]]) -> list[tuple[float, float]]:
    """Seconds of ``(baseline(), candidate())`` for each pair, the two calls of a pair made
    one right after the other (who goes first alternates from pair to pair).

    On a machine shared with other work the load changes from second to second; two calls
    made back to back see the same load, so their ratio stays meaningful when the times of
    separately timed benchmarks (minutes apart) do not.
    """
    seconds = []
    for index, (baseline, candidate) in enumerate(pairs):
        calls = [(0, baseline), (1, candidate)]
        if index % 2:
            calls.reverse()
        pair = [0.0, 0.0]
        for which, call in calls:
            began = time.perf_counter()
            call()
            pair[which] = time.perf_counter() - began
        seconds.append((pair[0], pair[1]))
    return seconds


def paired_ratio(baseline: Callable[[], Any], candidate: Callable[[], Any], rounds: int) -> float:
    """Median over ``rounds`` back-to-back pairs of time(candidate) / time(baseline)."""
    return statistics.median(c / b for b, c in paired_seconds([(baseline, candidate)] * rounds))


# --------------------------------------------------------------------------- memory


class TensorMemoryTracker(TorchDispatchMode):
    """Bytes of live tensor storage, and their peak, while the mode is active.

    Every aten op's outputs are registered (by storage, so views are not counted twice) and
    released when their storage is freed (a weak reference to the storage's Python object,
    which torch keeps alive exactly as long as the storage). Tensors that exist before the
    mode is entered are counted with :meth:`add` (what a unit owns between steps).

    What it measures: tensor data only, at op granularity. It does not see scratch memory a
    kernel allocates and frees inside one op, allocator slack, or Python objects; on CPU this
    is the honest stand-in for ``torch.cuda.max_memory_allocated`` (tracemalloc does not see
    torch's allocations, and process RSS keeps freed pages, so it shows neither peaks nor
    differences between methods reliably).
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.is_sparse or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(storage, partial(self._release, key))
            self._sizes[key] = nbytes
            self.current += nbytes
        elif old != nbytes:  # an op resized an existing storage in place
            self._sizes[key] = nbytes
            self.current += nbytes - old
        self.peak = max(self.peak, self.current)

    def _release(self, key: int, _ref: weakref.ref) -> None:
        self.current -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            self.add(leaf)
        return out


@dataclass(frozen=True)
class MemoryFigures:
    owned_bytes: int  # held between steps (weights, grads, AdamW state, batch, extras)
    peak_bytes: int  # highest live tensor bytes during one step, owned bytes included


def measure_step_memory(unit: TrainingUnit) -> MemoryFigures:
    """Run one more step of ``unit`` under :class:`TensorMemoryTracker` (after the timed
    rounds, so AdamW state exists and counts as owned)."""
    gc.collect()
    tracker = TensorMemoryTracker()
    for tensor in unit.owned_tensors():
        tracker.add(tensor)
    owned = tracker.current
    with tracker:
        unit.step()
    return MemoryFigures(owned_bytes=owned, peak_bytes=tracker.peak)


# --------------------------------------------------------------------------- references


class ReferenceModelNPO:
    """NPO the straightforward way, as the MUSE code and the NPO+SAM code built on it run it:
    a frozen copy of the model before unlearning is kept in memory and run on the forget
    batch at every step to get log π_ref(x). Same loss as :class:`defenses.npo.NPO` (the
    paper's sequence log-likelihoods, Zhang et al. 2024, eq. 3) and the same GDR retain term;
    only where log π_ref comes from differs.
    """

    def __init__(self, model: torch.nn.Module, with_retain: bool, beta: float = NPO_BETA) -> None:
        self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.with_retain = with_retain
        self.beta = beta

    def forget_loss(self, model, forget: dict) -> torch.Tensor:
        policy = sequence_logps(model, forget["input_ids"], forget["attention_mask"])
        with torch.no_grad():
            ref = sequence_logps(self.reference_model, forget["input_ids"], forget["attention_mask"])
        return npo_loss(policy, ref, self.beta)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        loss = self.forget_loss(model, batch["forget"])  # w_forget = 1
        if self.with_retain:  # w_retain = 1, GDR: NLL on the retain batch
            retain = batch["retain"]
            loss = loss + masked_mean_nll(model, retain["input_ids"], retain["attention_mask"])
        return loss


@torch.inference_mode()
def knowmem_one_by_one(
    model, tokenizer, qa_records: Sequence[dict], icl_records: Sequence[dict], max_new_tokens: int = KNOWMEM_NEW_TOKENS
) -> list[tuple[str, float]]:
    """KnowMem as MUSE's evaluation runs it: one prompt at a time through ``generate``
    (greedy, KV cache on as ``generate`` defaults), decoded, cut at the answer stops and
    scored with ROUGE-L. Returns ``(generation, score × 100)`` per question."""
    icl = [{"question": r["question"], "answer": r["answer"]} for r in icl_records]
    eos = tokenizer.eos_token_id
    results = []
    for record in qa_records:
        prompt = knowmem_prompt(icl, record["question"])
        input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        text = tokenizer.decode(
            output[0, input_ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        generation = truncate_answer(text)
        results.append((generation, 100.0 * rouge_l_f1(generation, str(record["answer"]))))
    return results


@torch.inference_mode()
def min_k_one_by_one(model, tokenizer, texts: Sequence[str]) -> list[float]:
    """Min-40% scores as MUSE's evaluation computes them: one unpadded text per forward pass."""
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    scores = []
    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :limit]
        logits = model(input_ids=input_ids).logits
        scores.append(min_k_score(token_logps(logits, input_ids)[0]))
    return scores


def matmul_workload(model: torch.nn.Module, tokens: int, seed: int = 0) -> Callable[[], None]:
    """A callable doing, as plain ``F.linear`` calls on random fp32 data, every linear-layer
    matmul of one forward pass of ``model`` over ``tokens`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(model)
    inputs = {fan_in: torch.randn(tokens, fan_in, generator=generator) for fan_in, _ in shapes}
    weights = [(fan_in, torch.randn(fan_out, fan_in, generator=generator)) for fan_in, fan_out in shapes]

    def run() -> None:
        for fan_in, weight in weights:
            F.linear(inputs[fan_in], weight)

    return run

