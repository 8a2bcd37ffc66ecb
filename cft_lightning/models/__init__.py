"""The fine-tuned model: the backbone spec and the `GuidedFineTuner` LightningModule."""

from cft_lightning.models.backbone import BackboneError, BackboneSpec, build_backbone
from cft_lightning.models.fine_tuner import GuidedFineTuner, NonFiniteLossError

__all__ = ["BackboneError", "BackboneSpec", "GuidedFineTuner", "NonFiniteLossError", "build_backbone"]
