"""The fused AttnLRP rules (`relevance/_fused_rules.py`) against the plain expressions of `rules.py`: the same
maps and the same parameter gradients on every tiny ViT family and activation, derivatives checked numerically
to second order, the same under bf16 autocast, and fewer tensors kept for the backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _lxt_oracle import MODELS, tiny_images, tiny_vit

from cft_lightning.relevance import AttnLRP
from cft_lightning.relevance._fused_rules import (
    attention_rule_fused,
    fused_activation,
    layer_norm_rule_fused,
    mlp_rule_fused,
)
from cft_lightning.relevance.rules import attention_rule, identity_rule, layer_norm_rule

TARGETS = torch.tensor([3, 7])


def _map_and_grads(model, x, rule, second_order, dtype=torch.float64):
    """The raw map and the parameter gradient of a fixed random linear function of it."""
    method = AttnLRP(attention_rule=rule, second_order=second_order)
    raw = method(model, x, TARGETS).raw
    weights = torch.randn(raw.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((weights * raw.to(dtype)).sum(), params, allow_unused=True)
    return raw.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
@pytest.mark.parametrize("key", list(MODELS))
def test_fused_equals_autograd_on_every_family(key, rule):
    model, x = tiny_vit(key), tiny_images(key)
    raw_f, grads_f = _map_and_grads(model, x, rule, "fused")
    raw_a, grads_a = _map_and_grads(model, x, rule, "autograd")
    torch.testing.assert_close(raw_f, raw_a, rtol=1e-12, atol=1e-12 * float(raw_a.abs().max()))
    assert any(g.abs().max() > 1e-6 for g in grads_a)
    for gf, ga in zip(grads_f, grads_a):
        torch.testing.assert_close(gf, ga, rtol=1e-9, atol=1e-11 * float(ga.abs().max() + 1))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"])  # timm's own modules
def test_fused_equals_autograd_for_other_activations(act):
    model, x = tiny_vit("cls", act_layer=act), tiny_images("cls")
    assert fused_activation(model.blocks[0].mlp.act) is not None  # the fused MLP rule really runs
    raw_f, grads_f = _map_and_grads(model, x, "attnlrp", "fused")
    raw_a, grads_a = _map_and_grads(model, x, "attnlrp", "autograd")
    torch.testing.assert_close(raw_f, raw_a, rtol=1e-12, atol=1e-12 * float(raw_a.abs().max()))
    for gf, ga in zip(grads_f, grads_a):
        torch.testing.assert_close(gf, ga, rtol=1e-9, atol=1e-11 * float(ga.abs().max() + 1))


def _double(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "identity"])
def test_mlp_rule_derivatives(kind):
    from timm.layers import QuickGELU

    act = {"gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU(),
           "silu": torch.nn.SiLU(), "relu": torch.nn.ReLU(), "identity": torch.nn.Identity()}[kind]
    assert fused_activation(act) == kind
    g, h, w2, w1 = _double(2, 3, 4, seed=0), _double(2, 3, 8, seed=1), _double(4, 8, seed=2), _double(8, 4, seed=3)
    reference = identity_rule(g @ w2, act, h) @ w1
    torch.testing.assert_close(mlp_rule_fused(g, h, w2, w1, kind), reference, rtol=1e-13, atol=1e-13)

    def f(*args):
        return mlp_rule_fused(*args, kind)

    assert torch.autograd.gradcheck(f, (g, h, w2, w1))  # first order: the in-place path (no graph built)
    assert torch.autograd.gradgradcheck(f, (g, h, w2, w1))  # second order: the differentiable path


@pytest.mark.parametrize("with_weight", [True, False])
def test_layer_norm_rule_derivatives(with_weight):
    g, std = _double(2, 3, 5, seed=0), (torch.rand(2, 3, 1, dtype=torch.float64) + 0.5).requires_grad_()
    weight = _double(5, seed=2) if with_weight else None
    torch.testing.assert_close(layer_norm_rule_fused(g, std, weight), layer_norm_rule(g, std, weight))
    args = (g, std, weight) if with_weight else (g, std)

    def f(*a):
        return layer_norm_rule_fused(*a) if with_weight else layer_norm_rule_fused(*a, None)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_attention_rule_derivatives():
    """The attention Function passes the map's gradient at `attn` on to q and k (attn = softmax(q k^T)): checked
    as a function of (g_out, q, k, v) with the softmax inside, against the plain expressions."""
    scale = 0.5
    g_out, q, k, v = (_double(2, 2, 4, 3, seed=s) for s in range(4))

    def fused(g_out, q, k, v):
        return attention_rule_fused(g_out, q, k, v, (q @ k.transpose(-2, -1)).softmax(-1), scale)

    def plain(g_out, q, k, v):
        return attention_rule(g_out, q, k, v, (q @ k.transpose(-2, -1)).softmax(-1), scale, "attnlrp")

    for a, b in zip(fused(g_out, q, k, v), plain(g_out, q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
               for o in plain(g_out, q, k, v)]
    grads_f = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, fused(g_out, q, k, v))), (g_out, q, k, v))
    grads_p = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, plain(g_out, q, k, v))), (g_out, q, k, v))
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (g_out, q, k, v))
    assert torch.autograd.gradgradcheck(fused, (g_out, q, k, v))


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.flatten() for t in a]).double(), torch.cat([t.flatten() for t in b]).double()
    return float(F.cosine_similarity(fa, fb, dim=0))


def test_fused_equals_autograd_under_bf16_autocast():
    """Under CPU bf16 autocast both paths round alike (the backward re-enters the forward's autocast state)."""
    model, x = tiny_vit("reg", dtype=torch.float32), tiny_images("reg", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw_f, grads_f = _map_and_grads(model, x, "attnlrp", "fused", torch.float32)
        raw_a, grads_a = _map_and_grads(model, x, "attnlrp", "autograd", torch.float32)
    _, grads_32 = _map_and_grads(model, x, "attnlrp", "fused", torch.float32)
    r = torch.corrcoef(torch.stack([raw_f.flatten().float(), raw_a.flatten().float()]))[0, 1]
    assert r > 0.999, float(r)
    assert _cosine(grads_f, grads_a) > 0.999
    assert _cosine(grads_f, grads_32) > 0.99  # and both stay close to float32


def _saved_bytes(model, x, second_order: str) -> int:
    """Bytes of distinct non-parameter tensors autograd keeps for the backward of one map."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        AttnLRP(second_order=second_order)(model, x, TARGETS)
    return total


def test_fused_rules_keep_less_for_the_backward():
    model = tiny_vit("cls", embed_dim=64, num_heads=4, img_size=(64, 96))
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    fused, plain = _saved_bytes(model, x, "fused"), _saved_bytes(model, x, "autograd")
    assert fused < 0.7 * plain, (fused, plain)  # 0.59 here; the rest is the forward trace both keep


def test_second_order_is_checked():
    with pytest.raises(ValueError, match="second_order"):
        AttnLRP(second_order="recompute")  # type: ignore[arg-type]


def test_constants():
    from cft_lightning.relevance import _fused_rules as fr

    assert math.isclose(math.exp(fr._LOG_2_INV_SQRT_2PI), 2.0 / math.sqrt(2.0 * math.pi))


@pytest.mark.parametrize("affine", [True, False])
def test_trace_layer_norm_returns_a_differentiable_std(affine):
    """The trace's LayerNorm computes the output and the std the rule needs in one kernel; both match the plain
    expressions, with first and second derivatives checked numerically."""
    from cft_lightning.relevance._vit import _LayerNormWithStd

    x = _double(2, 3, 6, seed=0, scale=2.0)
    weight, bias = (_double(6, seed=1), _double(6, seed=2)) if affine else (None, None)
    y, std = _LayerNormWithStd.apply(x, weight, bias, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (6,), weight, bias, 1e-5))
    torch.testing.assert_close(std, torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + 1e-5))
    args = (x, weight, bias) if affine else (x,)

    def f(*a):
        return _LayerNormWithStd.apply(*a, 1e-5) if affine else _LayerNormWithStd.apply(*a, None, None, 1e-5)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_saved_tensors_script_reports_each_phase(monkeypatch):
    """perf/saved_tensors.py (the memory breakdown in docs/performance.md) on a tiny ViT: every phase is counted,
    and the fused rule backward keeps less than the autograd one while the forward is the same."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "perf"))
    monkeypatch.delitem(sys.modules, "saved_tensors", raising=False)
    script = importlib.import_module("saved_tensors")
    fused = script.saved_by_phase("vit_tiny_patch16_224", 64, 2, 10, "fused")
    plain = script.saved_by_phase("vit_tiny_patch16_224", 64, 2, 10, "autograd")
    assert set(fused) == set(plain) == {"forward", "rule backward", "loss"}
    assert fused["forward"] == plain["forward"]
    assert 0 < fused["rule backward"] < 0.7 * plain["rule backward"]
