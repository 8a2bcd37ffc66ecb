"""`Evaluation`: one `cft test` run of a fine-tuned model and its reference, built from a `TestPlan`.

`GuidedFineTuner` builds it in `on_test_start` from what it was handed (the data module's `TestPlan`, see
`test_plan.py`; the default plan without one) and the models it evaluates, then forwards its test hooks: both
models on every split, the `Evaluator`'s metrics, the results files and the pictures. Batches with
background-swap donors (`data.interventions`) are also scored on their intervened images
(`evaluation.interventions`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cft_lightning.evaluation.evaluator import Evaluator, predicted_class_maps
from cft_lightning.evaluation.interventions import intervene
from cft_lightning.evaluation.report import print_table, write_results
from cft_lightning.evaluation.test_plan import TestPlan
from cft_lightning.tracking import log_results, run_dir

if TYPE_CHECKING:
    import lightning as L

    from cft_lightning.relevance.base import RelevanceMethod

__all__ = ["OVERLAY_IMAGES", "Evaluation"]

OVERLAY_IMAGES = 6  # test images drawn in overlays.png


class Evaluation:
    """Scores `model` and `reference` (the Original; None: not tracked) on the splits of `plan`.

    Args:
        plan: the test splits, one per dataloader (`TestPlan.for_loaders`), the label space, the metadata groups
            and the data config.
        model: the fine-tuned network.
        reference: the frozen starting network, run under inference mode; None leaves the Original out.
        relevance: the relevance method for alignment and `overlays.png` (None: accuracy only, no overlays).
        num_classes: the size of the model's head.
        device: where the metric state lives (the model's device).
        data_config: the model's own data config, for pictures when the plan names none.
    """

    def __init__(self, plan: TestPlan, model: nn.Module, reference: nn.Module | None,
                 relevance: RelevanceMethod | None, num_classes: int, device: torch.device | str,
                 data_config: dict[str, Any]) -> None:
        self.plan, self.model, self.reference, self.relevance = plan, model, reference, relevance
        self.data_config = dict(plan.data_config or data_config)
        self.evaluator = Evaluator(plan.split_names, num_classes, dict(plan.group_names),
                                   [s.scorer for s in plan.splits]).to(device)
        self.alignment = relevance is not None and not torch.is_inference_mode_enabled()
        if relevance is not None and not self.alignment:
            rank_zero_warn("test runs under inference mode: relevance alignment is skipped; "
                           "set trainer.inference_mode: false to measure it")
        self.overlay_images: Tensor | None = None
        self.overlay_labels: Tensor | None = None

    @property
    def models(self) -> list[tuple[str, nn.Module]]:
        """(results key, network) of each model evaluated."""
        return [("fine_tuned", self.model), *([("original", self.reference)] if self.reference is not None else [])]

    def _explain_or_forward(self, model: nn.Module, batch: dict[str, Any]
                            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(logits, normalised maps, raw maps); the maps only where the batch has object or concept masks."""
        if self.alignment and {"object", "concept"} & set(batch.get("masks") or {}):
            return predicted_class_maps(self.relevance, model, batch["image"])
        if model is self.reference:
            with torch.inference_mode():
                logits = model(batch["image"])
            return logits.clone(), None, None
        return model(batch["image"]), None, None

    def _forward_without_grad(self, model: nn.Module, images: Tensor) -> Tensor:
        """Logits without autograd: the reference under inference mode, the trainable model under no_grad (test
        may run with `inference_mode: false`)."""
        if model is self.reference:
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

    def step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score one test batch of split `dataloader_idx` with every model."""
        if batch_idx == 0 and dataloader_idx == 0:  # a few images of the first split for `overlays.png`
            self.overlay_images = batch["image"][:OVERLAY_IMAGES].detach().cpu()
            self.overlay_labels = batch["label"][:OVERLAY_IMAGES].detach().cpu() if "label" in batch else None
        views = self._intervened_views(batch, batch_idx, dataloader_idx)
        for who, model in self.models:
            logits, maps, raw = self._explain_or_forward(model, batch)
            self.evaluator.update(dataloader_idx, who, logits, batch, maps, raw)
            if views:
                view_logits = {name: self._forward_without_grad(model, images) for name, images in views.items()}
                self.evaluator.update_interventions(dataloader_idx, who, batch, view_logits)

    def finish(self, trainer: L.Trainer, log: Callable[..., None], run: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, str] | None]:
        """Log the metrics (`log`: the module's `self.log`), then on rank 0 write the results files and pictures
        into the run folder and hand them to the loggers. `run`: the model's part of the results' `run` record.
        Returns (results per split, the files written; None on other ranks)."""
        results = self.evaluator.results()  # synced across ranks by torchmetrics
        single = len(results) == 1
        for split, data in results.items():
            prefix = "test/" if single else f"test/{split}/"
            for metric, entry in data["metrics"].items():
                for who, key in (("fine_tuned", metric), ("original", f"ref_{metric}")):
                    if who in entry:
                        log(f"{prefix}{key}", entry[who], batch_size=max(data["num_images"], 1),
                            sync_dist=True)  # already synced: the same value on every rank
        directory = run_dir(trainer)  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return results, None
        record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "checkpoint": trainer.ckpt_path, **run}
        payload = {"run": record, "splits": results}
        paths = write_results(payload, directory)
        pictures = self.pictures(payload, directory)
        paths.update(pictures)
        print_table(payload, title=f"cft test: {run['backbone']} (values x100)")
        log_results(trainer, payload, pictures)
        return results, paths

    def pictures(self, payload: dict[str, Any], directory: str | Path) -> dict[str, str]:
        """`results.png` (accuracy bars with deltas) and, when relevance can run, `overlays.png` (Original vs
        fine-tuned maps of the first test images, named by the first split's labels and the model's outputs)."""
        from cft_lightning.evaluation import overlays
        from cft_lightning.evaluation.plots import results_chart

        pictures: dict[str, str] = {}
        chart = results_chart(payload, Path(directory) / "results.png", metrics=("acc1", "worst_group_acc"))
        if chart is not None:
            pictures["results_png"] = str(chart)
        images = self.overlay_images
        if images is not None and self.relevance is not None and not torch.is_inference_mode_enabled():
            explained = overlays.explain_models({"original": self.reference, "fine_tuned": self.model},
                                                self.relevance, images)
            path = overlays.save_overlays(Path(directory) / "overlays.png", images, self.data_config, explained,
                                          class_names=self.plan.class_names, labels=self.overlay_labels,
                                          label_names=self.plan.first_label_names)
            pictures["overlays_png"] = str(path)
        return pictures
