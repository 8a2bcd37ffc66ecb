"""`cft sweep`'s `ablation.png`: the sweep's metric against the swept value.

A numeric parameter (a learning rate, a weight) is the x axis of a line plot (log-scaled when its values span
more than a factor of 20); a categorical one (a config file, a relevance method, a mask store, a seed) gets one
bar per value, in the grid's order. With several varying parameters, x is the first numeric one (else the
first) and every combination of the others is its own line or bar series. Runs without the metric (failed,
unfinished) are left out, not drawn as empty slots. When the runs also report the Original's value of the
metric (`test/ref_<metric>`), it is drawn beside them (a dashed line, or a black tick per bar), since that is
what fine-tuning is compared against. A seed sweep gets a dashed line at the mean with the spread in its label.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ablation_plot", "is_finite_number", "reference_key", "short_value"]

LOG_SPAN = 20.0  # numeric values spanning more than this factor get a log x axis


def is_finite_number(value: Any) -> bool:
    """Whether a results cell holds a finite number (not a bool, None, NaN, inf or text)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short_value(value: Any) -> str:
    """A swept value as a run name or a legend shows it: class paths and file paths by their last part, lists
    and mappings as JSON."""
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", text):
        return text.rsplit(".", 1)[-1]  # a class path
    if isinstance(value, str) and ("/" in text or text.endswith((".yaml", ".yml", ".json"))):
        return Path(text).stem
    return text


def _numeric(values: list[Any]) -> bool:
    return bool(values) and all(is_finite_number(v) for v in values)


def _is_seed(param: str) -> bool:
    return "seed" in param.rsplit(".", 1)[-1]


def reference_key(metric: str) -> str:
    """The Original's column of a metric: `test/acc1` -> `test/ref_acc1`, `test/ood/acc1` -> `test/ood/ref_acc1`."""
    head, _, name = metric.rpartition("/")
    return f"{head}/ref_{name}" if head else f"ref_{name}"


def _series(rows: list[dict[str, Any]], others: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by the values of the non-x varying parameters ("" when there are none), in grid order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k.split('.')[-1]}={short_value(row.get(k))}" for k in others)
        groups.setdefault(label, []).append(row)
    return groups


def _lines(ax: Axes, series: dict[str, list[dict[str, Any]]], x: str, metric: str) -> None:
    values = sorted({row[x] for rows in series.values() for row in rows})
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r[x])
        ax.plot([r[x] for r in rows], [r[metric] for r in rows], marker="o", label=label or metric)
        reference = [r for r in rows if is_finite_number(r.get(reference_key(metric)))]
        if reference:
            ax.plot([r[x] for r in reference], [r[reference_key(metric)] for r in reference], ls="--", marker=".",
                    color="k", label="Original" + (f" ({label})" if label else ""))
    if values[0] > 0 and values[-1] / values[0] > LOG_SPAN:
        ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values], fontsize=8)
    ax.minorticks_off()


def _bars(ax: Axes, series: dict[str, list[dict[str, Any]]], x: str | None, metric: str) -> None:
    def category(row: dict[str, Any]) -> str:
        return short_value(row[x]) if x else str(row["run"])

    categories = list(dict.fromkeys(category(r) for rows in series.values() for r in rows))
    width = 0.8 / len(series)
    marked = False
    for s, (label, rows) in enumerate(series.items()):
        positions = [categories.index(category(r)) + (s - (len(series) - 1) / 2) * width for r in rows]
        ax.bar(positions, [r[metric] for r in rows], width, label=label or metric)
        reference = [(p, r[reference_key(metric)]) for p, r in zip(positions, rows)
                     if is_finite_number(r.get(reference_key(metric)))]
        if reference:
            ax.scatter(*zip(*reference), marker="_", s=400 * width, color="k", zorder=3,
                       label=None if marked else "Original")
            marked = True
    rotate = max(len(c) for c in categories) > 10
    ax.set_xticks(range(len(categories)), categories, fontsize=8, rotation=30 if rotate else 0,
                  ha="right" if rotate else "center")


def ablation_plot(rows: list[dict[str, Any]], varying: list[str], metric: str, title: str) -> Figure | None:
    """`metric` against the swept value (see the module docstring); None when no run reported it."""
    from matplotlib.figure import Figure

    done = [row for row in rows if is_finite_number(row.get(metric))]
    if not done:
        return None
    numeric = [k for k in varying if not _is_seed(k) and _numeric([row.get(k) for row in done])]
    x = numeric[0] if numeric else (varying[0] if varying else None)
    series = _series(done, [k for k in varying if k != x])
    fig = Figure(figsize=(max(4.5, 0.9 * len({str(r.get(x)) for r in done}) + 2.5), 3.8), layout="constrained")
    ax = fig.add_subplot()
    if x in numeric:
        _lines(ax, series, x, metric)
    else:
        _bars(ax, series, x, metric)
    if x is not None and _is_seed(x) and len(done) > 1:
        values = [row[metric] for row in done]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        ax.axhline(mean, ls="--", color="0.4", lw=1, label=f"mean {mean:.4g} ± {std:.2g} (std)")
    ax.set_xlabel(x or "run")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric} ({len(done)} of {len(rows)} run(s))", fontsize=10)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7)
    return fig
