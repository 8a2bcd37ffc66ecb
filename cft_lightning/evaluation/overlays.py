"""The one "Original vs fine-tuned" overlay: explain a batch with several models, draw their maps side by side.

Every overlay picture goes through these two functions: the `RelevanceOverlays` callback
(`overlays/step_<n>.png`), `cft test` (`overlays.png`), `cft explain` (one PNG per image) and `cft demo`
(`overlays.png`). `explain_models` runs the relevance method on each model (eval mode, autograd on, the model's
previous mode restored); `save_overlays` shows the images as the model saw them, de-normalised with the data's
config (the data config the batch was normalised with, not the model's timm default), and writes
`plots.overlay_grid`: image | mask (optional) | one overlay per model, the true class and each model's
prediction under each row, a colour bar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cft_lightning.evaluation.plots import class_labels, denormalize, overlay_grid

if TYPE_CHECKING:
    import numpy as np

    from cft_lightning.relevance.base import Relevance, RelevanceMethod

__all__ = ["explain_models", "rows_of", "save_overlays"]


def explain_models(models: Mapping[str, nn.Module | None], method: RelevanceMethod, images: Tensor,
                   targets: Tensor | None = None) -> dict[str, Relevance]:
    """{name: relevance of `images`} for every model that is not None, in the order given (e.g. `original`,
    then `fine_tuned`). Each model is explained in eval mode (dropout would blur the picture) with autograd on,
    on its own device, for `targets` (None: each model's predicted class); its training mode is restored."""
    explained: dict[str, Relevance] = {}
    for name, model in models.items():
        if model is None:
            continue
        device = next((p.device for p in model.parameters()), images.device)
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                explained[name] = method(model, images.to(device), None if targets is None else targets.to(device),
                                         differentiable=False)
        finally:
            model.train(was_training)
    return explained


def rows_of(explained: Mapping[str, Relevance], rows: slice) -> dict[str, Relevance]:
    """The same explanations for a slice of the batch (one PNG per image in `cft explain`)."""
    from cft_lightning.relevance.base import Relevance

    return {name: Relevance(rel.maps[rows], rel.raw[rows], rel.logits[rows], rel.targets[rows])
            for name, rel in explained.items()}


def save_overlays(path: str | Path, images: Tensor, data_config: Mapping[str, Any],
                  explained: Mapping[str, Relevance], class_names: Sequence[str] | None = None,
                  labels: Tensor | Sequence[int] | None = None, label_names: Sequence[str] | None = None,
                  masks: np.ndarray | None = None, mask_title: str = "concept mask") -> Path:
    """Write the overlay grid of `explained` (from `explain_models`) over `images` to `path`.

    Args:
        path: the PNG to write (folders are created).
        images: (B, 3, H, W), normalised with `data_config`'s mean and std (a batch as the model saw it).
        data_config: the data's timm data config (its `mean` and `std` undo the normalisation).
        explained: {column title: relevance}; each column shows the maps, and the predicted class under them.
        class_names: names of the model's outputs (None: "class i").
        labels: (B,) true classes (-1: none); None writes no true class.
        label_names: names of the labels when they are not the outputs' (a benchmark's list); default
            `class_names`.
        masks: (B, H, W) masks drawn in a column after the image (`mask_title`), or None.
    """
    truth = None
    if labels is not None:
        truth = class_labels(torch.as_tensor(labels).cpu(), label_names if label_names is not None else class_names)
    return overlay_grid(denormalize(images, data_config["mean"], data_config["std"]), masks,
                        {name: rel.maps.detach().cpu() for name, rel in explained.items()}, Path(path),
                        mask_title=mask_title, true_classes=truth,
                        predictions={name: class_labels(rel.logits.detach().argmax(1).cpu(), class_names)
                                     for name, rel in explained.items()})
