"""Recovery-curve figures for one result file (DESIGN §6).

One panel per metric present in the result (in the order of
:data:`benchmarks.core.results.METRIC_LABELS`): x = attack steps from 0, y on a fixed scale
(0–100 for the MUSE scores, −100–100 for PrivLeak) so that figures of different runs compare
at a glance. Each model role gets its mean over seeds as a line and its 95 % interval as a
shaded band; the target and retrain baselines are dashed.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``, so plotting keeps no global state and needs no display.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.core.results import atomic_write, metric_label, ordered_metrics, reference_roles

# Fixed y ranges; any other metric gets 0–100 as well.
Y_LIMITS = {"privleak": (-100.0, 100.0)}
DEFAULT_Y_LIMITS = (0.0, 100.0)
REFERENCE_STYLE = {"target": {"color": "black"}, "retrain": {"color": "0.55"}}
# Colour-blind-safe palette (Okabe & Ito) for the defenses.
DEFENSE_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
MAX_COLUMNS = 3


def _floats(values: Any) -> list[float]:
    """Numbers as floats, with null as NaN so matplotlib leaves a gap."""
    return [math.nan if v is None else float(v) for v in (values or [])]


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _title(result: Mapping[str, Any]) -> str:
    model = (result.get("model") or {}).get("id", "?")
    source = (result.get("data") or {}).get("source", "?")
    attack = result.get("attack") or {}
    parts = [f"model {_short(str(model))}", f"data {_short(str(source))}"]
    n_relearn = len(attack.get("relearn_doc_ids") or [])
    n_heldout = len(attack.get("heldout_doc_ids") or [])
    n_seeds = len(attack.get("seeds") or [])
    parts.append(
        f"attack {attack.get('name', '?')} on {n_relearn} docs (T), {n_heldout} held out (V), "
        f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    )
    title = " | ".join(parts)
    status = result.get("status")
    if status and status != "complete":
        title += f"  [{status}]"
    return title


def recovery_figure(
    result: Mapping[str, Any],
    metrics: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    y_limits: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """The recovery-curve figure of one result dict (see :mod:`benchmarks.core.results`).

    Other benchmarks' results (TOFU's) come in the same ``curves``/``references`` layout and
    say which ``metrics`` to draw in which order, their panel ``labels``, ``y_limits`` and the
    ``title``; by default every metric of the file is drawn with the MUSE names and scales."""
    curves: Mapping[str, Any] = result.get("curves") or {}
    refs = reference_roles(result)
    reference_of = {role: kind for kind, role in refs.items() if role is not None}
    # Defenses first, in file order, then the baselines drawn on top of them.
    roles = [r for r in curves if r not in reference_of]
    roles += [refs[kind] for kind in ("target", "retrain") if refs[kind] is not None]
    roles = list(dict.fromkeys(roles))
    present = ordered_metrics(m for curve in curves.values() for m in (curve.get("metrics") or {}))
    metrics = present if metrics is None else [m for m in metrics if m in present]
    if not metrics:
        raise ValueError("the result has no curves to plot")

    columns = min(len(metrics), MAX_COLUMNS)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.3 * rows + 1.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()

    colors: dict[str, dict] = {}
    palette = iter(DEFENSE_COLORS * (1 + len(roles) // len(DEFENSE_COLORS)))
    for role in roles:
        kind = reference_of.get(role)
        if kind is not None:
            colors[role] = {**REFERENCE_STYLE[kind], "linestyle": "--"}
        else:
            colors[role] = {"color": next(palette), "linestyle": "-"}

    legend: dict[str, Any] = {}
    for ax, metric in zip(axes, metrics):
        for role in roles:
            series = (curves[role].get("metrics") or {}).get(metric)
            if series is None:
                continue
            steps = list(curves[role].get("steps") or [])
            mean = _floats(series.get("mean"))
            style = colors[role]
            label = f"{role} ({reference_of[role]})" if role in reference_of and role != reference_of[role] else role
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, linewidth=1.6, label=label, **style)
            legend.setdefault(label, line)
            low, high = _floats(series.get("ci95_low")), _floats(series.get("ci95_high"))
            if len(low) == len(steps) == len(high) and any(math.isfinite(v) for v in low + high):
                ax.fill_between(steps, low, high, color=style["color"], alpha=0.18, linewidth=0)
        ax.set_title((labels or {}).get(metric) or metric_label(metric), fontsize=10)
        ax.set_xlabel("attack step")
        ax.set_ylim(*((y_limits or {}).get(metric) or Y_LIMITS.get(metric, DEFAULT_Y_LIMITS)))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)

    figure.suptitle(title or _title(result), fontsize=10)
    figure.legend(list(legend.values()), list(legend.keys()), loc="outside lower center",
                  ncols=min(len(legend), 6), frameon=False)
    return figure


def plot_recovery(result: Mapping[str, Any], png_path: str | os.PathLike, overwrite: bool = False,
                  **figure_options: Any) -> Path:
    """Draw :func:`recovery_figure` (with ``figure_options``) to ``png_path`` atomically
    (temporary file, then rename); an existing file is replaced only with ``overwrite=True``."""
    figure = recovery_figure(result, **figure_options)
    return atomic_write(
        Path(png_path), lambda stream: figure.savefig(stream, format="png", dpi=130),
        overwrite=overwrite, binary=True,
    )
