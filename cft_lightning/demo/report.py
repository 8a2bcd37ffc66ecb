"""What the demo shows: a summary table over seeds, a bar chart and relevance overlays."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from cft_lightning.evaluation.plots import overlay_grid

__all__ = ["KEY_METRICS", "overlay_grid", "summarize", "summary_markdown"]

# (split, metric) pairs the summary reports, in order.
KEY_METRICS = (
    ("test_ood", "acc1", "OOD top-1"),
    ("test_ood", "acc5", "OOD top-5"),
    ("test_ood", "worst_group_acc", "OOD WGA"),
    ("test_id", "acc1", "ID top-1"),
    ("test_id", "acc5", "ID top-5"),
    ("test_ood", "map", "OOD relevance mAP"),
    ("test_ood", "mean_group_acc", "OOD mean group acc"),
    ("test_ood", "mu_align", "OOD mu_align"),  # decoy benchmarks: share of |attribution| off the decoy
)
# the bar chart leaves out top-5 (with few classes it is close to 100 for every model)
CHART_METRICS = ("OOD top-1", "OOD WGA", "ID top-1", "OOD relevance mAP")


def _class_split_accuracy(res: dict[str, Any], who: str) -> dict[str, float]:
    """OOD top-1 on the fine-tuning classes and on the held-out ones, from the per-group results
    (group names are "<class>|<background>")."""
    groups = res["splits"].get("test_ood", {}).get("groups", {})
    chosen = set(res.get("fine_tuning_classes") or [])
    out = {}
    for label, inside in (("OOD top-1, fine-tuned classes", True), ("OOD top-1, held-out classes", False)):
        items = [g for name, g in groups.items() if who in g and (name.split("|")[0] in chosen) == inside]
        count = sum(g["count"] for g in items)
        if chosen and count:
            out[label] = sum(g["count"] * g[who] for g in items) / count
    return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{row: {metric label: (mean, std, n)}} over seeds; row "original" is the shared pretrained model.

    Besides KEY_METRICS, OOD top-1 is split into the classes the method fine-tuned on and the held-out ones
    (for "original", with the classes its seed's first method used: the same draw for every method)."""
    values: dict[str, dict[str, list[float]]] = {}
    for per_method in results.values():
        for method, res in per_method.items():
            for label, value in _class_split_accuracy(res, "fine_tuned").items():
                values.setdefault(method, {}).setdefault(label, []).append(value)
            if method == next(iter(per_method)):
                for label, value in _class_split_accuracy(res, "original").items():
                    values.setdefault("original", {}).setdefault(label, []).append(value)
            for split, metric, label in KEY_METRICS:
                entry = res["splits"].get(split, {}).get("metrics", {}).get(metric)
                if entry is None:
                    continue
                values.setdefault(method, {}).setdefault(label, []).append(entry["fine_tuned"])
                if method == next(iter(per_method)):  # the reference is the same for every method of a seed
                    values.setdefault("original", {}).setdefault(label, []).append(entry["original"])
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for row in ["original", *[m for m in values if m != "original"]]:
        out[row] = {
            label: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for label, v in values.get(row, {}).items()
        }
    return out


CLASS_SPLIT_LABELS = ("OOD top-1, fine-tuned classes", "OOD top-1, held-out classes")


def summary_markdown(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    labels = [label for _, _, label in KEY_METRICS]
    labels += [label for label in CLASS_SPLIT_LABELS]
    labels = [label for label in labels if any(label in row for row in summary.values())]
    lines = ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row, metrics in summary.items():
        cells = []
        for label in labels:
            if label not in metrics:
                cells.append("-")
                continue
            mean, std, n = metrics[label]
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> Path:
    """Grouped bars (x100) with seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(CHART_METRICS)
    rows = list(summary)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, row in enumerate(rows):
        means = [100 * summary[row].get(label, (np.nan, 0, 0))[0] for label in labels]
        stds = [100 * summary[row].get(label, (0, 0, 0))[1] for label in labels]
        ax.bar(np.arange(len(labels)) + i * width, means, width, yerr=stds, label=row, capsize=2)
    ax.set_xticks(np.arange(len(labels)) + width * (len(rows) - 1) / 2, labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(rows), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
