"""The first-order paths of the fused rules (`relevance/_fused_rules.py`): the CPU workspace they compute in
never leaks into what they return, the in-place accumulation of products equals the plain sum, and partial
`needs_input_grad` and float32 (the training default) give the plain expressions' gradients."""

from __future__ import annotations

import threading

import pytest
import torch
from _lxt_oracle import tiny_images, tiny_vit

from cft_lightning.relevance import AttnLRP
from cft_lightning.relevance._fused_rules import (
    _WORKSPACE,
    _add_product,
    _side_by_side,
    attention_rule_fused,
    mlp_rule_fused,
)
from cft_lightning.relevance.rules import attention_rule, identity_rule


def _randn(*shape, seed, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def test_workspace_keeps_one_buffer_per_name_shape_and_thread():
    a = _WORKSPACE.take("test.a", torch.Size([3, 4]), torch.float32, torch.device("cpu"))
    assert _WORKSPACE.take("test.a", torch.Size([3, 4]), torch.float32, torch.device("cpu")) is a
    assert _WORKSPACE.take("test.b", torch.Size([3, 4]), torch.float32, torch.device("cpu")) is not a
    bigger = _WORKSPACE.take("test.a", torch.Size([5, 4]), torch.float32, torch.device("cpu"))
    assert bigger.shape == (5, 4) and bigger is not a
    assert _WORKSPACE.take("test.a", torch.Size([5, 4]), torch.float64, torch.device("cpu")).dtype == torch.float64
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(
        _WORKSPACE.take("test.a", torch.Size([5, 4]), torch.float64, torch.device("cpu"))))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != _WORKSPACE.take("test.a", torch.Size([5, 4]), torch.float64,
                                                  torch.device("cpu")).data_ptr()
    _WORKSPACE.buffers.clear()


def test_workspace_buffer_made_in_inference_mode_is_replaced_outside_it():
    with torch.inference_mode():
        made = _WORKSPACE.take("test.c", torch.Size([2, 2]), torch.float32, torch.device("cpu"))
        assert made.is_inference()
    outside = _WORKSPACE.take("test.c", torch.Size([2, 2]), torch.float32, torch.device("cpu"))
    assert not outside.is_inference()
    torch.mul(torch.ones(2, 2), 2.0, out=outside)  # writable in a training step
    _WORKSPACE.buffers.clear()


def _mlp_grads(seed):
    g, h = _randn(2, 5, 4, seed=seed), _randn(2, 5, 8, seed=seed + 1)
    w2, w1 = _randn(4, 8, seed=seed + 2), _randn(8, 4, seed=seed + 3)
    out = mlp_rule_fused(g, h, w2, w1, "gelu")
    return torch.autograd.grad((out * _randn(*out.shape, seed=seed + 4, grad=False)).sum(), (g, h, w2, w1))


def _attention_grads(seed, dtype=torch.float32):
    g_out, q, k, v = (_randn(2, 3, 5, 4, seed=seed + i, dtype=dtype) for i in range(4))
    attn = (q @ k.transpose(-2, -1)).softmax(-1)
    outs = attention_rule_fused(g_out, q, k, v, attn, 0.5)
    loss = sum((o * _randn(*o.shape, seed=seed + 9 + i, dtype=dtype, grad=False)).sum() for i, o in enumerate(outs))
    return torch.autograd.grad(loss, (g_out, q, k, v))


@pytest.mark.parametrize("grads", [_mlp_grads, _attention_grads])
def test_nothing_returned_aliases_the_workspace(grads):
    """A later call reuses the workspace; what an earlier call returned must not change."""
    first = grads(0)
    kept = [t.clone() for t in first]
    grads(100)  # different values through the same buffers
    for t, k in zip(first, kept):
        torch.testing.assert_close(t, k, rtol=0, atol=0)
    workspace = {b.data_ptr() for b in _WORKSPACE.buffers.values()}
    assert workspace and not workspace & {t.data_ptr() for t in first}


