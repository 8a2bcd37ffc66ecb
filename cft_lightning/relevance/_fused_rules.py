"""The AttnLRP rules of `rules.py` as autograd Functions with hand-written derivatives: the same values, and
the loss's gradient through them is the same, but the backward keeps far fewer tensors.

A guided step differentiates the relevance map, i.e. it runs backward through the rule backward. Written as
plain tensor expressions (`rules.py`), autograd keeps every intermediate of the rule backward for that pass:
per block the MLP's modified gradients, the activation ratio and their product (three (B, N, 4D) tensors),
the softmax rule's two (B, H, N, N) products, and the LayerNorm rule's centred copy. The Functions here keep
only their inputs (most of which the forward trace holds anyway) plus one (B, N, 4D) tensor per MLP, and
recompute the cheap element-wise parts and the (B, H, N, N) products in the backward.

Each backward has two paths: in place on its own temporaries when no higher-order graph is being built (a
training step), and out of place in differentiable operations when one is, so the rules stay differentiable
to any order (tests run `gradcheck` and `gradgradcheck` on each, and compare with `rules.py`). Under
autocast the backward re-enters the forward's autocast state, so its matrix products run in the same type and
its float32 regions are the forward's (`_precision.py`).
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning.relevance.rules import ActivationKind, activation_kind, ratio_of_kind

__all__ = ["attention_rule_fused", "fused_activation", "layer_norm_rule_fused", "mlp_rule_fused"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_LOG_2_INV_SQRT_2PI = math.log(2.0 / math.sqrt(2.0 * math.pi))
_TANH_C = 0.044715


def _save_autocast(ctx: Any, like: Tensor) -> None:
    device = like.device.type
    ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))


def _autocast(ctx: Any) -> AbstractContextManager[Any]:
    """The forward's autocast state (the backward runs outside the user's autocast context)."""
    device, enabled, dtype = ctx.autocast
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _Workspace(threading.local):
    """Temporaries reused from call to call on CPU: one buffer per name, kept at the last shape and type asked.

    On CPU a fresh (B, N, 4D) temporary is fresh memory from the system (glibc maps blocks this large anew and
    hands them back), and faulting it in costs several times the element-wise pass that fills it (measured in
    docs/performance.md). CUDA's caching allocator already reuses memory, so there every call gets a new
    tensor. What a call writes into a buffer is dead when the call returns: nothing a rule returns or saves
    aliases one, and one call never takes the same name twice. Per thread, as autograd may run backward on
    several. The buffers stay allocated at their last shape for the life of the thread (94 MiB for ViT-B/16 at
    batch 8 in float32).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.buffers.get(name)
        # an inference tensor cannot be written outside inference mode (and the reverse would make one)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.is_inference() != \
                torch.is_inference_mode_enabled():
            self.buffers.pop(name, None)  # freed before the new one is taken
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


_WORKSPACE = _Workspace()


def _scaled_into(name: str, t: Tensor, c: float) -> Tensor:
    """t * c in the workspace buffer `name`."""
    return torch.mul(t, c, out=_WORKSPACE.take(name, t.shape, t.dtype, t.device))


# ---------------------------------------------------------------------------------------------------- MLP


def fused_activation(act: nn.Module) -> ActivationKind | None:
    """The closed form of `act`'s identity-rule ratio act(h)/h (whose derivative `_ratio_grad` knows), or None
    when there is none (then the MLP rule runs as plain expressions)."""
    return activation_kind(act)


def _ratio_grad(kind: str, h: Tensor) -> Tensor | None:
    """d(act(h)/h)/dh, None where it is 0 almost everywhere (ReLU, identity)."""
    if kind == "gelu":  # d Phi / dh = phi, the standard normal density
        return torch.exp(h.square() * -0.5) * _INV_SQRT_2PI
    if kind == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + _TANH_C * h.pow(3)))
        return 0.5 * (1.0 - t.square()) * (_SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * h.square()))
    if kind in ("silu", "quick_gelu"):
        a = 1.702 if kind == "quick_gelu" else 1.0
        s = torch.sigmoid(a * h)
        return a * s * (1.0 - s)
    return None


