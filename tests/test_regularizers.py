"""The fine-tuning objectives: CFT (and its object-mask sibling) and plain fine-tuning.

Covers the loss arithmetic on hand-computed tensors (alignment terms, mask pooling, consistency CE),
the constructor and batch validation, and, on a tiny random float64 ViT, that the total loss's
parameter gradient is non-zero and equals the finite-difference directional derivative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _lxt_oracle import evaluate_at_offsets
from _regularizer_helpers import (
    GRID,
    LABELS,
    H,
    check_gradient_matches_fd,
    directional,
    grads_of,
    random_direction,
    tiny_batch,
    tiny_vit,
)
from torch import Tensor

from cft_lightning.regularizers import (
    CFT,
    ObjectMaskGuidance,
    PlainFineTuning,
    alignment_terms,
    consistency_loss,
    masks_to_grid,
)
from cft_lightning.relevance.attn_lrp import AttnLRP
from cft_lightning.relevance.gradient_rollout import GradientRollout

# --------------------------------------------------------------------------------------------------
# 1. gradients against finite differences on a real tiny model


@pytest.mark.parametrize("loss_form", ["paper", "release"])
def test_cft_attnlrp_total_gradient_matches_finite_differences(loss_form):
    check_gradient_matches_fd(CFT(loss_form=loss_form, consistency_target="label"), AttnLRP(), tiny_batch())


def test_cft_self_consistency_gradient_matches_finite_differences():
    """The release's setting: consistency toward the model's own (locally constant) argmax; explain argmax."""
    reg = CFT(consistency_target="self", relevance_target="self")
    check_gradient_matches_fd(reg, AttnLRP(), tiny_batch())


def test_cft_reference_consistency_gradient_matches_finite_differences():
    reference = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    check_gradient_matches_fd(CFT(consistency_target="reference"), AttnLRP(), tiny_batch(), reference)


@pytest.mark.parametrize("loss_form", ["paper", "release"])
def test_alignment_term_alone_moves_the_parameters(loss_form):
    """cls_weight=0: the total is the relevance penalty only. Its gradient is non-zero in every block (not
    just the head) and is the true derivative of the penalty (AttnLRP is exactly differentiable)."""
    reg = CFT(loss_form=loss_form, cls_weight=0.0, consistency_target="label")
    grads = check_gradient_matches_fd(reg, AttnLRP(), tiny_batch())
    for i in range(2):
        for part in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            assert grads[f"blocks.{i}.{part}"].abs().max() > 1e-6, (i, part)
    # the map explains head.weight[target]; the head bias shifts every logit of a class equally and
    # enters neither the map nor (with cls_weight=0) the loss
    assert grads["head.weight"].abs().max() > 1e-6
    assert grads["head.bias"].abs().max() == 0


def test_object_mask_guidance_gradient_matches_finite_differences():
    check_gradient_matches_fd(ObjectMaskGuidance(consistency_target="label"), AttnLRP(), tiny_batch())


@pytest.mark.parametrize("target", ["label", "self"])
def test_plain_fine_tuning_gradient_matches_finite_differences(target):
    check_gradient_matches_fd(PlainFineTuning(consistency_target=target), None, tiny_batch())


def test_cft_gradient_rollout_gradient_is_nonzero_and_finite():
    """GradientRollout is `attention_only` differentiable: dy/dA is computed without create_graph and held
    constant, so autograd returns the gradient of a surrogate, not the derivative of the loss. Comparing it
    with finite differences would be wrong by design (the next test shows that it indeed disagrees); only
    that the loss trains the model (non-zero gradient, also from the penalty alone) and stays finite."""
    for cls_weight in (0.2, 0.0):
        model = tiny_vit()
        out = CFT(cls_weight=cls_weight, consistency_target="label")(tiny_batch(), model, GradientRollout(), None)
        assert torch.isfinite(out.total)
        grads = grads_of(model, out.total)
        flat = torch.cat([g.flatten() for g in grads.values()])
        assert torch.isfinite(flat).all()
        assert flat.abs().max() > 1e-6
        if cls_weight == 0:  # the penalty reaches the attention weights through the attention maps
            assert grads["blocks.0.attn.qkv.weight"].abs().max() > 1e-6


def test_finite_difference_check_detects_a_non_exact_gradient():
    """The harness is discriminative: GradientRollout's held-constant attention gradients give a
    directional derivative far from the finite difference of the same loss."""
    model = tiny_vit()
    reg, rel, batch = CFT(cls_weight=0.0, consistency_target="label"), GradientRollout(), tiny_batch()
    d = random_direction(model)
    ad = directional(grads_of(model, reg(batch, model, rel, None).total), model, d)
    plus, minus = evaluate_at_offsets(model, lambda: reg(batch, model, rel, None), d, H)
    fd = (float(plus.total.detach()) - float(minus.total.detach())) / (2 * H)
    assert abs(ad - fd) > 1e-2 * abs(fd), (ad, fd)


# --------------------------------------------------------------------------------------------------
# 2. alignment_terms by hand

MAPS = torch.tensor([[[0.2, 0.9], [0.5, 0.7]]], dtype=torch.float64)


def test_alignment_terms_paper_hard_mask():
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    concept, non = alignment_terms(MAPS, mask, "paper")
    assert concept.item() == pytest.approx(-(math.log(0.2) + math.log(0.5)) / 2, rel=1e-12)
    assert non.item() == pytest.approx(-(math.log(1 - 0.9) + math.log(1 - 0.7)) / 2, rel=1e-12)


def test_alignment_terms_release_hard_mask():
    """The release's BCE form divides by all 4 cells, whatever the region's area."""
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    concept, non = alignment_terms(MAPS, mask, "release")
    assert concept.item() == pytest.approx(-(math.log(0.2) + math.log(0.5)) / 4, rel=1e-12)
    assert non.item() == pytest.approx(-(math.log(0.1) + math.log(0.3)) / 4, rel=1e-12)
    # and their sum is torch's BCE on the same cells
    bce = F.binary_cross_entropy(MAPS, mask)
    assert (concept + non).item() == pytest.approx(bce.item(), rel=1e-12)


def test_alignment_terms_soft_mask_weights_each_cell():
    mask = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]], dtype=torch.float64)
    concept, non = alignment_terms(MAPS, mask, "paper")
    # inside weights 1, .5, .25, 0 (sum 1.75); outside weights 0, .5, .75, 1 (sum 2.25)
    want_c = -(1 * math.log(0.2) + 0.5 * math.log(0.9) + 0.25 * math.log(0.5)) / 1.75
    want_n = -(0.5 * math.log(0.1) + 0.75 * math.log(0.5) + 1 * math.log(0.3)) / 2.25
    assert concept.item() == pytest.approx(want_c, rel=1e-12)
    assert non.item() == pytest.approx(want_n, rel=1e-12)
    concept_r, non_r = alignment_terms(MAPS, mask, "release")
    assert concept_r.item() == pytest.approx(want_c * 1.75 / 4, rel=1e-12)
    assert non_r.item() == pytest.approx(want_n * 2.25 / 4, rel=1e-12)


def test_alignment_terms_mask_values_are_clamped_to_unit_interval():
    high = torch.tensor([[[2.0, -1.0], [1.0, 0.0]]], dtype=torch.float64)
    unit = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    for form in ("paper", "release"):
        for a, b in zip(alignment_terms(MAPS, high, form), alignment_terms(MAPS, unit, form)):
            assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_alignment_terms_empty_mask_image_is_excluded_from_concept_mean():
    maps = torch.stack([MAPS[0], torch.tensor([[0.4, 0.6], [0.8, 0.1]], dtype=torch.float64)])
    masks = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    concept, non = alignment_terms(maps, masks, "paper")
    # L_concept: only image 0 has a region -> its mean alone (not halved)
    assert concept.item() == pytest.approx(-(math.log(0.2) + math.log(0.5)) / 2, rel=1e-12)
    # L_non_concept: image 0 over 2 cells, image 1 over all 4, then averaged over both images
    non0 = -(math.log(0.1) + math.log(0.3)) / 2
    non1 = -(math.log(0.6) + math.log(0.4) + math.log(0.2) + math.log(0.9)) / 4
    assert non.item() == pytest.approx((non0 + non1) / 2, rel=1e-12)


def test_alignment_terms_all_ones_mask_has_zero_non_concept():
    ones = torch.ones(1, 2, 2, dtype=torch.float64)
    for form in ("paper", "release"):
        concept, non = alignment_terms(MAPS, ones, form)
        assert non.item() == 0.0
        want = -(math.log(0.2) + math.log(0.9) + math.log(0.5) + math.log(0.7)) / 4
        assert concept.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("form", ["paper", "release"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("mask_kind", ["empty", "ones", "half"])
def test_alignment_terms_degenerate_inputs_give_finite_losses_and_gradients(form, value, mask_kind):
    maps = torch.full((2, 3, 3), value, dtype=torch.float64, requires_grad=True)
    masks = {"empty": torch.zeros(2, 3, 3), "ones": torch.ones(2, 3, 3), "half": torch.zeros(2, 3, 3)}[mask_kind]
    if mask_kind == "half":
        masks[:, :, :1] = 1
    concept, non = alignment_terms(maps, masks.double(), form)
    assert torch.isfinite(concept) and torch.isfinite(non)
    (grad,) = torch.autograd.grad(0.5 * concept + 1.2 * non, maps)
    assert torch.isfinite(grad).all()
    if mask_kind == "empty":
        assert concept.item() == 0.0
    if mask_kind == "ones":
        assert non.item() == 0.0


def test_alignment_terms_clamp_phi_to_eps():
    maps = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    for eps in (1e-6, 1e-3):
        concept, non = alignment_terms(maps, mask, "paper", eps=eps)
        # Phi = 0 inside -> -log(eps); Phi = 1 outside -> -log(1 - (1 - eps)) = -log(eps)
        assert concept.item() == pytest.approx(-math.log(eps), rel=1e-9)
        assert non.item() == pytest.approx(-math.log(eps), rel=1e-6)
    # values already inside [eps, 1 - eps] are untouched
    inner = torch.tensor([[[0.01, 0.99]]], dtype=torch.float64)
    concept, non = alignment_terms(inner, mask, "paper", eps=1e-3)
    assert concept.item() == pytest.approx(-math.log(0.01), rel=1e-12)
    assert non.item() == pytest.approx(-math.log(0.01), rel=1e-9)


def test_alignment_terms_rejects_bad_shapes_and_forms():
    with pytest.raises(ValueError, match="same shape"):
        alignment_terms(MAPS, torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_form"):
        alignment_terms(MAPS, torch.zeros(1, 2, 2, dtype=torch.float64), "bce")


@pytest.mark.parametrize("mask_value", [0.0, 1.0])
@pytest.mark.parametrize("loss_form", ["paper", "release"])
def test_cft_on_real_model_with_empty_or_full_masks_is_finite(mask_value, loss_form):
    model = tiny_vit()
    masks = torch.full((2, 32, 32), mask_value)
    out = CFT(loss_form=loss_form)(tiny_batch(concept=masks), model, AttnLRP(), None)
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(v) for v in out.terms.values())
    if mask_value == 0.0:
        assert out.terms["concept"].item() == 0.0
    else:
        assert out.terms["non_concept"].item() == 0.0
    grads = grads_of(model, out.total)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-6


# --------------------------------------------------------------------------------------------------
# 3. masks_to_grid


def test_masks_to_grid_area_fractions_are_exact():
    masks = torch.zeros(1, 8, 8)
    masks[0, 0:2, 4:6] = 1  # a quarter of cell (0, 1)
    masks[0, 4:8, 0:4] = 1  # all of cell (1, 0)
    masks[0, 4:5, 4:8] = 1  # one row of cell (1, 1): 4 / 16
    grid = masks_to_grid(masks, (2, 2))
    assert grid.shape == (1, 2, 2)
    torch.testing.assert_close(grid, torch.tensor([[[0.0, 0.25], [1.0, 0.25]]]), rtol=0, atol=0)


def test_masks_to_grid_matches_block_means_on_random_masks():
    masks = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    want = masks.view(3, 4, 8, 4, 8).mean(dim=(2, 4))
    torch.testing.assert_close(masks_to_grid(masks, GRID), want)
    # non-square grid: 4 rows x 2 columns of 8x16 cells
    want = masks.view(3, 4, 8, 2, 16).mean(dim=(2, 4))
    torch.testing.assert_close(masks_to_grid(masks, (4, 2)), want)


def test_masks_to_grid_identity_when_sizes_match_and_bool_masks():
    masks = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masks_to_grid(masks, (4, 4)), masks)
    b = masks > 0.5
    torch.testing.assert_close(masks_to_grid(b, (4, 4)), b.float())
    assert masks_to_grid(b, (2, 2)).dtype.is_floating_point


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 8, 8)])
def test_masks_to_grid_rejects_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        masks_to_grid(torch.zeros(shape), (2, 2))


# --------------------------------------------------------------------------------------------------
# 4. consistency_loss

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)


def ce_by_hand(logits: Tensor, target: list[int]) -> float:
    total = 0.0
    for row, t in zip(logits.tolist(), target):
        total += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    return total / len(target)


def test_consistency_self_uses_argmax_of_logits():
    labels = torch.tensor([1, 0])
    loss = consistency_loss(LOGITS, "self", labels, None)
    assert loss.item() == pytest.approx(ce_by_hand(LOGITS, [0, 2]), rel=1e-12)
    assert loss.item() != pytest.approx(ce_by_hand(LOGITS, [1, 0]), rel=1e-3)


def test_consistency_reference_uses_reference_argmax():
    labels = torch.tensor([0, 2])
    reference = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    loss = consistency_loss(LOGITS, "reference", labels, reference)
    assert loss.item() == pytest.approx(ce_by_hand(LOGITS, [1, 0]), rel=1e-12)
    with pytest.raises(ValueError, match="reference"):
        consistency_loss(LOGITS, "reference", labels, None)


def test_consistency_label_uses_labels():
    labels = torch.tensor([2, 1])
    loss = consistency_loss(LOGITS, "label", labels, None)
    assert loss.item() == pytest.approx(ce_by_hand(LOGITS, [2, 1]), rel=1e-12)


def test_consistency_temperature_divides_logits():
    labels = torch.tensor([2, 1])
    for target in ("self", "label"):
        loss = consistency_loss(LOGITS, target, labels, None, temperature=0.5)
        y = [0, 2] if target == "self" else [2, 1]
        assert loss.item() == pytest.approx(ce_by_hand(LOGITS / 0.5, y), rel=1e-12)
        assert loss.item() != pytest.approx(ce_by_hand(LOGITS, y), rel=1e-3)


def test_consistency_self_argmax_is_taken_before_temperature_and_not_differentiated():
    logits = LOGITS.clone().requires_grad_(True)
    loss = consistency_loss(logits, "self", torch.tensor([1, 1]), None, temperature=3.0)
    (grad,) = torch.autograd.grad(loss, logits)
    # d CE(z / T, y) / dz = (softmax(z / T) - onehot(y)) / (T B)
    want = (torch.softmax(LOGITS / 3.0, 1) - F.one_hot(torch.tensor([0, 2]), 3)) / (3.0 * 2)
    torch.testing.assert_close(grad, want.double(), rtol=1e-12, atol=1e-14)


def test_consistency_unknown_target_raises():
    with pytest.raises(ValueError, match="consistency_target"):
        consistency_loss(LOGITS, "teacher", torch.tensor([0, 1]), None)


# --------------------------------------------------------------------------------------------------
# 5. construction, validation, weights


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"loss_form": "bce"}, "loss_form"),
        ({"consistency_target": "teacher"}, "consistency_target"),
        ({"relevance_target": "reference"}, "relevance_target"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 0.5}, "eps"),
        ({"eps": -1e-6}, "eps"),
    ],
)
@pytest.mark.parametrize("cls", [CFT, ObjectMaskGuidance])
def test_cft_constructor_validation(cls, kwargs, key):
    with pytest.raises(ValueError, match=key):
        cls(**kwargs)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_plain_constructor_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        PlainFineTuning(temperature=temperature)


def test_cft_defaults_and_required_masks():
    cft = CFT()
    assert (cft.concept_weight, cft.non_concept_weight, cft.align_weight, cft.cls_weight) == (0.5, 1.2, 0.8, 0.2)
    assert (cft.loss_form, cft.consistency_target, cft.relevance_target) == ("paper", "self", "label")
    assert cft.temperature == 1.0
    assert cft.requirements.masks == ("concept",)
    assert CFT.needs_relevance
    obj = ObjectMaskGuidance()
    assert obj.requirements.masks == ("object",) and obj.mask_kind == "object"
    assert (obj.concept_weight, obj.non_concept_weight, obj.align_weight, obj.cls_weight) == (0.5, 1.2, 0.8, 0.2)
    assert CFT(mask_kind="parts").requirements.masks == ("parts",)
    assert PlainFineTuning().requirements.masks == () and not PlainFineTuning.needs_relevance
    assert PlainFineTuning().consistency_target == "label"


@pytest.mark.parametrize("cls", [CFT, ObjectMaskGuidance])
def test_missing_mask_kind_raises_keyerror(cls):
    reg = cls()
    kind = reg.mask_kind
    batch = tiny_batch()
    del batch["masks"][kind]
    with pytest.raises(KeyError, match=f"'{kind}'") as info:
        reg(batch, tiny_vit(), AttnLRP(), None)
    assert "data.mask_kinds" in str(info.value)
    assert "'a'" in str(info.value)  # names the first path of the batch
    batch.pop("masks")
    with pytest.raises(KeyError, match="data.mask_kinds"):
        reg(batch, tiny_vit(), AttnLRP(), None)


def test_cft_without_relevance_raises():
    with pytest.raises(ValueError, match="relevance"):
        CFT()(tiny_batch(), tiny_vit(), None, None)


def test_reference_consistency_without_reference_logits_raises_in_regularizers():
    with pytest.raises(ValueError, match="reference"):
        CFT(consistency_target="reference")(tiny_batch(), tiny_vit(), AttnLRP(), None)
    with pytest.raises(ValueError, match="reference"):
        PlainFineTuning(consistency_target="reference")(tiny_batch(), tiny_vit(), None, None)


@pytest.mark.parametrize(
    "weights",
    [{}, {"concept_weight": 2.0, "non_concept_weight": 0.3, "align_weight": 1.5, "cls_weight": 0.7}],
)
def test_cft_total_is_the_weighted_sum_of_terms(weights):
    reg = CFT(**weights)
    out = reg(tiny_batch(), tiny_vit(), AttnLRP(), None)
    t = out.terms
    assert set(t) == {"concept", "non_concept", "align", "cls"}
    cw, nw = reg.concept_weight, reg.non_concept_weight
    aw, clw = reg.align_weight, reg.cls_weight
    torch.testing.assert_close(t["align"], cw * t["concept"] + nw * t["non_concept"], rtol=1e-14, atol=0)
    want = aw * (cw * t["concept"] + nw * t["non_concept"]) + clw * t["cls"]
    torch.testing.assert_close(out.total, want, rtol=1e-14, atol=0)
    assert all(v.item() > 0 for v in t.values())  # every term contributes


def test_cft_terms_are_computed_from_the_relevance_map_and_masks():
    """The plumbing: the terms equal alignment_terms / consistency_loss on AttnLRP's map of the labels and
    the masks pooled to the patch grid; the logits are those of the same forward pass."""
    model, batch = tiny_vit(), tiny_batch()
    out = CFT(consistency_target="label")(batch, model, AttnLRP(), None)
    rel = AttnLRP()(model, batch["image"], LABELS)
    torch.testing.assert_close(out.relevance.maps, rel.maps, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, model(batch["image"]), rtol=1e-12, atol=1e-12)
    grid = masks_to_grid(batch["masks"]["concept"], GRID)
    concept, non = alignment_terms(rel.maps, grid.double(), "paper")
    torch.testing.assert_close(out.terms["concept"], concept, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.terms["non_concept"], non, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(out.logits, LABELS), rtol=1e-14, atol=0)


def test_object_mask_guidance_uses_object_masks():
    model, batch = tiny_vit(), tiny_batch()
    obj = ObjectMaskGuidance()(batch, model, AttnLRP(), None)
    cft_obj = CFT(mask_kind="object")(batch, model, AttnLRP(), None)
    cft = CFT()(batch, model, AttnLRP(), None)
    torch.testing.assert_close(obj.total, cft_obj.total, rtol=0, atol=0)
    assert abs(obj.terms["concept"].item() - cft.terms["concept"].item()) > 1e-3
    # with the concept masks removed, only the object masks are needed
    del batch["masks"]["concept"]
    torch.testing.assert_close(ObjectMaskGuidance()(batch, model, AttnLRP(), None).total, obj.total, rtol=0, atol=0)


def test_plain_fine_tuning_ignores_relevance_and_masks():
    model, batch = tiny_vit(), tiny_batch()
    batch.pop("masks")
    out = PlainFineTuning(temperature=2.0)(batch, model, None, None)
    assert out.relevance is None and set(out.terms) == {"cls"}
    logits = model(batch["image"])
    torch.testing.assert_close(out.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.total, F.cross_entropy(logits / 2.0, LABELS), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 6. which class the map explains


def test_relevance_target_label_explains_labels():
    model, batch = tiny_vit(), tiny_batch()
    out = CFT(relevance_target="label")(batch, model, AttnLRP(), None)
    pred = model(batch["image"]).argmax(1)
    assert not torch.equal(pred, LABELS)  # the fixture distinguishes the two choices
    assert torch.equal(out.relevance.targets, LABELS)
    torch.testing.assert_close(out.relevance.maps, AttnLRP()(model, batch["image"], LABELS).maps, rtol=0, atol=0)


def test_relevance_target_self_explains_the_prediction():
    model, batch = tiny_vit(), tiny_batch()
    out = CFT(relevance_target="self")(batch, model, AttnLRP(), None)
    pred = model(batch["image"]).argmax(1)
    assert not torch.equal(pred, LABELS)
    assert torch.equal(out.relevance.targets, pred)
    torch.testing.assert_close(out.relevance.maps, AttnLRP()(model, batch["image"], pred).maps, rtol=0, atol=0)
    label_maps = CFT(relevance_target="label")(batch, model, AttnLRP(), None).relevance.maps
    assert (out.relevance.maps - label_maps).abs().max() > 1e-3


def test_labels_may_be_a_python_list():
    model, batch = tiny_vit(), tiny_batch()
    ref = CFT()(batch, model, AttnLRP(), None)
    batch["label"] = LABELS.tolist()
    out = CFT()(batch, model, AttnLRP(), None)
    torch.testing.assert_close(out.total, ref.total, rtol=0, atol=0)
    assert torch.equal(out.relevance.targets, LABELS)
