"""Input gradients as relevance: `InputGradient` (saliency, Simonyan et al. 2014) and `InputXGradient`.

Both explain the target logit on the pixel grid (maps are (B, H, W)), for any differentiable model. With
`differentiable=True` the gradient is taken with `create_graph=True`, so a loss on the map reaches the
weights exactly (second order through the model). `input_gradient` is the shared primitive; RRR and
GradMask build their penalties on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from cft_lightning._registry import register_relevance
from cft_lightning.relevance._attention import explicit_attention
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets

__all__ = ["InputGradient", "InputXGradient", "input_gradient"]

ChannelReduction = Literal["abs_sum", "abs_max", "sum"]


def input_gradient(
    model: nn.Module, images: Tensor, score: Callable[[Tensor], Tensor], *, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """One forward pass; returns (logits, d score(logits) / d images) of shape (B, C) and images.shape.

    `score` maps the (B, C) logits to a scalar (a sum over the batch: the images do not interact, so the
    gradient of the sum holds each image's own gradient). timm attention runs its explicit path on this
    instance during the forward: the fused kernel has no double backward.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "input gradients need autograd, but this runs under torch.inference_mode(); "
            "set trainer.inference_mode: false"
        )
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        with explicit_attention(model):
            logits = model(x)
        (grad,) = torch.autograd.grad(score(logits), x, create_graph=create_graph and torch.is_grad_enabled())
    return logits, grad


def _target_gradient(model: nn.Module, images: Tensor, targets: Tensor | None, differentiable: bool):
    chosen: list[Tensor] = []

    def score(logits: Tensor) -> Tensor:
        chosen.append(resolve_targets(logits, targets))
        return logits.gather(1, chosen[0][:, None]).sum()

    logits, grad = input_gradient(model, images, score, create_graph=differentiable)
    return logits, grad, chosen[0]


@register_relevance("input_grad")
class InputGradient(RelevanceMethod):
    """|d logit_target / d pixel|, reduced over the colour channels (sum by default)."""

    differentiability = "exact"
    architectures = ("any differentiable image classifier",)

    def __init__(self, channels: ChannelReduction = "abs_sum", normalize: Normalization = "minmax",
                 eps: float = 1e-8) -> None:
        """
        Args:
            channels: `abs_sum` (sum of |g| over channels), `abs_max` (Simonyan et al.'s max of |g|) or
                `sum` (signed sum).
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        if channels not in ("abs_sum", "abs_max", "sum"):
            raise ValueError(f"unknown channels {channels!r}; expected 'abs_sum', 'abs_max' or 'sum'")
        super().__init__(normalize=normalize, eps=eps)
        self.channels: ChannelReduction = channels

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        logits, grad, targets = _target_gradient(model, images, targets, differentiable)
        if self.channels == "abs_sum":
            raw = grad.abs().sum(dim=1)
        elif self.channels == "abs_max":
            raw = grad.abs().amax(dim=1)
        else:
            raw = grad.sum(dim=1)
        return raw, logits, targets


@register_relevance("ixg")
class InputXGradient(RelevanceMethod):
    """x . d logit_target / dx summed over the colour channels (signed; LRP-0 for ReLU networks)."""

    differentiability = "exact"
    architectures = ("any differentiable image classifier",)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        logits, grad, targets = _target_gradient(model, images, targets, differentiable)
        return (images * grad).sum(dim=1), logits, targets
