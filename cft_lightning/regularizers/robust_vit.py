"""RobustViT (Chefer, Schwartz, Wolf, NeurIPS 2022): relevance pushed off the background, onto the object.

    L_bg  = mean (Phi * (1 - S))^2                  (MSE of the background relevance against 0)
    L_fg  = mean (Phi * S - S)^2                    (MSE of the foreground relevance against 1)
    L_cls = CE(f(x) / T, argmax f(x))               (consistency with the model's own prediction)
    L     = lambda_seg * (lambda_bg * L_bg + lambda_fg * L_fg) + lambda_acc * L_cls

Means run over all B * h * w cells, as in the RobustViT code. Phi is the relevance map of the ground-truth
class; RobustViT computes it with gradient-weighted rollout, attention gradients held constant (our
`GradientRollout`). Phi lives on the patch grid and S is brought to it by area (the code upsamples Phi to
pixels instead; on binary, patch-aligned masks the two agree). Defaults: the RobustViT README (0.8, 0.2,
2, 0.3; T = 1, 0.65 for DeiT-B and 0.55 for DeiT-S).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers.base import (
    CONSISTENCY_TARGETS,
    ConsistencyTarget,
    Regularizer,
    RegularizerOutput,
    check_choice,
    check_positive,
    consistency_loss,
)
from cft_lightning.relevance.base import RelevanceMethod

__all__ = ["RobustViT", "robust_vit_terms"]


def robust_vit_terms(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(L_bg, L_fg) of (B, h, w) maps in [0, 1] against (B, h, w) soft masks in [0, 1], means over all cells."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    inside = masks.to(maps.dtype).clamp(0.0, 1.0)
    background = ((maps * (1.0 - inside)) ** 2).mean()
    foreground = ((maps * inside - inside) ** 2).mean()
    return background, foreground


@register_regularizer("robust_vit")
class RobustViT(Regularizer):
    """RobustViT's segmentation-guided objective (MSE on background and foreground relevance)."""

    needs_relevance = True
    required_masks = ("object",)

    def __init__(
        self,
        background_weight: float = 2.0,
        foreground_weight: float = 0.3,
        seg_weight: float = 0.8,
        cls_weight: float = 0.2,
        temperature: float = 1.0,
        consistency_target: ConsistencyTarget = "self",
        mask_kind: str = "object",
    ) -> None:
        """
        Args:
            background_weight: lambda_bg (2).
            foreground_weight: lambda_fg (0.3).
            seg_weight: lambda_seg, weight of the relevance terms (0.8).
            cls_weight: lambda_acc, weight of the consistency cross-entropy (0.2).
            temperature: T of the cross-entropy (1; RobustViT uses 0.65 for DeiT-B, 0.55 for DeiT-S).
            consistency_target: `self` (RobustViT: the trainable model's argmax), `reference` or `label`.
            mask_kind: the masks S (`object` as in RobustViT; `concept` to compare with CFT's masks).
        """
        check_positive("temperature", temperature)
        check_choice("consistency_target", consistency_target, CONSISTENCY_TARGETS)
        self.background_weight = background_weight
        self.foreground_weight = foreground_weight
        self.seg_weight = seg_weight
        self.cls_weight = cls_weight
        self.temperature = temperature
        self.consistency_target: ConsistencyTarget = consistency_target
        self.mask_kind = mask_kind

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        rel, grid, labels = self.guided_pass(batch, model, relevance, self.mask_kind)
        background, foreground = robust_vit_terms(rel.maps, grid)
        seg = self.background_weight * background + self.foreground_weight * foreground
        cls = consistency_loss(rel.logits, self.consistency_target, labels, reference_logits, self.temperature)
        total = self.seg_weight * seg + self.cls_weight * cls
        terms = {"background": background, "foreground": foreground, "seg": seg, "cls": cls}
        return RegularizerOutput(total=total, terms=terms, logits=rel.logits, relevance=rel)
