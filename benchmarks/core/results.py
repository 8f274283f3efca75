"""Result files: one self-describing YAML per relearning run (DESIGN §6), written atomically.

Schema (``schema_version: 1``). Every key below is required unless marked *optional*; a value
that could not be measured is ``null``. Lists of per-step values have one entry per step.

.. code-block:: yaml

    schema_version: 1
    run_id: 20260102T030405.123456Z-9f3a1c      # new_run_id(): sortable, filesystem-safe
    command: python -m benchmarks.relearn --defense npo --seeds 0 1 2   # exact argv, shell-quoted
    created: '2026-01-02T03:04:05+00:00'        # UTC, ISO 8601
    status: complete                            # complete | diverged | interrupted
    model: {id: world/target, revision_or_hash: 3f2a..., dtype: float32}
    defense:
      name: npo
      hyperparameters: {beta: 0.1, lr: 1.0e-05, ...}   # every field of the defense config
    attack:
      name: finetune
      hyperparameters: {lr: 1.0e-05, steps: 100, schedule: cosine, ...}
      seeds: [0, 1, 2]
      relearn_doc_ids: [doc-003, doc-017]       # T: forget documents the attacker trains on
      heldout_doc_ids: [doc-001, doc-002, ...]  # V: forget documents the attacker never sees
      settings_hash: 63ba1b98763b               # optional: attack_settings_hash(); which runs compare
    data:
      source: world                             # hub id, directory or "world"
      splits:                                   # "<subset>/<split>" -> size and digest
        knowmem/forget_qa: {n: 100, sha256: 5d1e...}   # benchmarks.core.data.records_sha256
    curves:                                     # per model role; the key is the label shown
      npo:                                      # e.g. npo, npo_sam, target, retrain
        steps: [0, 25, 50, 100]                 # attack steps, strictly increasing, from 0
        metrics:
          knowmem_forget_heldout:
            per_seed: {0: [3.1, 8.0, 12.2, 15.0], 1: [...], 2: [...]}
            mean: [...]
            ci95_low: [...]                     # t-interval over seeds (null with one seed)
            ci95_high: [...]
    summary:                                    # per role -> per metric -> statistic
      npo:
        knowmem_forget_heldout:
          before: {mean: 3.0, ci95_low: 2.1, ci95_high: 3.9}    # value at step 0
          after: {...}                          # value at the last step S
          recovery_ratio: {...}                 # (M(S) - M(0)) / (M_target(0) - M(0))
          auc: {...}                            # trapezoid area under the curve / step span
          steps_to_50: {...}                    # first step with recovery ratio >= 0.5; null if never
          excess_over_retrain: {...}            # M(S) - M_retrain(S), same attack, same seed
    higher_is_better: {knowmem_forget_heldout: false, knowmem_retain: true, privleak: null}
    references: {target: target, retrain: retrain}   # curve roles of the two baselines (or null)
    environment:                                # environment_info()
      python: 3.11.9
      packages: {torch: 2.13.0, transformers: 5.23.0, ...}
      device: cpu
      threads: 2
      jobs: 2                                   # relearn: trajectories at once (--jobs) ...
      threads_per_job: 1                        # ... and the torch threads of each
      git_revision: bd33076...                  # null outside a git checkout
      git_dirty: false                          # optional
    timings: {defense: 81.2, attack: 240.5, evaluation: 130.0}   # seconds per stage (wall clock; with
                                                # --jobs the workers' attack and evaluation seconds are
                                                # scaled to the wall-clock time they took together)

Each statistic is computed per seed, then given as mean and Student-t 95 % interval over
seeds (:func:`mean_ci95`); the exact definitions are :data:`benchmarks.core.recovery.DEFINITIONS`,
which the runner also writes into the file under ``definitions``. A writer may add keys of its
own (the runner adds ``models``, ``definitions``, ``evaluation``, ``trajectories``); readers
ignore keys they do not know.

Metric names in ``curves`` are those of :mod:`benchmarks.core.metrics` (``knowmem_forget``,
``verbmem_forget``, ``knowmem_retain``, ``privleak``), plus ``knowmem_forget_heldout`` and
``knowmem_forget_relearn`` for the KnowMem-forget questions of V and of T (DESIGN §5), and
``verbmem_forget_heldout`` / ``verbmem_forget_relearn`` for the VerbMem items of V's and T's
articles (where the items carry a ``doc_id``).
``higher_is_better`` is from the unlearner's point of view (``null`` = closer to 0 is better).
``excess_over_retrain`` is a *level* difference: what the attacked model knows beyond what the
retrain model, which never saw the forget data, knows after the same attack. A defense that
never removed the knowledge therefore cannot score well on it.

Read files with :func:`read_result` (``yaml.safe_load``) and check them with
:func:`validate_result`, which lists problems instead of raising so that a reader (the
leaderboard) can name a broken file and go on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import secrets
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import yaml

from benchmarks.core.errors import UsageError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("complete", "diverged", "interrupted")
SUMMARY_STATS = ("before", "after", "recovery_ratio", "auc", "steps_to_50", "excess_over_retrain")
INTERVAL_KEYS = ("mean", "ci95_low", "ci95_high")

# Curve metrics in the order plots and tables show them, with their labels.
METRIC_LABELS = {
    "knowmem_forget": "KnowMem-forget (all)",
    "knowmem_forget_heldout": "KnowMem-forget on held-out V",
    "knowmem_forget_relearn": "KnowMem-forget on T",
    "verbmem_forget": "VerbMem-forget",
    "verbmem_forget_heldout": "VerbMem-forget on held-out V",
    "verbmem_forget_relearn": "VerbMem-forget on T",
    "knowmem_retain": "KnowMem-retain",
    "privleak": "PrivLeak",
}
# From the unlearner's point of view; None: closer to 0 is better.
HIGHER_IS_BETTER = {
    "knowmem_forget": False,
    "knowmem_forget_heldout": False,
    "knowmem_forget_relearn": False,
    "verbmem_forget": False,
    "verbmem_forget_heldout": False,
    "verbmem_forget_relearn": False,
    "knowmem_retain": True,
    "privleak": None,
}

# Versions recorded in every result file (distribution names as pip knows them).
RECORDED_PACKAGES = (
    "relearn-bench", "torch", "transformers", "tokenizers", "accelerate", "peft", "datasets",
    "safetensors", "huggingface_hub", "rouge-score", "scikit-learn", "numpy", "matplotlib",
    "tabulate", "PyYAML",
)

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ResultFileError(UsageError):
    """A result file cannot be read: missing, not YAML, or not a mapping."""


# --------------------------------------------------------------------------- identity


_last_stamp = 0
_stamp_lock = threading.Lock()


def new_run_id() -> str:
    """A run id like ``20260102T030405.123456Z-9f3a1c``: UTC time to the microsecond, then a
    random suffix. Ids sort in creation order (within a process even when two fall in the same
    microsecond) and are safe as file names on every common filesystem."""
    global _last_stamp
    with _stamp_lock:
        stamp = max(time.time_ns() // 1000, _last_stamp + 1)
        _last_stamp = stamp
    moment = datetime.fromtimestamp(stamp // 1_000_000, tz=timezone.utc)
    return f"{moment:%Y%m%dT%H%M%S}.{stamp % 1_000_000:06d}Z-{secrets.token_hex(3)}"


def utc_now() -> str:
    """Current UTC time in ISO 8601, to the second (the ``created`` field)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, shell-quoted: ``python -m <module> <argv...>``
    (``argv`` defaults to ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *args])


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall-clock seconds spent in the block to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start)


