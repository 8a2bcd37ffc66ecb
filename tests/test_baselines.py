"""The baseline objectives: RRR, GradMask (both forms), RobustViT, RRDA and LVLM-VA's critic RRR.

For each: the loss arithmetic by hand, and on a tiny random float64 ViT that the penalty's parameter
gradient is non-zero and equals the finite-difference directional derivative (the input gradients are
taken with create_graph, so the penalty reaches the weights, unlike the RobustViT reference scripts).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _regularizer_helpers import check_gradient_matches_fd, grads_of, tiny_batch, tiny_vit
from torch import Tensor

from cft_lightning.regularizers import RRDA, RRR, GradMask, LVLMCritic, RegularizerOutput, RobustViT
from cft_lightning.regularizers._input_gradient import input_gradient, masked_region
from cft_lightning.regularizers.robust_vit import robust_vit_terms
from cft_lightning.regularizers.rrda import composite_foregrounds
from cft_lightning.relevance import AttnLRP, GradientRollout


def critic_batch() -> dict[str, Any]:
    batch = tiny_batch()
    critic = torch.zeros(2, 32, 32)
    critic[0, 20:32, :] = 1  # a spurious strip at the bottom of image 0; image 1 outside the alignment set
    batch["masks"]["critic"] = critic
    return batch


def block_grads_nonzero(grads: dict[str, Tensor]) -> None:
    for i in range(2):
        for part in ("attn.qkv.weight", "mlp.fc1.weight"):
            assert grads[f"blocks.{i}.{part}"].abs().max() > 1e-8, (i, part)


# --------------------------------------------------------------------------------------------------
# input gradients


def test_input_gradient_keeps_the_graph_and_restores_fused_attention():
    model = tiny_vit()
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    images = tiny_batch()["image"]
    logits, grad = input_gradient(model, images, lambda z: z.sum())
    assert grad.shape == images.shape and grad.requires_grad
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == flags
    torch.testing.assert_close(logits, model(images), rtol=1e-12, atol=1e-12)


def test_without_create_graph_the_penalty_is_a_constant():
    """The RobustViT scripts' bug, reproduced: no create_graph, no path from the penalty to the weights."""
    model = tiny_vit()
    _, grad = input_gradient(model, tiny_batch()["image"], lambda z: z.sum(), create_graph=False)
    assert not grad.requires_grad and (grad**2).sum().grad_fn is None


def test_input_gradient_refuses_inference_mode():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        input_gradient(tiny_vit(), tiny_batch()["image"], lambda z: z.sum())


