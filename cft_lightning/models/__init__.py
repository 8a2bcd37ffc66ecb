"""The fine-tuned model: the backbone spec and the `GuidedFineTuner` LightningModule."""

from cft_lightning.errors import BackboneError, NonFiniteLossError
from cft_lightning.models.backbone import BackboneSpec, build_backbone
from cft_lightning.models.fine_tuner import GuidedFineTuner

__all__ = ["BackboneError", "BackboneSpec", "GuidedFineTuner", "NonFiniteLossError", "build_backbone"]
