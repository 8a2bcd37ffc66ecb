"""What `GuidanceDataModule` records in the run's folder (its log dir): the class split it drew
(`fine_tuning_classes.json`) and the files its folder scans skipped (`skipped_files.txt`).

Both go to the trainer's log dir, on rank 0; without a trainer nothing is written and the skipped files are
only named in the warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from cft_lightning.data.image_folder import scan_image_folder
from cft_lightning.data.image_io import skipped_summary

__all__ = ["SELECTION_FILE", "SKIPPED_FILE", "RunFiles"]

SELECTION_FILE = "fine_tuning_classes.json"
SKIPPED_FILE = "skipped_files.txt"


class RunFiles:
    """Mixin of `GuidanceDataModule`: expects `trainer`, `seed`, `root`, `images_per_class`, `class_fraction`,
    `selection`, `train_dataset`, and the `skipped_files` list and `_reported_skips` count it keeps."""

    trainer: Any
    seed: int
    root: str
    images_per_class: int | None
    class_fraction: float
    selection: Any
    train_dataset: Any
    skipped_files: list[str]
    _reported_skips: int

    def _scan(self, root: str, allow_flat: bool = False) -> dict[str, list[str]]:
        """`scan_image_folder`, collecting the files it skips (joined to ``root``) for `_report_skipped`."""
        skipped: list[str] = []
        images = scan_image_folder(root, allow_flat=allow_flat, skipped=skipped)
        known = set(self.skipped_files)
        self.skipped_files += [p for p in (str(Path(root, rel)) for rel in skipped) if p not in known]
        return images

    def _report_skipped(self) -> None:
        """One warning for the files skipped since the last report (count, first few), and the full list of the
        module's skipped files in the run's log dir (`skipped_files.txt`, one path a line; rank 0)."""
        new = self.skipped_files[self._reported_skips:]
        if not new:
            return
        self._reported_skips = len(self.skipped_files)
        log_dir = self._run_log_dir()
        full = None
        if log_dir is not None:
            full = str(Path(log_dir, SKIPPED_FILE))
            os.makedirs(log_dir, exist_ok=True)
            Path(full).write_text("".join(f"{p}\n" for p in self.skipped_files), encoding="utf-8")
        rank_zero_warn(skipped_summary("the data folders", new, full))

    def _run_log_dir(self) -> str | None:
        """The run's log dir on rank 0, None on other ranks or without a trainer (every rank must call it)."""
        trainer = self.trainer
        if trainer is None:
            return None
        from cft_lightning.tracking import run_dir

        log_dir = run_dir(trainer)  # the run folder (docs/tracking.md); a broadcast: every rank must ask
        return log_dir if log_dir and trainer.is_global_zero else None

    def _write_selection(self) -> None:
        """Record the class split in the run's log dir (rank 0), so a run can be reproduced and audited."""
        log_dir = self._run_log_dir()
        if log_dir is None:
            return
        selection = self.selection
        record = {
            "seed": self.seed,
            "root": str(Path(self.root).resolve()),
            "images_per_class": self.images_per_class,
            "class_fraction": self.class_fraction,
            "fine_tuning_classes": selection.fine_tuning_classes,
            "held_out_classes": selection.held_out_classes,
            "train_images": [s.path for s in self.train_dataset.samples] if self.train_dataset else [],
        }
        os.makedirs(log_dir, exist_ok=True)
        Path(log_dir, SELECTION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
