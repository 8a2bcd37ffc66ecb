"""Fine-tuning objectives (the `Regularizer` plugin seam). One file per method."""

from cft_lightning.regularizers.base import Regularizer, RegularizerOutput, consistency_loss, masks_to_grid
from cft_lightning.regularizers.cft import CFT, alignment_terms
from cft_lightning.regularizers.object_guidance import ObjectMaskGuidance
from cft_lightning.regularizers.plain import PlainFineTuning

__all__ = [
    "CFT",
    "ObjectMaskGuidance",
    "PlainFineTuning",
    "Regularizer",
    "RegularizerOutput",
    "alignment_terms",
    "consistency_loss",
    "masks_to_grid",
]
