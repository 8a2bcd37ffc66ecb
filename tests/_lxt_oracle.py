"""Test helpers: tiny random timm ViTs and an LXT-style AttnLRP oracle.

The oracle is the reference the AttnLRP implementation is checked against. It applies the rules of LXT's
"efficient" mode (rachtibat/LRP-eXplains-Transformers, `lxt/efficient/rules.py` + `patches.py`): the
forward pass is unchanged, but the backward of a few ops is modified, and relevance is gradient x input.

`import lxt.efficient` fails with transformers 5: its package `__init__` imports a function transformers
removed. The rule primitives themselves only need torch, so `lxt/efficient/rules.py` is loaded here
directly from its file, without executing `lxt/efficient/__init__.py`.

The patch is applied to the modules of one model *instance* (instance attribute `forward`), never to a
class, and is undone on exit. The model's own `VisionTransformer.forward` runs: pooling, residuals,
LayerScale, position embeddings and prefix tokens are timm's, not re-implemented here.
"""

from __future__ import annotations

import importlib.util
import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _load_lxt_rules() -> types.ModuleType:
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lxt is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "efficient" / "rules.py"
    rules_spec = importlib.util.spec_from_file_location("_lxt_efficient_rules", path)
    module = importlib.util.module_from_spec(rules_spec)
    rules_spec.loader.exec_module(module)
    return module


lxt_rules = _load_lxt_rules()
identity_rule_implicit = lxt_rules.identity_rule_implicit
divide_gradient = lxt_rules.divide_gradient
stop_gradient = lxt_rules.stop_gradient


# --------------------------------------------------------------------------------------------------
# tiny models

TINY = dict(pretrained=False, depth=2, embed_dim=48, num_heads=3, num_classes=10)

# name -> (timm model name, extra kwargs, image size (H, W))
MODELS = {
    # class token, patch 8 on a non-square image: a 4x6 grid (checks the (h, w) orientation)
    "cls": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8), (32, 48)),
    # DeiT-III: LayerScale, position embedding not on the class token
    "deit3": ("deit3_small_patch16_224", dict(img_size=32), (32, 32)),
    # DINOv2 with 4 register tokens + LayerScale, patch 14
    "reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28), (28, 28)),
    # no class token, average pooling over the patch tokens (fc_norm instead of norm)
    "avg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, global_pool="avg", class_token=False), (32, 32)),
    # LayerNorm on q and k
    "qknorm": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, qk_norm=True), (32, 32)),
    # average pooling with prefix tokens (class + 2 registers) that the pool skips, and one that includes them
    "avg_prefix": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, global_pool="avg", reg_tokens=2),
        (32, 32),
    ),
    "avg_incl": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, global_pool="avg", reg_tokens=2, pool_include_prefix=True),
        (32, 32),
    ),
}


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter so that the network is far from linear and from uniform attention.

    timm's init (std 0.02 weights, LayerScale 1e-5, unit LayerNorm) makes attention almost uniform and
    LayerScale blocks almost the identity, so a wrong rule could hide behind tiny contributions.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token"):
                new = 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name.endswith("gamma"):
                new = 0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64)
            elif p.ndim >= 2:
                new = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                new = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(new.to(p.dtype))
    return model


