"""Shared pieces of the input-gradient penalties (RRR, GradMask, LVLM-VA's critic loss).

The RobustViT reference scripts take the input gradient without `create_graph`, so their penalty is a
constant and never reaches the weights. `input_gradient` (from `relevance.input_gradient`) keeps the graph:
a penalty on it is differentiated a second time, through the model, into the parameters.
"""

from __future__ import annotations

from torch import Tensor

from cft_lightning.relevance.input_gradient import input_gradient

__all__ = ["input_gradient", "masked_region"]


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
