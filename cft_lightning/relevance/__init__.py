"""Relevance (explanation) methods: the `RelevanceMethod` plugin seam. One file per method."""

from cft_lightning.relevance._vit import UnsupportedModelError, explicit_attention
from cft_lightning.relevance.attn_lrp import AttnLRP
from cft_lightning.relevance.base import Relevance, RelevanceMethod, normalize_maps
from cft_lightning.relevance.grad_cam import GradCAM
from cft_lightning.relevance.gradient_rollout import GradientRollout
from cft_lightning.relevance.iia import IIA
from cft_lightning.relevance.input_gradient import InputGradient, InputXGradient

__all__ = [
    "AttnLRP",
    "GradCAM",
    "GradientRollout",
    "IIA",
    "InputGradient",
    "InputXGradient",
    "Relevance",
    "RelevanceMethod",
    "UnsupportedModelError",
    "explicit_attention",
    "normalize_maps",
]
