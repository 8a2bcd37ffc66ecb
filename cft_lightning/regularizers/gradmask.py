"""GradMask (Simpson, Dutil, Bengio, Cohen, 2019): penalise input-gradient saliency outside the foreground.

Two forms, one switch:

- `additive` (RobustViT's adaptation, the one the CFT paper's Table 8 tunes: lambda 50, 0.1):
      L = lambda_cls * CE(f(x) / T, y) + lambda * mean_{b,c,h,w} (G * (1 - S))^2,   G = d/dx sum_b f(x)_{b, y_b}
- `authors` (the authors' code): saliency of |target logit|, squared and summed outside the foreground,
  with a growing weight, multiplicative in the cross-entropy:
      pen = min(lambda * exp(growth * step), cap),   L = CE * (1 + pen * sum (G * (1 - S))^2)

G is taken with `create_graph=True` (RobustViT's script omits it, which makes its penalty a constant).
The authors' code is binary (one "non-healthy" logit, positive samples only); for multi-class data the
target logit is the ground-truth class's, for every sample.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor, nn

from cft_lightning._registry import register_regularizer
from cft_lightning.regularizers._input_gradient import input_gradient, masked_region
from cft_lightning.regularizers.base import (
    Regularizer,
    RegularizerOutput,
    check_choice,
    check_positive,
    cross_entropy,
    labels_of,
)
from cft_lightning.regularizers.rrr import MaskRole
from cft_lightning.relevance.base import RelevanceMethod

GradMaskForm = Literal["additive", "authors"]

__all__ = ["GradMask", "GradMaskForm"]


@register_regularizer("gradmask")
class GradMask(Regularizer):
    """Input-gradient saliency of the target logit, squared, outside the foreground mask."""

    needs_autograd = True
    required_masks = ("object",)

    def __init__(
        self,
        penalty_weight: float = 50.0,
        cls_weight: float = 0.1,
        form: GradMaskForm = "additive",
        penalty_growth: float = 0.0,
        penalty_cap: float = 1000.0,
        mask_kind: str = "object",
        mask_role: MaskRole = "relevant",
        temperature: float = 1.0,
    ) -> None:
        """
        Args:
            penalty_weight: `additive`: lambda, the penalty's weight (Table 8: 50); `authors`: the schedule's
                starting value lambda_1.
            cls_weight: weight of the cross-entropy in the `additive` form (Table 8: 0.1); unused by `authors`.
            form: `additive` (RobustViT / CFT paper) or `authors` (multiplicative, growing penalty).
            penalty_growth: lambda_2 of the `authors` schedule pen = min(lambda_1 exp(lambda_2 step), cap);
                0 keeps it constant. The authors' configured values are not published with the paper.
            penalty_cap: the schedule's ceiling (1000 in the authors' code).
            mask_kind: the masks that mark the foreground (`object`, `concept`, ...).
            mask_role: `relevant` (penalise outside the mask) or `irrelevant` (penalise inside it).
            temperature: T in CE(logits / T, y) (`additive` form).
        """
        check_choice("GradMask form", form, ("additive", "authors"))
        if min(penalty_weight, cls_weight, penalty_cap) < 0:
            raise ValueError("penalty_weight, cls_weight and penalty_cap must be >= 0")
        check_positive("temperature", temperature)
        check_choice("mask_role", mask_role, ("relevant", "irrelevant"))
        self.penalty_weight = penalty_weight
        self.cls_weight = cls_weight
        self.form: GradMaskForm = form
        self.penalty_growth = penalty_growth
        self.penalty_cap = penalty_cap
        self.mask_kind = mask_kind
        self.mask_role: MaskRole = mask_role
        self.temperature = temperature
        self._step = 0

    def step_begin(self, global_step: int, epoch: int) -> None:
        self._step = global_step

    def schedule(self, step: int | None = None) -> float:
        """The `authors` form's penalty weight at optimizer step `step` (default: the current step)."""
        step = self._step if step is None else step
        exponent = self.penalty_growth * step
        if exponent > math.log(max(self.penalty_cap, 1e-300) / max(self.penalty_weight, 1e-300)):
            return self.penalty_cap
        return min(self.penalty_weight * math.exp(exponent), self.penalty_cap)

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        images = batch["image"]
        masks = self.masks_of(batch, self.mask_kind)
        labels = labels_of(batch).to(images.device)
        if self.form == "additive":
            logits, grad = input_gradient(model, images, lambda z: z.gather(1, labels[:, None]).sum())
        else:
            logits, grad = input_gradient(model, images, lambda z: z.gather(1, labels[:, None]).abs().sum())
        weight = masked_region(masks, self.mask_role, grad)
        masked = (grad * weight) ** 2
        if self.form == "additive":
            cls = cross_entropy(logits, labels, self.temperature)
            penalty = masked.mean()
            total = self.cls_weight * cls + self.penalty_weight * penalty
        else:
            cls = cross_entropy(logits, labels)
            penalty = masked.sum()
            total = cls * (1.0 + self.schedule() * penalty)
        return RegularizerOutput(total=total, terms={"cls": cls, "saliency": penalty}, logits=logits)
