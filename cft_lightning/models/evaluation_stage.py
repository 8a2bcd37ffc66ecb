"""`cft test` inside `GuidedFineTuner`: both models on every test split, the Evaluator's metrics, the results
files and pictures (a mixin, so the training module stays about training). Batches with background-swap donors
(`data.interventions`) are also scored on their intervened images (`evaluation.interventions`)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cft_lightning.errors import DataError
from cft_lightning.evaluation.evaluator import Evaluator, predicted_class_maps
from cft_lightning.evaluation.interventions import intervene
from cft_lightning.evaluation.report import print_table, write_results
from cft_lightning.models.backbone import resolve_data_config
from cft_lightning.tracking import log_results, run_dir

__all__ = ["OVERLAY_IMAGES", "EvaluationStage"]

OVERLAY_IMAGES = 6  # test images drawn in overlays.png


class EvaluationStage:
    """The test hooks of `GuidedFineTuner` (which provides backbone, _reference, relevance, regularizer,
    backbone_spec, num_classes, log and trainer)."""

    def on_test_start(self) -> None:
        loaders = self.trainer.test_dataloaders
        n_loaders = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        datamodule = getattr(self.trainer, "datamodule", None)
        splits = list(getattr(datamodule, "test_split_names", None) or [])
        if len(splits) != n_loaders:
            splits = ["test"] if n_loaders == 1 else [f"test_{i}" for i in range(n_loaders)]
        groups = dict(getattr(datamodule, "group_names", None) or {})
        scorers = list(getattr(datamodule, "test_scorers", None) or [])
        scorers = scorers if len(scorers) == len(splits) else None
        self.evaluator = Evaluator(splits, self.num_classes, groups, scorers).to(self.device)
        self._alignment = self.relevance is not None and not torch.is_inference_mode_enabled()
        if self.relevance is not None and not self._alignment:
            rank_zero_warn(
                "test runs under inference mode: relevance alignment is skipped; "
                "set trainer.inference_mode: false to measure it"
            )

    def _explain_or_forward(self, model: nn.Module, batch: dict[str, Any]
                            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(logits, normalised maps, raw maps); the maps only where the batch has object or concept masks."""
        if self._alignment and {"object", "concept"} & set(batch.get("masks") or {}):
            return predicted_class_maps(self.relevance, model, batch["image"])
        if model is self._reference:
            with torch.inference_mode():
                logits = model(batch["image"])
            return logits.clone(), None, None
        return model(batch["image"]), None, None

    def _forward_without_grad(self, model: nn.Module, images: Tensor) -> Tensor:
        """Logits without autograd: the reference under inference mode, the trainable model under no_grad (test
        may run with `inference_mode: false`)."""
        if model is self._reference:
            with torch.inference_mode():
                return model(images).clone()
        with torch.no_grad():
            return model(images)

    def _intervened_views(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int) -> dict[str, Tensor]:
        """The batch's intervened images (none without donors), computed once for both models."""
        try:
            with torch.no_grad():
                return intervene(batch)
        except ValueError as exc:
            split = self.evaluator.split_names[dataloader_idx]
            raise ValueError(f"cft test, split {split!r}, batch {batch_idx}: {exc}") from exc

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:  # a few images of the first split for `overlays.png`
            self._overlay_images = batch["image"][:OVERLAY_IMAGES].detach().cpu()
            self._overlay_labels = batch["label"][:OVERLAY_IMAGES].detach().cpu() if "label" in batch else None
        views = self._intervened_views(batch, batch_idx, dataloader_idx)
        models = [("fine_tuned", self.backbone)]
        if self._reference is not None:
            models.append(("original", self._reference))
        for who, model in models:
            logits, maps, raw = self._explain_or_forward(model, batch)
            self.evaluator.update(dataloader_idx, who, logits, batch, maps, raw)
            if views:
                view_logits = {name: self._forward_without_grad(model, images) for name, images in views.items()}
                self.evaluator.update_interventions(dataloader_idx, who, batch, view_logits)

    def on_test_epoch_end(self) -> None:
        results = self.evaluator.results()  # synced across ranks by torchmetrics
        self.test_results = results
        single = len(results) == 1
        for split, data in results.items():
            prefix = "test/" if single else f"test/{split}/"
            for metric, entry in data["metrics"].items():
                for who, key in (("fine_tuned", metric), ("original", f"ref_{metric}")):
                    if who in entry:
                        self.log(f"{prefix}{key}", entry[who], batch_size=max(data["num_images"], 1),
                                 sync_dist=True)  # already synced: the same value on every rank
        directory = run_dir(self.trainer)  # a broadcast: every rank asks
        if not self.trainer.is_global_zero:
            return
        run = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": getattr(self.trainer, "ckpt_path", None),
            "backbone": self.backbone_spec.name,
            "regularizer": f"{type(self.regularizer).__module__}.{type(self.regularizer).__qualname__}",
            "relevance": None if self.relevance is None else f"{type(self.relevance).__module__}."
            f"{type(self.relevance).__qualname__}",
        }
        payload = {"run": run, "splits": results}
        self.results_paths = write_results(payload, directory)
        pictures = self._test_pictures(payload, directory)
        self.results_paths.update(pictures)
        print_table(payload, title=f"cft test: {self.backbone_spec.name} (values x100)")
        log_results(self.trainer, payload, pictures)

    def _overlay_class_names(self) -> tuple[list[str] | None, list[str] | None]:
        """(names of the first test split's labels, names of the model's outputs) for `overlays.png`: a benchmark
        split labels by its own class list (e.g. ImageNet-R's 200), the model outputs the datamodule's classes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        try:
            outputs = list(getattr(datamodule, "class_names", None) or []) or None
        except DataError:  # no class list to name them by: indices are shown
            outputs = None
        scorers = list(getattr(datamodule, "test_scorers", None) or [])
        benchmark = getattr(scorers[0], "__self__", None) if scorers else None
        return list(getattr(benchmark, "class_names", None) or []) or outputs, outputs

    def _test_pictures(self, payload: dict[str, Any], directory: str) -> dict[str, str]:
        """`results.png` (accuracy bars with deltas) and, when relevance can run, `overlays.png` (Original vs
        fine-tuned maps of the first test images)."""
        from cft_lightning.evaluation.plots import class_labels, denormalize, overlay_grid, results_chart

        pictures: dict[str, str] = {}
        chart = results_chart(payload, Path(directory) / "results.png", metrics=("acc1", "worst_group_acc"))
        if chart is not None:
            pictures["results_png"] = str(chart)
        images = self._overlay_images
        if images is not None and self.relevance is not None and not torch.is_inference_mode_enabled():
            models = {"original": self._reference, "fine_tuned": self.backbone}
            explained = {name: self.relevance(m, images.to(self.device), None, differentiable=False)
                         for name, m in models.items() if m is not None}
            maps = {name: rel.maps.cpu() for name, rel in explained.items()}
            label_names, output_names = self._overlay_class_names()
            labels = getattr(self, "_overlay_labels", None)
            datamodule = getattr(self.trainer, "datamodule", None)  # the images' own normalisation
            config = getattr(datamodule, "data_config", None) or resolve_data_config(self.backbone)
            path = overlay_grid(denormalize(images, config["mean"], config["std"]), None, maps,
                                Path(directory) / "overlays.png",
                                true_classes=None if labels is None else class_labels(labels, label_names),
                                predictions={name: class_labels(rel.logits.argmax(1).cpu(), output_names)
                                             for name, rel in explained.items()})
            pictures["overlays_png"] = str(path)
        return pictures

