"""Infrastructure for timm Vision Transformers (AttnLRP): structure checks and a recorded forward pass. What
other attention-based methods share (the explicit-attention switch, the patch grid) is in `_attention.py`.

The recorded forward (`trace_vit`) computes exactly what `model(images)` computes, with the modules'
own weights, and keeps the activations that the AttnLRP rules need. `_attnlrp.py` runs the rule
backward on these records as plain differentiable tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning.errors import UnsupportedModelError


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


def _check_norm(m: nn.Module, where: str) -> None:
    if not (_is_identity(m) or _is_layer_norm(m)):
        raise UnsupportedModelError(f"{where} is {type(m).__name__}; only LayerNorm or Identity is supported")


def _active_dropout(m: nn.Module) -> bool:
    p = getattr(m, "p", None)
    if p is None:
        p = getattr(m, "drop_prob", None)
    if p is None:
        p = getattr(m, "prob", 0.0)  # timm PatchDropout
    return bool(m.training and p and p > 0)


def check_vit(model: nn.Module) -> None:
    """Raise UnsupportedModelError naming the first part of `model` outside the supported timm ViT family."""
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is not a timm VisionTransformer (ViT, DeiT-III, DINOv2 with or without registers are)"
        )
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(f"global_pool={model.global_pool!r}: only 'token' and 'avg' pooling are supported")
    pe = model.patch_embed
    if not _is_identity(getattr(pe, "norm", None)):
        raise UnsupportedModelError("patch_embed.norm must be Identity")
    if not getattr(pe, "flatten", True) or getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic_img_size / unflattened patch embeddings are not supported")
    _check_norm(model.norm_pre, "norm_pre")
    _check_norm(model.norm, "norm")
    _check_norm(model.fc_norm, "fc_norm")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError("the classifier head must be an nn.Linear (set num_classes > 0)")
    for i, blk in enumerate(model.blocks):
        where = f"blocks[{i}]"
        if type(blk) is not Block:
            raise UnsupportedModelError(f"{where} is {type(blk).__name__}; only timm's pre-norm Block is supported")
        attn = blk.attn
        if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{where}.attn is {type(attn).__name__}; only timm's ungated Attention is")
        if type(blk.mlp) is not Mlp or not _is_identity(getattr(blk.mlp, "norm", None)):
            raise UnsupportedModelError(f"{where}.mlp is {type(blk.mlp).__name__}; only timm's Mlp (no norm) is")
        for norm_name in ("norm1", "norm2"):
            _check_norm(getattr(blk, norm_name), f"{where}.{norm_name}")
        for norm_name in ("q_norm", "k_norm", "norm"):
            _check_norm(getattr(attn, norm_name), f"{where}.attn.{norm_name}")
        for ls_name in ("ls1", "ls2"):
            ls = getattr(blk, ls_name)
            if not (_is_identity(ls) or isinstance(ls, LayerScale)):
                raise UnsupportedModelError(f"{where}.{ls_name} is {type(ls).__name__}")
    drops = [n for n, m in model.named_modules() if _active_dropout(m)]
    if drops:
        raise UnsupportedModelError(
            f"active dropout/drop-path in training mode at {drops[:3]}: the rule backward needs a deterministic "
            "forward; build the backbone with drop_rate=attn_drop_rate=proj_drop_rate=drop_path_rate=patch_drop_rate=0"
        )


@dataclass
class NormRecord:
    """What the LayerNorm rule needs: the weight and the per-token standard deviation of the input."""

    weight: Tensor | None
    std: Tensor


@dataclass
class BlockRecord:
    norm1: NormRecord | None
    q_norm: NormRecord | None
    k_norm: NormRecord | None
    q: Tensor  # scaled query after q_norm, (B, H, N, d)
    k: Tensor  # key after k_norm, (B, H, N, d)
    v: Tensor  # (B, H, N, d)
    attn: Tensor  # post-softmax attention, (B, H, N, N)
    attn_norm: NormRecord | None
    norm2: NormRecord | None
    hidden: Tensor  # MLP pre-activation (fc1 output)


@dataclass
class ViTTrace:
    """Records of one forward pass of a timm ViT."""

    logits: Tensor
    patch_tokens: Tensor  # patch embeddings minus the projection bias, (B, N_patches, D)
    grid: tuple[int, int]
    num_prefix_tokens: int
    num_tokens: int
    norm_pre: NormRecord | None
    blocks: list[BlockRecord] = field(default_factory=list)
    norm: NormRecord | None = None
    fc_norm: NormRecord | None = None


class _LayerNormWithStd(torch.autograd.Function):
    """LayerNorm over the last dimension that also returns its per-token std, sqrt(var + eps), as a differentiable
    output: one fused kernel for both (the rule needs the std, and the loss's gradient flows through it), where
    `F.layer_norm` plus a separate variance would read the activations twice more, forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y, rstd.reciprocal()

    @staticmethod
    def backward(ctx: Any, d_y: Tensor, d_std: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # a higher-order graph: differentiate the plain expressions again
            with torch.enable_grad():
                inputs = [t for t in (x, weight, bias) if t is not None]
                y = F.layer_norm(x, x.shape[-1:], weight, bias, ctx.eps)
                std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + ctx.eps)
                grads = iter(torch.autograd.grad((y, std), inputs, (d_y, d_std), create_graph=True,
                                                 allow_unused=True))
                return next(grads), *(None if t is None else next(grads) for t in (weight, bias)), None
        d_x, d_w, d_b = torch.ops.aten.native_layer_norm_backward(
            d_y, x, x.shape[-1:], mean, rstd, weight, bias, [need_x, need_w and weight is not None,
                                                          need_b and bias is not None])
        if need_x:  # d std / d x_j = (x_j - mean) / (D std); d_x is this function's own tensor: in place
            d_x = d_x.addcmul_(x - mean, d_std * rstd / x.shape[-1])
        return d_x, d_w, d_b, None


def _layer_norm(m: nn.Module, x: Tensor) -> tuple[Tensor, NormRecord | None]:
    """Apply `m` (LayerNorm or Identity) and record what the LN rule needs."""
    if _is_identity(m):
        return x, None
    # float32 statistics under autocast (as CUDA autocast runs layer_norm): a variance in bfloat16 loses the
    # small spread of a token around its mean, and 1/std scales the LayerNorm rule's gradient.
    with float32_region(x):
        y, std = _LayerNormWithStd.apply(upcast(x), m.weight, m.bias, m.eps)
    return y, NormRecord(weight=m.weight, std=std)


def _layer_scale(m: nn.Module, x: Tensor) -> Tensor:
    return x if _is_identity(m) else x * m.gamma


def trace_vit(model: nn.Module, images: Tensor) -> ViTTrace:
    """Run `model`'s forward on `images` explicitly, recording the activations the rules need.

    The logits equal `model(images)` (same modules, same order; attention always explicit). Under autocast,
    LayerNorm and softmax run in float32 here, as CUDA autocast runs them (CPU autocast runs them in
    bfloat16 in the model's own forward, so there the two differ by rounding).
    """
    check_vit(model)
    pe = model.patch_embed
    tokens = pe(images)  # (B, Np, D); patch_embed.norm is Identity (checked)
    bias = pe.proj.bias
    patch_tokens = tokens - bias if bias is not None else tokens
    grid = tuple(int(s) for s in pe.dynamic_feat_size(tuple(images.shape[-2:])))
    x = model._pos_embed(tokens)
    x = model.patch_drop(x)
    x, norm_pre = _layer_norm(model.norm_pre, x)
    trace = ViTTrace(
        logits=x.new_empty(0),
        patch_tokens=patch_tokens,
        grid=grid,
        num_prefix_tokens=model.num_prefix_tokens,
        num_tokens=x.shape[1],
        norm_pre=norm_pre,
    )
    for blk in model.blocks:
        attn = blk.attn
        B, N, _ = x.shape
        h, n1 = _layer_norm(blk.norm1, x)
        # contiguous once: every later product with q, k or v (forward, rule, both backwards) would copy a view
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = qkv.unbind(0)
        q, qn = _layer_norm(attn.q_norm, q)
        k, kn = _layer_norm(attn.k_norm, k)
        q = q * attn.scale
        scores = q @ k.transpose(-2, -1)
        with float32_region(scores):  # softmax in float32 (CUDA autocast does so too; the rule's VJP reuses `a`)
            a = upcast(scores).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
        o, an = _layer_norm(attn.norm, o)
        x = x + _layer_scale(blk.ls1, attn.proj(o))
        h, n2 = _layer_norm(blk.norm2, x)
        hidden = blk.mlp.fc1(h)
        x = x + _layer_scale(blk.ls2, blk.mlp.fc2(blk.mlp.act(hidden)))
        trace.blocks.append(BlockRecord(n1, qn, kn, q, k, v, a, an, n2, hidden))
    x, trace.norm = _layer_norm(model.norm, x)
    if model.global_pool == "avg":
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        pooled = x[:, start:].mean(dim=1)
    else:
        pooled = x[:, 0]
    pooled, trace.fc_norm = _layer_norm(model.fc_norm, pooled)
    trace.logits = model.head(pooled)
    return trace
