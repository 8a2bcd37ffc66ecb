"""`Evaluator`: the metrics of `cft test` for the fine-tuned model and its reference, per test split.

For every split and both models ("fine_tuned", "original") it accumulates top-1/top-5 accuracy, group
accuracies (when the batch carries groups), relevance alignment with object masks (when the batch has
`object` masks and a relevance method can run) and, with `update_interventions`, top-1 on the intervened images
of `evaluation.interventions` (concepts removed, background swapped) and how often the decision follows the
swapped-in background (`bg_follow`). `results()` gives the nested dict the report writer and
the JSON file use (schema in docs/results.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from cft_lightning.evaluation.interventions import INTERVENTIONS
from cft_lightning.evaluation.metrics import ConceptShare, GroupAccuracy, RankAccuracy, RelevanceAlignment

__all__ = ["CLASS_SPLITS", "INTERVENTION_METRICS", "MODELS", "Evaluator", "Scorer", "plain_rank"]

MODELS = ("original", "fine_tuned")
# accuracy on the classes seen in fine-tuning and on the held-out ones (the paper's Table 4), when the
# batch says which is which (`batch["class_split"]`: 1 seen, 0 held out, -1 unknown)
CLASS_SPLITS = {1: "seen", 0: "held_out"}
Scorer = Callable[[Tensor, Tensor], Tensor]
# results key of each intervention metric (a top-1 `RankAccuracy` each; `bg_follow` ranks the donor's label)
INTERVENTION_METRICS = {**{name: f"acc1_{name}" for name in INTERVENTIONS}, "bg_follow": "bg_follow"}


def plain_rank(logits: Tensor, labels: Tensor) -> Tensor:
    """Classes whose logit beats the label's: `rank < k` is a top-k hit (the ordinary all-class protocol)."""
    return (logits > logits.gather(1, labels[:, None])).sum(dim=1)