class _MlpRule(torch.autograd.Function):
    """g -> ((g @ W2) * act(h)/h) @ W1: the epsilon rule of fc2, the identity rule of the activation, the
    epsilon rule of fc1. Keeps g, h, the weights and g @ W2; recomputes the ratio and the product.

    The (B, N, 4D) element-wise passes are the cost beyond the matrix products, so the exact GELU (ViT, DeiT,
    DINOv2) has a path with as few as the math allows: the ratio's 1/2 is moved onto the (B, N, D) side of
    fc1, and phi(h) = exp(log(2c) - h^2 / 2) / 2 is one fused multiply-add and one exp.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, hidden: Tensor, w2: Tensor, w1: Tensor, kind: str) -> Tensor:
        gm = g @ w2
        ctx.kind = kind
        _save_autocast(ctx, g)
        ctx.save_for_backward(g, hidden, w2, w1, gm)
        # Function.forward runs without grad, so in place on our own temporaries is safe
        if kind == "gelu":  # (gm * erfc(-h / sqrt 2) / 2) @ W1, the 1/2 applied to the narrower output
            e = _scaled_into("mlp.e", hidden, -_INV_SQRT2)
            return (torch.special.erfc(e, out=e).mul_(gm) @ w1).mul_(0.5)
        return ratio_of_kind(kind, hidden).mul_(gm) @ w1

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        g, hidden, w2, w1, gm = ctx.saved_tensors
        need_g, need_h, need_w2, need_w1, _ = ctx.needs_input_grad
        d_g = d_h = d_w2 = d_w1 = None
        with _autocast(ctx):
            if ctx.kind == "gelu" and not torch.is_grad_enabled():
                # First order (no graph of this backward is built): in place on temporaries, and no more fresh
                # (B, N, 4D) tensors than the math needs (on CPU a fresh one costs more than the pass that fills
                # it). e = 2 Phi(h); d_p = d_out/2 @ W1^T, so d_gm = d_p * e and d_h = d_p * gm * 2 phi(h).
                d_half = d_out * 0.5
                e = _scaled_into("mlp.e", hidden, -_INV_SQRT2)
                e = torch.special.erfc(e, out=e)
                d_p = _product_into("mlp.d_p", d_half, w1.t())
                scratch = None
                if need_w1:
                    scratch = torch.mul(e, gm)
                    d_w1 = _flat(scratch).t() @ _flat(d_half)
                if need_h:
                    log_2c = torch.tensor(_LOG_2_INV_SQRT_2PI, dtype=hidden.dtype)
                    if scratch is not None and scratch.dtype == hidden.dtype:
                        d_h = torch.addcmul(log_2c, hidden, hidden, value=-0.5, out=scratch)
                    else:
                        d_h = torch.addcmul(log_2c, hidden, hidden, value=-0.5)
                    d_h = d_h.exp_().mul_(gm).mul_(d_p)
                d_gm = e.mul_(d_p)
            else:  # any activation, and differentiable again when a higher-order graph is being built
                if torch.is_grad_enabled():  # the saved gm was computed without a graph: rebuild it from g, W2
                    gm = g @ w2
                ratio = ratio_of_kind(ctx.kind, hidden)
                d_p = d_out @ w1.t()
                if need_w1:
                    d_w1 = _flat(gm * ratio).t() @ _flat(d_out)
                if need_h:
                    slope = _ratio_grad(ctx.kind, hidden)
                    d_h = None if slope is None else d_p * gm * slope
                d_gm = d_p * ratio
            if need_g:
                d_g = d_gm @ w2.t()
            if need_w2:
                d_w2 = _flat(g).t() @ _flat(d_gm)
        return d_g, d_h, d_w2, d_w1, None


def _product_into(name: str, x: Tensor, w: Tensor) -> Tensor:
    """x @ w for x (..., m, k) and w (k, n) or (..., k, n), in the workspace buffer `name` when nothing is
    autocast and the types agree (else as autocast runs it)."""
    if x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
        return x @ w
    out = _WORKSPACE.take(name, x.shape[:-1] + w.shape[-1:], x.dtype, x.device)
    if w.dim() == 2:
        torch.mm(_flat(x), w, out=_flat(out))
    else:
        torch.bmm(x.reshape(-1, *x.shape[-2:]), w.reshape(-1, *w.shape[-2:]), out=out.view(-1, *out.shape[-2:]))
    return out


def mlp_rule_fused(g: Tensor, hidden: Tensor, fc2_weight: Tensor, fc1_weight: Tensor, kind: str) -> Tensor:
    """Modified gradient at an MLP's input from the one at its output (`kind` from `fused_activation`)."""
    return _MlpRule.apply(g, hidden, fc2_weight, fc1_weight, kind)