# --------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=_PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """``(revision, dirty)`` of the checkout this package runs from, or ``(None, None)`` when
    it is not a git checkout (an installed wheel). ``dirty`` counts modified tracked files."""
    top = _git("rev-parse", "--show-toplevel")
    # An installed copy may sit inside somebody else's repository: only our own tree counts.
    if top is None or Path(top).resolve() != _PROJECT_ROOT:
        return None, None
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return revision, (None if status is None else bool(status))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Package versions, device, threads and git revision for the ``environment`` field.

    ``device``: what the run used (e.g. ``"cuda:0"``); by default the best one torch sees.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = device
    if str(device).startswith("cuda") and torch.cuda.is_available():
        device_name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    revision, dirty = git_state()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in RECORDED_PACKAGES},
        "device": device_name,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_revision": revision,
        "git_dirty": dirty,
    }


# --------------------------------------------------------------------------- statistics

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)
_Z975 = 1.959963984540054  # the standard normal 0.975 quantile


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df): a table up to df = 30, then the Cornish-Fisher expansion of the t
    quantile around the normal one to third order in 1/df (error below 2e-6 for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci95(values: Iterable[float | None]) -> dict[str, float | None]:
    """``{mean, ci95_low, ci95_high}`` over seeds: mean ± t_{0.975}(n-1) · s / √n.

    Missing (``None``) and non-finite values are left out; with one value the interval is
    ``None`` (one seed says nothing about spread), with none everything is ``None``.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return {"mean": None, "ci95_low": None, "ci95_high": None}
    mean = math.fsum(finite) / n
    if n == 1:
        return {"mean": mean, "ci95_low": None, "ci95_high": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


# --------------------------------------------------------------------------- writing


def check_writable_directory(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Raise UsageError unless ``directory`` exists and is writable or can be created; return it.

    The nearest existing ancestor must be a directory in which a file can really be created:
    ``os.access`` alone says yes to root for read-only or virtual filesystems (``/proc``), so a
    temporary file is created there and removed at once. Nothing else is created.
    """
    directory = Path(directory).expanduser()
    ancestor = directory
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot create {what} {directory}: {ancestor} is not a directory")
    denied = None if os.access(ancestor, os.W_OK | os.X_OK) else "denies writing"
    if denied is None:
        probe = ancestor / f".relearn-bench-probe.{secrets.token_hex(4)}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as err:
            denied = f"cannot create files there: {err.strerror or err}"
        else:
            probe.unlink(missing_ok=True)
    if denied is not None:
        raise UsageError(f"{what} {directory} is not writable ({ancestor} {denied}); choose another path")
    return directory


def _check_directory(directory: Path) -> None:
    check_writable_directory(directory)


def check_output_target(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate an output path before any model is loaded, and return it.

    A path with a suffix (``run.yaml``, ``plot.png``) is a file: it must not exist unless
    ``overwrite``, and its directory must exist or be creatable, and be writable. A path
    without a suffix, or an existing directory, is an output directory and gets the directory
    checks only. Nothing is created.
    """
    path = Path(target).expanduser()
    if path.is_dir() or not path.suffix:
        _check_directory(path)
        return path
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it or choose another path")
    _check_directory(path.parent)
    return path


def check_yaml_target(target: str | os.PathLike, flag: str, overwrite: bool = False) -> Path:
    """:func:`check_output_target` for a result file named by ``flag``: it must also end in .yaml/.yml."""
    path = check_output_target(target, overwrite=overwrite)
    if path.suffix not in (".yaml", ".yml"):
        raise UsageError(f"{flag} {str(target)!r} should name a .yaml file")
    return path


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO], None],
    overwrite: bool = False,
    binary: bool = False,
) -> Path:
    """Write a file so that readers see either the old file or the whole new one.

    ``write(stream)`` fills a temporary file in the target's directory (so the final rename
    stays on one filesystem); it is flushed and fsynced, then renamed over ``path``. Without
    ``overwrite`` the rename is a hard link, which fails if ``path`` appeared meanwhile. On any
    error, ``KeyboardInterrupt`` included, the temporary file is removed and ``path`` is as it
    was.
    """
    path = Path(path).expanduser()
    directory = path.parent
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it or choose another path")
    _check_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
        # os.open with 0o666 lets the umask set the final permissions, like a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise UsageError(f"cannot write to directory {directory}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return path


