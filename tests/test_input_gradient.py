"""InputGradient / InputXGradient relevance: values by hand, exact second order (finite differences) on a
ViT and on a ConvNeXt-V2, detached when asked."""

from __future__ import annotations

import pytest
import timm
import torch
from _regularizer_helpers import check_gradient_matches_fd, tiny_batch, tiny_vit

from cft_lightning.regularizers import CFT
from cft_lightning.relevance import InputGradient, InputXGradient


def tiny_convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                              dims=(8, 16, 24, 32))
    return model.double().eval()


def manual_grad(model, images, targets):
    x = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return g


@pytest.mark.parametrize("make", [tiny_vit, tiny_convnext], ids=["vit", "convnextv2"])
def test_maps_by_hand(make):
    model, images = make(), tiny_batch()["image"]
    targets = torch.tensor([1, 3])
    g = manual_grad(model, images, targets)
    for method, want in (
        (InputGradient(), g.abs().sum(1)),
        (InputGradient(channels="abs_max"), g.abs().amax(1)),
        (InputGradient(channels="sum"), g.sum(1)),
        (InputXGradient(), (images * g).sum(1)),
    ):
        rel = method(model, images, targets, differentiable=False)
        assert rel.raw.shape == (2, 32, 32) and not rel.raw.requires_grad
        torch.testing.assert_close(rel.raw, want, rtol=1e-10, atol=1e-12)
        assert rel.maps.min() >= 0 and rel.maps.max() <= 1
    pred = InputXGradient()(model, images, None, differentiable=False)
    assert torch.equal(pred.targets, model(images).argmax(1))


@pytest.mark.parametrize(
    "method", [InputXGradient(), InputGradient(channels="sum"), InputGradient()], ids=["ixg", "grad", "abs_grad"]
)
def test_cft_with_input_gradient_maps_is_exactly_differentiable(method):
    """`exact`: the total loss's autograd gradient equals the finite difference (second order)."""
    check_gradient_matches_fd(CFT(consistency_target="label", cls_weight=0.0), method, tiny_batch())


def test_cft_with_input_x_gradient_trains_a_convnext():
    batch = tiny_batch()
    grads = check_gradient_matches_fd(CFT(consistency_target="label", cls_weight=0.0), InputXGradient(), batch,
                                      model=tiny_convnext())
    assert grads["stem.0.weight"].abs().max() > 1e-8


def test_unknown_channel_reduction_is_rejected():
    with pytest.raises(ValueError, match="channels"):
        InputGradient(channels="l2")
