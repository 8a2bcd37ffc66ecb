"""`cft masks generate` as `Trainer.predict`: every rank grounds its own share of the images (Lightning's
predict sampler gives each image to exactly one rank), writes their masks atomically and logs what it wrote
to `<store>/logs/rank_<r>.jsonl`; images whose masks exist are skipped, so a killed run resumes.
`trainer.devices` / `trainer.num_nodes` scale it out with DDP like any other Lightning job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from cft_lightning.data.mask_store import MaskStore
from cft_lightning.masks.generate import ground_and_write

__all__ = ["MaskGeneration", "generation_loader"]


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.items[index]


def _as_list(batch: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(batch)


def generation_loader(images: dict[str, list[str]], batch_size: int = 8) -> torch.utils.data.DataLoader:
    """(class, rel path) pairs in a stable order, batched as lists."""
    items = sorted((cls, rel) for cls, rels in images.items() for rel in rels)
    return torch.utils.data.DataLoader(_Items(items), batch_size=batch_size, shuffle=False, collate_fn=_as_list)


class MaskGeneration(L.LightningModule):
    """Grounds and writes masks in `predict_step`; the grounder's models (if `nn.Module`s) follow the device."""

    def __init__(self, grounder: Any, bank: dict[str, list[str]], store: str | os.PathLike[str],
                 class_names: dict[str, str] | None = None) -> None:
        super().__init__()
        self.grounder = grounder
        self.models = nn.ModuleList(m for m in vars(grounder).values() if isinstance(m, nn.Module))
        self.bank = bank
        self.store_root = Path(store)
        self.class_names = class_names or {}

    def on_predict_start(self) -> None:
        if hasattr(self.grounder, "device"):
            self.grounder.device = self.device
        self._log = self.store_root / "logs" / f"rank_{self.global_rank}.jsonl"
        self._log.parent.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: list[tuple[str, str]], batch_idx: int) -> list[dict[str, Any]]:
        store = MaskStore(self.store_root)
        records = []
        for cls, rel in batch:
            record = ground_and_write(store, self.grounder, rel, self.class_names.get(cls, cls), self.bank.get(cls, []))
            with open(self._log, "a", encoding="utf-8") as fh:  # per image: a crash loses no record
                fh.write(json.dumps({**record, "rank": self.global_rank}) + "\n")
            records.append(record)
        return records
