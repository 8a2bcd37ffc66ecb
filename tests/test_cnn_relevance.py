"""Relevance for CNNs: zennit LRP (explanation only; conservation, the model untouched) and
LayerGradXActivation (exactly differentiable; CFT trains a ConvNeXt-V2 with it)."""

from __future__ import annotations

import pytest
import timm
import torch
from _lxt_oracle import directional_fd_richardson, randomize_
from _regularizer_helpers import directional, grads_of, random_direction, tiny_batch
from torch import nn

from cft_lightning.regularizers import CFT
from cft_lightning.relevance import LayerGradXActivation, UnsupportedModelError, ZennitLRP

pytest.importorskip("zennit")


def tiny_convnext(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny ConvNeXt-V2 with every weight re-drawn (timm's init zeroes GRN and shrinks the maps to ~1e-17)."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                              dims=(8, 16, 24, 32))
    return randomize_(model.double(), 0).to(dtype).eval()


def bias_free_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4, bias=False),
    ).double().eval()


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_plus"])
def test_zennit_lrp_conserves_the_logit_on_a_bias_free_relu_network(composite: str):
    model = bias_free_cnn()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([0, 2, 3])
    rel = ZennitLRP(composite)(model, x, targets, differentiable=False)
    logit = model(x).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(rel.raw.flatten(1).sum(1), logit.detach(), rtol=1e-3, atol=1e-6)


def test_zennit_lrp_leaves_the_explained_model_alone():
    model = tiny_convnext()
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    method = ZennitLRP()
    rel = method(model, tiny_batch()["image"], None, differentiable=True)
    assert rel.raw.shape == (2, 32, 32) and not rel.raw.requires_grad
    assert all(p is params[n] and torch.equal(p, values[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():  # a changed model is explained with its new weights (the private copy is refreshed)
        model.head.fc.weight.mul_(-1)
    flipped = method(model, tiny_batch()["image"], rel.targets, differentiable=False)
    assert rel.raw.abs().max() > 1e-6
    assert not torch.allclose(flipped.raw, rel.raw)
    with pytest.raises(ValueError, match="composite"):
        ZennitLRP("epsilon_gamma_box")


def test_layer_grad_x_activation_values_by_hand():
    model, images = tiny_convnext(), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = torch.tensor([1, 4])
    rel = LayerGradXActivation()(model, images, targets, differentiable=False)
    feats: list = []
    h = model.stages[-2].register_forward_hook(lambda _m, _i, o: feats.append(o))
    logits = model(images)
    h.remove()
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), feats[0])
    torch.testing.assert_close(rel.raw, (feats[0] * g).clamp_min(0).sum(1), rtol=1e-10, atol=1e-12)
    assert rel.raw.shape == (2, 4, 4)  # stages.-2 of a 64 px image: 64 / 16
    signed = LayerGradXActivation(positive=False)(model, images, targets, differentiable=False)
    torch.testing.assert_close(signed.raw, (feats[0] * g).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positive, h", [(False, 1e-5), (True, 1e-7)])
def test_cft_with_layer_grad_x_activation_is_exactly_differentiable_on_a_convnext(positive: bool, h: float):
    """Richardson-extrapolated finite differences (the randomised ConvNeXt is strongly curved: the plain
    central difference at 1e-6 is off by 3e-5; with relu, steps above ~1e-6 cross kinks)."""
    batch = tiny_batch()
    batch["image"] = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kind in ("concept", "object"):
        batch["masks"][kind] = torch.nn.functional.interpolate(batch["masks"][kind][:, None], size=64)[:, 0]
    model, rel = tiny_convnext(), LayerGradXActivation(positive=positive)
    reg = CFT(consistency_target="label", cls_weight=0.0)
    grads = grads_of(model, reg(batch, model, rel, None).total)
    assert grads["stem.0.weight"].abs().max() > 1e-8
    d = random_direction(model)
    ad = directional(grads, model, d)
    fd = directional_fd_richardson(model, lambda: reg(batch, model, rel, None).total, d, h)
    assert abs(fd) > 1e-3 and abs(ad - fd) <= 1e-6 * abs(fd), (ad, fd)


def test_feature_layer_errors_are_clear():
    with pytest.raises(UnsupportedModelError, match="default feature layer"):
        LayerGradXActivation().check_model(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="no module"):
        LayerGradXActivation(layer="stages.9").check_model(tiny_convnext())


def test_cft_fits_a_convnext_v2_for_a_few_steps(tmp_path):
    import lightning as L

    from cft_lightning.data.datamodule import GuidanceDataModule
    from cft_lightning.models import BackboneSpec, GuidedFineTuner
    from cft_lightning.smoke_data import generate

    data = generate(tmp_path / "data", classes=3, per_class=2, size=32, seed=0)
    spec = BackboneSpec("convnextv2_atto", pretrained=False, num_classes=3,
                        model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)})
    torch.manual_seed(0)
    module = GuidedFineTuner(spec, CFT(), LayerGradXActivation(), lr=1e-3)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    dm = GuidanceDataModule(str(data / "images" / "train"), masks=str(data / "masks"), images_per_class=2,
                            class_fraction=1.0, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False, limit_val_batches=0)
    trainer.fit(module, dm)
    after = module.backbone.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])
