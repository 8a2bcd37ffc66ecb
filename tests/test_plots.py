"""The pictures, drawn from small synthetic inputs and read back: overlays (colour bar, true class and each
model's prediction per row), the demo's bar chart (no empty group) and the sweep's metric-vs-value figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer

from cft_lightning.demo.report import CHART_METRICS, bar_chart, bar_chart_figure
from cft_lightning.evaluation.plots import RIGHT, WRONG, class_labels, overlay_figure, overlay_grid
from cft_lightning.sweep import plot_metric, write_ablation
from cft_lightning.sweep_figure import ablation_plot


def _overlay_inputs(rows: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, 16, 16, 3), dtype=np.uint8)
    masks = rng.random((rows, 16, 16)) > 0.5
    maps = {"original": torch.rand(rows, 4, 4), "fine_tuned": torch.rand(rows, 4, 4)}
    return images, masks, maps


def test_overlays_have_a_colour_bar_and_per_row_true_class_and_predictions(tmp_path: Path) -> None:
    images, masks, maps = _overlay_inputs()
    fig = overlay_figure(images, masks, maps, true_classes=["tabby cat", "beagle"],
                         predictions={"original": ["tabby cat", "tabby cat"], "fine_tuned": ["tabby cat", "beagle"]})
    tiles = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(tiles) == 2 * 4 and len(bars) == 1  # rows x (image | mask | 2 overlays), one colour bar
    assert "relevance" in bars[0].get_ylabel()
    assert [t.get_text() for t in bars[0].get_yticklabels()] == ["low", "high"]
    assert [ax.get_title() for ax in tiles[:4]] == ["image", "concept mask", "original", "fine_tuned"]
    labels = [[ax.xaxis.label for ax in tiles[r * 4:(r + 1) * 4]] for r in range(2)]
    assert [t.get_text() for t in labels[0]] == ["true: tabby cat", "", "pred: tabby cat ✓", "pred: tabby cat ✓"]
    assert [t.get_text() for t in labels[1]] == ["true: beagle", "", "pred: tabby cat ✗", "pred: beagle ✓"]
    assert labels[1][2].get_color() == WRONG and labels[1][3].get_color() == RIGHT
    path = overlay_grid(images, masks, maps, tmp_path / "sub" / "overlays.png", true_classes=["a", "b"])
    assert path.is_file() and path.stat().st_size > 1000


def test_overlays_without_labels_and_long_names() -> None:
    images, _, maps = _overlay_inputs(1)
    fig = overlay_figure(images, None, maps, predictions={"original": ["x" * 80], "fine_tuned": [""]})
    tiles = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]
    assert len(fig.axes) == 3 + 1
    assert tiles[0].get_xlabel() == "" and tiles[2].get_xlabel() == ""  # no true class, no name: nothing written
    text = tiles[1].xaxis.label
    assert text.get_text().startswith("pred: xxx") and text.get_text().endswith("…") and len(text.get_text()) < 40
    assert text.get_color() == "black"  # no true class to compare with


def test_class_labels_name_imagenet_wnids_and_indices() -> None:
    assert class_labels(torch.tensor([0, 2, 5, -1]), ["n01440764", "b", "c"]) == ["tench", "c", "class 5", ""]
    assert class_labels([1], None) == ["class 1"]


def _summary() -> dict[str, dict[str, tuple[float, float, int]]]:
    return {
        "original": {"OOD top-1": (0.6, 0.02, 3), "OOD WGA": (0.0, 0.0, 3), "ID top-1": (0.9, 0.01, 3),
                     "OOD relevance mAP": (0.7, 0.03, 3)},
        "plain": {"OOD top-1": (0.5, 0.02, 3), "OOD WGA": (0.0, 0.0, 3), "ID top-1": (0.85, 0.01, 3)},  # no mAP
        "rrda_full": {"OOD top-1": (0.8, 0.02, 3), "OOD WGA": (0.1, 0.05, 3), "ID top-1": (float("nan"), 0, 0),
                      "OOD relevance mAP": (0.72, 0.03, 3)},
        "probe_only": {"fine-tuning images: relevance on concepts": (0.5, 0.0, 3)},  # nothing the chart shows
    }


def test_demo_bar_chart_has_no_empty_group(tmp_path: Path) -> None:
    fig = bar_chart_figure(_summary())
    ax = fig.axes[0]
    groups = [t.get_text() for t in ax.get_xticklabels()]
    assert groups == ["OOD top-1", "OOD WGA", "ID top-1", "OOD relevance mAP"] == list(CHART_METRICS)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["original", "plain", "rrda_full"]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    bars = [(bar.get_x() + bar.get_width() / 2, bar.get_height(), c.get_label()) for c in containers
            for bar in c.patches]
    assert all(np.isfinite(h) for _, h, _ in bars)
    expected = {"OOD top-1": 3, "OOD WGA": 3, "ID top-1": 2, "OOD relevance mAP": 2}
    for position, group in enumerate(groups):
        inside = sorted(x for x, _, _ in bars if abs(x - position) < 0.45)
        assert len(inside) == expected[group], group
        assert np.mean(inside) == pytest.approx(position)  # the group's bars are packed around its tick
        gaps = np.diff(inside)
        assert np.allclose(gaps, gaps[0] if len(gaps) else 0)  # side by side: no empty slot between them
    colours: dict[str, set] = {}
    for c in containers:
        colours.setdefault(c.get_label(), set()).add(c.patches[0].get_facecolor())
    assert all(len(v) == 1 for v in colours.values())  # a model keeps one colour in every group
    assert len(set().union(*colours.values())) == 3
    # a metric that is 0 for every model is left out
    zero_wga = {row: {k: v for k, v in m.items()} for row, m in _summary().items() if row != "rrda_full"}
    assert "OOD WGA" not in [t.get_text() for t in bar_chart_figure(zero_wga).axes[0].get_xticklabels()]
    assert bar_chart(_summary(), tmp_path / "metrics.png").stat().st_size > 1000


def _rows(param: str, values: list, metric: list, status: list | None = None) -> list[dict]:
    return [{"run": f"{i:03d}", param: v, "test/acc1": m, "test/ref_acc1": 0.5,
             "status": (status or ["finished"] * len(values))[i]} for i, (v, m) in enumerate(zip(values, metric))]


def test_sweep_figure_plots_the_metric_against_numeric_swept_values() -> None:
    rows = _rows("model.lr", [1e-4, 5e-7, 1e-6, 2e-6], [0.7, 0.6, 0.65, None])  # the last run failed
    fig = ablation_plot(rows, ["model.lr"], "test/acc1", "lr_grid")
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and not ax.patches  # a line plot, not a table or bars
    line = ax.lines[0]
    assert list(line.get_xdata()) == [5e-7, 1e-6, 1e-4]  # the swept values of the runs that reported the metric
    assert list(line.get_ydata()) == [0.6, 0.65, 0.7]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "model.lr" and ax.get_ylabel() == "test/acc1"
    assert list(ax.lines[1].get_ydata()) == [0.5] * 3  # the Original
    assert "3 of 4 run(s)" in ax.get_title()


def test_sweep_figure_draws_bars_for_categorical_values_and_series_for_other_parameters() -> None:
    methods = ["cft_lightning.relevance.AttnLRP", "cft_lightning.relevance.GradCAM"]
    rows = [{"run": str(i), "model.relevance": m, "model.lr": lr, "test/acc1": 0.1 * i}
            for i, (m, lr) in enumerate((m, lr) for lr in (1e-6, 2e-6) for m in methods)]
    fig = ablation_plot(rows, ["model.relevance", "data.seed"], "test/acc1", "t7")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["AttnLRP", "GradCAM"]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # two varying parameters: x is the numeric one (lr), one line per relevance method
    fig = ablation_plot(rows, ["model.relevance", "model.lr"], "test/acc1", "t7")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "model.lr" and len(ax.lines) == 2
    assert [list(line.get_xdata()) for line in ax.lines] == [[1e-6, 2e-6], [1e-6, 2e-6]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["relevance=AttnLRP", "relevance=GradCAM"]
    # seeds are categories, with the mean drawn across
    seeds = _rows("data.seed", [0, 1, 2], [0.6, 0.7, 0.8])
    ax = ablation_plot(seeds, ["data.seed"], "test/acc1", "seeds").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"] and len(ax.patches) == 3
    assert any("mean 0.7" in t.get_text() for t in ax.get_legend().get_texts())
    assert ablation_plot(_rows("model.lr", [1e-6], [None]), ["model.lr"], "test/acc1", "x") is None


def test_write_ablation_draws_the_sweep_metric_and_leaves_no_stale_picture(tmp_path: Path) -> None:
    rows = _rows("model.lr", [1e-4, 1e-3], [0.6, 0.7])
    record = {"name": "smoke_lr", "metric": {"name": "test/acc1"}, "varying": ["model.lr"], "runs": [], "table": rows}
    assert plot_metric(record) == "test/acc1"
    write_ablation(tmp_path, record)
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    failed = {**record, "table": _rows("model.lr", [1e-4], [None], ["failed (exit 1)"])}
    assert plot_metric(failed) is None
    write_ablation(tmp_path, failed)
    assert not (tmp_path / "ablation.png").exists() and (tmp_path / "ablation.md").is_file()
