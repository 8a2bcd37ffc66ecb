"""Fine-tuning objectives (the `Regularizer` plugin seam). One file per method, each registered under a name
(`cft`, `rrr`, ...): `create_regularizer(spec)` builds one from a name or a class path `pkg.module.Class`,
`list_regularizers()` lists the names, `register_regularizer` adds yours (docs/extending.md)."""

from typing import Any

from cft_lightning._precision import float32_region, upcast  # for plugins: what stays float32 under autocast
from cft_lightning._registry import REGULARIZERS, register_regularizer
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
    "create_regularizer",
    "float32_region",
    "list_regularizers",
    "masks_to_grid",
    "register_regularizer",
    "regularizer_class",
    "upcast",
]


def create_regularizer(spec: str, **kwargs: Any) -> Regularizer:
    """A regularizer from a registered name (`cft`, `rrr`, ...) or a class path `pkg.module.Class`, built with the
    name's preset arguments and then `kwargs`."""
    return REGULARIZERS.create(spec, **kwargs)


def list_regularizers() -> list[str]:
    """Every registered regularizer name: the shipped ones and those of plugins (`CFT_PLUGINS`, entry points)."""
    return REGULARIZERS.names()


def regularizer_class(spec: str) -> type[Regularizer]:
    """The class behind a name or class path."""
    return REGULARIZERS.class_of(spec)
