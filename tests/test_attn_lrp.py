"""Correctness of AttnLRP for timm ViTs: the recorded forward, the first-order map against an LXT oracle,
and exact second-order differentiability against finite differences."""

from __future__ import annotations

import pytest
import torch
from _lxt_oracle import (
    MODELS,
    directional_autograd,
    directional_fd,
    directional_fd_richardson,
    lxt_map_surrogate,
    lxt_relevance,
    random_direction,
    tiny_images,
    tiny_vit,
)

from cft_lightning.relevance._vit import trace_vit
from cft_lightning.relevance.attn_lrp import AttnLRP

TARGETS = torch.tensor([3, 7])


def _grid(key: str) -> tuple[int, int]:
    return tuple(int(s) for s in tiny_vit(key).patch_embed.grid_size)


# --------------------------------------------------------------------------------------------------
# 1. forward equality


@pytest.mark.parametrize("key", list(MODELS))
def test_trace_logits_equal_model_forward(key):
    model = tiny_vit(key)
    x = tiny_images(key)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # reference: timm's default path
    expected = model(x)
    trace = trace_vit(model, x)
    torch.testing.assert_close(trace.logits, expected, rtol=1e-12, atol=1e-12)
    assert trace.grid == _grid(key)
    assert trace.num_prefix_tokens == model.num_prefix_tokens
    assert trace.patch_tokens.shape == (2, trace.grid[0] * trace.grid[1], 48)
    # the method returns the logits of the same pass
    torch.testing.assert_close(AttnLRP()(model, x, TARGETS).logits, expected, rtol=1e-12, atol=1e-12)


