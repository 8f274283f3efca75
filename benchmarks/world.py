"""``python -m benchmarks.world``: the embedded world (corpus, target and retrain models).

By default the world of the default configuration is the **pinned** one shipped with the
package (:mod:`benchmarks.core.pinned_world`): the same model bytes on every machine, verified
by digest, with the corpus generated from its seed. Nothing is trained. Another configuration,
or ``--rebuild``, trains from the recipe (:mod:`benchmarks.core.world_build`).

    python -m benchmarks.world                       # install (or find) the default world
    python -m benchmarks.world --rebuild [--out DIR] # retrain it from the recipe and compare scores
    python -m benchmarks.world --pin --out DIR       # make a rebuilt world the pinned one (maintainers)

``--tofu`` does the same for the TOFU-style author world (``--data tofu-world`` elsewhere;
:mod:`benchmarks.core.pinned_tofu_world`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from benchmarks.core.errors import UsageError, run_cli, setup_logging

logger = logging.getLogger("benchmarks.world")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``) like every other usage error."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see python -m benchmarks.world --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m benchmarks.world",
        description="Install (pinned) or build the embedded world: corpus, target and retrain models.",
    )
    parser.add_argument(
        "--out", default=None,
        help="directory of the world (default: $RELEARN_BENCH_CACHE/world-<hash>, "
        "$RELEARN_BENCH_CACHE defaulting to ~/.cache/relearn-bench; with --rebuild: world-<hash>-rebuild)",
    )
    parser.add_argument(
        "--tofu", action="store_true",
        help="the TOFU-style author world (--data tofu-world) instead of the MUSE-style world "
        "(default --out: $RELEARN_BENCH_CACHE/tofu-world-<hash>)",
    )
    parser.add_argument("--force", action="store_true", help="replace a world already in --out")
    parser.add_argument(
        "--rebuild", action="store_true",
        help="train target and retrain from the recipe instead of installing the pinned models, "
        "then evaluate both and print their scores beside the pinned ones",
    )
    parser.add_argument(
        "--pin", action="store_true",
        help="make the world trained in --out (by --rebuild, now or earlier) the package's pinned world "
        "(maintainers): its scores are measured and recorded with the digests",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.pin and args.out is None and not args.rebuild:
        raise UsageError("--pin needs the trained world to pin: --out DIR (a world made by --rebuild) or --rebuild")
    setup_logging(args.verbose)

    from benchmarks.core import world_build

    out = args.out
    # (--tofu: the author world's default directories are its own, benchmarks.core.pinned_tofu_world)
    if args.rebuild and out is None and not args.tofu:
        out = world_build.default_world_dir(world_build.WorldBuildConfig()).with_name(
            world_build.default_world_dir(world_build.WorldBuildConfig()).name + "-rebuild"
        )
    world_build.check_world_target(out)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from benchmarks.core.processes import from_main

    # Under accelerate launch the main process builds (trains as one process) and the others wait.
    return from_main(lambda: _make(args, argv, out))


def _make(args: argparse.Namespace, argv: Sequence[str] | None, out) -> int:
    """Build, install or pin the world as asked, and print where it is."""
    from benchmarks.core import pinned_world, world_build
    from benchmarks.core.results import command_line

    if args.tofu:
        from benchmarks.core import pinned_tofu_world

        for line in pinned_tofu_world.make_from_cli(out, rebuild=args.rebuild, pin_it=args.pin, force=args.force,
                                                    command=command_line("benchmarks.world", argv)):
            print(line)
        return 0

    if args.pin and not args.rebuild:
        manifest = world_build.read_manifest(Path(out))
        if manifest is None or manifest.get("pinned") or manifest.get("hash") != world_build.world_hash(
                world_build.WorldBuildConfig()):
            raise UsageError(f"--pin: {out} holds no world of the default configuration trained from its recipe; "
                             "make one with python -m benchmarks.world --rebuild --out DIR")
        paths = world_build.WorldPaths.at(Path(out))
    else:
        paths = world_build.ensure_world(out, force=args.force or args.rebuild, rebuild=args.rebuild)
        if args.rebuild:  # the world records the command that trained it (pin copies it on)
            manifest_path = paths.root / world_build.MANIFEST
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            manifest["built_by"] = command_line("benchmarks.world", argv)
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"world:   {paths.root}")
    print(f"corpus:  {paths.corpus_dir}")
    print(f"target:  {paths.target_dir}")
    print(f"retrain: {paths.retrain_dir}")
    if args.rebuild or args.pin:
        scores = pinned_world.score_world(paths)
        print(pinned_world.format_comparison(scores, pinned_world.pinned_manifest()))
        if args.pin:
            where = pinned_world.pin(paths, scores, command=command_line("benchmarks.world", argv))
            print(f"pinned:  {where}")
    return 0


if __name__ == "__main__":
    run_cli(main)
