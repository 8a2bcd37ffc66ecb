"""Callbacks: `PredictionWriter` (added by `cft predict` on its own) and `RelevanceOverlays` (opt-in).

`PredictionWriter`: `cft predict` writes what it predicted, one CSV row per image, into the run's log
directory (`predictions.csv`; under DDP one `predictions-rank<r>.csv` per process, since each rank sees a
different shard of the images).

`RelevanceOverlays`: every N training steps, the relevance maps of a few images of the batch for the
Original and the fine-tuned model (each row: the true class, each model's prediction; a colour bar), written as
`<log_dir>/overlays/step_<n>.png` and logged as an image to W&B or TensorBoard:

    trainer:
      callbacks:
        - class_path: cft_lightning.callbacks.RelevanceOverlays
          init_args: {every_n_steps: 200, num_images: 4}
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_warn

from cft_lightning.tracking import run_dir

__all__ = ["PredictionWriter", "RelevanceOverlays"]

FIELDS = ("path", "label", "pred", "prob", "ref_pred", "ref_prob")


class PredictionWriter(BasePredictionWriter):
    """Writes `path, label, pred, prob, ref_pred, ref_prob` per image (label -1: unlabelled; ref_* empty
    without a reference model), batch by batch, so an interrupted run keeps what it predicted."""

    def __init__(self, output_dir: str | None = None, class_names: list[str] | None = None) -> None:
        """
        Args:
            output_dir: where the CSV goes (default: the run's log directory).
            class_names: if given, `pred`/`ref_pred` columns also get a `*_name` column.
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.class_names = class_names
        self.path: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        directory = self.output_dir or run_dir(trainer)  # every rank asks (broadcast)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, name)
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerow(self._header())

    def _header(self) -> list[str]:
        if not self.class_names:
            return list(FIELDS)
        return [*FIELDS[:3], "pred_name", *FIELDS[3:5], "ref_pred_name", FIELDS[5]]

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.path is None:
            return
        probs = prediction["logits"].float().softmax(dim=1)
        prob, pred = probs.max(dim=1)
        ref_pred = prediction.get("ref_pred")
        ref_prob = prediction.get("ref_prob")
        labels = batch.get("label", torch.full_like(pred, -1))
        rows = []
        for i, path in enumerate(prediction.get("path") or batch.get("path") or []):
            row: list[Any] = [path, int(labels[i]), int(pred[i])]
            if self.class_names:
                row.append(self.class_names[int(pred[i])] if int(pred[i]) < len(self.class_names) else "")
            row.append(f"{float(prob[i]):.6f}")
            row.append("" if ref_pred is None else int(ref_pred[i]))
            if self.class_names:
                ok = ref_pred is not None and int(ref_pred[i]) < len(self.class_names)
                row.append(self.class_names[int(ref_pred[i])] if ok else "")
            row.append("" if ref_prob is None else f"{float(ref_prob[i]):.6f}")
            rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerows(rows)


class RelevanceOverlays(Callback):
    """Relevance overlays of the training batch every `every_n_steps` steps (rank 0; the model's own relevance
    method, in eval mode for the picture, so dropout does not blur it)."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 4) -> None:
        if every_n_steps < 1 or num_images < 1:
            raise ValueError("RelevanceOverlays: every_n_steps and num_images must be >= 1")
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.written: list[str] = []
        self._warned = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        directory = run_dir(trainer)  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return
        relevance = getattr(pl_module, "relevance", None)
        if relevance is None:
            if not self._warned:
                rank_zero_warn("RelevanceOverlays: the model has no relevance method (model.relevance); no overlays")
                self._warned = True
            return
        from cft_lightning.evaluation.overlays import explain_models, save_overlays
        from cft_lightning.evaluation.test_plan import plan_of
        from cft_lightning.models.backbone import resolve_data_config
        from cft_lightning.tracking import log_images

        plan = plan_of(trainer.datamodule)  # the data's class names and normalisation
        config = plan.data_config if plan is not None and plan.data_config is not None else \
            resolve_data_config(pl_module.backbone)
        images = batch["image"][: self.num_images].detach()
        labels = batch["label"][: self.num_images]
        models = {"original": getattr(pl_module, "reference", None), "fine_tuned": pl_module.backbone}
        explained = explain_models(models, relevance, images, labels)
        path = save_overlays(Path(directory) / "overlays" / f"step_{step:06d}.png", images, config, explained,
                             class_names=None if plan is None else plan.class_names, labels=labels)
        self.written.append(str(path))
        from PIL import Image

        log_images(trainer, "train/relevance", [np.asarray(Image.open(path).convert("RGB"))], step=step)