def test_trace_logits_equal_model_forward_float32():
    model = tiny_vit("reg", dtype=torch.float32)
    x = tiny_images("reg", dtype=torch.float32)
    torch.testing.assert_close(trace_vit(model, x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_tiny_models_exercise_the_intended_parts():
    """Guards the fixtures: each model family really has the part its tests are meant to cover."""
    from timm.layers import LayerScale

    assert tiny_vit("cls").num_prefix_tokens == 1 and _grid("cls") == (4, 6)
    assert isinstance(tiny_vit("deit3").blocks[0].ls1, LayerScale)
    reg = tiny_vit("reg")
    assert reg.num_prefix_tokens == 5 and reg.patch_embed.patch_size == (14, 14)
    assert isinstance(reg.blocks[0].ls2, LayerScale)
    avg = tiny_vit("avg")
    assert avg.cls_token is None and avg.num_prefix_tokens == 0 and avg.global_pool == "avg"
    assert isinstance(avg.fc_norm, torch.nn.LayerNorm)
    assert isinstance(tiny_vit("qknorm").blocks[0].attn.q_norm, torch.nn.LayerNorm)
    prefix = tiny_vit("avg_prefix")
    assert prefix.num_prefix_tokens == 3 and prefix.global_pool == "avg" and not prefix.pool_include_prefix
    assert tiny_vit("avg_incl").pool_include_prefix


# --------------------------------------------------------------------------------------------------
# 2. first order: the LXT oracle


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
@pytest.mark.parametrize("key", list(MODELS))
def test_raw_equals_lxt_gradient_times_input(key, rule):
    model = tiny_vit(key)
    x = tiny_images(key)
    raw = AttnLRP(attention_rule=rule)(model, x, TARGETS).raw.detach()
    assert raw.shape == (2, *_grid(key))

    # LXT as shipped (identity rule stabilised by +1e-10 in act(h) / (h + 1e-10))
    oracle = lxt_relevance(model, x, TARGETS, rule)
    scale = oracle.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(raw, oracle, rtol=1e-6, atol=1e-9 * float(scale))
    # the same LXT Function without the stabiliser: the two computations agree to rounding
    exact_oracle = lxt_relevance(model, x, TARGETS, rule, act_eps=0.0)
    torch.testing.assert_close(raw, exact_oracle, rtol=1e-10, atol=1e-13 * float(scale))


@pytest.mark.parametrize("key", ["cls", "reg"])
def test_oracle_comparison_is_discriminative(key):
    """The rules change the map by far more than the oracle tolerance: plain gradient x input (no rules),
    and the other attention rule, are both far from the AttnLRP map."""
    model = tiny_vit(key)
    x = tiny_images(key)
    raw = AttnLRP()(model, x, TARGETS).raw.detach()
    cp = AttnLRP(attention_rule="cp")(model, x, TARGETS).raw.detach()

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[torch.arange(2), TARGETS].sum(), xg)
    p = model.patch_embed.patch_size[0]
    plain = torch.nn.functional.avg_pool2d((x * grad).sum(1, keepdim=True), p).squeeze(1) * p * p

    scale = raw.abs().max()
    assert (raw - plain).abs().max() > 1e-2 * scale
    assert (raw - cp).abs().max() > 1e-2 * scale


def test_default_targets_are_the_prediction():
    model = tiny_vit("cls")
    x = tiny_images("cls")
    rel = AttnLRP()(model, x)
    pred = model(x).argmax(1)
    assert torch.equal(rel.targets, pred)
    torch.testing.assert_close(rel.raw.detach(), lxt_relevance(model, x, pred), rtol=1e-6, atol=1e-9)


def test_targets_select_the_explained_class():
    model = tiny_vit("cls")
    x = tiny_images("cls")
    a = AttnLRP()(model, x, torch.tensor([3, 3])).raw
    b = AttnLRP()(model, x, torch.tensor([3, 4])).raw
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert (a[1] - b[1]).abs().max() > 1e-3 * a[1].abs().max()


def test_relevance_is_per_image():
    """Image i's map does not depend on the other images of the batch."""
    model = tiny_vit("reg")
    x = tiny_images("reg", batch=3)
    targets = torch.tensor([1, 2, 3])
    full = AttnLRP()(model, x, targets).raw
    single = AttnLRP()(model, x[1:2], targets[1:2]).raw
    torch.testing.assert_close(full[1:2], single, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 3. second order: the map's parameter gradient is exact


def _c(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("field", ["raw", "maps"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
@pytest.mark.parametrize("key", ["cls", "reg"])
def test_parameter_gradient_matches_finite_differences(key, rule, field):
    model = tiny_vit(key)
    x = tiny_images(key)
    method = AttnLRP(attention_rule=rule)
    c = _c((2, *_grid(key)))

    def f():
        return (c * getattr(method(model, x, TARGETS), field)).sum()

    directions = [random_direction(model, seed) for seed in range(3)]
    autograd_dd = directional_autograd(model, f(), directions)
    for ad, d in zip(autograd_dd, directions):
        fd = directional_fd_richardson(model, f, d, h=1e-5)
        assert abs(fd) > 1e-3  # a direction along which the map really changes
        assert abs(ad - fd) <= 1e-6 * abs(fd), (ad, fd)


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_finite_difference_check_detects_a_surrogate_gradient(rule):
    """The same check rejects LXT's patched-backward map trained with create_graph (regime iii): its
    first-order map equals ours, but its parameter gradient runs through the modified backward."""
    model = tiny_vit("cls")
    x = tiny_images("cls")
    c = _c((2, *_grid("cls")))
    torch.testing.assert_close(
        lxt_map_surrogate(model, x, TARGETS, rule).detach(),
        AttnLRP(attention_rule=rule)(model, x, TARGETS).raw.detach(),
        rtol=1e-6,
        atol=1e-9,
    )

    def f():
        return (c * AttnLRP(attention_rule=rule)(model, x, TARGETS).raw).sum()

    directions = [random_direction(model, seed) for seed in range(3)]
    surrogate = directional_autograd(model, (c * lxt_map_surrogate(model, x, TARGETS, rule)).sum(), directions)
    fd = torch.tensor([directional_fd(model, f, d) for d in directions], dtype=torch.float64)
    rel = (torch.tensor(surrogate, dtype=torch.float64) - fd).norm() / fd.norm()
    assert rel > 1e-2, float(rel)


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_every_block_weight_gets_gradient_from_a_map_loss(rule):
    model = tiny_vit("reg")
    x = tiny_images("reg")
    mask = (_c((2, *_grid("reg"))) > 0).double()
    maps = AttnLRP(attention_rule=rule)(model, x, TARGETS).maps.clamp(1e-6, 1 - 1e-6)
    loss = torch.nn.functional.binary_cross_entropy(maps, mask)  # no classification term
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    D = 48
    for i in range(len(model.blocks)):
        for part in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            g = grads[f"blocks.{i}.{part}"]
            assert g is not None and g.abs().max() > 1e-8, (i, part)
        qkv = grads[f"blocks.{i}.attn.qkv.weight"]
        for j, which in enumerate("qkv"):  # also q and k under CP (through the forward's attention map)
            assert qkv[j * D : (j + 1) * D].abs().max() > 1e-8, (i, which)
    assert grads["head.weight"].abs().max() > 1e-8  # the map starts from head.weight[target]
    assert grads["head.bias"] is None or grads["head.bias"].abs().max() == 0  # the bias never enters the map


def test_attention_flags_untouched():
    """AttnLRP records the forward explicitly and never switches timm's fused attention."""
    model = tiny_vit("cls")
    other = tiny_vit("cls")
    x = tiny_images("cls")
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    attn[0].fused_attn = False  # a mixed configuration
    before = [m.fused_attn for m in attn]
    raw = AttnLRP()(model, x, TARGETS).raw
    assert [m.fused_attn for m in attn] == before
    assert all(m.fused_attn for m in other.modules() if hasattr(m, "fused_attn"))
    for m in attn:
        m.fused_attn = True
    torch.testing.assert_close(AttnLRP()(model, x, TARGETS).raw, raw, rtol=0, atol=0)
