"""The RelevanceMethod contract (base.py): normalisation, targets, autograd modes, unsupported models.

The contract tests run on every registered relevance method (`list_relevance()`: the shipped ones and any a
plugin registers, e.g. with CFT_PLUGINS), each on a tiny model of every family its class flag `families` lists;
a family it does not list must be refused with `UnsupportedModelError`."""

from __future__ import annotations

import pytest
import timm
import torch
from _lxt_oracle import TINY, tiny_images, tiny_vit
from timm.layers import RmsNorm
from timm.models.vision_transformer import ResPostBlock

from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance import create_relevance, list_relevance, relevance_class
from cft_lightning.relevance.attn_lrp import AttnLRP
from cft_lightning.relevance.base import Relevance, normalize_maps, resolve_targets
from cft_lightning.relevance.gradient_rollout import GradientRollout

TARGETS = torch.tensor([3, 7])
FAMILIES = ("vit", "cnn")
# (name, family) for every registered method and every family its class says it explains / does not explain
SUPPORTED = [(n, f) for n in list_relevance() for f in FAMILIES if f in relevance_class(n).families]
UNSUPPORTED = [(n, f) for n in list_relevance() for f in FAMILIES if f not in relevance_class(n).families]


def _model_and_images(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny random float64 model of the family with 10 classes, in eval mode, and two images for it."""
    if family == "vit":
        return tiny_vit("cls"), tiny_images("cls")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).double().eval()
    return model, torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_the_contract_covers_every_shipped_method_on_some_family():
    shipped = {"attnlrp", "cp_lrp", "rollout", "gradcam", "iia", "input_grad", "ixg", "grad_x_act", "lrp"}
    assert shipped <= {name for name, _ in SUPPORTED}
    assert {name for name, family in UNSUPPORTED if family == "cnn"} >= {"attnlrp", "cp_lrp", "rollout", "iia"}


def _random_map(seed=0, shape=(3, 4, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# normalize_maps


def test_minmax_range_and_extremes():
    raw = _random_map()
    out = normalize_maps(raw, "minmax")
    assert out.shape == raw.shape
    flat = out.flatten(1)
    assert (flat >= 0).all() and (flat <= 1).all()
    torch.testing.assert_close(flat.amin(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(flat.amax(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-7)
    # per image, order preserving, affine
    lo, hi = raw.flatten(1).amin(1), raw.flatten(1).amax(1)
    torch.testing.assert_close(out, (raw - lo[:, None, None]) / (hi - lo + 1e-8)[:, None, None])


def test_minmax_is_per_image():
    raw = _random_map()
    scaled = raw.clone()
    scaled[1] = 100 * scaled[1] + 7  # another image's scale must not matter
    torch.testing.assert_close(normalize_maps(scaled)[0], normalize_maps(raw)[0])
    torch.testing.assert_close(normalize_maps(scaled)[1], normalize_maps(raw)[1], rtol=1e-6, atol=1e-7)


def test_positive_max_range_and_negative_evidence():
    raw = _random_map()
    out = normalize_maps(raw, "positive_max")
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[raw <= 0] == 0).all()
    torch.testing.assert_close(out.flatten(1).amax(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-7)
    pos = raw.clamp_min(0).flatten(1)
    torch.testing.assert_close(out.flatten(1), pos / (pos.amax(1, keepdim=True) + 1e-8))


@pytest.mark.parametrize("mode", ["minmax", "positive_max"])
@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_map_gives_no_nan(mode, value):
    raw = torch.full((2, 3, 3), value, dtype=torch.float64, requires_grad=True)
    out = normalize_maps(raw, mode)
    assert torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1).all()
    (grad,) = torch.autograd.grad(out.sum(), raw)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["minmax", "positive_max"])
def test_normalize_is_differentiable(mode):
    raw = _random_map(seed=1, shape=(2, 3, 3)).requires_grad_(True)  # distinct values, none at 0
    assert torch.autograd.gradcheck(lambda r: normalize_maps(r, mode), (raw,))


def test_normalize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="minmax"):
        normalize_maps(_random_map(), "softmax")


# --------------------------------------------------------------------------------------------------
# resolve_targets


def test_resolve_targets_none_is_argmax_and_detached():
    logits = _random_map(shape=(4, 10)).requires_grad_(True)
    t = resolve_targets(logits, None)
    assert torch.equal(t, logits.argmax(1)) and not t.requires_grad and t.dtype == torch.long


def test_resolve_targets_accepts_lists_and_ints():
    logits = _random_map(shape=(2, 10))
    assert torch.equal(resolve_targets(logits, [9, 0]), torch.tensor([9, 0]))
    assert torch.equal(resolve_targets(logits[:1], 4), torch.tensor([4]))


@pytest.mark.parametrize("targets", [[0, 10], [-1, 2]])
def test_resolve_targets_out_of_range(targets):
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
        resolve_targets(_random_map(shape=(2, 10)), torch.tensor(targets))


def test_resolve_targets_wrong_count():
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        resolve_targets(_random_map(shape=(2, 10)), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(("name", "family"), SUPPORTED)
def test_methods_validate_targets(name, family):
    method = create_relevance(name)
    model, x = _model_and_images(family)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        method(model, x, torch.tensor([0, 10]))
    rel = method(model, x)
    assert isinstance(rel, Relevance)
    assert torch.equal(rel.targets, model(x).argmax(1))


# --------------------------------------------------------------------------------------------------
# autograd modes


@pytest.mark.parametrize(("name", "family"), SUPPORTED)
def test_inference_mode_is_refused(name, family):
    method = create_relevance(name)
    model, x = _model_and_images(family)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        method(model, x)


@pytest.mark.parametrize(("name", "family"), SUPPORTED)
def test_differentiable_false(name, family):
    method = create_relevance(name)
    model, x = (tiny_vit("reg"), tiny_images("reg")) if family == "vit" else _model_and_images(family)
    rel = method(model, x, TARGETS, differentiable=False)
    assert not rel.maps.requires_grad and not rel.raw.requires_grad
    assert rel.logits.requires_grad  # still usable for the classification loss
    torch.testing.assert_close(rel.logits, model(x), rtol=1e-12, atol=1e-12)
    on = method(model, x, TARGETS)
    differentiable = method.differentiability != "none"  # the class flag: maps in the graph or detached
    assert on.maps.requires_grad == on.raw.requires_grad == differentiable
    torch.testing.assert_close(rel.maps, on.maps.detach(), rtol=0, atol=0)
    torch.testing.assert_close(rel.raw, on.raw.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "family"), SUPPORTED)
def test_result_shapes(name, family):
    method = create_relevance(name)
    model, x = _model_and_images(family)
    rel = method(model, x, TARGETS)
    assert rel.maps.shape == rel.raw.shape and rel.maps.dim() == 3 and rel.maps.shape[0] == 2
    if family == "vit" and rel.maps.shape[1:] != x.shape[2:]:  # a patch-grid method: the model's 4 x 6 grid
        assert rel.maps.shape == (2, 4, 6)
    assert rel.logits.shape == (2, 10) and torch.equal(rel.targets, TARGETS)
    assert (rel.maps >= 0).all() and (rel.maps <= 1).all()


# --------------------------------------------------------------------------------------------------
# unsupported models


def _vit(**kw):
    return tiny_vit("cls", **kw)


@pytest.mark.parametrize(("name", "family"), UNSUPPORTED)
def test_a_family_the_method_does_not_list_is_refused(name, family):
    model, x = _model_and_images(family)
    with pytest.raises(UnsupportedModelError, match=type(model).__name__):
        create_relevance(name)(model, x)


def test_drop_path_in_training_is_unsupported_by_attn_lrp():
    model = _vit(drop_path_rate=0.2).train()
    with pytest.raises(UnsupportedModelError, match="drop_path"):
        AttnLRP()(model, tiny_images("cls"), TARGETS)
    model.eval()  # deterministic forward: fine
    assert AttnLRP()(model, tiny_images("cls"), TARGETS).raw.shape == (2, 4, 6)


def test_patch_dropout_in_training_is_unsupported_by_attn_lrp():
    model = _vit(patch_drop_rate=0.5).train()
    with pytest.raises(UnsupportedModelError, match="patch_drop"):
        AttnLRP()(model, tiny_images("cls"), TARGETS)


def test_attention_dropout_in_training_is_unsupported():
    model = _vit(attn_drop_rate=0.1).train()
    with pytest.raises(UnsupportedModelError, match="attn_drop"):
        GradientRollout()(model, tiny_images("cls"), TARGETS)
    with pytest.raises(UnsupportedModelError, match="attn_drop"):
        AttnLRP()(model, tiny_images("cls"), TARGETS)


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        ({"global_pool": "max", "class_token": False}, "global_pool='max'"),
        ({"global_pool": "map"}, "global_pool='map'"),
        ({"num_classes": 0}, "head"),
        ({"block_fn": ResPostBlock}, r"blocks\[0\] is ResPostBlock"),
        ({"norm_layer": RmsNorm}, "norm is RmsNorm"),
    ],
    ids=["max_pool", "map_pool", "no_head", "post_norm_block", "rmsnorm"],
)
def test_unsupported_vit_parts_are_named(kwargs, part):
    torch.manual_seed(0)
    args = {**TINY, "img_size": 32, "patch_size": 8, **kwargs}
    model = timm.create_model("vit_tiny_patch16_224", **args).double().eval()
    with pytest.raises(UnsupportedModelError, match=part):
        AttnLRP()(model, tiny_images("avg"))
