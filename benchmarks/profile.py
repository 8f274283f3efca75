"""Where the time of a relearning run goes: ``python -m benchmarks.profile [relearn args...]``.

Runs ``python -m benchmarks.relearn`` in a process of its own (with the arguments given, the default
end-to-end world run when there are none), writing its result files to a temporary directory
so nothing under ``results/`` is touched, and prints its stages -- world, defenses, attacks,
evaluation -- with seconds and share of the wall-clock total, so the slowest stage is visible.

The stage times are the ones the runner records in its result file (``timings``); what they
do not cover (loading models for the attacks, imports, writing the result file and the plot)
is shown as ``rest``. With trajectories in worker processes (``--jobs``) the attack and
evaluation seconds of the workers are scaled to the wall-clock time they took together, so the
stages still add up to the run. The cache decides what a stage costs: with a warm cache the world and the
unlearned models are found, not built.

    python -m benchmarks.profile                      # the default run, current cache
    python -m benchmarks.profile --cold               # from nothing: world and defenses built
    python -m benchmarks.profile --cache /tmp/c --seeds 0 --steps 10

``--cold`` points ``RELEARN_BENCH_CACHE`` at a fresh temporary directory (removed afterwards);
``--cache DIR`` at ``DIR``. Any argument this command does not know goes to the runner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from benchmarks.core.env import CACHE_ENV, cache_root
from benchmarks.core.errors import UsageError, run_cli

PROG = "python -m benchmarks.profile"

#: Stages of a run in pipeline order: the runner's ``timings`` key and how the table names it.
STAGES = (
    ("data", "data"),
    ("world", "world"),
    ("defense", "defenses"),
    ("attack", "attacks"),
    ("evaluation", "evaluation"),
)
#: The stages the profile is for; the runner should record each of them.
EXPECTED = ("world", "defense", "attack", "evaluation")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,  # an abbreviation must not swallow one of the runner's flags
        description="Time a relearning run (python -m benchmarks.relearn) stage by stage. "
        "Arguments not listed here are passed to the runner (see python -m benchmarks.relearn --help).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cold", action="store_true",
                       help=f"use a fresh temporary {CACHE_ENV}, so the world and the defenses are built")
    where.add_argument("--cache", default=None, help=f"use this directory as {CACHE_ENV}")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary output directory (and the --cold cache) and print where")
    return parser


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (unchanged when value is None)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def find_result(out_dir: Path, explicit: str | None, started: float) -> Path | None:
    """The result YAML the run wrote: ``--output`` when given, else the newest YAML under
    ``out_dir`` written after ``started`` (a wall-clock timestamp)."""
    if explicit is not None:
        path = Path(explicit)
        return path if path.is_file() else None
    found = [p for p in out_dir.rglob("*.yaml") if p.stat().st_mtime >= started - 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def stage_rows(timings: dict, wall: float) -> tuple[list[list], list[str]]:
    """Rows ``[stage, seconds, share]`` in pipeline order, then any stage the runner records
    that this module does not know, then ``rest`` (wall − recorded stages) and ``total``; and
    the notes on expected stages the runner did not record."""
    rows, recorded = [], 0.0
    known = {key for key, _ in STAGES} | {"total"}
    ordered = [(key, label) for key, label in STAGES if key in timings]
    ordered += [(key, key) for key in timings if key not in known]
    for key, label in ordered:
        seconds = float(timings[key])
        recorded += seconds
        rows.append([label, seconds])
    slowest = max(rows, key=lambda r: r[1])[0] if rows else None
    rows.append(["rest (model loading, imports, result files, plot)", max(wall - recorded, 0.0)])
    table = [[label + ("  <- slowest" if label == slowest else ""), f"{s:.1f}", f"{s / wall:.0%}" if wall else "-"]
             for label, s in rows]
    table.append(["total (wall clock)", f"{wall:.1f}", "100%"])
    notes = []
    for key in EXPECTED:
        if key not in timings:
            notes.append(
                f"the runner recorded no {key!r} timing: the stage did not run in this configuration "
                "or the runner does not time it"
            )
    if "total" in timings:
        notes.append(f"the runner's own total (without writing files) is {float(timings['total']):.1f} s")
    return table, notes


def _seconds(timings: dict) -> str:
    return ", ".join(f"{key} {float(value):.1f} s" for key, value in timings.items()
                     if isinstance(value, (int, float)) and not key.endswith("_steps") and "loss" not in key)


def stage_details(result: dict, started_at: float) -> list[str]:
    """Where the world and defense stages went, from the files those stages leave: the world's
    ``world.json`` and each unlearned model's ``unlearn.yaml`` (only for what this run built;
    what came from the cache cost nothing here)."""
    import json

    import yaml

    lines = []
    models = result.get("models") or {}
    worlds = {Path(m["checkpoint"]).parent for m in models.values()
              if m.get("kind") in ("target", "retrain") and m.get("checkpoint")}
    for root in sorted(worlds):
        manifest = root / "world.json"
        if manifest.is_file() and manifest.stat().st_mtime >= started_at - 1:
            timings = json.loads(manifest.read_text(encoding="utf-8")).get("timings") or {}
            # A pinned world is copied, not trained: its manifest records no build timings.
            lines.append(f"world built in this run: {_seconds(timings)}" if timings
                         else f"world installed in this run (pinned, no training): {root}")
    for label, model in models.items():
        if model.get("kind") != "defended" or not model.get("checkpoint"):
            continue
        record = Path(model["checkpoint"]) / "unlearn.yaml"
        if record.is_file() and record.stat().st_mtime >= started_at - 1:
            timings = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get("timings") or {}
            lines.append(f"defense {label} unlearned in this run: {_seconds(timings)}")
        elif record.is_file():
            lines.append(f"defense {label}: found in the cache (unlearned earlier)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args, relearn_argv = build_parser().parse_known_args(argv)
    if args.cache is not None and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise UsageError(f"--cache {args.cache!r} is a file, not a directory; give a directory for the cache")
    if args.cache is not None:
        from benchmarks.core.results import check_writable_directory

        check_writable_directory(args.cache, "--cache")
    if _has_flag(relearn_argv, "--dry-run"):
        raise UsageError("--dry-run runs nothing to time; drop it")

    from benchmarks.core.results import check_output_target, check_writable_directory

    explicit_output = _flag_value(relearn_argv, "--output")
    given_dir = _flag_value(relearn_argv, "--output-dir")
    # The runner is a process of its own; where it will write is checked here too, so that a
    # bad path is one line before anything starts.
    if explicit_output is not None:
        check_output_target(explicit_output, overwrite=_has_flag(relearn_argv, "--overwrite"))
    if given_dir is not None:
        check_writable_directory(given_dir, "--output-dir")
    runner_argv = list(relearn_argv)
    temporary: list[Path] = []  # removed at the end unless --keep
    if explicit_output is not None or given_dir is not None:
        out_dir = Path(given_dir) if given_dir is not None else Path(explicit_output).parent
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="relearn-profile-out-"))
        temporary.append(out_dir)
        runner_argv += ["--output-dir", str(out_dir)]
    cache = str(Path(args.cache).expanduser()) if args.cache else None
    if args.cold:
        cache = tempfile.mkdtemp(prefix="relearn-profile-cache-")
        temporary.append(Path(cache))

    try:
        with _environment(CACHE_ENV, cache):
            started_at = time.time()
            began = time.perf_counter()
            # A process of its own, as a user runs it (entry points never import one another);
            # the wall clock includes its start-up and imports.
            code = subprocess.run([sys.executable, "-m", "benchmarks.relearn", *runner_argv]).returncode
            wall = time.perf_counter() - began
        if code != 0:
            return code  # the runner has said why
        result_path = find_result(out_dir, explicit_output, started_at)
        if result_path is None:
            print(f"error: the run wrote no result file under {out_dir}; nothing to profile", file=sys.stderr)
            return 1
        import yaml
        from tabulate import tabulate

        result = yaml.safe_load(result_path.read_text(encoding="utf-8"))
        timings = result.get("timings") or {}
        table, notes = stage_rows(timings, wall)
        if not timings:
            notes.insert(0, f"the result file {result_path} has no 'timings'; only the wall clock is known")
        environment = result.get("environment") or {}
        print()
        print(f"profile of: {result.get('command', PROG)}")
        print(f"cache: {cache or cache_root()}"
              + (" (cold: a fresh temporary cache)" if args.cold else ""))
        jobs = environment.get("jobs", 1)
        print(f"device: {environment.get('device', '?')}, torch threads: {environment.get('threads', '?')}"
              + (f"; {jobs} jobs at once (--jobs), {environment.get('threads_per_job', '?')} thread(s) each"
                 if jobs > 1 else ""))
        print(tabulate(table, headers=["stage", "seconds", "share"], tablefmt="github", disable_numparse=True))
        for line in stage_details(result, started_at):
            print(f"  {line}")
        for note in notes:
            print(f"note: {note}")
        return code
    finally:
        if args.keep:
            if temporary:
                print("kept: " + ", ".join(str(p) for p in temporary), file=sys.stderr)
        else:
            for path in temporary:
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