def test_masked_region_roles_and_validation():
    masks = torch.tensor([[[1.0, 0.25], [0.0, 2.0]]])
    like = torch.zeros(1, 3, 2, 2)
    torch.testing.assert_close(masked_region(masks, "relevant", like)[0, 0], torch.tensor([[0.0, 0.75], [1.0, 0.0]]))
    torch.testing.assert_close(masked_region(masks, "irrelevant", like)[0, 0], torch.tensor([[1.0, 0.25], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="mask_role"):
        masked_region(masks, "spurious", like)
    with pytest.raises(ValueError, match="differ in size"):
        masked_region(masks, "relevant", torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------------------------------
# RRR


def test_rrr_terms_by_hand():
    model, batch = tiny_vit(), tiny_batch()
    x = batch["image"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.log_softmax(model(x), dim=1).sum(), x)
    outside = 1.0 - batch["masks"]["object"].double()[:, None]
    want = ((g * outside) ** 2).sum() / 2  # per image: summed over pixels and channels, mean over the 2 images
    out = RRR(grad_weight=0.5, cls_weight=2.0)(batch, model, None, None)
    torch.testing.assert_close(out.terms["grad"], want, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(out.logits, batch["label"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.total, 2.0 * out.terms["cls"] + 0.5 * want, rtol=1e-10, atol=0)
    batch_sum = RRR(reduction="batch_sum")(batch, model, None, None).terms["grad"]  # the RobustViT script's form
    torch.testing.assert_close(batch_sum, 2 * want, rtol=1e-10, atol=0)
    mean = RRR(reduction="mean")(batch, model, None, None).terms["grad"]
    torch.testing.assert_close(mean, 2 * want / (outside.sum() * 3), rtol=1e-10, atol=0)
    l2 = RRR(l2_weight=1e-3)(batch, model, None, None)
    torch.testing.assert_close(l2.terms["l2"], sum((p**2).sum() for p in model.parameters()), rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "batch_sum", "mean"])
def test_rrr_gradient_matches_finite_differences(reduction):
    check_gradient_matches_fd(RRR(grad_weight=1.0, cls_weight=1.0, reduction=reduction), None, tiny_batch())


def test_rrr_penalty_alone_moves_every_block():
    """The default, per-image form: the penalty alone has a non-zero parameter gradient in every block, equal
    to the finite difference of the loss."""
    assert RRR().reduction == "sum"
    grads = check_gradient_matches_fd(RRR(grad_weight=1.0, cls_weight=0.0, reduction="sum"), None, tiny_batch())
    block_grads_nonzero(grads)


def _repeat(batch: dict[str, Any], times: int) -> dict[str, Any]:
    return {"image": batch["image"].repeat(times, 1, 1, 1), "label": batch["label"].repeat(times),
            "masks": {k: m.repeat(times, 1, 1) for k, m in batch["masks"].items()}, "path": batch["path"] * times}


def test_rrr_per_image_penalty_does_not_depend_on_the_batch_size():
    """The same images at batch 2 and (repeated) at batch 6 give the same per-image penalty, total loss and
    parameter gradient, so a weight keeps its meaning when data.batch_size changes; the script's batch sum
    triples instead. One image alone gets its own penalty, and a batch the mean of its images'."""
    model, batch = tiny_vit(), tiny_batch()
    reg = RRR(grad_weight=1.0, cls_weight=1.0)
    small, large = reg(batch, model, None, None), reg(_repeat(batch, 3), model, None, None)
    torch.testing.assert_close(large.terms["grad"], small.terms["grad"], rtol=1e-10, atol=0)
    torch.testing.assert_close(large.total, small.total, rtol=1e-10, atol=0)
    g_small, g_large = grads_of(model, small.total), grads_of(model, large.total)
    assert max(float(g.abs().max()) for g in g_small.values()) > 0
    for name, g in g_small.items():
        torch.testing.assert_close(g_large[name], g, rtol=1e-8, atol=1e-14)
    singles = [reg({"image": batch["image"][i : i + 1], "label": batch["label"][i : i + 1],
                    "masks": {k: m[i : i + 1] for k, m in batch["masks"].items()}, "path": [batch["path"][i]]},
                   model, None, None).terms["grad"] for i in range(2)]
    torch.testing.assert_close(small.terms["grad"], (singles[0] + singles[1]) / 2, rtol=1e-10, atol=0)
    script = RRR(grad_weight=1.0, cls_weight=1.0, reduction="batch_sum")
    torch.testing.assert_close(script(_repeat(batch, 3), model, None, None).terms["grad"],
                               3 * script(batch, model, None, None).terms["grad"], rtol=1e-10, atol=0)


def test_rrr_masks_and_arguments_are_validated():
    batch = tiny_batch()
    del batch["masks"]["object"]
    with pytest.raises(KeyError, match="'object' masks"):
        RRR()(batch, tiny_vit(), None, None)
    for kwargs in ({"temperature": 0}, {"grad_weight": -1}, {"reduction": "max"}, {"mask_role": "x"},
                   {"consistency_target": "teacher"}):
        with pytest.raises(ValueError):
            RRR(**kwargs)
    assert RRR(mask_kind="concept").requirements.masks == ("concept",)


# --------------------------------------------------------------------------------------------------
# GradMask


def test_gradmask_additive_terms_by_hand():
    model, batch = tiny_vit(), tiny_batch()
    x = batch["image"].clone().requires_grad_(True)
    logits = model(x)
    (g,) = torch.autograd.grad(logits.gather(1, batch["label"][:, None]).sum(), x)
    want = ((g * (1.0 - batch["masks"]["object"].double()[:, None])) ** 2).mean()
    out = GradMask(temperature=2.0)(batch, model, None, None)
    torch.testing.assert_close(out.terms["saliency"], want, rtol=1e-10, atol=0)
    cls = F.cross_entropy(logits / 2.0, batch["label"])
    torch.testing.assert_close(out.total, 0.1 * cls + 50.0 * want, rtol=1e-10, atol=0)


def test_gradmask_authors_form_is_multiplicative_with_a_growing_capped_penalty():
    reg = GradMask(penalty_weight=2.0, form="authors", penalty_growth=0.1, penalty_cap=10.0)
    assert reg.schedule(0) == 2.0
    assert reg.schedule(10) == pytest.approx(2.0 * math.e)
    assert reg.schedule(100) == 10.0 and reg.schedule(10**9) == 10.0
    reg.step_begin(10, 0)
    model, batch = tiny_vit(), tiny_batch()
    out = reg(batch, model, None, None)
    x = batch["image"].clone().requires_grad_(True)
    logits = model(x)
    (g,) = torch.autograd.grad(logits.gather(1, batch["label"][:, None]).abs().sum(), x)
    sal = ((g * (1.0 - batch["masks"]["object"].double()[:, None])) ** 2).sum()
    ce = F.cross_entropy(logits, batch["label"])
    torch.testing.assert_close(out.total, ce * (1 + 2.0 * math.e * sal), rtol=1e-10, atol=0)


@pytest.mark.parametrize("form", ["additive", "authors"])
def test_gradmask_gradient_matches_finite_differences(form):
    reg = GradMask(penalty_weight=5.0, form=form, penalty_growth=0.01)
    reg.step_begin(3, 0)
    check_gradient_matches_fd(reg, None, tiny_batch())


def test_gradmask_penalty_alone_moves_every_block():
    grads = check_gradient_matches_fd(GradMask(penalty_weight=1000.0, cls_weight=0.0), None, tiny_batch())
    block_grads_nonzero(grads)


def test_gradmask_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        GradMask(form="multiplicative")


# --------------------------------------------------------------------------------------------------
# RobustViT


def test_robust_vit_terms_by_hand():
    maps = torch.tensor([[[0.2, 0.9], [0.5, 1.0]]], dtype=torch.float64)
    masks = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]], dtype=torch.float64)
    bg, fg = robust_vit_terms(maps, masks)
    assert bg.item() == pytest.approx((0 + 0.81 + 0.0625 + 1.0) / 4)
    assert fg.item() == pytest.approx(((0.2 - 1) ** 2 + 0 + (0.25 - 0.5) ** 2 + 0) / 4)
    with pytest.raises(ValueError, match="same shape"):
        robust_vit_terms(maps, masks[:, :1])


def test_robust_vit_total_with_exact_relevance_matches_finite_differences():
    check_gradient_matches_fd(RobustViT(consistency_target="label"), AttnLRP(), tiny_batch())
    grads = check_gradient_matches_fd(RobustViT(cls_weight=0.0), AttnLRP(), tiny_batch())
    block_grads_nonzero(grads)


def test_robust_vit_with_gradient_rollout_trains_through_the_attention_maps():
    model = tiny_vit()
    out = RobustViT(cls_weight=0.0)(tiny_batch(), model, GradientRollout(), None)
    assert set(out.terms) == {"background", "foreground", "seg", "cls"}
    grads = grads_of(model, out.total)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.qkv.weight"].abs().max() > 1e-8
    with pytest.raises(ValueError, match="relevance method"):
        RobustViT()(tiny_batch(), model, None, None)


# --------------------------------------------------------------------------------------------------
# RRDA


def test_composite_by_hand_mean_and_keep():
    images = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 5.0)])
    images[1, :, 1, 1] = 9.0  # image 1's foreground pixel
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([0, 1])
    out, partner, applied = composite_foregrounds(images, masks, labels, 1.0, "mean")
    assert partner.tolist() == [1, 0] and applied.all()
    # image 0: its foreground (1.0) at (0, 0); image 1's context (5.0) elsewhere, its object filled with 5.0
    assert out[0, 0].tolist() == [[1.0, 5.0], [5.0, 5.0]]
    # image 1: its foreground (9.0) at (1, 1); image 0's context (1.0) elsewhere, its object filled with 1.0
    assert out[1, 0].tolist() == [[1.0, 1.0], [1.0, 9.0]]
    keep, _, _ = composite_foregrounds(images, masks, labels, 1.0, "keep")
    assert keep[1, 0].tolist() == [[1.0, 1.0], [1.0, 9.0]] and keep[0, 0].tolist() == [[1.0, 5.0], [5.0, 9.0]]