class Evaluator(nn.Module):
    """Metric state of one test run; a submodule, so Lightning moves it and torchmetrics syncs it under DDP."""

    def __init__(self, split_names: list[str], num_classes: int, group_names: dict[int, str] | None = None,
                 scorers: list[Scorer | None] | None = None) -> None:
        """
        Args:
            split_names: test splits in dataloader order.
            num_classes: size of the model's head (kept for callers; ranks make accuracy head-agnostic).
            group_names: group id -> name, for per-group accuracy and WGA.
            scorers: per split, `(logits, labels) -> rank of the true class` (a benchmark's protocol); None
                scores over all classes.
        """
        super().__init__()
        self.split_names = list(split_names)
        self.scorers = list(scorers or [None] * len(self.split_names))
        self.group_names = dict(group_names or {})
        num_groups = max(self.group_names, default=-1) + 1
        self.metrics = nn.ModuleDict()
        for split in range(len(self.split_names)):
            for who in MODELS:
                parts: dict[str, nn.Module] = {"acc": RankAccuracy(), "align": RelevanceAlignment(),
                                               "share": ConceptShare()}
                for name in CLASS_SPLITS.values():
                    parts[f"acc_{name}"] = RankAccuracy()
                for name in INTERVENTION_METRICS:
                    parts[name] = RankAccuracy(ks=(1,))
                if num_groups:
                    parts["groups"] = GroupAccuracy(num_groups)
                self.metrics[f"{split}_{who}"] = nn.ModuleDict(parts)
        self.images = nn.ModuleList(SumMetric() for _ in self.split_names)
        # labelled images seen per split and model: a model or split never evaluated gets no key (not 0.0)
        self.labelled = nn.ModuleDict({key: SumMetric() for key in self.metrics})
        self.used_alignment = [False] * len(self.split_names)
        self.used_share = [False] * len(self.split_names)

    def update(self, split: int, who: str, logits: Tensor, batch: dict[str, Any], maps: Tensor | None,
               raw: Tensor | None = None) -> None:
        """Add one batch of `who`'s predictions (and relevance maps for the predicted class, if any: `maps`
        normalised, `raw` signed; the share of positive raw relevance on the concept pixels needs `raw`)."""
        metrics = self.metrics[f"{split}_{who}"]
        labels = batch["label"]
        labelled = labels >= 0
        self.labelled[f"{split}_{who}"].update(labelled.sum().to(torch.float32))
        if labelled.any():
            y = labels[labelled]
            ranks = (self.scorers[split] or plain_rank)(logits[labelled], y)
            metrics["acc"].update(ranks)
            if "class_split" in batch:
                kind = batch["class_split"][labelled]
                for value, name in CLASS_SPLITS.items():
                    if (kind == value).any():
                        metrics[f"acc_{name}"].update(ranks[kind == value])
            if "groups" in metrics and "group" in batch:
                hit_labels = torch.where(ranks == 0, y, torch.full_like(y, -1))  # the protocol's top-1 hit
                metrics["groups"].update(hit_labels, y, batch["group"][labelled])
        if maps is not None and "object" in (batch.get("masks") or {}):
            metrics["align"].update(maps, batch["masks"]["object"])
            self.used_alignment[split] = True
        share_kind = next((k for k in ("concept", "object") if k in (batch.get("masks") or {})), None)
        if raw is not None and share_kind is not None:
            metrics["share"].update(raw, batch["masks"][share_kind])
            self.used_share[split] = True
        if who == MODELS[-1]:
            self.images[split].update(torch.tensor(float(labels.numel()), device=labels.device))

    def update_interventions(self, split: int, who: str, batch: dict[str, Any],
                             logits: dict[str, Tensor]) -> None:
        """Add `who`'s logits on the intervened images of one batch, `{intervention: (B, C)}` (any subset of
        `concepts_removed`, `background_swapped`), scored by the split's protocol like `acc1`. `bg_follow`
        counts the swapped images whose protocol top-1 is the donor's label (`batch["donor_label"]`), over the
        labelled images whose donor has another label."""
        metrics = self.metrics[f"{split}_{who}"]
        labels = batch["label"]
        labelled = labels >= 0
        score = self.scorers[split] or plain_rank
        for name, view_logits in logits.items():
            if name not in INTERVENTIONS:
                raise KeyError(f"unknown intervention {name!r}; expected one of {', '.join(INTERVENTIONS)}")
            if view_logits.shape[0] != labels.shape[0]:
                raise ValueError(f"{name}: {view_logits.shape[0]} logits for a batch of {labels.shape[0]} images")
            if labelled.any():
                metrics[name].update(score(view_logits[labelled], labels[labelled]))
            if name == "background_swapped":
                donor = batch["donor_label"].to(labels.device)
                differs = labelled & (donor >= 0) & (donor != labels)
                if differs.any():
                    metrics["bg_follow"].update(score(view_logits[differs], donor[differs]))

    def results(self) -> dict[str, Any]:
        """{split: {"num_images", "metrics": {name: {original, fine_tuned, delta}}, "groups": {...}}}."""
        out: dict[str, Any] = {}
        for split, name in enumerate(self.split_names):
            values: dict[str, dict[str, float]] = {}
            groups: dict[str, dict[str, float | int]] = {}
            for who in MODELS:
                metrics = self.metrics[f"{split}_{who}"]
                # every rank runs the same computes (each one is a collective under DDP)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    labelled = int(self.labelled[f"{split}_{who}"].compute())
                    acc = metrics["acc"].compute()
                    split_acc = {kind: metrics[f"acc_{kind}"].compute() for kind in CLASS_SPLITS.values()}  # NaN: none
                    g = metrics["groups"].compute() if "groups" in metrics else None
                    align = metrics["align"].compute() if self.used_alignment[split] else None
                    share = metrics["share"].compute() if self.used_share[split] else None
                    reliance = {key: float(metrics[name].compute()["acc1"])
                                for name, key in INTERVENTION_METRICS.items()}
                if labelled > 0:
                    for key, value in acc.items():
                        values.setdefault(key, {})[who] = float(value)
                    for kind, part in split_acc.items():
                        for key, value in part.items():
                            if not math.isnan(float(value)):
                                values.setdefault(f"{key}_{kind}", {})[who] = float(value)
                if labelled > 0 and g is not None and int(g["group_count"].sum()) > 0:
                    values.setdefault("worst_group_acc", {})[who] = float(g["worst_group_acc"])
                    values.setdefault("mean_group_acc", {})[who] = float(g["mean_group_acc"])
                    for gid, (acc_g, count) in enumerate(zip(g["group_acc"].tolist(), g["group_count"].tolist())):
                        if count:
                            entry = groups.setdefault(self.group_names.get(gid, str(gid)), {"count": int(count)})
                            entry[who] = float(acc_g)
                if align is not None and not math.isnan(align["pixel_acc"]):
                    for key, value in align.items():
                        values.setdefault(key, {})[who] = float(value)
                if share is not None and not math.isnan(share["concept_share"]):
                    for key, value in share.items():
                        values.setdefault(key, {})[who] = value
                for key, value in reliance.items():  # NaN (no key) where nothing was intervened
                    if not math.isnan(value):
                        values.setdefault(key, {})[who] = value
            for entry in values.values():
                if "original" in entry and "fine_tuned" in entry:
                    entry["delta"] = entry["fine_tuned"] - entry["original"]
            out[name] = {"num_images": int(self.images[split].compute()), "metrics": values, "groups": groups}
        return out

    def reset(self) -> None:
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()
        for count in (*self.images, *self.labelled.values()):
            count.reset()
        self.used_alignment = [False] * len(self.split_names)
        self.used_share = [False] * len(self.split_names)


def predicted_class_maps(relevance: Any, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, normalised maps, raw signed maps) for the predicted class from one pass, detached (Table 3
    protocol)."""
    with torch.enable_grad():
        rel = relevance(model, images, None, differentiable=False)
    return rel.logits.detach(), rel.maps.detach(), rel.raw.detach()
