"""A running relearning run's state directory, so an interrupted run resumes (DESIGN §6).

``benchmarks.relearn`` keeps one per run (MUSE, the world and TOFU alike), keyed by a hash of
the plan: the run's metadata, the record of every finished trajectory (one model under one
attack seed) and the latest milestone checkpoint of the trajectory in progress
(:mod:`benchmarks.core.checkpoints`). A run that completes removes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def safe_name(text: str) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits and ``._+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


class RunState:
    """A running run's state directory: run metadata, finished trajectories and the latest
    milestone checkpoint of the trajectory in progress. Every file is written to a temporary
    name and renamed, so a kill at any moment leaves the last complete version.

    Under ``accelerate launch`` only the main process writes (elsewhere the writing methods do
    nothing); what the others must know of the state (the run id, whether a trajectory is
    done) reaches them from the main process (:func:`benchmarks.core.processes.from_main`)."""

    def __init__(self, directory: Path, checkpoints: bool, checkpoint_every: int = 0) -> None:
        from benchmarks.core.processes import is_main

        self.directory = directory
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every  # steps at least between two checkpoints
        self._last_saved: dict[str, int] = {}
        self.writes = is_main()

    def exists(self) -> bool:
        return (self.directory / "run.json").is_file()

    def start(self, meta: dict) -> None:
        if not self.writes:
            return
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._write_json("run.json", meta)

    def meta(self) -> dict:
        return json.loads((self.directory / "run.json").read_text(encoding="utf-8"))

    def update_meta(self, **items) -> None:
        if not self.writes:
            return
        meta = self.meta()
        meta.update(items)
        self._write_json("run.json", meta)

    def _name(self, seed: int, label: str) -> str:
        return f"seed{seed}-{safe_name(label)}"

    def finished(self, seed: int, label: str) -> dict | None:
        path = self.directory / f"{self._name(seed, label)}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def finish(self, seed: int, label: str, record: dict) -> None:
        if not self.writes:
            return
        self._write_json(f"{self._name(seed, label)}.json", record)
        shutil.rmtree(self.directory / f"{self._name(seed, label)}.ckpt", ignore_errors=True)

    def checkpoint(self, seed: int, label: str) -> dict | None:
        """The trajectory's latest checkpoint (safetensors and JSON; see
        :mod:`benchmarks.core.checkpoints`), or None."""
        from benchmarks.core.checkpoints import load_resume_checkpoint

        loaded = load_resume_checkpoint(self.directory / f"{self._name(seed, label)}.ckpt")
        if loaded is None:
            return None
        weights, loop_state, extra = loaded
        self._last_saved[self._name(seed, label)] = loop_state["step"]
        return {"trainable_state": weights, "loop_state": loop_state, "curve": extra["curve"]}

    def save_checkpoint(self, seed: int, label: str, payload: dict) -> None:
        """Replace the trajectory's checkpoint (only the latest is kept), unless checkpoints
        are off or fewer than ``checkpoint_every`` steps passed since the last one."""
        from benchmarks.core.checkpoints import format_bytes, save_resume_checkpoint

        name, step = self._name(seed, label), payload["loop_state"]["step"]
        if not self.writes or not self.checkpoints or step - self._last_saved.get(name, 0) < self.checkpoint_every:
            return
        size = save_resume_checkpoint(self.directory / f"{name}.ckpt", payload["trainable_state"],
                                      payload["loop_state"], {"curve": payload["curve"]})
        self._last_saved[name] = step
        logger.info("%s: checkpoint at step %d (%s)", name, step, format_bytes(size))

    def remove(self) -> None:
        if not self.writes:
            return
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_json(self, name: str, data: dict) -> None:
        path = self.directory / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)