def test_composite_partners_always_have_another_label_and_probability_is_respected():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    masks = (torch.rand(64, 8, 8) > 0.5).float()
    labels = torch.randint(0, 3, (64,))
    out, partner, applied = composite_foregrounds(images, masks, labels, 0.5, "mean")
    assert (labels[partner] != labels).all()
    assert 16 < int(applied.sum()) < 48
    torch.testing.assert_close(out[~applied], images[~applied], rtol=0, atol=0)
    same = composite_foregrounds(images, masks, torch.zeros(64, dtype=torch.long), 1.0)
    assert not same[2].any() and torch.equal(same[0], images)
    assert not composite_foregrounds(images, masks, labels, 0.0)[2].any()


class Seeded:
    """Calls `reg` with the global RNG reset, so that every call draws the same composites."""

    def __init__(self, reg: RRDA) -> None:
        self.reg = reg

    def __call__(self, *args: Any) -> RegularizerOutput:
        torch.manual_seed(123)
        return self.reg(*args)


def test_rrda_trains_on_the_composites():
    model, batch = tiny_vit().train(), tiny_batch()  # no dropout in the tiny ViT: train mode computes the same
    batch["label"] = torch.tensor([1, 3])
    out = Seeded(RRDA(probability=1.0))(batch, model, None, None)
    assert out.terms["augmented"].item() == 1.0
    torch.manual_seed(123)
    mixed, _, _ = composite_foregrounds(batch["image"], batch["masks"]["object"], batch["label"], 1.0)
    torch.testing.assert_close(out.total, F.cross_entropy(model(mixed), batch["label"]), rtol=1e-12, atol=0)
    plain = F.cross_entropy(model(batch["image"]), batch["label"])
    assert abs(out.total.item() - plain.item()) > 1e-6
    check_gradient_matches_fd(Seeded(RRDA(probability=1.0)), None, batch, model=tiny_vit().train())


