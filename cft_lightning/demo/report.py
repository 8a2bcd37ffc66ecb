"""What the demo shows: a summary table over seeds and a bar chart (the overlays: `evaluation/overlays.py`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["KEY_METRICS", "bar_chart", "bar_chart_figure", "paired", "paired_markdown", "per_seed", "summarize",
           "summary_markdown"]

# (split, metric, label) triples the summary reports, in order: first what the models decide ...
DECISION_METRICS = (
    ("test_ood", "acc1", "OOD top-1"),
    ("test_ood", "acc5", "OOD top-5"),
    ("test_ood", "worst_group_acc", "OOD WGA"),
    ("test_id", "acc1", "ID top-1"),
    ("test_id", "acc5", "ID top-5"),
    ("test_ood", "mean_group_acc", "OOD mean group acc"),
    ("test_ood", "mu_align", "OOD mu_align"),  # decoy benchmarks: share of |attribution| off the decoy
)
# ... then where their evidence lies and what their decisions rely on (cft test with data.interventions, on ID
# images, where the background matches the class)
EVIDENCE_METRICS = (
    ("test_ood", "map", "OOD relevance mAP"),
    ("test_ood", "concept_share", "OOD relevance on concepts"),
    ("fewshot", "concept_share", "fine-tuning images: relevance on concepts"),
    ("test_id", "acc1_concepts_removed", "ID top-1, concepts removed"),
    ("test_id", "acc1_background_swapped", "ID top-1, background swapped"),
    ("test_id", "bg_follow", "ID follows swapped background"),
)
KEY_METRICS = DECISION_METRICS + EVIDENCE_METRICS
CLASS_SPLIT_LABELS = ("OOD top-1, fine-tuned classes", "OOD top-1, held-out classes")
# the bar chart leaves out top-5 (with few classes it is close to 100 for every model)
CHART_METRICS = ("OOD top-1", "OOD WGA", "ID top-1", "OOD relevance mAP")
# the paired-difference table and chart: what a repair must move, and what it must not cost (the class split
# only when part of the classes was fine-tuned)
PAIRED_METRICS = ("OOD top-1", "OOD top-1, fine-tuned classes", "OOD top-1, held-out classes", "ID top-1", "OOD WGA",
                  "OOD relevance mAP", "OOD relevance on concepts",
                  "fine-tuning images: relevance on concepts", "ID top-1, concepts removed",
                  "ID top-1, background swapped", "ID follows swapped background")
BOOTSTRAP_DRAWS = 10_000


def _class_split_accuracy(res: dict[str, Any], who: str) -> dict[str, float]:
    """OOD top-1 on the fine-tuning classes and on the held-out ones (the paper's Table 4), from the per-group
    results (group names are "<class>|<background>"); nothing when every class was fine-tuned."""
    groups = res["splits"].get("test_ood", {}).get("groups", {})
    chosen = set(res.get("fine_tuning_classes") or [])
    out: dict[str, float] = {}
    if not chosen or chosen >= {name.split("|")[0] for name in groups}:
        return out  # every class fine-tuned: both columns would repeat OOD top-1 or be empty
    for label, inside in zip(CLASS_SPLIT_LABELS, (True, False)):
        items = [g for name, g in groups.items() if who in g and (name.split("|")[0] in chosen) == inside]
        count = sum(g["count"] for g in items)
        if count:
            out[label] = sum(g["count"] * g[who] for g in items) / count
    return out


def _values(res: dict[str, Any], who: str) -> dict[str, float]:
    out = dict(_class_split_accuracy(res, who))
    for split, metric, label in KEY_METRICS:
        entry = res["splits"].get(split, {}).get("metrics", {}).get(metric)
        if entry is not None and who in entry:
            out[label] = entry[who]
    return out


def per_seed(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric label: {seed: value}}}; row "original" is the seed's starting model (the reference of
    its first method: the same model for every method of a seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for seed, per_method in results.items():
        for i, (method, res) in enumerate(per_method.items()):
            whos = [("original", "original"), (method, "fine_tuned")] if i == 0 else [(method, "fine_tuned")]
            for row, who in whos:
                for label, value in _values(res, who).items():
                    out.setdefault(row, {}).setdefault(label, {})[seed] = value
    return {row: out[row] for row in ["original", *[m for m in out if m != "original"]] if row in out}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{row: {metric label: (mean, std, n)}} over seeds (sample std; 0 for one seed)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for row, metrics in per_seed(results).items():
        out[row] = {}
        for label, by_seed in metrics.items():
            v = list(by_seed.values())
            out[row][label] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
    return out


def bootstrap_interval(diffs: list[float], draws: int = BOOTSTRAP_DRAWS, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling seeds with replacement)."""
    values = np.asarray(diffs, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def sign_test(diffs: list[float]) -> float:
    """Two-sided exact sign test p-value of paired differences (ties dropped); 1.0 with nothing to test."""
    pos = sum(d > 0 for d in diffs)
    n = pos + sum(d < 0 for d in diffs)
    if n == 0:
        return 1.0
    k = min(pos, n - pos)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Paired differences (method - baseline) of one metric over the seeds both have."""

    mean: float
    std: float
    low: float  # 95 % percentile-bootstrap interval of the mean difference
    high: float
    positive: int  # seeds where the method is above the baseline
    n: int
    sign_p: float  # two-sided exact sign test

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def paired(results: dict[str, dict[str, Any]], baseline: str,
           metrics: tuple[str, ...] = PAIRED_METRICS) -> dict[str, dict[str, Paired]]:
    """{method: {metric label: Paired}} of every row against `baseline` ("original" or a method), per seed."""
    table = per_seed(results)
    if baseline not in table:
        return {}
    out: dict[str, dict[str, Paired]] = {}
    for row, values in table.items():
        if row == baseline:
            continue
        for label in metrics:
            mine, theirs = values.get(label, {}), table[baseline].get(label, {})
            seeds = [s for s in mine if s in theirs]
            if not seeds:
                continue
            diffs = [mine[s] - theirs[s] for s in seeds]
            low, high = bootstrap_interval(diffs)
            out.setdefault(row, {})[label] = Paired(
                statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, low, high,
                sum(d > 0 for d in diffs), len(diffs), sign_test(diffs))
    return out


def paired_markdown(diffs: dict[str, dict[str, Paired]], baseline: str) -> str:
    """Mean paired difference x100 [95 % bootstrap interval] (seeds above the baseline / seeds); bold when the
    interval excludes 0."""
    labels = [label for label in PAIRED_METRICS if any(label in row for row in diffs.values())]
    if not labels:
        return ""
    lines = [f"| model - {baseline} | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row, metrics in diffs.items():
        cells = []
        for label in labels:
            d = metrics.get(label)
            if d is None:
                cells.append("-")
            elif d.n < 2:
                cells.append(f"{100 * d.mean:+.1f}")
            else:
                text = f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] ({d.positive}/{d.n})"
                cells.append(f"**{text}**" if d.excludes_zero else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """Two tables, mean ± std over seeds (x100): decisions (with the Table 4 class split when only part of
    the classes was fine-tuned), then evidence and decision reliance."""
    tables = []
    for metrics in (DECISION_METRICS, EVIDENCE_METRICS):
        labels = [label for _, _, label in metrics] + (list(CLASS_SPLIT_LABELS) if metrics is DECISION_METRICS else [])
        labels = [label for label in labels if any(label in row for row in summary.values())]
        if not labels:
            continue
        lines = ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for row, values in summary.items():
            cells = []
            for label in labels:
                if label not in values:
                    cells.append("-")
                    continue
                mean, std, n = values[label]
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


FOREST_METRICS = ("OOD top-1", "ID top-1", "ID top-1, background swapped")


def _chart_values(summary: dict[str, dict[str, tuple[float, float, int]]]
                  ) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[float, float]]]:
    """(metrics, rows, {(row, metric): (mean, std)}) of the bar panel, with nothing empty: a value that is absent
    or not finite is left out, then a metric with no value (or 0 for every row: WGA when no model gets every group
    right) and a row with no value."""
    values = {(row, label): (metrics[label][0], metrics[label][1]) for row, metrics in summary.items()
              for label in CHART_METRICS if label in metrics and math.isfinite(metrics[label][0])}
    labels = [label for label in CHART_METRICS if any(m == label and v[0] > 0 for (_, m), v in values.items())]
    rows = [row for row in summary if any((row, label) in values for label in labels)]
    return labels, rows, {key: v for key, v in values.items() if key[0] in rows and key[1] in labels}


def bar_chart_figure(summary: dict[str, dict[str, tuple[float, float, int]]],
                     diffs: dict[str, dict[str, Paired]] | None = None, baseline: str = "original") -> Figure:
    """Grouped bars (x100, seed spread as error bars): per metric, one bar per model that has it, packed side by
    side (no empty slot; a model keeps its colour in every group); with `diffs`, a second panel with each
    method's paired difference to `baseline` and its 95 % bootstrap interval (filled markers: the interval
    excludes 0)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels, rows, values = _chart_values(summary)
    colours = colormaps["tab20" if len(rows) > 10 else "tab10"]
    colour = {row: colours(i % colours.N) for i, row in enumerate(rows)}
    panels = 2 if diffs else 1
    fig = Figure(figsize=(8 + 5 * (panels - 1), 3.8 + 0.12 * max(0, len(rows) - 8)), layout="tight")
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0, 0]
    widest = max([sum((row, label) in values for row in rows) for label in labels] or [1])
    width = 0.8 / widest
    for j, label in enumerate(labels):
        present = [row for row in rows if (row, label) in values]
        start = j - width * (len(present) - 1) / 2
        for k, row in enumerate(present):
            mean, std = values[(row, label)]
            ax.bar(start + k * width, 100 * mean, width, yerr=100 * std, capsize=2, color=colour[row],
                   error_kw={"elinewidth": 0.8}, label=row)
            if 100 * mean < 1.5:  # a bar too low to see is a value, not a gap: write it
                ax.text(start + k * width, 100 * (mean + std) + 1, f"{100 * mean:.0f}", ha="center", fontsize=6,
                        color=colour[row])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_ylim(0, 100)
    ax.legend(handles=[Patch(color=colour[row], label=row) for row in rows], ncol=min(len(rows), 6), fontsize=7,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if diffs:
        ax = axes[0, 1]
        methods = list(diffs)
        metrics = [m for m in FOREST_METRICS if any(m in diffs[r] for r in methods)]
        step = 0.8 / max(len(metrics), 1)
        for j, metric in enumerate(metrics):
            for i, method in enumerate(methods):
                d = diffs[method].get(metric)
                if d is None:
                    continue
                y = i + (j - (len(metrics) - 1) / 2) * step
                lo, hi = (d.low, d.high) if d.n > 1 else (d.mean, d.mean)
                ax.errorbar(100 * d.mean, y, xerr=[[100 * (d.mean - lo)], [100 * (hi - d.mean)]], fmt="o",
                            color=f"C{j}", mfc=f"C{j}" if d.excludes_zero else "white", capsize=2,
                            label=metric if i == 0 else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"paired difference to {baseline}, points (95 % bootstrap over seeds)")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(metrics), frameon=False)
    return fig


def bar_chart(summary: dict[str, dict[str, tuple[float, float, int]]], path: Path,
              diffs: dict[str, dict[str, Paired]] | None = None, baseline: str = "original") -> Path:
    """Write `bar_chart_figure` as a PNG at `path`."""
    bar_chart_figure(summary, diffs, baseline).savefig(path, dpi=120)
    return path
