"""Callbacks the `cft` command adds on its own.

`PredictionWriter`: `cft predict` writes what it predicted, one CSV row per image, into the run's log
directory (`predictions.csv`; under DDP one `predictions-rank<r>.csv` per process, since each rank sees a
different shard of the images).
"""

from __future__ import annotations

import csv
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]

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
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir  # every rank asks (broadcast)
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