def test_rrda_evaluates_real_images_in_eval_mode():
    model, batch = tiny_vit().eval(), tiny_batch()
    out = RRDA(probability=1.0)(batch, model, None, None)
    assert out.terms["augmented"].item() == 0.0
    torch.testing.assert_close(out.total, F.cross_entropy(model(batch["image"]), batch["label"]), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# LVLM-VA critic RRR


def test_lvlm_critic_penalises_the_critic_region_only():
    model, batch = tiny_vit(), critic_batch()
    out = LVLMCritic(grad_weight=1.0)(batch, model, None, None)
    x = batch["image"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.log_softmax(model(x), dim=1).sum(), x)
    want = ((g * batch["masks"]["critic"].double()[:, None]) ** 2).sum() / 2  # per image, mean over the batch
    torch.testing.assert_close(out.terms["grad"], want, rtol=1e-10, atol=0)
    assert LVLMCritic().requirements.masks == ("critic",)
    with pytest.raises(ValueError, match="alignment_ratio"):
        LVLMCritic(alignment_ratio=1.0)


def test_lvlm_critic_penalty_alone_matches_finite_differences():
    grads = check_gradient_matches_fd(LVLMCritic(grad_weight=1.0, cls_weight=0.0), None, critic_batch())
    block_grads_nonzero(grads)
