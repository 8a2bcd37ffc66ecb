"""Input gradients that stay in the autograd graph (shared by RRR, GradMask and LVLM-VA's critic loss).

The RobustViT reference scripts take these gradients without `create_graph`, so their penalty is a
constant and never reaches the weights. Here the gradient is taken with `create_graph=True`: a penalty on
it is differentiated a second time, through the model, into the parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cft_lightning.relevance._vit import explicit_attention

__all__ = ["input_gradient", "masked_region"]


def input_gradient(
    model: nn.Module, images: Tensor, score: Callable[[Tensor], Tensor], *, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """One forward pass; returns (logits, d score(logits) / d images) of shape (B, C) and images.shape.

    `score` maps the (B, C) logits to a scalar (sum over the batch: the images do not interact, so the
    gradient of the sum holds each image's own gradient). timm attention runs its explicit path on this
    instance during the forward: the fused kernel has no double backward.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "input-gradient penalties need autograd, but this runs under torch.inference_mode(); "
            "set trainer.inference_mode: false"
        )
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        with explicit_attention(model):
            logits = model(x)
        (grad,) = torch.autograd.grad(score(logits), x, create_graph=create_graph and torch.is_grad_enabled())
    return logits, grad


def masked_region(masks: Tensor, role: str, like: Tensor) -> Tensor:
    """The (B, 1, H, W) weight of the penalised pixels, broadcastable over the image channels.

    `role="relevant"`: the masks mark the evidence (object or concept masks) and the penalty falls on
    their complement, 1 - M (soft masks give fractional weights, not the release's exact-0/1 flip);
    `role="irrelevant"`: the masks already mark what must not be used (LVLM-VA's critic masks).
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) != tuple(like.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape[-2:])} and images {tuple(like.shape[-2:])} differ in size")
    m = masks.to(device=like.device, dtype=like.dtype).clamp(0.0, 1.0).unsqueeze(1)
    if role == "relevant":
        return 1.0 - m
    if role == "irrelevant":
        return m
    raise ValueError(f"unknown mask_role {role!r}; expected 'relevant' or 'irrelevant'")
