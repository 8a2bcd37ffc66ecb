"""Object-mask guidance: CFT's loss on whole-object masks (the paper's "Segmentation" ablation).

RobustViT (Chefer et al., NeurIPS 2022) guides relevance with foreground masks; the CFT paper compares
concept masks with object masks under the same loss. This is that comparison's second arm.
"""

from __future__ import annotations

from typing import Any

from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers.cft import CFT

__all__ = ["ObjectMaskGuidance"]


@register_regularizer("object")
class ObjectMaskGuidance(CFT):
    """The CFT loss on object masks instead of concept masks (the paper's "Segmentation" ablation,
    RobustViT-style guidance with CFT's loss). Same weights and switches as `CFT`."""

    required_masks = ("object",)

    def __init__(self, *args: Any, mask_kind: str = "object", **kwargs: Any) -> None:
        super().__init__(*args, mask_kind=mask_kind, **kwargs)