# ---------------------------------------------------------------------------------------------- LayerNorm


class _LayerNormRule(torch.autograd.Function):
    """g -> (g*w - mean(g*w)) / std in float32 (see `rules.layer_norm_rule`). Keeps g, std and w only."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, std: Tensor, weight: Tensor | None) -> Tensor:
        with float32_region(g):  # in place on the first temporary (Function.forward records no graph)
            gw = upcast(g) * weight if weight is not None else upcast(g)
            mean = gw.mean(dim=-1, keepdim=True)
            out = (gw.sub_(mean) if gw is not g else gw - mean).div_(upcast(std))
        _save_autocast(ctx, g)
        ctx.save_for_backward(g, std, weight)
        return out

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        g, std, weight = ctx.saved_tensors
        need_g, need_std, need_w = ctx.needs_input_grad
        d_g = d_std = d_w = None
        with _autocast(ctx), float32_region(g):
            std32, g32 = upcast(std), upcast(g)
            u = upcast(d_out) / std32
            u_mean = u.mean(dim=-1, keepdim=True)
            d_gw = u - u_mean if torch.is_grad_enabled() else u.sub_(u_mean)  # in place: u is our temporary
            if need_g:
                d_g = (d_gw * weight if weight is not None else d_gw).to(g.dtype)
            if need_w or need_std:
                # out = (gw - m) / std  =>  d std = -sum(u * (gw - m)) / std = -sum(d_gw * g * w) / std, as the
                # centred d_gw sums to 0 against the constant m; and d w = sum over tokens of d_gw * g
                spent = not torch.is_grad_enabled() and d_g is not d_gw  # d_g is d_gw without a weight
                d_gw_g = d_gw.mul_(g32) if spent else d_gw * g32  # d_gw is not needed after this
                if need_w:
                    d_w = _flat(d_gw_g).sum(dim=0)
                if need_std:
                    dot = d_gw_g @ weight if weight is not None else d_gw_g.sum(dim=-1)
                    d_std = (-dot.unsqueeze(-1) / std32).to(std.dtype)
        return d_g, d_std, d_w


def layer_norm_rule_fused(g: Tensor, std: Tensor, weight: Tensor | None) -> Tensor:
    """`rules.layer_norm_rule` keeping only its inputs for the backward."""
    return _LayerNormRule.apply(g, std, weight)


# ---------------------------------------------------------------------------------------------- attention


class _AttentionRule(torch.autograd.Function):
    """The AttnLRP attention rule (`rules.attention_rule`, rule `attnlrp`). Keeps g_out, q, k, v and the
    attention map (the last four are the trace's); recomputes G = g_out v^T and the softmax VJP S.

    `attn` must be softmax(q k^T) of the same (scaled) q and k, as the trace records them: the map's gradient
    with respect to `attn` is passed on through that softmax to q and k here, and none is returned for `attn`.
    So no (B, H, N, N) gradient per block waits for the forward's backward, which starts only after the rule
    backward of every block has run (with it, those gradients were the step's peak memory).
    """

    @staticmethod
    def forward(ctx: Any, g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, scale: float):
        ctx.scale = scale
        _save_autocast(ctx, g_out)
        ctx.save_for_backward(g_out, q, k, v, attn)
        g_v = attn.transpose(-2, -1) @ g_out
        scores = _softmax_vjp(_product_into("attn.G", g_out, v.transpose(-2, -1)), attn, into="attn.S")
        return (scores @ k).mul_(scale / 4.0), (scores.transpose(-2, -1) @ q).mul_(0.25), g_v.mul_(0.5)

    @staticmethod
    def backward(ctx: Any, d_gq: Tensor, d_gk: Tensor, d_gv: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[:4]  # g_out, q, k, v
        # a higher-order graph is being built: out of place, differentiable; else in place on temporaries
        backward = _attention_backward_graph if torch.is_grad_enabled() else _attention_backward_first_order
        with _autocast(ctx):
            return (*backward(*ctx.saved_tensors, d_gq, d_gk, d_gv, ctx.scale, needs), None, None)


# The softmax rule's derivatives. With G = g_out v^T, r = rowsum(G * a), S = a * (G - r) (the softmax VJP) and
# dS = d_gq k^T + q d_gk^T, c = rowsum(dS * a), t = dS - c:  dG = a * t (the softmax VJP again: its Jacobian is
# symmetric) and da = dS * (G - r) - G * c = (G - r) * t - r * c, plus g_out d_gv^T from the uniform rule on
# A v. da goes on through attn = softmax(q k^T) to q and k. The (B, H, N, N) parts run in float32 under
# autocast, as the forward.

_Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def _attention_backward_graph(
    g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, d_gq: Tensor, d_gk: Tensor, d_gv: Tensor,
    scale: float, needs: tuple[bool, ...],
) -> _Grads:
    """Out of place in differentiable operations (a higher-order graph is being built)."""
    need_gout, need_q, need_k, need_v = needs
    d_gq, d_gk, d_gv = d_gq * (scale / 4.0), d_gk * 0.25, d_gv * 0.5
    big_g = g_out @ v.transpose(-2, -1)
    d_scores = d_gq @ k.transpose(-2, -1) + q @ d_gk.transpose(-2, -1)
    with float32_region(attn):
        a32, g32, ds32 = upcast(attn), upcast(big_g), upcast(d_scores)
        scores = torch._softmax_backward_data(g32, a32, -1, a32.dtype)
        d_big_g = torch._softmax_backward_data(ds32, a32, -1, a32.dtype)
    d_q = d_k = d_gout = d_v = None
    if need_q or need_k:
        from_gv = g_out @ d_gv.transpose(-2, -1)
        with float32_region(attn):
            r = (g32 * a32).sum(dim=-1, keepdim=True)
            c = (ds32 * a32).sum(dim=-1, keepdim=True)
            d_attn = torch.addcmul(ds32 * (g32 - r), g32, c, value=-1.0) + upcast(from_gv)
            d_logits = torch._softmax_backward_data(d_attn, a32, -1, a32.dtype)
        if need_q:
            d_q = scores @ d_gk + d_logits @ k
        if need_k:
            d_k = scores.transpose(-2, -1) @ d_gq + d_logits.transpose(-2, -1) @ q
    if need_gout:
        d_gout = attn @ d_gv + d_big_g @ v
    if need_v:
        d_v = d_big_g.transpose(-2, -1) @ g_out
    return d_gout, d_q, d_k, d_v


def _attention_backward_first_order(
    g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, d_gq: Tensor, d_gk: Tensor, d_gv: Tensor,
    scale: float, needs: tuple[bool, ...],
) -> _Grads:
    """The same values with the fewest (B, H, N, N) passes, in place on its own temporaries. Every
    (B, H, N, N) pass is a trip through memory, and they cost as much as the products that read them."""
    need_gout, need_q, need_k, need_v = needs
    need_attn = need_q or need_k
    d = q.shape[-1]
    # The incoming gradients are views of the (B, N, 3, H, d) stack: each is scaled into (B, H, N, d) order
    # once, and d_gq, d_gk straight into [d_gq | q] and [k | d_gk], so that dS = d_gq k^T + q d_gk^T is one
    # product over 2d (no second (B, H, N, N) product and no sum of two).
    left = _side_by_side(d_gq, scale / 4.0, q, None)
    right = _side_by_side(k, None, d_gk, 0.25)
    d_gq, d_gk = left[..., :d], right[..., d:]
    d_gv = torch.mul(d_gv, 0.5, out=torch.empty(d_gv.shape, dtype=d_gv.dtype, device=d_gv.device))
    big_g = _product_into("attn.G", g_out, v.transpose(-2, -1))
    d_scores = _product_into("attn.dS", left, right.transpose(-2, -1))
    with float32_region(attn):
        a32, g_r, t = upcast(attn), upcast(big_g), upcast(d_scores)
        r = _rowdot(g_r, a32)
        g_r = g_r.sub_(r)  # G - r
        scores = torch.mul(a32, g_r, out=_WORKSPACE.take("attn.S", g_r.shape, a32.dtype, a32.device))
        c = _rowdot(t, a32)
        t = t.sub_(c)
        d_attn = torch.addcmul((r * c).neg_(), g_r, t, out=g_r) if need_attn else None
    d_q = d_k = d_gout = d_v = None
    if d_attn is not None:
        _add_product(d_attn, g_out, d_gv.transpose(-2, -1))
        with float32_region(attn):
            d_logits = torch._softmax_backward_data(d_attn, a32, -1, a32.dtype, grad_input=_WORKSPACE.take(
                "attn.d_logits", d_attn.shape, a32.dtype, a32.device))
        if need_q:
            d_q = _add_product(scores @ d_gk, d_logits, k)
        if need_k:
            d_k = _add_product(scores.transpose(-2, -1) @ d_gq, d_logits.transpose(-2, -1), q)
    d_big_g = t.mul_(a32)
    if need_gout:
        d_gout = _add_product(attn @ d_gv, d_big_g, v)
    if need_v:
        d_v = d_big_g.transpose(-2, -1) @ g_out
    return d_gout, d_q, d_k, d_v


def _side_by_side(x: Tensor, x_scale: float | None, y: Tensor, y_scale: float | None) -> Tensor:
    """[x * x_scale | y * y_scale] along the last dimension (contiguous), one pass per half."""
    width = x.shape[-1]
    out = torch.empty(*x.shape[:-1], width + y.shape[-1], dtype=torch.promote_types(x.dtype, y.dtype),
                      device=x.device)
    for part, src, c in ((out[..., :width], x, x_scale), (out[..., width:], y, y_scale)):
        torch.mul(src, c, out=part) if c is not None else part.copy_(src)
    return out


def _add_product(acc: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """acc += x @ y over (..., n, m) batches, in place. When nothing is autocast and the types agree, the
    product accumulates into `acc` itself (no (..., n, m) temporary and no extra pass); else as autocast runs it."""
    if acc.dtype == x.dtype == y.dtype and acc.is_contiguous() and not torch.is_autocast_enabled(acc.device.type):
        acc.view(-1, *acc.shape[-2:]).baddbmm_(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
        return acc
    return acc.add_(x @ y)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum(x * y) over the last dimension, keeping it (one pass, no (B, H, N, N) product materialised)."""
    return torch.einsum("...ij,...ij->...i", x, y).unsqueeze(-1)


def _softmax_vjp(big_g: Tensor, attn: Tensor, into: str) -> Tensor:
    """The softmax VJP of `big_g` at `attn`, in the workspace buffer `into`."""
    # In float32 under autocast: G - sum(G * a) cancels (the DTD rule's bias term); see rules.attention_rule.
    with float32_region(big_g):
        a32 = upcast(attn)
        out = _WORKSPACE.take(into, big_g.shape, a32.dtype, a32.device)
        return torch._softmax_backward_data(upcast(big_g), a32, -1, a32.dtype, grad_input=out)


def attention_rule_fused(
    g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """`rules.attention_rule(..., rule="attnlrp")` keeping no (B, H, N, N) tensor of its own for the backward."""
    # contiguous before the Function (so in the graph): g_out is a head view of (B, N, D), and every product
    # with it, forward and backward, would copy it otherwise
    return _AttentionRule.apply(g_out.contiguous(), q, k, v, attn, scale)

