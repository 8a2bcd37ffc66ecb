"""Evaluation metrics (evaluation/metrics.py): hand-computed top-k, group and relevance-alignment numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.functional.classification import binary_average_precision

from cft_lightning.evaluation import GroupAccuracy, RelevanceAlignment, accuracy_metrics


def _step_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Independent step-wise AP: sum_n (R_n - R_{n-1}) P_n over thresholds at each distinct score."""
    scores, targets = scores.flatten().tolist(), targets.flatten().bool().tolist()
    n_pos = sum(targets)
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores), reverse=True):
        selected = [t for s, t in zip(scores, targets) if s >= thr]
        tp = sum(selected)
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / len(selected)
        prev_recall = recall
    return ap


def _te_reference(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Transformer-Explainability's per-image steps, transcribed literally (NaN handling and aliasing included),
    with PA / mIoU from torchmetrics and AP from both torchmetrics and `_step_ap`."""
    preds, aps, aps_step = [], [], []
    for rel, gt in zip(maps, masks):
        res = F.interpolate(rel[None, None].float(), size=gt.shape, mode="bilinear", align_corners=False)
        res = (res - res.min()) / (res.max() - res.min())
        ret = res.mean()
        res_1 = res.gt(ret).float()
        res_0 = res.le(ret).float()
        res_1_ap = res  # an alias in TE: the next NaN fix also edits res
        res_0_ap = 1 - res
        res_1[res_1 != res_1] = 0
        res_0[res_0 != res_0] = 0
        res_1_ap[res_1_ap != res_1_ap] = 0
        res_0_ap[res_0_ap != res_0_ap] = 0
        preds.append((res_1 > res_0).long()[0, 0])  # argmax over (bg, fg); a tie goes to bg
        scores = torch.cat([res_0_ap, res_1_ap], dim=1).flatten()
        targets = torch.stack([gt == 0, gt == 1]).flatten().long()
        aps.append(float(binary_average_precision(scores, targets, thresholds=None).nan_to_num()))
        aps_step.append(_step_ap(scores, targets))
    pred, gt = torch.stack(preds).flatten(), masks.long().flatten()
    return {
        "pixel_acc": float(MulticlassAccuracy(2, average="micro")(pred, gt)),
        "miou": float(MulticlassJaccardIndex(2, average="macro")(pred, gt)),
        "map": sum(aps) / len(aps),
        "map_step": sum(aps_step) / len(aps_step),
    }


def _assert_results(got: dict[str, float], want: dict[str, float], tol: float = 1e-9) -> None:
    for key in ("pixel_acc", "miou", "map"):
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(want[key], abs=tol), key


# --------------------------------------------------------------------------------------------------
# accuracy_metrics


def test_accuracy_names_and_prefix():
    assert set(accuracy_metrics(10).keys()) == {"acc1", "acc5"}
    assert set(accuracy_metrics(10, prefix="val_").keys()) == {"val_acc1", "val_acc5"}
    assert set(accuracy_metrics(10, ks=(1, 3)).keys()) == {"acc1", "acc3"}


def test_top5_clamped_for_three_classes():
    metrics = accuracy_metrics(3)
    assert metrics["acc5"].top_k == 3
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    target = torch.tensor([2, 0])  # both ranked last of 3
    out = metrics(logits, target)
    assert float(out["acc1"]) == 0.0
    assert float(out["acc5"]) == 1.0


def test_top5_counts_rank_five_not_six():
    logits = torch.arange(10.0).flip(0).repeat(2, 1)  # class c has rank c + 1
    out = accuracy_metrics(10)(logits, torch.tensor([4, 5]))
    assert float(out["acc1"]) == 0.0
    assert float(out["acc5"]) == 0.5


def test_accuracy_is_micro_not_macro():
    # 4 samples of class 0 (all right), 1 of class 1 (wrong): micro 4/5, macro (1 + 0) / 2
    logits = F.one_hot(torch.zeros(5, dtype=torch.long), 3).float()
    target = torch.tensor([0, 0, 0, 0, 1])
    out = accuracy_metrics(3)(logits, target)
    assert float(out["acc1"]) == pytest.approx(0.8)
    assert float(MulticlassAccuracy(3, average="macro")(logits, target)) == pytest.approx(0.5)


def test_accuracy_accumulates_and_resets():
    metrics = accuracy_metrics(3)
    metrics.update(torch.eye(3), torch.tensor([0, 1, 2]))
    metrics.update(torch.eye(3)[:1], torch.tensor([1]))
    assert float(metrics.compute()["acc1"]) == pytest.approx(0.75)
    metrics.reset()
    metrics.update(torch.eye(3)[:2], torch.tensor([1, 1]))
    assert float(metrics.compute()["acc1"]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# GroupAccuracy

# group 0: 3/4 right, group 1: 1/2, group 2: empty, group 3: 1/1, group -1: 0/2 (ignored)
_PRED = torch.tensor([0, 1, 1, 0, 1, 0, 2, 2, 2])
_TARGET = torch.tensor([0, 1, 1, 1, 1, 1, 2, 0, 0])
_GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 3, -1, -1])


def _check_groups(out: dict[str, torch.Tensor]) -> None:
    acc = out["group_acc"]
    assert acc.shape == (4,)
    torch.testing.assert_close(acc[[0, 1, 3]], torch.tensor([0.75, 0.5, 1.0], dtype=acc.dtype))
    assert torch.isnan(acc[2])
    assert out["group_count"].tolist() == [4, 2, 0, 1]
    assert float(out["worst_group_acc"]) == pytest.approx(0.5)
    # unweighted over the 3 non-empty groups; the sample-weighted accuracy would be 5/7
    assert float(out["mean_group_acc"]) == pytest.approx(0.75)
    assert float(out["mean_group_acc"]) != pytest.approx(5 / 7)


def test_group_accuracy_from_labels():
    metric = GroupAccuracy(4)
    metric.update(_PRED, _TARGET, _GROUPS)
    _check_groups(metric.compute())


def test_group_accuracy_from_logits_in_two_batches():
    logits = F.one_hot(_PRED, 3).float() * 5 - 1
    metric = GroupAccuracy(4)
    metric.update(logits[:5], _TARGET[:5], _GROUPS[:5])
    metric.update(logits[5:], _TARGET[5:], _GROUPS[5:])
    _check_groups(metric.compute())


def test_group_accuracy_merge_state_equals_one_pass():
    # what a DDP sum-reduction does with per-rank states
    a, b = GroupAccuracy(4), GroupAccuracy(4)
    a.update(_PRED[:4], _TARGET[:4], _GROUPS[:4])
    b.update(_PRED[4:], _TARGET[4:], _GROUPS[4:])
    a.merge_state(b)
    _check_groups(a.compute())


def test_group_accuracy_all_empty_is_nan():
    metric = GroupAccuracy(2)
    metric.update(_PRED[:2], _TARGET[:2], torch.tensor([-1, -1]))
    out = metric.compute()
    assert torch.isnan(out["group_acc"]).all()
    assert math.isnan(float(out["worst_group_acc"])) and math.isnan(float(out["mean_group_acc"]))


def test_group_accuracy_errors():
    metric = GroupAccuracy(4)
    with pytest.raises(ValueError, match="out of range"):
        metric.update(_PRED[:2], _TARGET[:2], torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.tensor([0.2, 0.9]), _TARGET[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch size"):
        metric.update(_PRED[:3], _TARGET[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        GroupAccuracy(0)


def test_group_accuracy_reset():
    metric = GroupAccuracy(4)
    metric.update(_PRED, _TARGET, _GROUPS)
    metric.compute()
    metric.reset()
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    out = metric.compute()
    assert out["group_count"].tolist() == [0, 0, 2, 0]
    assert float(out["worst_group_acc"]) == pytest.approx(0.5)
    assert torch.isnan(out["group_acc"][[0, 1, 3]]).all()


# --------------------------------------------------------------------------------------------------
# RelevanceAlignment: two hand-computed 4x4 images


def _image_a() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised map: 1 at (1,1) (1,2) (2,1), 0.5 at (2,2), 0 elsewhere; mean 4.5/16 -> fg = centre 2x2.
    GT fg = (1,1) (1,2) (2,1) (0,0)."""
    rel = torch.tensor([[0, 0, 0, 0], [0, 4, 4, 0], [0, 4, 2, 0], [0, 0, 0, 0]], dtype=torch.float32) * 3 + 5
    gt = torch.zeros(4, 4, dtype=torch.long)
    gt[1, 1] = gt[1, 2] = gt[2, 1] = gt[0, 0] = 1
    return rel, gt


def _image_b() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised map: 1 at (0,0), 0.3 at (0,1) (1,0) (1,1), 0 elsewhere; mean 1.9/16 -> fg = top-left 2x2
    (a 0.5 threshold would give only (0,0)). GT fg = (0,0) (0,1) (1,0)."""
    rel = torch.tensor([[10, 3, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32) - 7
    gt = torch.zeros(4, 4, dtype=torch.long)
    gt[0, 0] = gt[0, 1] = gt[1, 0] = 1
    return rel, gt


# Image A: pred fg {(1,1),(1,2),(2,1),(2,2)}, wrong at (2,2) and (0,0): correct 14;
#   fg inter 3, union 5; bg inter 16 - 5 = 11, union 16 - 3 = 13.
#   AP on the 32 pooled entries (16 positive), tie groups by score:
#   1.0: fg-ch 3 pos + bg-ch 11 pos, 1 neg -> P 14/15, dR 14/16; 0.5: bg-ch 1 pos + fg-ch 1 neg -> P 15/17, dR 1/16;
#   0.0: 1 pos of 15 -> P 16/32, dR 1/16.
AP_A = 14 / 16 * 14 / 15 + 1 / 16 * 15 / 17 + 1 / 16 * 16 / 32
# Image B: pred fg top-left 2x2, wrong at (1,1): correct 15; fg inter 3, union 4; bg inter 12, union 13.
#   AP: 1.0: 13 pos of 13 -> P 1, dR 13/16; 0.7 (bg-ch): 1 pos of 3 -> P 14/16, dR 1/16;
#   0.3 (fg-ch): 2 pos of 3 -> P 16/19, dR 2/16; 0.0: no positives left.
AP_B = 13 / 16 + 1 / 16 * 14 / 16 + 2 / 16 * 16 / 19
EPS = 2.220446049250313e-16


def _batch_ab() -> tuple[torch.Tensor, torch.Tensor]:
    (ra, ga), (rb, gb) = _image_a(), _image_b()
    return torch.stack([ra, rb]), torch.stack([ga, gb])


def test_hand_computed_two_images():
    metric = RelevanceAlignment()
    metric.update(*_batch_ab())
    out = metric.compute()
    iou_bg = (11 + 12) / (EPS + 13 + 13)
    iou_fg = (3 + 3) / (EPS + 5 + 4)
    _assert_results(out, {"pixel_acc": 29 / 32, "miou": (iou_bg + iou_fg) / 2, "map": (AP_A + AP_B) / 2})
    # dataset-level IoU, not the mean of per-image IoUs (fg: (3/5 + 3/4) / 2 = 0.675 != 6/9)
    assert out["miou"] != pytest.approx((11 / 13 + 12 / 13) / 4 + (3 / 5 + 3 / 4) / 4)


def test_hand_computed_ap_matches_independent_implementations():
    for (rel, gt), want in ((_image_a(), AP_A), (_image_b(), AP_B)):
        r = (rel - rel.min()) / (rel.max() - rel.min())
        scores = torch.cat([1 - r.flatten(), r.flatten()])
        targets = torch.cat([(gt == 0).flatten(), (gt == 1).flatten()]).long()
        assert _step_ap(scores, targets) == pytest.approx(want, abs=1e-12)
        assert float(binary_average_precision(scores, targets, thresholds=None)) == pytest.approx(want, abs=1e-6)
        metric = RelevanceAlignment()
        metric.update(rel[None], gt[None])
        assert metric.compute()["map"] == pytest.approx(want, abs=1e-12)


def test_threshold_is_the_mean_not_one_half():
    rel, gt = _image_b()
    metric = RelevanceAlignment()
    metric.update(rel[None], gt[None])
    out = metric.compute()
    assert out["pixel_acc"] == pytest.approx(15 / 16)  # a 0.5 threshold would give 14/16
    assert out["miou"] == pytest.approx((12 / 13 + 3 / 4) / 2)


def test_scale_and_shift_invariant():
    maps, masks = _batch_ab()
    a, b = RelevanceAlignment(), RelevanceAlignment()
    a.update(maps, masks)
    b.update(maps * 1e-3 - 42.0, masks.bool())
    _assert_results(b.compute(), a.compute(), tol=1e-6)


def test_constant_map_gives_no_nan():
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, :2] = 1  # 8 fg pixels
    metric = RelevanceAlignment()
    metric.update(torch.full((1, 4, 4), 5.0), gt)
    out = metric.compute()
    assert all(math.isfinite(v) for v in out.values())
    # all background: 8 of 16 right; IoU_bg = 8/16, IoU_fg = 0/8; TE's all-zero AP scores -> AP = 16/32
    _assert_results(out, {"pixel_acc": 0.5, "miou": (8 / 16 + 0.0) / 2, "map": 0.5})


def test_upsamples_patch_grid_bilinearly():
    # [[0, 0], [0, 4]] -> 4x4 with align_corners=False is 4 * outer(w, w), w = [0, 1/4, 3/4, 1]
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    bilinear = 4 * torch.outer(w, w)
    nearest = torch.zeros(4, 4)
    nearest[2:, 2:] = 4
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, 2:, 2:] = 1
    gt[0, 1, 3] = 1  # relevance there is 0.25 = the mean: not fg (strict >), but ranked above the zeros
    results = {}
    for name, rel in (("grid", torch.tensor([[0.0, 0.0], [0.0, 4.0]])), ("bilinear", bilinear), ("nearest", nearest)):
        metric = RelevanceAlignment()
        metric.update(rel[None], gt)
        results[name] = metric.compute()
    _assert_results(results["grid"], results["bilinear"], tol=1e-12)
    assert results["grid"]["pixel_acc"] == pytest.approx(15 / 16)
    assert results["grid"]["map"] != pytest.approx(results["nearest"]["map"])


def test_channel_dim_accepted():
    maps, masks = _batch_ab()
    a, b = RelevanceAlignment(), RelevanceAlignment()
    a.update(maps, masks)
    b.update(maps[:, None], masks[:, None])
    _assert_results(b.compute(), a.compute(), tol=0)


def _random_batch(seed: int, n: int = 5, grid: int = 3, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps with few levels (many ties after upsampling), one constant map, random masks."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 3, (n, grid, grid), generator=gen).float()
    maps[1] = 2.0
    masks = torch.randint(0, 2, (n, size, size), generator=gen)
    return maps, masks


def test_matches_transformer_explainability_reference():
    for seed, grid, size in ((0, 3, 6), (1, 4, 8), (2, 8, 8)):
        maps, masks = _random_batch(seed, grid=grid, size=size)
        metric = RelevanceAlignment()
        metric.update(maps, masks)
        want = _te_reference(maps, masks)
        assert want["map"] == pytest.approx(want["map_step"], abs=1e-6)
        _assert_results(metric.compute(), want, tol=1e-6)


def test_two_updates_equal_one_concatenated_batch():
    maps, masks = _random_batch(3)
    whole, parts = RelevanceAlignment(), RelevanceAlignment()
    whole.update(maps, masks)
    parts.update(maps[:2], masks[:2])
    parts.update(maps[2:], masks[2:])
    _assert_results(parts.compute(), whole.compute(), tol=1e-12)
    merged, other = RelevanceAlignment(), RelevanceAlignment()
    merged.update(maps[:3], masks[:3])
    other.update(maps[3:], masks[3:])
    merged.merge_state(other)
    _assert_results(merged.compute(), whole.compute(), tol=1e-12)


def test_relevance_alignment_reset():
    maps, masks = _random_batch(4)
    metric = RelevanceAlignment()
    metric.update(maps, masks)
    metric.compute()
    metric.reset()
    metric.update(*_batch_ab())
    fresh = RelevanceAlignment()
    fresh.update(*_batch_ab())
    _assert_results(metric.compute(), fresh.compute(), tol=0)


def test_relevance_alignment_input_errors():
    metric = RelevanceAlignment()
    maps, masks = _batch_ab()
    with pytest.raises(ValueError, match="binary"):
        metric.update(maps, masks * 2)
    with pytest.raises(ValueError, match="masks"):
        metric.update(maps, masks[:1])
    with pytest.raises(ValueError, match="NaN"):
        metric.update(maps.masked_fill(masks.bool(), float("nan")), masks)
    with pytest.raises(ValueError):
        metric.update(maps.flatten(1), masks)
    assert all(math.isnan(v) for v in metric.compute().values())  # nothing was accumulated


def test_concept_share_reads_the_signed_relevance_not_the_normalised_map() -> None:
    """All positive relevance on the mask -> 1; a uniform map -> the mask's area; negative relevance counts as
    none; a map whose background sits flat at the minimum (min-max: 0 there) still shares its evidence."""
    from cft_lightning.evaluation.metrics import ConceptShare

    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :4] = 1.0  # a quarter of the image, a quarter of a 2x2 grid
    inside = torch.tensor([[[5.0, -3.0], [-1.0, -2.0]]])
    uniform = torch.ones(1, 2, 2)
    flat_background = torch.tensor([[[9.0, 3.0], [3.0, 3.0]]])  # min-max: 1 on the concept, 0 elsewhere
    for raw, expected in ((inside, 1.0), (uniform, 0.25), (flat_background, 0.5)):
        metric = ConceptShare()
        metric.update(raw, mask)
        assert metric.compute()["concept_share"] == pytest.approx(expected)
        assert metric.compute()["concept_area"] == pytest.approx(0.25)
    metric = ConceptShare()
    metric.update(-torch.ones(1, 2, 2), mask)  # no positive relevance: skipped, not 0/0
    assert math.isnan(metric.compute()["concept_share"])
