"""Imports flow one way (DESIGN §1): entry points -> defenses, attacks -> benchmarks.core.

``benchmarks.core`` never imports ``defenses``, ``attacks`` or an entry module
(``benchmarks.<name>`` outside ``core``); ``defenses`` and ``attacks`` never import each other
nor an entry module. Imports are read from the source with ``ast``, so lazy imports inside
functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "core": {"defenses", "attacks", "entry"},
    "defenses": {"attacks", "entry"},
    "attacks": {"defenses", "entry"},
    "entry": {"entry"},  # entry points never import one another: what two share lives in core
}


def layer_of(module: str) -> str | None:
    """``core``, ``defenses``, ``attacks``, ``entry`` or None (third party, the bare
    ``benchmarks`` package)."""
    parts = module.split(".")
    if parts[0] in ("defenses", "attacks"):
        return parts[0]
    if parts[0] == "benchmarks" and len(parts) > 1:
        return "core" if parts[1] == "core" else "entry"
    return None


def imported_modules(module: str, source: str, is_package: bool = False) -> set[str]:
    """Absolute names of everything ``source`` (the code of ``module``) imports. For
    ``from X import y`` both ``X`` and ``X.y`` are listed, since ``y`` may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
    return names


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    forbidden = FORBIDDEN[layer_of(module) or "entry"]
    return sorted(
        f"{module} imports {name} ({layer_of(name)})"
        for name in imported_modules(module, source, is_package)
        if layer_of(name) in forbidden
    )


def project_modules() -> dict[str, Path]:
    """Every module of benchmarks/core, defenses, attacks and the entry points benchmarks/*.py."""
    files = [*(ROOT / "benchmarks" / "core").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "defenses").rglob("*.py"), *(ROOT / "attacks").rglob("*.py")]
    modules = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def test_scan_covers_the_layers():
    modules = project_modules()
    assert {"benchmarks.core.results", "benchmarks.core.errors", "benchmarks.leaderboard",
            "defenses", "attacks"} <= set(modules)


def test_imports_follow_the_layering():
    problems = []
    for module, path in sorted(project_modules().items()):
        problems += violations(module, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py")
    assert problems == [], "imports against DESIGN §1:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("defenses.npo", "from attacks.lora import LoraAttack",
         ["defenses.npo imports attacks.lora (attacks)", "defenses.npo imports attacks.lora.LoraAttack (attacks)"]),
        ("defenses.npo", "import torch\nfrom benchmarks.core.logprobs import sequence_logps", []),
        ("attacks.lora", "def build():\n    import defenses.npo\n", ["attacks.lora imports defenses.npo (defenses)"]),
        ("benchmarks.core.results", "import defenses", ["benchmarks.core.results imports defenses (defenses)"]),
        ("benchmarks.core.results", "from benchmarks import relearn",
         ["benchmarks.core.results imports benchmarks.relearn (entry)"]),
        ("benchmarks.core.results", "from .. import relearn",
         ["benchmarks.core.results imports benchmarks.relearn (entry)"]),
        ("benchmarks.core.results", "from . import errors\nfrom .registry import Registry", []),
        ("attacks", "from .finetune import FineTune", []),
        ("benchmarks.relearn", "import defenses, attacks\nfrom benchmarks.core import results", []),
    ],
)
def test_violation_check_on_synthetic_sources(module, source, expected):
    assert violations(module, source, is_package="." not in module) == expected
