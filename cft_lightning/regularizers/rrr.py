"""Right for the Right Reasons (Ross, Hughes, Doshi-Velez, IJCAI 2017).

    L = lambda_cls * CE(f(x) / T, y) + lambda_grad * mean_n sum_d (A_nd * d/dx_nd sum_k log p_nk)^2 + lambda_2 |theta|^2

A marks the inputs the model must not use: the complement of the object/concept mask (`mask_role:
relevant`), or the mask itself when it already marks the spurious region (LVLM-VA's critic masks,
`mask_role: irrelevant`). The input gradient is of the summed log-probabilities of all classes, taken
with `create_graph=True` so that the penalty reaches the weights (the RobustViT script's RRR omits it and
its penalty is a constant).

The penalty is summed over each image's pixels and channels and averaged over the batch (`reduction: sum`),
like the cross-entropy, so a weight means the same at any batch size. This is Ross's formula, which sums
both terms over the batch (sum_n CE_n + lambda sum_n penalty_n), divided by the batch size: the same
lambda. `reduction: batch_sum` also sums the penalty over the batch while the cross-entropy stays a mean:
the RobustViT script's form, in which the CFT paper's Table 8 weights are given, whose weight scales with
the batch size. `reduction: mean` divides by the penalised area (Ross's `normalize`). Defaults: Table 8 for
ViT-B at the paper's batch of 8 (lambda_cls 2e-6, lambda_grad 1e-10 in the script's form = 8e-10 per image).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers._input_gradient import input_gradient, masked_region
from cft_lightning.regularizers.base import (
    CONSISTENCY_TARGETS,
    ConsistencyTarget,
    Regularizer,
    RegularizerOutput,
    check_choice,
    check_positive,
    consistency_loss,
    labels_of,
)
from cft_lightning.relevance.base import RelevanceMethod

Reduction = Literal["sum", "batch_sum", "mean"]
REDUCTIONS = ("sum", "batch_sum", "mean")
MaskRole = Literal["relevant", "irrelevant"]

__all__ = ["REDUCTIONS", "RRR", "MaskRole", "Reduction", "penalty_reduce"]


def penalty_reduce(values: Tensor, weight: Tensor, reduction: Reduction) -> Tensor:
    """Reduce the per-entry penalty `values` (B, C, H, W), already multiplied by `weight` (B, 1, H, W).

    `sum`: over each image's entries, averaged over the images (per image: a weight does not depend on the
    batch size; Ross's formula divided by the batch size); `batch_sum`: over every entry of the batch (the
    RobustViT script, in whose form the CFT paper's Table 8 gives its weights); `mean`: divided by the
    penalised area summed over channels (Ross's `normalize=True`), so lambda does not scale with image size.
    """
    total = values.sum()
    if reduction == "sum":
        return total / max(values.shape[0], 1)
    if reduction == "batch_sum":
        return total
    if reduction == "mean":
        return total / (weight.sum() * values.shape[1]).clamp_min(1e-12)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")


def _summed_log_probs(logits: Tensor) -> Tensor:
    """sum_{n,k} log p_nk, in float32 (a log term; its gradient 1 - C p_nk is where the input gradient starts)."""
    with float32_region(logits):
        return F.log_softmax(upcast(logits), dim=1).sum()


@register_regularizer("rrr")
class RRR(Regularizer):
    """Cross-entropy plus the squared input gradient of the log-probabilities on the masked-out pixels."""

    needs_autograd = True
    required_masks = ("object",)

    def __init__(
        self,
        grad_weight: float = 8e-10,
        cls_weight: float = 2e-6,
        l2_weight: float = 0.0,
        reduction: Reduction = "sum",
        mask_kind: str = "object",
        mask_role: MaskRole = "relevant",
        consistency_target: ConsistencyTarget = "label",
        temperature: float = 1.0,
    ) -> None:
        """
        Args:
            grad_weight: lambda_1, weight of the input-gradient penalty. Table 8 gives 1e-10 (1e-8 for
                ConvNeXt-V2) in the script's `batch_sum` form at batch 8, i.e. 8e-10 (8e-8) per image.
            cls_weight: weight of the cross-entropy (Table 8: 2e-6; 2e-8 for DINOv2). Only the ratio of the
                two weights matters to AdamW.
            l2_weight: lambda_2, weight of sum(theta^2) over the trainable parameters (Ross's optional term;
                0 by default since AdamW already decays weights).
            reduction: `sum` over each image's pixels and channels, averaged over the batch (batch-size
                invariant); `batch_sum` summed over the batch too (RobustViT's script, Table 8's form); or
                `mean` over the penalised entries.
            mask_kind: the masks of the batch that define A (`object`, `concept`, `critic`, ...).
            mask_role: `relevant` (penalise 1 - M) or `irrelevant` (penalise M).
            consistency_target: target of the cross-entropy: `label` (RRR is supervised), `self`, `reference`.
            temperature: T in CE(logits / T, target).
        """
        check_positive("temperature", temperature)
        if min(grad_weight, cls_weight, l2_weight) < 0:
            raise ValueError("grad_weight, cls_weight and l2_weight must be >= 0")
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("mask_role", mask_role, ("relevant", "irrelevant"))
        check_choice("consistency_target", consistency_target, CONSISTENCY_TARGETS)
        self.grad_weight = grad_weight
        self.cls_weight = cls_weight
        self.l2_weight = l2_weight
        self.reduction: Reduction = reduction
        self.mask_kind = mask_kind
        self.mask_role: MaskRole = mask_role
        self.consistency_target: ConsistencyTarget = consistency_target
        self.temperature = temperature

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        images = batch["image"]
        masks = self.masks_of(batch, self.mask_kind)
        logits, grad = input_gradient(model, images, _summed_log_probs)
        weight = masked_region(masks, self.mask_role, grad)
        penalty = penalty_reduce((grad * weight) ** 2, weight, self.reduction)
        labels = labels_of(batch).to(logits.device)
        cls = consistency_loss(logits, self.consistency_target, labels, reference_logits, self.temperature)
        total = self.cls_weight * cls + self.grad_weight * penalty
        terms = {"cls": cls, "grad": penalty}
        if self.l2_weight > 0:
            l2 = sum((p**2).sum() for p in model.parameters() if p.requires_grad)
            total = total + self.l2_weight * l2
            terms["l2"] = torch.as_tensor(l2)
        return RegularizerOutput(total=total, terms=terms, logits=logits)
