"""Concept-Guided Fine-Tuning (Elisha, Barkan, Koenigstein, CVPR 2026) and its mask-guided siblings.

    L = l_align * (l_concept * L_concept + l_non * L_non_concept) + l_cls * L_cls          (paper Eqs. 3-7)
    L_concept     = -mean_{p in S} log Phi_p
    L_non_concept = -mean_{p not in S} log(1 - Phi_p)
    L_cls         = CE(f(I) / T, argmax f(I))

Phi is the relevance map on the model's patch grid; the pixel mask S is brought to that grid by area,
so a cell half inside the mask counts half in each term (the soft weights generalise the paper's sets).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
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

LossForm = Literal["paper", "release"]
RelevanceTarget = Literal["label", "self"]

__all__ = ["CFT", "LossForm", "RelevanceTarget", "alignment_terms"]


def alignment_terms(maps: Tensor, masks: Tensor, form: LossForm = "paper", eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(L_concept, L_non_concept) of (B, h, w) maps in [0, 1] against (B, h, w) soft masks in [0, 1].

    `paper`: each term is a mask-weighted mean per image (Eqs. 3-4), then averaged over the images whose
    region is non-empty (an image with no concept pixel adds nothing to L_concept, and none is divided by 0).
    `release`: the CFT code's BCE form, both terms averaged over all B*h*w cells, so their weight scales
    with the region's area. Phi is clamped to [eps, 1 - eps] first: a min-max map always reaches 0 and 1,
    and an unclamped log would give inf (the release's BCE clips the log at -100 with ~1e12 gradients).
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    if form not in ("paper", "release"):
        raise ValueError(f"unknown loss_form {form!r}; expected 'paper' or 'release'")
    # The log terms in float32 whatever the autocast type: 1 - eps rounds to 1 in bfloat16 and float16, where
    # log(1 - Phi) is -inf, and d log(Phi) = 1 / Phi near eps needs float32's precision.
    with float32_region(maps):
        phi = upcast(maps).clamp(eps, 1.0 - eps)
        inside = masks.to(phi.dtype).clamp(0.0, 1.0)
        outside = 1.0 - inside
        pos = -torch.log(phi) * inside
        neg = -torch.log1p(-phi) * outside
        if form == "release":
            return pos.mean(), neg.mean()
        return _region_mean(pos, inside), _region_mean(neg, outside)


def _region_mean(values: Tensor, weights: Tensor) -> Tensor:
    area = weights.flatten(1).sum(dim=1)
    per_image = values.flatten(1).sum(dim=1) / area.clamp_min(1e-12)
    valid = (area > 0).to(values.dtype)
    return (per_image * valid).sum() / valid.sum().clamp_min(1.0)


@register_regularizer("cft")
class CFT(Regularizer):
    """The CFT objective: relevance pulled onto concept masks, pushed off the rest, plus consistency CE.

    Defaults are the paper's (Table 8: 0.5, 1.2, 0.8, 0.2 for every model).
    """

    needs_relevance = True
    required_masks = ("concept",)  # the default; an instance reads its `mask_kind`

    def __init__(
        self,
        concept_weight: float = 0.5,
        non_concept_weight: float = 1.2,
        align_weight: float = 0.8,
        cls_weight: float = 0.2,
        loss_form: LossForm = "paper",
        consistency_target: ConsistencyTarget = "self",
        relevance_target: RelevanceTarget = "label",
        temperature: float = 1.0,
        mask_kind: str = "concept",
        eps: float = 1e-6,
    ) -> None:
        """
        Args:
            concept_weight: lambda_concept, weight of -mean log Phi over mask pixels.
            non_concept_weight: lambda_non-concept, weight of -mean log(1 - Phi) outside the mask.
            align_weight: lambda_align, weight of the alignment loss.
            cls_weight: lambda_cls, weight of the classification-consistency loss.
            loss_form: `paper` (per-region means, Eqs. 3-4) or `release` (BCE averaged over all cells).
            consistency_target: class the consistency CE pulls towards: `self` (argmax of this step's
                logits, Eq. 6 and the release; the published numbers), `reference` (the frozen
                reference's argmax) or `label` (ground truth, the paper's ablation).
            relevance_target: class the relevance map explains: `label` (ground truth, as the release) or
                `self` (this pass's prediction).
            temperature: T in CE(logits / T, target) (1 in the paper; RobustViT uses 0.55-0.65 for DeiT).
            mask_kind: which masks of the batch guide the map (`concept`; `object` for the segmentation
                ablation; any kind the mask store holds).
            eps: Phi is clamped to [eps, 1 - eps] before the logs.
        """
        check_positive("temperature", temperature)
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        check_choice("loss_form", loss_form, ("paper", "release"))
        check_choice("consistency_target", consistency_target, CONSISTENCY_TARGETS)
        check_choice("relevance_target", relevance_target, ("label", "self"))
        self.concept_weight = concept_weight
        self.non_concept_weight = non_concept_weight
        self.align_weight = align_weight
        self.cls_weight = cls_weight
        self.loss_form: LossForm = loss_form
        self.consistency_target: ConsistencyTarget = consistency_target
        self.relevance_target: RelevanceTarget = relevance_target
        self.temperature = temperature
        self.mask_kind = mask_kind
        self.eps = eps

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        rel, grid_masks, labels = self.guided_pass(batch, model, relevance, self.mask_kind,
                                                   explain_labels=self.relevance_target == "label")
        concept, non_concept = alignment_terms(rel.maps, grid_masks, self.loss_form, self.eps)
        align = self.concept_weight * concept + self.non_concept_weight * non_concept
        cls = consistency_loss(rel.logits, self.consistency_target, labels, reference_logits, self.temperature)
        total = self.align_weight * align + self.cls_weight * cls
        terms = {"concept": concept, "non_concept": non_concept, "align": align, "cls": cls}
        return RegularizerOutput(total=total, terms=terms, logits=rel.logits, relevance=rel)