def _move_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} exists; pass --overwrite to replace it or choose another path") from None
    except OSError:
        # Filesystems without hard links: a check-then-rename is the best left.
        if path.exists():
            raise UsageError(f"{path} exists; pass --overwrite to replace it or choose another path") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ResultDumper(yaml.SafeDumper):
    """One line for a list of scalars and for a small mapping of scalars (an interval, a split
    digest); block style otherwise; no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _is_scalar(item: Any) -> bool:
    return item is None or isinstance(item, (bool, int, float, str))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(_is_scalar(item) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flow = len(data) <= 3 and all(_is_scalar(item) for item in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)


_ResultDumper.add_representer(list, _represent_list)
_ResultDumper.add_representer(dict, _represent_dict)


def to_plain(value: Any, where: str = "result") -> Any:
    """``value`` as plain dicts, lists, str, int, float, bool and None, ready for
    ``yaml.safe_dump``: tuples become lists, paths strings, numpy/torch values and arrays
    their Python equivalents (via ``tolist``). Anything else is a programming error and raises
    ``TypeError`` naming where it sits."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            key = to_plain(key, where)
            if not isinstance(key, (str, int, bool)) and key is not None:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be written")
            out[key] = to_plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, datetime):
        return value.isoformat()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_plain(tolist(), where)
    raise TypeError(f"{where}: value of type {type(value).__name__} cannot be written to a result file")


