"""`cft critique` as two `Trainer.predict` passes, distributed like `cft masks generate`.

1. `EntropyScoring`: every rank scores its share of the training images and appends {image: entropy} to
   `<store>/critique/entropy/rank_<r>.jsonl`; after a barrier every rank reads all of them and takes the
   same N lowest (`sampling.lowest_entropy`).
2. `CritiqueGeneration`: every rank critiques its share of those N: attribution on the model's view,
   PPEPS-WGM segments, critic and judge, then the corrective mask A (the union of the spurious segments),
   drawn back to the image's own resolution and written atomically as mask kind `critic` (all zero when no
   segment is spurious: the image still belongs to the alignment set). The record (segments' shares,
   verdicts, the critic's reasoning, the judge's answer) goes to `<store>/critique/records/rank_<r>.jsonl`
   and the segment map and overlay to `<store>/critique/views/`. An image whose critic mask exists is
   skipped, so a killed run resumes without duplicates; an image whose critique failed (endpoint down,
   refusals, malformed verdicts after the retries) gets no mask and is recorded as failed: a rerun retries
   it (answers already obtained come from the cache).
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from cft_lightning._io import atomic_write
from cft_lightning.critique.attribution import Attributor
from cft_lightning.critique.critic import Critic, CritiqueSample, describe
from cft_lightning.critique.ppeps import effect_mass, ppeps_segments
from cft_lightning.critique.sampling import entropies_by_key
from cft_lightning.critique.views import overlay, segment_map, to_original
from cft_lightning.data.image_folder import load_image
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.transforms import JointTransform
from cft_lightning.errors import ChatError, ChatUnavailable

__all__ = ["CritiqueGeneration", "EntropyScoring", "ImageItems", "read_jsonl"]

KIND = "critic"


class ImageItems(torch.utils.data.Dataset):
    """(key, label index) items as model-ready tensors on the eval view, with the image's size and, when
    `truth` (store, kind) is given, the ground-truth mask on the same view (for the oracle critic)."""

    def __init__(self, root: str | os.PathLike[str], items: list[tuple[str, int]], transform: JointTransform,
                 truth: tuple[MaskStore, str] | None = None) -> None:
        self.root, self.items, self.transform, self.truth = Path(root), items, transform, truth

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, label = self.items[index]
        image = load_image(self.root / key)
        masks = {}
        if self.truth is not None:
            store, kind = self.truth
            masks[kind] = store.read(key, kind)
        tensor, tmasks = self.transform(image, masks)
        out = {"image": tensor, "label": label, "key": key, "size": torch.tensor([image.height, image.width])}
        if self.truth is not None:
            out["truth"] = tmasks[self.truth[1]] > 0.5
        return out


def read_jsonl(folder: Path) -> list[dict[str, Any]]:
    """Every record of every rank's JSONL file in `folder` (a torn last line of a killed run is skipped)."""
    records = []
    for path in sorted(folder.glob("rank_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class _Stage(L.LightningModule):
    def __init__(self, model: nn.Module, store: str | os.PathLike[str], folder: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.store_root = Path(store)
        self.folder = folder

    def on_predict_start(self) -> None:
        self._log = self.store_root / "critique" / self.folder / f"rank_{self.global_rank}.jsonl"
        self._log.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, records: list[dict[str, Any]]) -> None:
        with open(self._log, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))


class EntropyScoring(_Stage):
    """Predictive entropy of every image (no gradients); records go to `critique/entropy/`."""

    def __init__(self, model: nn.Module, store: str | os.PathLike[str]) -> None:
        super().__init__(model, store, "entropy")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.inference_mode():
            logits = self.model(batch["image"])
        entropy = entropies_by_key(batch["key"], logits)
        pred = logits.argmax(dim=1).tolist()
        self._append([{"image": k, "entropy": e, "prediction": p} for (k, e), p in zip(entropy.items(), pred)])


class CritiqueGeneration(_Stage):
    """Attribute, segment, critique and write the corrective masks of a batch of alignment images."""

    def __init__(self, model: nn.Module, attributor: Attributor, critic: Critic, store: str | os.PathLike[str],
                 class_ids: list[str], descriptions: dict[str, str], class_names: dict[str, str] | None = None,
                 segments: int = 4, target: str = "label", mean: tuple[float, ...] = (0.5,) * 3,
                 std: tuple[float, ...] = (0.5,) * 3, data_config: Any = None, seed: int = 0,
                 write_views: bool = True, concurrency: int = 4) -> None:
        super().__init__(model, store, "records")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if target not in ("label", "prediction"):
            raise ValueError(f"target must be 'label' or 'prediction', got {target!r}")
        self.attributor, self.critic = attributor, critic
        self.class_ids, self.descriptions = class_ids, descriptions
        self.class_names = class_names or {}
        self.segments, self.target, self.seed = segments, target, seed
        self.mean, self.std, self.data_config = mean, std, data_config
        self.write_views, self.concurrency = write_views, concurrency

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._lock = threading.Lock()  # made here, in each process: a lock does not pickle (ddp_spawn)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        store = MaskStore(self.store_root)
        todo = [i for i, key in enumerate(batch["key"]) if not store.has(key, KIND)]
        if not todo:
            return []
        images, labels = batch["image"][todo], batch["label"][todo]
        with torch.inference_mode():
            logits = self.model(images)
        targets = labels if self.target == "label" else logits.argmax(dim=1)
        attribution = self.attributor(self.model, images, targets).cpu().numpy()
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        views = ((images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        def critique(n: int) -> dict[str, Any]:
            i = todo[n]
            record = self._one(store, batch, i, views[n], attribution[n], int(labels[n]),
                               int(logits[n].argmax()), int(targets[n]))
            with self._lock:  # per image, right after its mask: a kill loses no record of a written mask
                self._append([record])
            return record

        if self.concurrency == 1 or len(todo) == 1:
            return [critique(n) for n in range(len(todo))]
        # the critic's requests wait on the network: `concurrency` images of the batch are critiqued at once
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
            return list(pool.map(critique, range(len(todo))))

    def _one(self, store: MaskStore, batch: dict[str, Any], i: int, view: np.ndarray, attribution: np.ndarray,
             label: int, prediction: int, target: int) -> dict[str, Any]:
        key = batch["key"][i]
        cls = self.class_ids[label]
        record: dict[str, Any] = {"image": key, "label": cls, "prediction": self.class_ids[prediction],
                                  "explained": self.class_ids[target], "critic": self.critic.name,
                                  "rank": self.global_rank}
        mass = effect_mass(attribution)
        if (mass > 0).sum() < self.segments:
            record.update(status="failed", error="the attribution has no positive effect to segment")
            return record
        segments, shares, gmm = ppeps_segments(attribution, self.segments, seed=self.seed)
        truth = batch["truth"][i].cpu().numpy() if "truth" in batch else None
        sample = CritiqueSample(key, cls, self.class_names.get(cls, cls), describe(self.descriptions, cls),
                                view, segments, shares, mass, truth)
        try:
            verdicts = self.critic(sample)
        except ChatUnavailable:  # no later image would fare better: stop the run
            raise
        except ChatError as exc:
            record.update(status="failed", error=str(exc), shares=shares.round(4).tolist())
            return record
        spurious = np.array(verdicts.spurious, dtype=bool)
        view_mask = spurious[segments] if spurious.any() else np.zeros_like(segments, dtype=bool)
        original = to_original(np.where(view_mask, 1, 0), tuple(batch["size"][i].tolist()), self.data_config) == 1
        if self.write_views:
            self._write_views(key, view, segments, view_mask)
        store.write(key, KIND, original)  # the mask marks the image as done: written after everything else
        record.update(status="ok", shares=shares.round(4).tolist(), mixture_weights=gmm.weights.round(4).tolist(),
                      spurious=verdicts.spurious, spurious_share=float(shares[spurious].sum()),
                      mask_fraction=float(original.mean()), reasoning=verdicts.reasoning, judge=verdicts.judge,
                      notes=verdicts.notes)
        return record

    def _write_views(self, key: str, view: np.ndarray, segments: np.ndarray, mask: np.ndarray) -> None:
        from PIL import Image

        folder = self.store_root / "critique" / "views"
        panels = [Image.fromarray(view), segment_map(segments), overlay(view, segments),
                  Image.fromarray(np.where(mask[..., None], view // 3 + np.uint8(170), view))]
        sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
        x = 0
        for panel in panels:
            sheet.paste(panel, (x, 0))
            x += panel.width
        import io

        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        data = buffer.getvalue()
        atomic_write(folder / Path(key).with_suffix(".png"), lambda fh: fh.write(data))
