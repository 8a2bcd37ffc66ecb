"""RRDA, Right for the Right Reasons Data Augmentation (Santos & Zanchettin, ICCV-W 2023).

The foreground of an image is composited onto the context of an image of another class, keeping the
foreground's label; the model is trained with cross-entropy on the result:

    x~_i = M_i * x_i + (1 - M_i) * context(x_j),   y~_i = y_i,   y_j != y_i

The paper (only its abstract is public, no code) leaves open what this implementation decides, each a
documented argument:
- partner: j is drawn uniformly among the images of the same batch with another label (no extra image
  loading, no Python loop); an image whose batch holds no other class stays unchanged;
- probability: each image is replaced by its composite with probability `probability` (0.5), so
  original and augmented samples are mixed in every batch;
- context: j's own foreground is removed, its pixels filled with the mean colour of j's context
  (`context_fill: mean`), so no evidence of j's class remains; `keep` leaves j's object in place;
- masks: soft mask values blend the two images linearly;
- evaluation: only a model in training mode sees composites; validation scores the real images.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers.base import (
    Regularizer,
    RegularizerOutput,
    check_choice,
    check_positive,
    cross_entropy,
    labels_of,
)
from cft_lightning.relevance.base import RelevanceMethod

ContextFill = Literal["mean", "keep"]

__all__ = ["RRDA", "ContextFill", "composite_foregrounds"]


def composite_foregrounds(
    images: Tensor,
    masks: Tensor,
    labels: Tensor,
    probability: float,
    context_fill: ContextFill = "mean",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Composite each image's foreground onto the context of another-class image of the batch.

    Returns (images (B, C, H, W), partner index (B,), applied (B,) bool): `applied[i]` is False where the
    image was left unchanged (not drawn, or no image of another class in the batch).
    """
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    check_choice("context_fill", context_fill, ("mean", "keep"))
    B, device = images.shape[0], images.device
    labels = labels.to(device)
    other = labels[:, None] != labels[None, :]
    scores = torch.rand(B, B, generator=generator, device=generator.device if generator else device).to(device)
    partner = scores.masked_fill(~other, -1.0).argmax(dim=1)
    drawn = torch.rand(B, generator=generator, device=generator.device if generator else device).to(device)
    applied = (drawn < probability) & other.any(dim=1)
    m = masks.to(device=device, dtype=images.dtype).clamp(0.0, 1.0).unsqueeze(1)
    context, context_fg = images[partner], m[partner]
    if context_fill == "mean":
        bg = 1.0 - context_fg
        mean = (context * bg).sum(dim=(2, 3), keepdim=True) / bg.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        context = context * bg + mean * context_fg
    mixed = m * images + (1.0 - m) * context
    return torch.where(applied[:, None, None, None], mixed, images), partner, applied


@register_regularizer("rrda")
class RRDA(Regularizer):
    """Cross-entropy on batches where foregrounds are pasted onto other classes' contexts."""

    required_masks = ("object",)

    def __init__(
        self,
        probability: float = 0.5,
        context_fill: ContextFill = "mean",
        mask_kind: str = "object",
        temperature: float = 1.0,
    ) -> None:
        """
        Args:
            probability: chance that an image is replaced by its composite.
            context_fill: `mean` (the partner's foreground is filled with its context's mean colour) or `keep`.
            mask_kind: the masks that mark the foreground (`object`; `concept` keeps only the concept parts).
            temperature: T in CE(logits / T, y).
        """
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {probability}")
        check_choice("context_fill", context_fill, ("mean", "keep"))
        check_positive("temperature", temperature)
        self.probability = probability
        self.context_fill: ContextFill = context_fill
        self.mask_kind = mask_kind
        self.temperature = temperature

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        images = batch["image"]
        labels = labels_of(batch).to(images.device)
        masks = self.masks_of(batch, self.mask_kind)
        probability = self.probability if model.training else 0.0  # validation scores the real images
        mixed, _, applied = composite_foregrounds(images, masks, labels, probability, self.context_fill)
        logits = model(mixed)
        cls = cross_entropy(logits, labels, self.temperature)
        terms = {"cls": cls, "augmented": applied.float().mean()}
        return RegularizerOutput(total=cls, terms=terms, logits=logits)