def tiny_vit(key: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> nn.Module:
    """A tiny random eval-mode timm ViT of the family `key` (see MODELS), pretrained=False."""
    name, extra, _ = MODELS[key]
    kwargs = {**TINY, **extra, **overrides}
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    return randomize_(model.to(dtype), seed).eval()


def tiny_images(key: str, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    size = MODELS[key][2]
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# LXT-style patched forward


def _lxt_layer_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    # lxt/efficient/patches.py: layer_norm_forward (biased variance, std held constant in the backward)
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / stop_gradient(torch.sqrt(var + self.eps))
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _make_lxt_mlp_forward(act_eps: float | None):
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        # lxt/efficient/patches.py: non_linear_forward on the activation (identity rule)
        x = self.fc1(x)
        if act_eps is None:  # LXT as shipped: ratio act(h) / (h + 1e-10)
            x = identity_rule_implicit(self.act, x)
        else:  # the same LXT Function with another stabiliser (0: the exact ratio act(h) / h)
            x = lxt_rules.identity_rule_implicit_fn.apply(self.act, x, act_eps)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)

    return forward


def _make_lxt_attention_forward(rule: str):
    def forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        assert attn_mask is None and not is_causal
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rule == "attnlrp":  # uniform rule on q k^T and A v (lxt wrap_attention_forward)
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
        elif rule == "cp":  # CP-LRP (lxt cp_multi_head_attention_forward)
            q, k = stop_gradient(q), stop_gradient(k)
        else:
            raise ValueError(rule)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


@contextmanager
def lxt_patched(model: nn.Module, rule: str = "attnlrp", act_eps: float | None = None) -> Iterator[nn.Module]:
    """Patch the LayerNorm, Mlp and Attention modules of this instance with LXT's efficient rules.

    act_eps: None uses `identity_rule_implicit` as LXT ships it (stabiliser 1e-10 in act(h) / (h + eps));
    a number calls LXT's `identity_rule_implicit_fn` with that stabiliser.
    """
    from timm.layers import Attention, Mlp

    attention_forward = _make_lxt_attention_forward(rule)
    mlp_forward = _make_lxt_mlp_forward(act_eps)
    patched = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = types.MethodType(_lxt_layer_norm_forward, m)
        elif isinstance(m, Mlp):
            m.forward = types.MethodType(mlp_forward, m)
        elif isinstance(m, Attention):
            m.forward = types.MethodType(attention_forward, m)
        else:
            continue
        patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def lxt_relevance(
    model: nn.Module, images: Tensor, targets: Tensor, rule: str = "attnlrp", act_eps: float | None = None
) -> Tensor:
    """LXT heatmap (x * x.grad) summed over channels and over each patch: (B, h, w)."""
    x = images.detach().clone().requires_grad_(True)
    with lxt_patched(model, rule, act_eps):
        logits = model(x)
    # = logits[range(B), targets].sum().backward() and x.grad, without filling the parameters' .grad
    (x_grad,) = torch.autograd.grad(logits[torch.arange(x.shape[0]), targets].sum(), x)
    pixel_map = (x * x_grad).sum(1, keepdim=True).detach()  # (B, 1, H, W)
    ph, pw = model.patch_embed.patch_size
    return (F.avg_pool2d(pixel_map, (ph, pw)) * (ph * pw)).squeeze(1)


def lxt_map_surrogate(model: nn.Module, images: Tensor, targets: Tensor, rule: str = "attnlrp") -> Tensor:
    """The same heatmap, kept in the graph (create_graph) as the "surrogate" regime (iii): differentiable,
    but its parameter gradient runs through the *modified* backward of the patched ops."""
    x = images.detach().clone().requires_grad_(True)
    with lxt_patched(model, rule):
        logits = model(x)
    score = logits[torch.arange(x.shape[0]), targets].sum()
    (g,) = torch.autograd.grad(score, x, create_graph=True)
    pixel_map = (x * g).sum(1, keepdim=True)
    ph, pw = model.patch_embed.patch_size
    return (F.avg_pool2d(pixel_map, (ph, pw)) * (ph * pw)).squeeze(1)


# --------------------------------------------------------------------------------------------------
# finite differences over all parameters


def random_direction(model: nn.Module, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in model.parameters()]


def evaluate_at_offsets(model: nn.Module, fn, direction: list[Tensor], h: float) -> list:
    """[fn() at theta + h d, fn() at theta - h d]; the parameters are restored exactly afterwards."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    outs = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, p0, d in zip(params, saved, direction):
                    p.copy_(p0 + sign * h * d)
            outs.append(fn())
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
    return outs


def directional_fd(model: nn.Module, fn, direction: list[Tensor], h: float = 1e-5) -> float:
    """Central difference (fn(theta + h d) - fn(theta - h d)) / 2h, parameters restored exactly afterwards."""
    plus, minus = (float(v.detach()) for v in evaluate_at_offsets(model, fn, direction, h))
    return (plus - minus) / (2 * h)


def directional_fd_richardson(model: nn.Module, fn, direction: list[Tensor], h: float = 1e-5) -> float:
    """Richardson-extrapolated central difference (4 D(h/2) - D(h)) / 3: truncation error O(h^4).

    The plain central difference has an O(h^2) error; for these maps it is ~3e3 h^2 (measured), i.e. a
    relative error of ~1e-6 at h = 1e-5, too close to the 1e-6 tolerance of the exactness tests.
    """
    coarse = directional_fd(model, fn, direction, h)
    fine = directional_fd(model, fn, direction, h / 2)
    return (4 * fine - coarse) / 3


def directional_autograd(model: nn.Module, value: Tensor, directions: list[list[Tensor]]) -> list[float]:
    """sum(grad_theta value . d) for each direction d (parameters the value does not use count as 0)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    out = []
    for direction in directions:
        total = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
        out.append(total)
    return out
