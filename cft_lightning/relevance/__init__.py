"""Relevance (explanation) methods: the `RelevanceMethod` plugin seam. One file per method."""

from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance._attention import explicit_attention
from cft_lightning.relevance.attn_lrp import AttnLRP
from cft_lightning.relevance.base import Relevance, RelevanceMethod, normalize_maps
from cft_lightning.relevance.grad_cam import GradCAM
from cft_lightning.relevance.gradient_rollout import GradientRollout
from cft_lightning.relevance.iia import IIA
from cft_lightning.relevance.input_gradient import InputGradient, InputXGradient
from cft_lightning.relevance.layer_grad_x_activation import LayerGradXActivation
from cft_lightning.relevance.zennit_lrp import ZennitLRP

__all__ = [
    "AttnLRP",
    "GradCAM",
    "GradientRollout",
    "IIA",
    "InputGradient",
    "InputXGradient",
    "LayerGradXActivation",
    "Relevance",
    "RelevanceMethod",
    "UnsupportedModelError",
    "ZennitLRP",
    "explicit_attention",
    "normalize_maps",
]
