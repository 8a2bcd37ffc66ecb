"""AttnLRP rules as explicit vector-Jacobian products (the math, independent of any model).

Each function maps the modified gradient at an operation's output to the modified gradient at its
input. They are ordinary differentiable tensor expressions of the *true* forward activations, so a
relevance map built from them is exactly twice differentiable: its parameter gradient is the true
gradient of the AttnLRP map (no surrogate, unlike patching the forward graph's backward; see
docs/relevance.md). Relevance at a tensor `a` is `a * g_a` (LRP as gradient x input).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast

AttentionRule = Literal["attnlrp", "cp"]


def linear_rule(g: Tensor, weight: Tensor) -> Tensor:
    """Epsilon rule of a linear layer in gradient x input form: the plain VJP `g @ W` (bias absorbs)."""
    return g @ weight


def layer_norm_rule(g: Tensor, std: Tensor, weight: Tensor | None) -> Tensor:
    """Identity rule on the 1/std of LayerNorm: differentiate with std held constant.

    y = (x - mean(x)) / std * w + b  =>  g_x = (g*w - mean(g*w)) / std.
    """
    # float32 under autocast: removing the mean subtracts nearly equal numbers, and 1/std is large where the
    # token's variance is small; bfloat16's 8 significant bits would lose the difference. Returns float32 there.
    with float32_region(g):
        g = upcast(g)
        gw = g * weight if weight is not None else g
        return (gw - gw.mean(dim=-1, keepdim=True)) / upcast(std)


ActivationKind = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "identity"]

_TIMM_KINDS: dict[str, ActivationKind] = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu",
                                          "Swish": "silu"}


def activation_kind(act: nn.Module) -> ActivationKind | None:
    """Which closed form act(h)/h has (torch's and timm's modules alike), or None (then it is computed as a
    quotient)."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Identity):
        return "identity"
    if type(act).__module__.startswith("timm."):
        return _TIMM_KINDS.get(type(act).__name__)
    return None


def ratio_of_kind(kind: ActivationKind, h: Tensor) -> Tensor:
    """act(h) / h in closed form (no division by ~0)."""
    if kind == "gelu":
        # gelu(h) / h = Phi(h), the standard normal CDF, as erfc(-h / sqrt 2) / 2: torch's ndtr gives the same
        # values but is a scalar loop on CPU (15x slower than erfc on a ViT-B MLP activation)
        return 0.5 * torch.special.erfc(h * (-1.0 / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    if kind == "quick_gelu":  # h * sigmoid(1.702 h)
        return torch.sigmoid(1.702 * h)
    if kind == "silu":
        return torch.sigmoid(h)
    if kind == "relu":
        return (h > 0).to(h.dtype)
    if kind == "identity":
        return torch.ones_like(h)
    raise ValueError(f"unknown activation kind {kind!r}")


def activation_ratio(act: nn.Module, h: Tensor) -> Tensor:
    """act(h) / h, the identity rule's gradient factor for an element-wise activation, in closed form
    where it exists (no division by ~0)."""
    kind = activation_kind(act)
    if kind is not None:
        return ratio_of_kind(kind, h)
    # float32 for the generic ratio: its 1e-12 stabiliser is 0 in float16 (a division by zero)
    with float32_region(h):
        h = upcast(h)
        out = act(h)
        safe = torch.where(h.abs() < 1e-12, torch.full_like(h, 1e-12), h)
        return out / safe


def identity_rule(g: Tensor, act: nn.Module, h: Tensor) -> Tensor:
    """Identity rule for an element-wise non-linearity: g_h = g * act(h) / h."""
    return g * activation_ratio(act, h)


def attention_rule(
    g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, scale: float, rule: AttentionRule = "attnlrp"
) -> tuple[Tensor, Tensor, Tensor]:
    """Rule VJP of `softmax(q k^T) v` (q already scaled) for one multi-head attention.

    attnlrp: softmax keeps its true Jacobian (its DTD rule in gradient x input form); the two
    bilinear products split relevance uniformly: v gets 1/2, the attention map 1/2, shared by q and
    k equally (1/4 each). cp: CP-LRP, no relevance through q and k; v keeps its full gradient.
    Returns the modified gradients at the *unscaled* q, at k and at v.
    """
    g_v = attn.transpose(-2, -1) @ g_out
    if rule == "cp":
        zeros = torch.zeros_like(q)
        return zeros, zeros, g_v
    if rule != "attnlrp":
        raise ValueError(f"unknown attention rule {rule!r}; expected 'attnlrp' or 'cp'")
    g_attn = g_out @ v.transpose(-2, -1)
    # The softmax's true VJP, attn * (g - sum(g * attn)), as one kernel (twice differentiable; fewer saved
    # (B, H, N, N) intermediates for the second-order backward). In float32 under autocast: g - sum(g * attn)
    # cancels (the DTD rule's bias term), which bfloat16 rounds away; CUDA autocast runs softmax in float32 too.
    with float32_region(g_attn):
        attn32 = upcast(attn)
        g_scores = torch._softmax_backward_data(upcast(g_attn), attn32, -1, attn32.dtype)
    g_q = (g_scores @ k) * (scale / 4.0)
    g_k = (g_scores.transpose(-2, -1) @ q) / 4.0
    return g_q, g_k, g_v / 2.0
