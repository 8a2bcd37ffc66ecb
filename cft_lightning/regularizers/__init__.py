"""Fine-tuning objectives (the `Regularizer` plugin seam). One file per method."""

from cft_lightning.regularizers.base import Regularizer, RegularizerOutput, consistency_loss, masks_to_grid
from cft_lightning.regularizers.cft import CFT, alignment_terms
from cft_lightning.regularizers.gradmask import GradMask
from cft_lightning.regularizers.lvlm_critic import LVLMCritic
from cft_lightning.regularizers.object_guidance import ObjectMaskGuidance
from cft_lightning.regularizers.plain import PlainFineTuning
from cft_lightning.regularizers.robust_vit import RobustViT
from cft_lightning.regularizers.rrda import RRDA
from cft_lightning.regularizers.rrr import RRR

__all__ = [
    "CFT",
    "RRDA",
    "RRR",
    "GradMask",
    "LVLMCritic",
    "ObjectMaskGuidance",
    "PlainFineTuning",
    "Regularizer",
    "RegularizerOutput",
    "RobustViT",
    "alignment_terms",
    "consistency_loss",
    "masks_to_grid",
]