def test_mlp_rule_float32_matches_the_plain_expressions():
    g, h = _randn(2, 5, 4, seed=0), _randn(2, 5, 8, seed=1)
    w2, w1 = _randn(4, 8, seed=2), _randn(8, 4, seed=3)
    weights = _randn(2, 5, 4, seed=4, grad=False)
    fused = torch.autograd.grad((mlp_rule_fused(g, h, w2, w1, "gelu") * weights).sum(), (g, h, w2, w1))
    plain_out = identity_rule(g @ w2, torch.nn.GELU(), h) @ w1
    plain = torch.autograd.grad((plain_out * weights).sum(), (g, h, w2, w1))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("wanted", [("g_out",), ("v",), ("q",), ("k",), ("g_out", "q"), ("q", "k", "v")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_first_order_with_partial_needs(wanted, dtype):
    """Only some inputs need a gradient (frozen parts of a model): each branch of the first-order path."""
    names = ("g_out", "q", "k", "v")
    base = {n: _randn(2, 3, 5, 4, seed=i, dtype=dtype, grad=False) for i, n in enumerate(names)}
    weights = [_randn(2, 3, 5, 4, seed=10 + i, dtype=dtype, grad=False) for i in range(3)]

    def grads(rule):
        ins = {n: t.clone().requires_grad_(n in wanted) for n, t in base.items()}
        attn = (ins["q"] @ ins["k"].transpose(-2, -1)).softmax(-1)
        outs = rule(ins["g_out"], ins["q"], ins["k"], ins["v"], attn)
        loss = sum((w * o).sum() for w, o in zip(weights, outs))
        return torch.autograd.grad(loss, [ins[n] for n in wanted])

    fused = grads(lambda *a: attention_rule_fused(*a, 0.5))
    plain = grads(lambda *a: attention_rule(*a, 0.5, "attnlrp"))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(fused, plain):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_add_product_accumulates_in_place_or_through_autocast():
    x, y = _randn(2, 3, 5, 4, seed=0, grad=False), _randn(2, 3, 4, 6, seed=1, grad=False)
    acc = _randn(2, 3, 5, 6, seed=2, grad=False)
    expected = acc + x @ y
    out = _add_product(acc, x, y)
    assert out is acc  # in place
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    transposed = _add_product(torch.zeros(2, 3, 4, 4), x.transpose(-2, -1), x)  # a transposed view as operand
    torch.testing.assert_close(transposed, x.transpose(-2, -1) @ x, rtol=1e-6, atol=1e-6)
    acc = torch.zeros(2, 3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the product as autocast runs it
        _add_product(acc, x, y)
    torch.testing.assert_close(acc, x @ y, rtol=2e-2, atol=2e-2 * float((x @ y).abs().max()))


def test_side_by_side_writes_both_halves():
    x, y = _randn(2, 5, 3, seed=0, grad=False), _randn(2, 5, 4, seed=1, grad=False, dtype=torch.float64)
    out = _side_by_side(x, 0.5, y, None)
    assert out.is_contiguous() and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([x.double() * 0.5, y], -1))


def test_float32_training_path_matches_autograd_on_a_tiny_vit():
    """The default step runs in float32 with no autocast: the workspace, in-place accumulation and merged
    products all run. Maps and parameter gradients agree with the plain expressions to float32 rounding."""
    model, x = tiny_vit("cls", dtype=torch.float32), tiny_images("cls", dtype=torch.float32)
    targets = torch.tensor([3, 7])
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for second_order in ("fused", "autograd"):
        raw = AttnLRP(second_order=second_order)(model, x, targets).raw
        weights = torch.randn(raw.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((weights * raw).sum(), params, allow_unused=True)
        results.append((raw.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    (raw_f, grads_f), (raw_a, grads_a) = results
    torch.testing.assert_close(raw_f, raw_a, rtol=1e-4, atol=1e-5 * float(raw_a.abs().max()))
    flat_f, flat_a = torch.cat([g.flatten() for g in grads_f]), torch.cat([g.flatten() for g in grads_a])
    assert float(flat_a.abs().max()) > 0
    assert float(torch.nn.functional.cosine_similarity(flat_f, flat_a, dim=0)) > 0.99999
    torch.testing.assert_close(flat_f, flat_a, rtol=1e-3, atol=1e-4 * float(flat_a.abs().max()))
