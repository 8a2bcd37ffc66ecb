"""LRP for CNNs through zennit composites (Anders et al.), for explaining only.

Element-wise normalisations and activations (LayerNorm, LayerNorm2d, GRN, GELU, SiLU) pass relevance on
unchanged (`Pass`), the usual treatment when no canonizer exists; residual additions keep zennit's
gradient behaviour, so a ConvNeXt's relevance is not conservative (a bias-free ReLU network's is).

zennit applies its rules with hooks and modified parameters; under `create_graph` it crashes or gives no
parameter gradient, and zennit >= 1.0 restores parameters by replacing the Parameter objects (which
silently detaches them from an optimizer). So the composite is never attached to the model being
explained: it runs on a private copy whose weights are refreshed from the model at every call, and the
map is detached (`differentiability = "none"`). For a differentiable map on a CNN use `LayerGradXActivation`
or `GradCAM`.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets

__all__ = ["ZennitLRP"]


def _pass_through_map() -> list[tuple[Any, Any]]:
    """Rules prepended to the composite's map: element-wise normalisations and activations pass relevance on
    unchanged. Without a rule, zennit sends relevance through their true Jacobian; a LayerNorm's removes
    the mean and divides by the std, which drains almost all relevance in a ConvNeXt (measured: ~1e-21 of
    the logit reaches the input)."""
    from timm.layers import LayerNorm2d
    from zennit.rules import Pass

    types: list[type] = [nn.LayerNorm, LayerNorm2d, nn.GELU, nn.SiLU]
    try:
        from timm.layers.grn import GlobalResponseNorm

        types.append(GlobalResponseNorm)
    except ImportError:  # older timm: no GRN, nothing to map
        pass
    return [(tuple(types), Pass())]


@register_relevance("lrp", composite="epsilon_plus_flat")  # CNNs (zennit), explanation only
class ZennitLRP(RelevanceMethod):
    """Pixel relevance (sum over colour channels of LRP's input relevance) with a zennit composite."""

    differentiability = "none"
    architectures = ("CNNs built from Conv2d / Linear / pooling / activations (e.g. timm ConvNeXt-V2, ResNet)",)

    def __init__(self, composite: str = "epsilon_plus_flat", normalize: Normalization = "minmax",
                 eps: float = 1e-8) -> None:
        """
        Args:
            composite: a zennit composite name (`epsilon_plus_flat`, `epsilon_plus`, `epsilon_gamma_box`
                needs bounds and is not offered, `epsilon_alpha2_beta1_flat`, ...).
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        from zennit.composites import COMPOSITES

        if composite not in COMPOSITES or composite == "epsilon_gamma_box":
            names = sorted(n for n in COMPOSITES if n != "epsilon_gamma_box")
            raise ValueError(f"unknown zennit composite {composite!r}; expected one of {names}")
        super().__init__(normalize=normalize, eps=eps)
        self.composite = composite
        self._copies: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()

    def _private_copy(self, model: nn.Module) -> nn.Module:
        work = self._copies.get(model)
        if work is None:
            work = copy.deepcopy(model)
            self._copies[model] = work
        else:
            work.load_state_dict(model.state_dict())
        work.train(model.training)
        for p in work.parameters():
            p.requires_grad_(False)
        return work

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        from zennit.composites import COMPOSITES

        logits = model(images)  # the model's own pass: the logits returned (and trained on, if at all)
        targets = resolve_targets(logits, targets)
        work = self._private_copy(model)
        composite = COMPOSITES[self.composite](layer_map=_pass_through_map())
        x = upcast(images.detach()).clone().requires_grad_(True)
        # The private copy's rules in float32, outside autocast: they divide by each layer's output plus a 1e-6
        # stabiliser (0 in float16), and the map is detached anyway, so no training step pays for it.
        with float32_region(x), composite.context(work) as modified:
            out = modified(x)
            # the output relevance is the target logit itself, so that the input relevance sums to it
            start = torch.zeros_like(out).scatter_(1, targets[:, None], out.detach().gather(1, targets[:, None]))
            (grad,) = torch.autograd.grad(out, x, start)
        return grad.sum(dim=1), logits, targets  # zennit's rules leave the relevance itself at the input
