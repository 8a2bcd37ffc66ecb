"""Plain fine-tuning: the unguided control (cross-entropy only, no relevance map)."""

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
    labels_of,
)
from cft_lightning.relevance.base import RelevanceMethod

__all__ = ["PlainFineTuning"]


@register_regularizer("plain")
class PlainFineTuning(Regularizer):
    """Cross-entropy only, no relevance: the control every guided method is compared with."""

    def __init__(self, consistency_target: ConsistencyTarget = "label", temperature: float = 1.0) -> None:
        """
        Args:
            consistency_target: `label` (ordinary supervised fine-tuning, default), `self` or `reference`
                (CFT's consistency loss alone, i.e. CFT with the alignment weight set to 0).
            temperature: T in CE(logits / T, target).
        """
        check_positive("temperature", temperature)
        check_choice("consistency_target", consistency_target, CONSISTENCY_TARGETS)
        self.consistency_target: ConsistencyTarget = consistency_target
        self.temperature = temperature

    def __call__(
        self,
        batch: dict[str, Any],
        model: nn.Module,
        relevance: RelevanceMethod | None,
        reference_logits: Tensor | None,
    ) -> RegularizerOutput:
        logits = model(batch["image"])
        labels = labels_of(batch).to(logits.device)
        cls = consistency_loss(logits, self.consistency_target, labels, reference_logits, self.temperature)
        return RegularizerOutput(total=cls, terms={"cls": cls}, logits=logits)
