"""Writing `cft test` results: a terminal table, and markdown, CSV and JSON files in the run folder.

The JSON file is an interface (schema `cft_lightning.results/1`, documented in docs/results.md):

    {"schema": "cft_lightning.results/1",
     "run": {"created": ISO time, "checkpoint": path or null, "backbone": timm name,
             "regularizer": class path, "relevance": class path or null},
     "splits": {split: {"num_images": int,
                        "metrics": {metric: {"original": float, "fine_tuned": float, "delta": float}},
                        "groups": {group name: {"count": int, "original": float, "fine_tuned": float}}}}}

Metric values are fractions in [0, 1]; tables show them x100. A model that was not evaluated (no reference)
has no key; `delta` exists only when both do.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from cft_lightning._io import atomic_write

__all__ = ["METRIC_LABELS", "SCHEMA", "markdown_table", "print_table", "write_results"]

SCHEMA = "cft_lightning.results/1"
METRIC_LABELS = {
    "acc1": "top-1",
    "acc5": "top-5",
    "acc1_seen": "top-1, fine-tuned classes",
    "acc5_seen": "top-5, fine-tuned classes",
    "acc1_held_out": "top-1, held-out classes",
    "acc5_held_out": "top-5, held-out classes",
    "worst_group_acc": "worst-group acc (WGA)",
    "mean_group_acc": "mean group acc (unweighted)",
    "pixel_acc": "relevance pixel acc",
    "miou": "relevance mIoU",
    "map": "relevance mAP",
    "concept_share": "positive relevance on concepts",
    "concept_area": "concept area (share of grid)",
    "acc1_concepts_removed": "top-1, concepts removed",
    "acc1_background_swapped": "top-1, background swapped",
    "bg_follow": "follows swapped background",
}


def _rows(results: dict[str, Any]) -> list[tuple[str, str, float | None, float | None, float | None]]:
    rows = []
    for split, data in results["splits"].items():
        for metric, v in data["metrics"].items():
            rows.append((split, metric, v.get("original"), v.get("fine_tuned"), v.get("delta")))
    return rows


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or value != value:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| split | metric | Original | Fine-tuned | Δ |", "|---|---|---:|---:|---:|"]
    for split, metric, orig, tuned, delta in _rows(results):
        label = METRIC_LABELS.get(metric, metric)
        lines.append(f"| {split} | {label} | {_pct(orig)} | {_pct(tuned)} | {_pct(delta, True)} |")
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any], title: str = "cft test") -> None:
    """The results as a rich table on the terminal (values x100)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("split", "left"), ("metric", "left"), ("Original", "right"), ("Fine-tuned", "right"),
                          ("Δ", "right")):
        table.add_column(name, justify=justify)
    for split, metric, orig, tuned, delta in _rows(results):
        style = "" if delta is None or delta != delta else ("green" if delta > 0 else "red" if delta < 0 else "")
        table.add_row(split, METRIC_LABELS.get(metric, metric), _pct(orig), _pct(tuned),
                      f"[{style}]{_pct(delta, True)}[/]" if style else _pct(delta, True))
    Console().print(table)


def write_results(results: dict[str, Any], directory: str | os.PathLike[str], stem: str = "results") -> dict[str, str]:
    """Write `<stem>.json`, `<stem>.csv` and `<stem>.md` atomically; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {ext: os.path.join(directory, f"{stem}.{ext}") for ext in ("json", "csv", "md")}
    payload = {"schema": SCHEMA, **results}
    text_json = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["split", "metric", "original", "fine_tuned", "delta"])
    for row in _rows(results):
        writer.writerow(["" if v is None else v for v in row])
    for ext, text in (("json", text_json), ("csv", buffer.getvalue()), ("md", markdown_table(results))):
        atomic_write(Path(paths[ext]), lambda fh, text=text: fh.write(text.encode("utf-8")))
    return paths
