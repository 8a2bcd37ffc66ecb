"""Pictures of results: relevance overlays (Original vs fine-tuned) and bar charts with deltas.

`overlay_grid`: one row per image (image, optional mask, one relevance overlay per model). `results_chart`:
per split, Original and fine-tuned bars for each metric with the delta written above. `cft test` writes both
next to its results files (`overlays.png`, `results.png`) and logs them; the demo and `cft explain` use the
overlays, `cft sweep` the charts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = ["denormalize", "overlay_grid", "results_chart"]


def _heat(map_: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(map_[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min() + 1e-8)
    v = up.numpy()
    return np.stack([v, 0.25 + 0.5 * v * (1 - v) * 4 * 0.5, 1 - v], -1)  # blue (low) to red (high)


def overlay_grid(images: np.ndarray, masks: np.ndarray | None, maps: dict[str, torch.Tensor], path: Path,
                 scale: int = 3, mask_title: str = "concept mask") -> Path:
    """One row per image: image | mask (when given) | one relevance overlay per model (maps on any grid),
    under a header naming the columns. Overlays: red = high, blue = low relevance (min-max per image)."""
    rows = []
    for i in range(len(images)):
        img = images[i].astype(np.float64) / 255
        size = tuple(img.shape[:2])
        tiles = [img] if masks is None else [img, np.repeat(masks[i][..., None].astype(np.float64), 3, -1)]
        for m in maps.values():
            tiles.append(0.45 * img + 0.55 * _heat(m[i], size))
        rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=1) for t in tiles], 1))
    grid = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8)
    body = Image.fromarray(grid)
    body = body.resize((body.width * scale, body.height * scale), Image.NEAREST)
    titles = ["image", *([] if masks is None else [mask_title]), *maps]
    header = 16
    image = Image.new("RGB", (body.width, body.height + header), "white")
    image.paste(body, (0, header))
    draw = ImageDraw.Draw(image)
    tile = body.width / len(titles)
    for k, title in enumerate(titles):
        draw.text((k * tile + 4, 2), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{split}\n{metric}", v) for split, data in payload["splits"].items()
            for metric, v in data["metrics"].items() if metric in metrics]
    if not bars:
        return None
    x = np.arange(len(bars))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(bars) + 1.5), 3.4))
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
    plt.close(fig)
    return path
