"""Infrastructure for relevance methods that read a timm model's attention or place patch tokens on the image
grid: the explicit-attention switch, the modules whose outputs are the attention maps, the patch grid, and the
row of a token-to-token relevance matrix that explains the prediction.

Used by `GradientRollout`, `IIA`, `InputGradient`, `GradCAM` and `LayerGradXActivation` (through `_layers.py`);
works for any timm model with timm `Attention` modules, not only `VisionTransformer` (that family's own
structure checks and recorded forward are in `_vit.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from cft_lightning.errors import UnsupportedModelError

__all__ = ["attention_drops", "explicit_attention", "patch_grid", "prediction_row"]


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every timm attention module of *this instance* to the explicit softmax path.

    timm's fused attention (scaled_dot_product_attention) has no double backward and exposes no
    attention map. The flag is restored on exit; other model instances are never touched.
    """
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, saved):
            m.fused_attn = flag


def attention_drops(model: nn.Module) -> list[nn.Module]:
    """The `attn_drop` modules of timm attention layers, whose outputs are the post-softmax maps (first block
    first). Raises UnsupportedModelError for a model without any, or with attention dropout active."""
    drops = [m.attn_drop for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
    if not drops:
        raise UnsupportedModelError(f"{type(model).__name__} has no timm attention modules to read maps from")
    if any(d.training and d.p > 0 for d in drops):
        raise UnsupportedModelError("attention dropout is active: build the backbone with attn_drop_rate=0")
    return drops


def patch_grid(model: nn.Module, images: Tensor, num_patches: int) -> tuple[int, int]:
    """(rows, columns) of the patch grid that `num_patches` patch tokens of `model` cover for `images`: timm's
    `patch_embed.dynamic_feat_size` when the model has one, else a square. Raises UnsupportedModelError when the
    tokens do not fill the grid (patch dropout active) or cannot be square."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "dynamic_feat_size"):
        grid = tuple(int(s) for s in pe.dynamic_feat_size(tuple(images.shape[-2:])))
        if grid[0] * grid[1] == num_patches:
            return grid
        raise UnsupportedModelError(
            f"{num_patches} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid of these images "
            "(patch dropout active in training mode? build the backbone with patch_drop_rate=0)"
        )
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise UnsupportedModelError(f"cannot place {num_patches} patch tokens on a grid")
    return side, side


def prediction_row(joint: Tensor, model: nn.Module) -> Tensor:
    """The relevance of the patch tokens for the prediction, from a (B, N, N) token-to-token matrix (a rollout):
    the class token's row, or for models without a class token the mean of the patch tokens' rows. (B, N_patches)."""
    prefix = getattr(model, "num_prefix_tokens", 1)
    has_cls = getattr(model, "cls_token", None) is not None
    return joint[:, 0, prefix:] if has_cls else joint[:, prefix:, prefix:].mean(dim=1)
