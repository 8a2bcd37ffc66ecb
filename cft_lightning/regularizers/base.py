"""The `Regularizer` contract: the training objective of one fine-tuning method.

A regularizer receives the batch, the trainable model, the relevance method and the frozen reference's
logits, runs the model's forward pass itself (once, usually inside the relevance method so the map and
the logits come from the same pass) and returns named loss terms and their weighted total.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cft_lightning._plugins import RecordsInitArgs, Requirements
from cft_lightning._precision import ALL_PRECISIONS, PrecisionKind, float32_region, upcast
from cft_lightning.relevance.base import Relevance, RelevanceMethod

ConsistencyTarget = Literal["self", "reference", "label"]

__all__ = [
    "CONSISTENCY_TARGETS",
    "ConsistencyTarget",
    "Regularizer",
    "RegularizerOutput",
    "Requirements",
    "check_choice",
    "check_positive",
    "consistency_loss",
    "cross_entropy",
    "masks_to_grid",
]

CONSISTENCY_TARGETS = ("self", "reference", "label")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the argument when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def check_positive(name: str, value: float) -> None:
    """Raise a ValueError naming the argument when `value` is not > 0 (temperatures)."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class RegularizerOutput:
    """What one step of a method produced.

    Attributes:
        total: the scalar loss to minimise.
        terms: named unweighted loss terms (logged as `train/<name>`), detached or not.
        logits: (B, C) logits of the trainable model's forward pass (for accuracy logging).
        relevance: the relevance of that pass when the method computed one.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    relevance: Relevance | None = None


class Regularizer(RecordsInitArgs, ABC):
    """One fine-tuning objective. Subclass, declare what it needs, implement `__call__`.

    What it needs from the run is `requirements` (a `Requirements`), built from these declarations:

    Class attributes:
        required_masks: mask kinds the batch must carry (`batch["masks"][kind]`) when the instance sets no
            `mask_kind`; the data module is checked against them before training starts.
        needs_relevance: whether the method calls the relevance method (else its `relevance` is ignored).
        needs_autograd: whether the objective differentiates through the model itself (input gradients):
            such a loss cannot be evaluated under inference mode either.
        precisions: the `trainer.precision` kinds the objective supports (`"32"`, `"bf16"`, `"16"`: 32-true,
            bf16-mixed, 16-mixed); any other stops the run at start-up (docs/relevance.md, Mixed precision).

    Instance attributes (set them in `__init__` when the method has them):
        mask_kind: the one mask kind the method reads (it replaces `required_masks`).
        consistency_target: `reference` makes the fine-tuner compute the frozen reference's logits.
        alignment_ratio: share of every training batch drawn from the images with a `mask_kind` mask.

    Register one under a name with `@register_regularizer("name")` (`cft_lightning.regularizers`): `cft demo
    --methods` and the contract tests then know it (docs/extending.md).
    """

    required_masks: ClassVar[tuple[str, ...]] = ()
    needs_relevance: ClassVar[bool] = False
    needs_autograd: ClassVar[bool] = False
    precisions: ClassVar[tuple[PrecisionKind, ...]] = ALL_PRECISIONS
    mask_kind: str | None = None
    consistency_target: ConsistencyTarget | None = None
    alignment_ratio: float | None = None

    @property
    def requirements(self) -> Requirements:
        """What this objective needs from the run (the one declaration the fine-tuner and data module read)."""
        masks = (self.mask_kind,) if self.mask_kind else tuple(type(self).required_masks)
        alignment = None
        if self.alignment_ratio is not None:
            if not masks:
                raise ValueError(f"{type(self).__name__}: alignment_ratio needs a mask_kind (the alignment set)")
            alignment = (masks[0], float(self.alignment_ratio))
        return Requirements(masks=masks, relevance=type(self).needs_relevance, autograd=type(self).needs_autograd,
                            reference_logits=self.consistency_target == "reference", alignment=alignment,
                            precisions=tuple(type(self).precisions))

    def step_begin(self, global_step: int, epoch: int) -> None:
        """Called before every training step (for schedules such as GradMask's growing penalty)."""
        return None

    @abstractmethod
    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        """Run the forward pass on `batch["image"]` and return the loss terms and total."""

    def masks_of(self, batch: dict[str, Any], kind: str) -> Tensor:
        """`batch["masks"][kind]`, with a clear error naming the batch when it is missing."""
        masks = batch.get("masks") or {}
        if kind not in masks:
            paths = batch.get("path") or []
            where = f" (batch starting with {paths[0]!r})" if paths else ""
            raise KeyError(
                f"{type(self).__name__} needs '{kind}' masks but the batch has {sorted(masks) or 'none'}{where}; "
                f"add '{kind}' to data.mask_kinds and point data.masks at a mask store that has them"
            )
        return masks[kind]

    def guided_pass(
        self, batch: dict[str, Any], model: nn.Module, relevance: RelevanceMethod | None, mask_kind: str,
        explain_labels: bool = True,
    ) -> tuple[Relevance, Tensor, Tensor]:
        """The one forward pass of a relevance-guided objective: (relevance of the labels, or of this pass's
        prediction with `explain_labels=False`; the `mask_kind` masks pooled to the map's grid; the labels)."""
        if relevance is None:
            raise ValueError(f"{type(self).__name__} needs a relevance method (model.relevance in the config)")
        masks = self.masks_of(batch, mask_kind)
        labels = labels_of(batch).to(batch["image"].device)
        rel = relevance(model, batch["image"], labels if explain_labels else None, differentiable=True)
        grid = masks_to_grid(masks.to(rel.maps.device), tuple(rel.maps.shape[-2:]))
        return rel, grid, labels

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def masks_to_grid(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring (B, H, W) masks to a (B, h, w) grid by area: each cell holds the fraction of its pixels inside.

    Exact when H, W are multiples of h, w (patch grids); otherwise torch's adaptive average pooling.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
    masks = masks if masks.is_floating_point() else masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks.unsqueeze(1), size).squeeze(1)


def consistency_loss(
    logits: Tensor,
    target: ConsistencyTarget,
    labels: Tensor,
    reference_logits: Tensor | None,
    temperature: float = 1.0,
) -> Tensor:
    """Cross-entropy of `logits / temperature` against the consistency target (CFT Eq. 6 and its ablations).

    `self`: the trainable model's own argmax (the paper's and the release's choice); `reference`: the frozen
    reference's argmax; `label`: the ground-truth label (the paper's "w/ ground-truth" ablation).
    The argmax is taken before the temperature, as the release does (it does not change the argmax).
    """
    if target == "self":
        y = logits.detach().argmax(dim=1)
    elif target == "reference":
        if reference_logits is None:
            raise ValueError("consistency_target='reference' needs the reference model (track_reference: true)")
        y = reference_logits.argmax(dim=1).to(logits.device)
    elif target == "label":
        y = labels
    else:
        raise ValueError(f"unknown consistency_target {target!r}; expected 'self', 'reference' or 'label'")
    return cross_entropy(logits, y, temperature)


def cross_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """CE(logits / T, labels) in float32 whatever the autocast type: its log-softmax is a log term (CUDA
    autocast runs it in float32 too; CPU autocast would run the division in bfloat16)."""
    with float32_region(logits):
        return F.cross_entropy(upcast(logits) / temperature, labels)


def labels_of(batch: dict[str, Any]) -> Tensor:
    """Ground-truth labels as a long tensor."""
    return torch.as_tensor(batch["label"]).long()
