"""Relevance (explanation) methods: the `RelevanceMethod` plugin seam. One file per method, each registered under a
name (`attnlrp`, `gradcam`, ...): `create_relevance(spec)` builds one from a name or a class path
`pkg.module.Class`, `list_relevance()` lists the names, `register_relevance` adds yours (docs/extending.md)."""

from typing import Any

from cft_lightning._precision import float32_region, upcast  # for plugins: what stays float32 under autocast
from cft_lightning._registry import RELEVANCE, register_relevance
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
    "create_relevance",
    "explicit_attention",
    "float32_region",
    "list_relevance",
    "normalize_maps",
    "register_relevance",
    "relevance_class",
    "upcast",
]


def create_relevance(spec: str, **kwargs: Any) -> RelevanceMethod:
    """A relevance method from a registered name (`attnlrp`, `cp_lrp`, ...) or a class path `pkg.module.Class`,
    built with the name's preset arguments and then `kwargs`."""
    return RELEVANCE.create(spec, **kwargs)


def list_relevance() -> list[str]:
    """Every registered relevance method name: the shipped ones and those of plugins (`CFT_PLUGINS`, entry points)."""
    return RELEVANCE.names()


def relevance_class(spec: str) -> type[RelevanceMethod]:
    """The class behind a name or class path (for its class flags: `families`, `explains_layer`, ...)."""
    return RELEVANCE.class_of(spec)
