"""Evaluation metrics as torchmetrics `Metric`s: top-k accuracy, per-group accuracy and relevance alignment.

Every metric accumulates over a dataset batch by batch and keeps only `dist_reduce_fx="sum"` states, so
`compute()` gives the same number on one device and across DDP ranks (and `merge_state` of per-shard copies
equals one pass over the whole set). Values are fractions in [0, 1]; papers report them x100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ConceptShare", "GroupAccuracy", "RankAccuracy", "RelevanceAlignment", "accuracy_metrics"]

# np.spacing(1): the stabiliser of Transformer-Explainability's pixAcc / IoU formulas (utils/metrices.py).
_TE_EPS = float(np.spacing(1))
# Images per chunk of the vectorised AP: bounds the (chunk, 2*H*W) sort buffers (~50 MB at 224x224).
_AP_CHUNK = 32


def accuracy_metrics(num_classes: int, ks: Sequence[int] = (1, 5), prefix: str | None = None) -> MetricCollection:
    """Micro-averaged (plain, sample-weighted) top-k accuracies named `acc{k}`: `acc1`, `acc5` by default.

    `MulticlassAccuracy` defaults to `average="macro"` (the mean of per-class recalls), which differs from
    the accuracy every robustness benchmark reports on class-imbalanced sets (IN-A, IN-R, ObjectNet, ...),
    so `average="micro"` is set explicitly. `top_k` is clamped to `num_classes` (top-5 of a 3-class head is
    top-3, i.e. always 1.0) but the name keeps the requested k, so logged keys do not depend on the head.
    Update with `(logits (B, C), target (B,))`.
    """
    if num_classes < 2:
        raise ValueError(f"accuracy needs num_classes >= 2, got {num_classes}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    return MetricCollection(
        {f"acc{k}": MulticlassAccuracy(num_classes, top_k=min(int(k), num_classes), average="micro") for k in ks},
        prefix=prefix,
    )


class RankAccuracy(Metric):
    """Top-k accuracies from the rank of the true class (the number of scored classes that beat it).

    The rank carries each benchmark's protocol (`benchmarks.robustness.target_rank`: all classes, a 200-class
    subset, ObjectNet's groups), so one metric serves all of them: a top-k hit is `rank < k`. `compute()`
    gives `{"acc1": ..., "acc5": ...}` (micro: hits over samples); NaN before any update.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        super().__init__()
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.add_state("hits", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        ranks = ranks.reshape(-1)
        k = torch.tensor(self.ks, device=ranks.device)
        self.hits += (ranks[:, None] < k[None, :]).sum(dim=0).to(self.hits)
        self.count += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        values = self.hits / self.count if self.count > 0 else torch.full_like(self.hits, float("nan"))
        return {f"acc{k}": v.float() for k, v in zip(self.ks, values)}


class GroupAccuracy(Metric):
    """Per-group accuracy with its worst-group and unweighted-mean summaries (Waterbirds-style spurious groups).

    `update(preds, target, groups)`: `preds` are logits/scores (B, C) (argmax is taken) or predicted labels
    (B,) of an integer dtype; `target` (B,) true labels; `groups` (B,) group ids in [0, num_groups), where a
    negative id means "no group" and the sample is ignored.

    `compute()` returns a dict:
        `group_acc`: (num_groups,) accuracy per group, NaN for a group with no samples;
        `worst_group_acc`: the minimum over non-empty groups (WGA; group_DRO `robust_acc`, WILDS `acc_wg`);
        `mean_group_acc`: the UNWEIGHTED mean over non-empty groups, (1/G) sum_g acc_g, the literal "average
            group accuracy". It differs from the ordinary sample-weighted accuracy (group_DRO `avg_acc`) and from
            the Waterbirds "average accuracy" that weights by training-set group sizes; derive those from
            `group_acc` and `group_count` (or training counts) if needed;
        `group_count`: (num_groups,) samples seen per group.
    The two summaries are NaN when no group has samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    count: Tensor

    def __init__(self, num_groups: int, **kwargs) -> None:
        """
        Args:
            num_groups: number of groups G; ids must lie in [0, G) (negative ids are ignored).
            kwargs: forwarded to `torchmetrics.Metric` (e.g. `dist_sync_on_step`).
        """
        super().__init__(**kwargs)
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = int(num_groups)
        self.add_state("correct", torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Count correct predictions and samples per group (samples with a negative group id are skipped)."""
        if preds.ndim == 2:
            labels = preds.argmax(dim=1)
        elif preds.ndim == 1:
            if preds.is_floating_point() or preds.is_complex():
                raise ValueError(
                    "1-D preds must be predicted class labels of an integer dtype; pass scores as (B, C) logits"
                )
            labels = preds
        else:
            raise ValueError(f"preds must be (B, C) logits or (B,) labels, got shape {tuple(preds.shape)}")
        target, groups = target.reshape(-1), groups.reshape(-1)
        if not (labels.shape[0] == target.shape[0] == groups.shape[0]):
            raise ValueError(
                f"preds, target and groups disagree on the batch size: {labels.shape[0]}, {target.shape[0]}, "
                f"{groups.shape[0]}"
            )
        if groups.is_floating_point():
            raise ValueError("groups must be integer group ids")
        groups = groups.long()
        if groups.numel() and int(groups.max()) >= self.num_groups:
            raise ValueError(
                f"group id {int(groups.max())} is out of range for num_groups={self.num_groups} "
                "(ids must lie in [0, num_groups); use a negative id for samples without a group)"
            )
        valid = groups >= 0
        hit = valid & (labels.to(target.device).long() == target.long())
        self.correct += torch.bincount(groups[hit], minlength=self.num_groups)
        self.count += torch.bincount(groups[valid], minlength=self.num_groups)

    def compute(self) -> dict[str, Tensor]:
        """Per-group accuracies (NaN if empty), worst group, unweighted group mean and the group sizes."""
        nonempty = self.count > 0
        acc = torch.full((self.num_groups,), float("nan"), dtype=torch.float64, device=self.count.device)
        acc[nonempty] = self.correct[nonempty].double() / self.count[nonempty].double()
        if nonempty.any():
            worst, mean = acc[nonempty].min(), acc[nonempty].mean()
        else:
            worst = mean = torch.tensor(float("nan"), dtype=torch.float64, device=acc.device)
        return {"group_acc": acc, "worst_group_acc": worst, "mean_group_acc": mean, "group_count": self.count.clone()}


def _pooled_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Step-wise average precision of every row: (B, N) scores and {0, 1} targets -> (B,) float64.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, the formula of sklearn's
    `average_precision_score` and torchmetrics' `binary_average_precision(thresholds=None)`, vectorised over
    rows: a positive at sorted position j contributes P(end of j's tie group) / #positives, since the recall
    step of a threshold is the number of positives in its tie group over #positives. Rows without positives
    give 0 (sklearn's NaN after TE's `nan_to_num`).
    """
    n = scores.shape[1]
    order = scores.argsort(dim=1, descending=True)
    s = scores.gather(1, order)
    t = targets.gather(1, order).to(torch.float64)
    positions = torch.arange(n, device=scores.device).expand_as(order)
    group_end = torch.ones_like(s, dtype=torch.bool)
    group_end[:, :-1] = s[:, 1:] != s[:, :-1]
    # Index of the last element of each element's tie group: reverse running minimum over group-end positions.
    end_idx = torch.where(group_end, positions, n).flip(1).cummin(dim=1).values.flip(1)
    precision = t.cumsum(dim=1) / (positions + 1).to(torch.float64)
    ap = (t * precision.gather(1, end_idx)).sum(dim=1) / t.sum(dim=1)
    return ap.nan_to_num(nan=0.0)


class RelevanceAlignment(Metric):
    """How well relevance maps segment the object: the ImageNet-Segmentation protocol of Chefer et al.
    (Transformer-Explainability `imagenet_seg_eval.py`, reused by RobustViT and the CFT paper's Table 3).

    `update(maps, masks)`: `maps` (B, h, w) relevance on a patch or pixel grid, any scale or sign; `masks`
    (B, H, W) ground-truth object masks with values {0 = background, 1 = foreground} (bool or numeric). A
    singleton channel dim, (B, 1, h, w) / (B, 1, H, W), is accepted. Per image:
        1. the map is upsampled bilinearly (align_corners=False) to (H, W) if its size differs;
        2. min-max normalised to [0, 1] per image (exactly, no eps; a constant map becomes all zeros);
        3. foreground prediction = map > mean of the normalised map (strict; ties go to background).
    Accumulated over the dataset:
        `pixel_acc` = sum correct pixels / (eps + sum pixels): dataset-level pixel-micro accuracy;
        `miou` = mean over {background, foreground} of IoU_c = sum_n inter_c / (eps + sum_n union_c): IoU per
            class over the whole dataset, then the mean; not a mean of per-image IoUs;
        `map` = mean over images of the per-image AP of the 2-channel pooled vector: targets [gt == 0, gt == 1]
            against scores [1 - R, R], flattened together (2*H*W entries); neither foreground-only AP nor
            a dataset-global AP.
    eps = np.spacing(1), as in TE. A class with no pixels in any union scores IoU 0 (TE's convention).

    Constant maps follow TE exactly: TE's 0/0 normalisation yields NaN, its NaN-to-0 step makes both soft
    channels 0, so the AP vector is all zeros and that image's AP is 0.5 (half the pooled entries are
    positive); the hard prediction is all background. This metric reproduces that without producing a NaN.

    `compute()` returns Python floats in [0, 1] under keys `pixel_acc`, `miou`, `map` (NaN before any
    update); the paper reports them x100. Relevance must be for the model's predicted class, as in TE.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    labeled: Tensor
    inter: Tensor
    union: Tensor
    ap_sum: Tensor
    num_images: Tensor

    def __init__(self, **kwargs) -> None:
        """
        Args:
            kwargs: forwarded to `torchmetrics.Metric` (e.g. `dist_sync_on_step`).
        """
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("labeled", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # index 0 = background, 1 = foreground
        self.add_state("inter", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ap_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _check(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Validated (B, h, w) float maps and (B, H, W) bool masks."""
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if maps.ndim != 3 or masks.ndim != 3:
            raise ValueError(
                f"expected maps (B, h, w) and masks (B, H, W); got {tuple(maps.shape)} and {tuple(masks.shape)}"
            )
        if maps.shape[0] != masks.shape[0]:
            raise ValueError(f"got {maps.shape[0]} maps for {masks.shape[0]} masks")
        if masks.dtype != torch.bool:
            if not ((masks == 0) | (masks == 1)).all():
                raise ValueError("masks must be binary: 0 = background, 1 = foreground")
            masks = masks == 1
        maps = maps.detach()
        if maps.dtype not in (torch.float32, torch.float64):
            maps = maps.float()
        if not torch.isfinite(maps).all():
            raise ValueError("relevance maps contain NaN or inf")
        return maps, masks.to(maps.device)

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch of relevance maps (B, h, w) and their ground-truth object masks (B, H, W)."""
        maps, masks = self._check(maps, masks)
        if maps.shape[0] == 0:
            return
        if maps.shape[-2:] != masks.shape[-2:]:
            maps = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        flat = maps.flatten(1)
        lo = flat.amin(dim=1, keepdim=True)
        span = flat.amax(dim=1, keepdim=True) - lo
        constant = span == 0
        rel = torch.where(constant, torch.zeros_like(flat), (flat - lo) / torch.where(constant, 1, span))
        pred = rel > rel.mean(dim=1, keepdim=True)
        gt = masks.flatten(1)

        self.correct += (pred == gt).sum()
        self.labeled += gt.numel()
        inter_fg = (pred & gt).sum()
        inter_bg = (~pred & ~gt).sum()
        self.inter += torch.stack([inter_bg, inter_fg])
        # union_c = |pred = c| + |gt = c| - inter_c
        n_pred_fg, n_gt_fg = pred.sum(), gt.sum()
        n_pix = gt.numel()
        self.union += torch.stack([
            (n_pix - n_pred_fg) + (n_pix - n_gt_fg) - inter_bg,
            n_pred_fg + n_gt_fg - inter_fg,
        ])

        # Per-image AP of the pooled 2-channel vector; exact vectorised step-wise AP, chunked over images
        # only to bound the memory of the sort.
        scores = torch.cat([torch.where(constant, 0.0, 1.0 - rel), rel], dim=1)
        targets = torch.cat([~gt, gt], dim=1)
        for s, t in zip(scores.split(_AP_CHUNK), targets.split(_AP_CHUNK)):
            self.ap_sum += _pooled_average_precision(s, t).sum()
        self.num_images += maps.shape[0]

    def compute(self) -> dict[str, float]:
        """`pixel_acc`, `miou` and `map` as fractions in [0, 1] (x100 for the paper's numbers)."""
        if int(self.num_images) == 0:
            return {"pixel_acc": float("nan"), "miou": float("nan"), "map": float("nan")}
        pixel_acc = self.correct.double() / (_TE_EPS + self.labeled.double())
        iou = self.inter.double() / (_TE_EPS + self.union.double())
        return {
            "pixel_acc": float(pixel_acc),
            "miou": float(iou.mean()),
            "map": float(self.ap_sum / self.num_images.double()),
        }


class ConceptShare(Metric):
    """The share of a map's positive raw relevance that lies on the concept (or object) pixels, averaged over
    images, beside the share of the grid those pixels cover (what a map spread evenly would score).

    Unlike the segmentation scores above, which look at the min-max normalised map, this reads the signed
    relevance itself: a fine-tuned map can reach a low CFT loss by flattening the background at the map's
    minimum while the background still carries most of the positive evidence; the share does not move then.
    `update(raw, masks)`: `raw` (B, h, w) signed relevance on the model's grid, `masks` (B, H, W) in {0, 1},
    pooled to the grid by area. Images without positive relevance or without mask pixels are skipped.
    `compute()`: {"concept_share": mean share, "concept_area": mean area fraction} (NaN before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("share_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("area_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, raw: Tensor, masks: Tensor) -> None:
        if raw.dim() != 3 or masks.dim() != 3 or raw.shape[0] != masks.shape[0]:
            raise ValueError(f"raw (B, h, w) and masks (B, H, W) expected, got {tuple(raw.shape)} and "
                             f"{tuple(masks.shape)}")
        grid = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), tuple(raw.shape[-2:])).squeeze(1)
        positive = raw.float().clamp_min(0).flatten(1)
        total = positive.sum(dim=1)
        area = grid.flatten(1).mean(dim=1)
        valid = (total > 0) & (area > 0)
        share = (positive * grid.flatten(1)).sum(dim=1) / total.clamp_min(1e-30)
        self.share_sum += share[valid].sum().to(self.share_sum)
        self.area_sum += area[valid].sum().to(self.area_sum)
        self.count += valid.sum().to(self.count)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"concept_share": float("nan"), "concept_area": float("nan")}
        return {"concept_share": float(self.share_sum / self.count), "concept_area": float(self.area_sum / self.count)}
