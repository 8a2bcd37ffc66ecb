"""Pictures of results: relevance overlays (Original vs fine-tuned) and bar charts with deltas.

`overlay_grid`: one row per image (image, optional mask, one relevance overlay per model), a colour bar for the
relevance scale and, under each tile, the image's true class and each model's prediction (green when right, red
when wrong). `results_chart`: per split, Original and fine-tuned bars for each metric with the delta written
above. `cft test` writes both next to its results files (`overlays.png`, `results.png`) and logs them. Every
overlay (`cft test`, the demo, the `RelevanceOverlays` callback, `cft explain`) is drawn through
`evaluation/overlays.py`, which explains the models and calls `overlay_grid`.

Figures are built on `matplotlib.figure.Figure` (no pyplot), so drawing never switches a notebook's backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["OVERLAY_CMAP", "class_labels", "denormalize", "overlay_figure", "overlay_grid", "results_chart"]

OVERLAY_CMAP = "jet"  # blue (low) to red (high) relevance
RIGHT, WRONG = "#1b7f3b", "#c62828"  # prediction text: equal to the true class / not
_WNID = re.compile(r"n\d{8}")


def class_labels(indices: Any, class_names: Sequence[str] | None = None) -> list[str]:
    """Readable names of class indices: `class_names[i]` (ImageNet WNIDs by timm's readable name, e.g. "tench"),
    "class i" beyond the list or without one, "" for -1 (an unlabelled image)."""
    names = [str(n) for n in class_names or []]
    readable: dict[str, str] | None = None
    out = []
    for raw in np.asarray(indices).reshape(-1).tolist():
        i = int(raw)
        if i < 0:
            out.append("")
            continue
        name = names[i] if i < len(names) else f"class {i}"
        if _WNID.fullmatch(name):
            if readable is None:
                from cft_lightning.data.image_folder import imagenet_class_names

                readable = imagenet_class_names()
            name = readable.get(name, name)
        out.append(name)
    return out


def _heat(map_: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The map upsampled (bilinear) to the image and min-max normalised into [0, 1]."""
    up = F.interpolate(map_[None, None].detach().float().cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return ((up - up.min()) / (up.max() - up.min() + 1e-8)).numpy()


def _short(name: str, chars: int) -> str:
    return name if len(name) <= chars else name[: chars - 1] + "…"


def overlay_figure(images: np.ndarray, masks: np.ndarray | None, maps: Mapping[str, torch.Tensor],
                   mask_title: str = "concept mask", true_classes: Sequence[str] | None = None,
                   predictions: Mapping[str, Sequence[str]] | None = None, scale: int = 3) -> Figure:
    """The overlay grid as a figure: rows of image | mask (when given) | one overlay per model, column titles on
    the first row, a colour bar of the relevance scale (maps are min-max normalised per image), "true: <class>"
    under each image and "pred: <class>" under each model's overlay (green and ✓ when it equals the true class,
    red and ✗ when not; black without a true class). Empty class names ("") are not written."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    models = list(maps)
    columns = ["image", *([] if masks is None else [mask_title]), *models]
    rows, height, width = len(images), images.shape[1], images.shape[2]
    tile = float(np.clip(width * scale / 100, 1.3, 2.4))  # inches per tile at 100 dpi
    labelled = true_classes is not None or bool(predictions)
    chars = max(8, int(tile * 100 / 7) - 8)  # a class name that fits under its tile (8-point text)
    fig = Figure(figsize=(tile * len(columns) + 1.0, (tile + (0.3 if labelled else 0.05)) * rows + 0.5),
                 layout="constrained")
    grid = fig.add_gridspec(rows, len(columns) + 1, width_ratios=[1.0] * len(columns) + [0.06])
    for i in range(rows):
        image = images[i].astype(np.float64) / 255
        truth = true_classes[i] if true_classes is not None else ""
        for c, column in enumerate(columns):
            ax = fig.add_subplot(grid[i, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column, fontsize=9)
            if column == "image" and c == 0:
                ax.imshow(image, interpolation="nearest")
                if truth:
                    ax.set_xlabel(f"true: {_short(truth, chars)}", fontsize=8)
            elif masks is not None and c == 1:
                ax.imshow(masks[i].astype(np.float64), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
                ax.imshow(_heat(maps[column][i], (height, width)), cmap=OVERLAY_CMAP, vmin=0, vmax=1, alpha=0.5,
                          interpolation="nearest")
                predicted = (predictions or {}).get(column)
                if predicted is not None and predicted[i]:
                    mark, colour = ("", "black") if not truth else \
                        ((" ✓", RIGHT) if predicted[i] == truth else (" ✗", WRONG))
                    ax.set_xlabel(f"pred: {_short(predicted[i], chars)}{mark}", fontsize=8, color=colour)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), OVERLAY_CMAP), cax=fig.add_subplot(grid[:, -1]))
    bar.set_ticks([0, 1], labels=["low", "high"])
    bar.set_label("relevance (min-max per image)", fontsize=8)
    return fig


def overlay_grid(images: np.ndarray, masks: np.ndarray | None, maps: Mapping[str, torch.Tensor], path: Path,
                 scale: int = 3, mask_title: str = "concept mask", true_classes: Sequence[str] | None = None,
                 predictions: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write `overlay_figure` as a PNG at `path` (images (B, H, W, 3) uint8; masks (B, H, W); maps {model:
    (B, h, w)} on any grid; `true_classes` and `predictions` {model: names} per image, optional)."""
    fig = overlay_figure(images, masks, maps, mask_title, true_classes, predictions, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def denormalize(images: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) uint8 pixels."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    pixels = (images.detach().cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (pixels * 255).round().astype(np.uint8)


def results_chart(payload: dict[str, Any], path: str | Path, metrics: tuple[str, ...] = ("acc1",)) -> Path | None:
    """Grouped bars (x100): per split and metric, Original and fine-tuned, the delta above each pair.
    None when no split has any of `metrics`."""
    from matplotlib.figure import Figure

    bars = [(f"{split}\n{metric}", v) for split, data in payload["splits"].items()
            for metric, v in data["metrics"].items() if metric in metrics]
    if not bars:
        return None
    x = np.arange(len(bars))
    fig = Figure(figsize=(max(4.0, 1.3 * len(bars) + 1.5), 3.4))
    ax = fig.add_subplot()
    for offset, who, label in ((-0.2, "original", "Original"), (0.2, "fine_tuned", "Fine-tuned")):
        ax.bar(x + offset, [100 * (v.get(who) if v.get(who) is not None else np.nan) for _, v in bars], 0.4,
               label=label)
    for i, (_, v) in enumerate(bars):
        if v.get("delta") is not None:
            top = 100 * max(v.get("original") or 0.0, v.get("fine_tuned") or 0.0)
            ax.text(i, top + 1.5, f"{100 * v['delta']:+.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, [name for name, _ in bars], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
