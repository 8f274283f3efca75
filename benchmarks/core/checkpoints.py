"""Resume checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint of a training in progress holds what :func:`benchmarks.core.training.train` needs
to continue exactly (its ``state_hook`` payload) plus whatever the caller adds:

* ``weights.safetensors`` — the trainable weights (the whole model for full fine-tuning, the
  adapters for LoRA);
* ``optimizer.safetensors`` — every tensor of the optimizer's per-parameter state (AdamW's
  ``exp_avg``, ``exp_avg_sq``, ``step``), under ``state.<param index>.<name>``;
* ``rng.safetensors`` — torch's CPU and CUDA generator states and numpy's key array;
* ``state.json`` — the rest: step, optimizer hyperparameters (``param_groups``), the
  scheduler's state, python's and numpy's remaining RNG state, the loss history, the curve.

Loading reads tensors with ``safetensors`` and JSON with ``json``: a checkpoint cannot run code
(DESIGN §8), unlike ``torch.load(weights_only=False)``. The directory is written beside its final
name and swapped in, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"


def _tensor_identity(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of a ``state_dict``, with tensors that are one tensor in the model (tied
    embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``) copied once and kept one
    tensor under both names: at Llama 3's vocabulary the embedding is two thirds of a 1B model,
    and a copy per name would hold it twice."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        key = (*_tensor_identity(value), value.device)
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def _distinct_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``weights`` with every tensor written once: a name whose tensor is another name's (tied
    embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``) becomes an alias, recorded
    in ``state.json``. safetensors refuses tensors that share memory; writing the distinct ones
    as they are, rather than a clone of each, keeps a checkpoint from costing a second (and for
    tied embeddings a third) copy of the weights in memory, and the file holds them once."""
    distinct: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu()
        identity = _tensor_identity(tensor)
        if identity in first:
            aliases[name] = first[identity]
            continue
        first[identity] = name
        storage = identity[0]
        # A different view of memory already written (rare: slices of one buffer) is copied.
        distinct[name] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    return distinct, aliases


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as (tensors by flat name, JSON-able remainder)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def _split_rng(rng: dict) -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    tensors = {"torch": rng["torch"], "numpy_keys": torch.from_numpy(keys.astype("int64"))}
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"cuda.{i}"] = state
    rest = {"python": [version, list(internal), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)],
            "cuda": len(rng.get("cuda", []))}
    return tensors, rest


def _join_rng(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    import numpy as np

    version, internal, gauss = rest["python"]
    name, pos, has_gauss, cached = rest["numpy"]
    rng = {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
    }
    if rest["cuda"]:
        rng["cuda"] = [tensors[f"cuda.{i}"] for i in range(rest["cuda"])]
    return rng


def save_resume_checkpoint(directory: Path, weights: dict[str, torch.Tensor], loop_state: dict,
                           extra: dict | None = None) -> int:
    """Write a checkpoint to ``directory`` (replacing one there); returns its size in bytes.

    ``loop_state`` is the training loop's state (step, optimizer, scheduler, rng, history);
    ``extra`` is any JSON-able record of the caller (e.g. the curve measured so far).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        distinct, aliases = _distinct_weights(weights)
        save_file(distinct, tmp / WEIGHTS)
        del distinct
        optimizer_tensors, optimizer_rest = _split_optimizer(loop_state["optimizer"])
        save_file(optimizer_tensors, tmp / OPTIMIZER)
        rng_tensors, rng_rest = _split_rng(loop_state["rng"])
        save_file(rng_tensors, tmp / RNG)
        state = {
            "step": int(loop_state["step"]),
            "optimizer": optimizer_rest,
            "scheduler": loop_state["scheduler"],
            "rng": rng_rest,
            "weight_aliases": aliases,
            "history": loop_state["history"],
            "extra": extra or {},
        }
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
        if directory.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, aside / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint_size(directory)


def load_resume_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
    """``(weights, loop_state, extra)`` from :func:`save_resume_checkpoint`, or None if absent."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE).is_file():
        return None
    state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    loop_state = {
        "step": state["step"],
        "optimizer": _join_optimizer(load_file(directory / OPTIMIZER), state["optimizer"]),
        "scheduler": state["scheduler"],
        "rng": _join_rng(load_file(directory / RNG), state["rng"]),
        "history": state["history"],
    }
    weights = load_file(directory / WEIGHTS)
    for alias, name in state.get("weight_aliases", {}).items():
        weights[alias] = weights[name]  # tied: one tensor under both names, as saved
    return weights, loop_state, state["extra"]


def checkpoint_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


def estimate_checkpoint_bytes(trainable_parameters: int) -> int:
    """Size of one checkpoint of an AdamW training of float32 weights: the weights and the
    two moments, 12 bytes per trainable parameter (the rest is a few kilobytes)."""
    return 12 * trainable_parameters


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