def _dump(data: Any, stream: IO[str]) -> None:
    yaml.dump(data, stream, Dumper=_ResultDumper, sort_keys=False, allow_unicode=True, width=100)


def write_yaml_atomic(path: str | os.PathLike, data: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``data`` as YAML to ``path`` atomically (see :func:`atomic_write`).

    An existing ``path`` is replaced only with ``overwrite=True``; otherwise, and for an
    unwritable directory, :class:`UsageError` says what to do. Keys keep their order.
    """
    plain = to_plain(data)
    written = atomic_write(path, lambda stream: _dump(plain, stream), overwrite=overwrite)
    logger.info("wrote %s", written)
    return written


# --------------------------------------------------------------------------- reading


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Load one result file with ``yaml.safe_load``; a missing file, broken YAML or a
    document that is not a mapping raises :class:`ResultFileError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultFileError(f"result file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultFileError(f"cannot read result file {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ResultFileError(f"result file {path} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ResultFileError(
            f"result file {path} holds a YAML {type(data).__name__}, not a mapping of result fields"
        )
    return data


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_or_null(value: Any) -> bool:
    return value is None or _is_number(value)


class _Checker:
    """Collects schema problems as ``"path: what is wrong"`` lines."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def mapping(self, parent: Mapping, key: str, where: str, required: bool = True) -> Mapping | None:
        value = self.get(parent, key, where, required)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.add(where, f"expected a mapping, got {type(value).__name__}")
            return None
        return value

    def get(self, parent: Mapping, key: str, where: str, required: bool = True) -> Any:
        if key not in parent:
            if required:
                self.add(where, "missing")
            return None
        return parent[key]

    def typed(self, parent: Mapping, key: str, where: str, types: tuple, nullable: bool = False,
              required: bool = True) -> Any:
        if key not in parent:
            if required:
                self.add(where, "missing")
            return None
        value = parent[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            self.add(where, f"expected {names}, got {type(value).__name__}")
            return None
        return value

    def number_list(self, value: Any, where: str, length: int | None) -> None:
        if not isinstance(value, list):
            self.add(where, f"expected a list of numbers, got {type(value).__name__}")
            return
        if length is not None and len(value) != length:
            self.add(where, f"has {len(value)} values for {length} steps")
        bad = [v for v in value if not _is_number_or_null(v)]
        if bad:
            self.add(where, f"expected numbers or null, got {bad[0]!r}")


def validate_result(data: Any) -> list[str]:
    """Problems with a result dict (missing keys, wrong types, mismatched lengths), one line
    each, naming the key path; an empty list means the file follows the schema."""
    check = _Checker()
    if not isinstance(data, Mapping):
        return [f"result: expected a mapping, got {type(data).__name__}"]

    version = check.typed(data, "schema_version", "schema_version", (int,))
    if version is not None and version > SCHEMA_VERSION:
        check.add("schema_version", f"{version} is newer than this code reads ({SCHEMA_VERSION}); update relearn-bench")
    elif version is not None and version < 1:
        check.add("schema_version", f"must be >= 1, got {version}")
    check.typed(data, "run_id", "run_id", (str,))
    check.typed(data, "command", "command", (str,))
    created = check.typed(data, "created", "created", (str, datetime))
    if isinstance(created, str):
        try:
            datetime.fromisoformat(created)
        except ValueError:
            check.add("created", f"not an ISO 8601 time: {created!r}")
    status = check.typed(data, "status", "status", (str,))
    if status is not None and status not in STATUSES:
        check.add("status", f"{status!r} is not one of {', '.join(STATUSES)}")

    model = check.mapping(data, "model", "model")
    if model is not None:
        check.typed(model, "id", "model.id", (str,))
        check.typed(model, "revision_or_hash", "model.revision_or_hash", (str,), nullable=True)
        check.typed(model, "dtype", "model.dtype", (str,))

    defense = check.mapping(data, "defense", "defense")
    if defense is not None:
        check.typed(defense, "name", "defense.name", (str,))
        check.mapping(defense, "hyperparameters", "defense.hyperparameters")

    attack = check.mapping(data, "attack", "attack")
    if attack is not None:
        check.typed(attack, "name", "attack.name", (str,))
        check.mapping(attack, "hyperparameters", "attack.hyperparameters")
        seeds = check.typed(attack, "seeds", "attack.seeds", (list,))
        if seeds is not None and not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            check.add("attack.seeds", "expected a list of integers")
        for key in ("relearn_doc_ids", "heldout_doc_ids"):
            ids = check.typed(attack, key, f"attack.{key}", (list,))
            if ids is not None and not all(isinstance(i, (str, int)) for i in ids):
                check.add(f"attack.{key}", "expected a list of document ids (strings or integers)")

    data_section = check.mapping(data, "data", "data")
    if data_section is not None:
        check.typed(data_section, "source", "data.source", (str,))
        splits = check.mapping(data_section, "splits", "data.splits")
        for name, split in (splits or {}).items():
            where = f"data.splits.{name}"
            if not isinstance(split, Mapping):
                check.add(where, f"expected a mapping with n and sha256, got {type(split).__name__}")
                continue
            check.typed(split, "n", f"{where}.n", (int,))
            check.typed(split, "sha256", f"{where}.sha256", (str,))

    curves = check.mapping(data, "curves", "curves")
    curve_metrics: set[str] = set()
    for role, curve in (curves or {}).items():
        where = f"curves.{role}"
        if not isinstance(curve, Mapping):
            check.add(where, f"expected a mapping with steps and metrics, got {type(curve).__name__}")
            continue
        steps = check.typed(curve, "steps", f"{where}.steps", (list,))
        length = None
        if steps is not None:
            length = len(steps)
            if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
                check.add(f"{where}.steps", "expected a non-empty list of attack steps (integers >= 0)")
            elif any(b <= a for a, b in zip(steps, steps[1:])):
                check.add(f"{where}.steps", "steps must be strictly increasing")
        metrics = check.mapping(curve, "metrics", f"{where}.metrics")
        for metric, series in (metrics or {}).items():
            curve_metrics.add(metric)
            mwhere = f"{where}.metrics.{metric}"
            if not isinstance(series, Mapping):
                check.add(mwhere, f"expected a mapping, got {type(series).__name__}")
                continue
            per_seed = check.mapping(series, "per_seed", f"{mwhere}.per_seed")
            for seed, values in (per_seed or {}).items():
                check.number_list(values, f"{mwhere}.per_seed.{seed}", length)
            for key in ("mean", "ci95_low", "ci95_high"):
                if key not in series:
                    check.add(f"{mwhere}.{key}", "missing")
                else:
                    check.number_list(series[key], f"{mwhere}.{key}", length)

    summary = check.mapping(data, "summary", "summary")
    for role, per_metric in (summary or {}).items():
        where = f"summary.{role}"
        if curves is not None and role not in curves:
            check.add(where, "has no curve under curves")
        if not isinstance(per_metric, Mapping):
            check.add(where, f"expected a mapping of metrics, got {type(per_metric).__name__}")
            continue
        for metric, stats in per_metric.items():
            mwhere = f"{where}.{metric}"
            if not isinstance(stats, Mapping):
                check.add(mwhere, f"expected a mapping of statistics, got {type(stats).__name__}")
                continue
            for stat in SUMMARY_STATS:
                interval = check.mapping(stats, stat, f"{mwhere}.{stat}")
                if interval is None:
                    continue
                for key in INTERVAL_KEYS:
                    if key not in interval:
                        check.add(f"{mwhere}.{stat}.{key}", "missing")
                    elif not _is_number_or_null(interval[key]):
                        check.add(f"{mwhere}.{stat}.{key}", f"expected a number or null, got {interval[key]!r}")

    higher = check.mapping(data, "higher_is_better", "higher_is_better")
    if higher is not None:
        for metric, flag in higher.items():
            if flag is not None and not isinstance(flag, bool):
                check.add(f"higher_is_better.{metric}", f"expected true, false or null, got {flag!r}")
        for metric in sorted(curve_metrics - set(higher)):
            check.add(f"higher_is_better.{metric}", "missing (the metric has a curve)")

    references = check.mapping(data, "references", "references")
    if references is not None:
        for key in ("target", "retrain"):
            role = check.typed(references, key, f"references.{key}", (str,), nullable=True)
            if role is not None and curves is not None and role not in curves:
                check.add(f"references.{key}", f"names role {role!r}, which has no curve")

    environment = check.mapping(data, "environment", "environment")
    if environment is not None:
        check.typed(environment, "python", "environment.python", (str,))
        packages = check.mapping(environment, "packages", "environment.packages")
        for name, version in (packages or {}).items():
            if version is not None and not isinstance(version, str):
                check.add(f"environment.packages.{name}", f"expected a version string or null, got {version!r}")
        check.typed(environment, "device", "environment.device", (str,))
        check.typed(environment, "threads", "environment.threads", (int,))
        check.typed(environment, "git_revision", "environment.git_revision", (str,), nullable=True)
        check.typed(environment, "git_dirty", "environment.git_dirty", (bool,), nullable=True, required=False)

    timings = check.mapping(data, "timings", "timings")
    for stage, seconds in (timings or {}).items():
        if not _is_number(seconds):
            check.add(f"timings.{stage}", f"expected seconds as a number, got {seconds!r}")
    return check.problems


def reference_roles(result: Mapping[str, Any]) -> dict[str, str | None]:
    """``{"target": role, "retrain": role}`` (``None`` where absent): the curve roles of the
    two baselines, from ``references`` or, where it does not mention a baseline, roles
    literally named so. ``references: {target: null}`` means there is none: a model attacked
    under the label ``target`` with ``--no-baselines`` is not the target baseline."""
    curves = result.get("curves") or {}
    refs = result.get("references") or {}
    out: dict[str, str | None] = {}
    for key in ("target", "retrain"):
        role = refs.get(key) if isinstance(refs, Mapping) else None
        if role is None and key in curves and not (isinstance(refs, Mapping) and key in refs):
            role = key
        out[key] = role if role in curves else None
    return out


#: The attack fields that make two runs the same experiment: every attack hyperparameter
#: (documents in T, steps, lr, schedule, batch, ...), the seeds (each draws its own T), the
#: milestones (where the curve, and so its area, is measured) and the T/V split rule.
ATTACK_SETTINGS_FIELDS = ("name", "hyperparameters", "seeds", "milestones", "split_rule")


def attack_settings_hash(attack: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the :data:`ATTACK_SETTINGS_FIELDS` of a result file's
    ``attack`` section (a missing field counts as null). The runner records it as
    ``attack.settings_hash``; for files written before it did, the leaderboard computes it
    from the recorded settings, which gives the same value."""
    import hashlib
    import json

    payload = {key: to_plain(attack.get(key)) for key in ATTACK_SETTINGS_FIELDS}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def data_digest(data: Mapping[str, Any]) -> str | None:
    """12 hex digits over the sha256 of every split a result file's ``data.splits`` lists:
    two runs on the same source name but other contents (another world configuration) differ."""
    import hashlib

    splits = data.get("splits") if isinstance(data, Mapping) else None
    if not splits:
        return None
    lines = [f"{name}={split.get('sha256') if isinstance(split, Mapping) else split}" for name, split in sorted(splits.items())]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:12]


def metric_label(metric: str) -> str:
    """How tables and plots name a curve metric."""
    return METRIC_LABELS.get(metric, metric)


def ordered_metrics(names: Iterable[str]) -> list[str]:
    """Known metrics in :data:`METRIC_LABELS` order, then any others alphabetically."""
    names = set(names)
    known = [m for m in METRIC_LABELS if m in names]
    return known + sorted(names - set(known))
