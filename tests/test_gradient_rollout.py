"""Correctness of GradientRollout: the map against an independent reference, its `attention_only`
differentiability regime against finite differences, and the per-instance explicit-attention switch."""

from __future__ import annotations

import pytest
import torch
from _lxt_oracle import (
    directional_autograd,
    directional_fd,
    directional_fd_richardson,
    random_direction,
    tiny_images,
    tiny_vit,
)
from torch import Tensor, nn

from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance.attn_lrp import AttnLRP
from cft_lightning.relevance.gradient_rollout import GradientRollout

TARGETS = torch.tensor([3, 7])

# name -> tiny_vit(key, **overrides)
VARIANTS = {
    "cls": ("cls", {}),
    "reg": ("reg", {}),  # class token + 4 registers
    "avg": ("avg", {}),  # no class token
    "avg_reg": ("avg", {"reg_tokens": 2}),  # no class token, 2 registers
}


def _model(variant: str, **kw) -> nn.Module:
    key, overrides = VARIANTS[variant]
    return tiny_vit(key, **{**overrides, **kw})


def _images(variant: str) -> Tensor:
    return tiny_images(VARIANTS[variant][0])


# --------------------------------------------------------------------------------------------------
# reference computation, written independently of the module under test


def capture(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits and post-softmax attention maps of each block (hooks on attn_drop, explicit attention)."""
    maps: list[Tensor] = []
    saved = [blk.attn.fused_attn for blk in model.blocks]
    handles = [blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out)) for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.attn.fused_attn = False
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
        for blk, flag in zip(model.blocks, saved):
            blk.attn.fused_attn = flag
    return logits, maps


def attention_grads(model: nn.Module, x: Tensor, targets: Tensor) -> list[Tensor]:
    logits, maps = capture(model, x)
    grads = torch.autograd.grad(logits[torch.arange(x.shape[0]), targets].sum(), maps)
    return [g.detach() for g in grads]


def reference_rollout(model: nn.Module, maps: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Chefer rollout: R = I; R <- R + mean_h relu(grad * A) R per block in forward order; patch columns of
    the class token's row (no class token: the mean of the patch rows). Returns (B, num_patches)."""
    B, _, N, _ = maps[0].shape
    R = torch.eye(N, dtype=maps[0].dtype).repeat(B, 1, 1)
    for a, g in zip(maps, grads):
        R = R + torch.relu(g * a).mean(dim=1) @ R
    p = model.num_prefix_tokens
    return R[:, 0, p:] if model.cls_token is not None else R[:, p:, p:].mean(dim=1)


# --------------------------------------------------------------------------------------------------
# the map


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_map_equals_reference_rollout_on_the_patch_grid(variant):
    model = _model(variant)
    x = _images(variant)
    rel = GradientRollout()(model, x, TARGETS)
    grid = tuple(model.patch_embed.grid_size)
    assert rel.raw.shape == rel.maps.shape == (2, *grid)  # prefix (class / register) tokens excluded
    _, maps = capture(model, x)
    expected = reference_rollout(model, maps, attention_grads(model, x, TARGETS)).view(2, *grid)
    torch.testing.assert_close(rel.raw, expected, rtol=1e-12, atol=1e-14)
    assert expected.std() > 1e-3 * expected.abs().mean()  # not a trivial (constant) map
    torch.testing.assert_close(rel.logits, model(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(rel.targets, TARGETS)


def test_register_tokens_are_not_read_as_patches():
    """With registers the patch columns start after them: reading from column 1 would give another map."""
    model = _model("reg")
    x = _images("reg")
    rel = GradientRollout()(model, x, TARGETS)
    _, maps = capture(model, x)
    grads = attention_grads(model, x, TARGETS)
    B, _, N, _ = maps[0].shape
    R = torch.eye(N, dtype=torch.float64).repeat(B, 1, 1)
    for a, g in zip(maps, grads):
        R = R + torch.relu(g * a).mean(dim=1) @ R
    wrong = R[:, 0, 1 : 1 + rel.raw[0].numel()].reshape(rel.raw.shape)
    assert (rel.raw - wrong).abs().max() > 1e-3


def test_default_targets_are_the_prediction():
    model = _model("cls")
    x = _images("cls")
    rel = GradientRollout()(model, x)
    pred = model(x).argmax(1)
    assert torch.equal(rel.targets, pred)
    torch.testing.assert_close(rel.raw, GradientRollout()(model, x, pred).raw, rtol=0, atol=0)


def test_frozen_model_is_explained_like_a_trainable_one():
    """A model whose parameters do not require grad (and images that do not) still has dy/dA."""
    model = _model("cls")
    x = _images("cls")
    expected = GradientRollout()(model, x, TARGETS).raw.detach()
    model.requires_grad_(False)
    rel = GradientRollout()(model, x, TARGETS, differentiable=False)
    torch.testing.assert_close(rel.raw, expected, rtol=1e-12, atol=1e-14)


def test_patch_dropout_in_training_is_rejected():
    """Patch dropout drops tokens: the remaining ones are not the image's patch grid."""
    model = _model("avg", patch_drop_rate=0.75).train()  # 16 patches -> 4 kept: would fit a 2x2 grid
    with pytest.raises(UnsupportedModelError, match="patch"):
        GradientRollout()(model, _images("avg"))


# --------------------------------------------------------------------------------------------------
# the differentiability regime: attention gradients held constant


def _c(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variant", ["cls", "reg"])
def test_attention_only_regime(variant):
    model = _model(variant)
    x = _images(variant)
    assert GradientRollout.differentiability == "attention_only"
    grid = tuple(model.patch_embed.grid_size)
    c = _c((2, *grid))
    frozen = attention_grads(model, x, TARGETS)  # dy/dA at theta, held fixed below

    def method_value():
        return (c * GradientRollout()(model, x, TARGETS).raw).sum()

    def frozen_value():  # g(theta): rollout from A(theta) and the gradients frozen at theta_0
        _, maps = capture(model, x)
        return (c * reference_rollout(model, maps, frozen).view(2, *grid)).sum()

    directions = [random_direction(model, seed) for seed in range(3)]
    autograd_dd = torch.tensor(directional_autograd(model, method_value(), directions), dtype=torch.float64)
    fd_frozen = torch.tensor(
        [directional_fd_richardson(model, frozen_value, d, h=1e-5) for d in directions], dtype=torch.float64
    )
    assert fd_frozen.abs().min() > 1e-3
    torch.testing.assert_close(autograd_dd, fd_frozen, rtol=1e-6, atol=0)

    # ... which is not the derivative of the full map (dy/dA re-computed at each theta). The full map is
    # piecewise smooth (relu), so a plain central difference; seed 0 of the fixtures shows the gap.
    fd_full = torch.tensor([directional_fd(model, method_value, d, h=1e-5) for d in directions], dtype=torch.float64)
    gap = float((autograd_dd - fd_full).norm() / fd_full.norm())
    assert gap > 1e-3, gap


def test_differentiable_false_detaches_the_map_only():
    model = _model("cls")
    x = _images("cls")
    rel = GradientRollout()(model, x, TARGETS, differentiable=False)
    assert not rel.raw.requires_grad and not rel.maps.requires_grad
    assert rel.logits.requires_grad
    torch.nn.functional.cross_entropy(rel.logits, TARGETS).backward()  # the forward's graph is still usable
    assert model.head.weight.grad is not None
    torch.testing.assert_close(rel.maps, GradientRollout()(model, x, TARGETS).maps.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# the explicit-attention switch is per instance and restored


def _flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def test_gradient_rollout_switches_only_this_instance_and_restores():
    model_a = _model("cls")
    model_b = _model("cls")  # created separately
    x = _images("cls")
    attn_a = [m for m in model_a.modules() if hasattr(m, "fused_attn")]
    attn_a[1].fused_attn = False  # a mixed configuration must come back as it was
    before_a, before_b = _flags(model_a), _flags(model_b)
    assert before_b == [True, True]

    seen_a, seen_b = [], []

    def pre_hook(module, _args):
        seen_a.append(module.fused_attn)
        seen_b.append(_flags(model_b))

    handles = [m.register_forward_pre_hook(pre_hook) for m in attn_a]
    try:
        GradientRollout()(model_a, x, TARGETS)
    finally:
        for h in handles:
            h.remove()
    assert seen_a == [False, False]  # explicit attention inside the call
    assert seen_b == [before_b, before_b]  # the other instance untouched during the call
    assert _flags(model_a) == before_a
    assert _flags(model_b) == before_b


def test_flags_restored_when_the_forward_raises():
    model = _model("cls")
    before = _flags(model)

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        GradientRollout()(model, _images("cls"), TARGETS)
    handle.remove()
    assert _flags(model) == before == [True, True]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())  # the method's hooks are removed too


def test_attn_lrp_leaves_both_instances_alone():
    model_a = _model("reg")
    model_b = _model("reg")
    before_a, before_b = _flags(model_a), _flags(model_b)
    AttnLRP()(model_a, _images("reg"), TARGETS)
    assert _flags(model_a) == before_a and _flags(model_b) == before_b
    assert all(len(m._forward_hooks) == 0 for m in model_a.modules())
