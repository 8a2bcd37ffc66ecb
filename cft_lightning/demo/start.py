"""The demo's starting models: the "pretrained model with a shortcut" every method fine-tunes.

Two regimes (`DemoSettings.start`):

- `pretrained` (the default, the paper's regime): stage 1 trains the small ViT from scratch on *upstream*
  shortcut-parts images whose backgrounds carry no information (spurious rate 1/num_classes, generated with
  another seed, so no downstream image is seen), so it learns the parts, as an ImageNet model represents
  concepts; stage 2 continues on the biased training split (background = class 95 % of the time) until it
  leans on the background, as a pretrained model leans on context.
- `scratch`: one stage, trained from scratch on the biased split (the demo before issue 16): the model has
  almost no part features to re-weight.

Each stage is cached in `$CFT_CACHE/demo_models/<stage>-<recipe hash>.pth` beside a JSON record holding the
recipe, the file's size and sha256, and the model's profile (ID / OOD top-1 and how often it follows the
background). A record whose recipe differs, or weights whose size or hash do not match, mean the stage is
trained again: a cache file is never trusted on its name alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from cft_lightning._io import file_sha256
from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
from cft_lightning.benchmarks.shortcut_parts import default_cache_dir
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.data.image_folder import GuidanceDataset, build_samples, scan_image_folder
from cft_lightning.data.transforms import build_transforms
from cft_lightning.models import GuidedFineTuner
from cft_lightning.models.backbone import resolve_data_config
from cft_lightning.regularizers import PlainFineTuning

if TYPE_CHECKING:
    from cft_lightning.demo.settings import DemoSettings

__all__ = ["STARTS", "StartModel", "build_start", "demo_trainer", "profile", "stage_note", "torch_threads",
           "upstream_spec"]

STARTS = ("pretrained", "scratch")
RECIPE_VERSION = 1  # bump when the training code of a stage changes: older cache entries are retrained
UPSTREAM_SEED_OFFSET = 1000  # the upstream benchmark's generation seed, so its images differ from downstream's


class StartModel(dict):
    """{"weights": path, "stages": [record, ...]}: the starting model and how it was made (JSON-able)."""

    @property
    def weights(self) -> Path:
        return Path(self["weights"])


def upstream_spec(benchmark: ShortcutPartsSpec) -> ShortcutPartsSpec:
    """The stage-1 data: the same creatures and backgrounds, the background independent of the class."""
    return replace(benchmark, spurious_rate=1.0 / benchmark.num_classes, seed=benchmark.seed + UPSTREAM_SEED_OFFSET,
                   test_per_class=1)


_T0 = time.perf_counter()


def stage_note(message: str, progress: bool = False) -> None:
    """One line per stage on stderr, with the time since the command started, terminal or not: a long stage
    with no output looks hung, and a log file gets no progress bars. (`progress` is kept for callers; the
    line is printed either way.)"""
    print(f"cft demo: {message} [{time.perf_counter() - _T0:.0f} s]", file=sys.stderr, flush=True)


def _cache_dir() -> Path:
    return default_cache_dir() / "demo_models"


def _recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _cached(weights: Path, record: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record when `weights` is exactly what `recipe` made; None when anything is off."""
    try:
        stored = json.loads(record.read_text())
        size = weights.stat().st_size
    except (OSError, ValueError):
        return None
    if stored.get("recipe") != json.loads(json.dumps(recipe)) or stored.get("size") != size:
        return None
    if stored.get("sha256") != file_sha256(weights):
        return None
    return stored


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `count` inside, restored after (`DemoSettings.threads`)."""
    if count < 1:
        raise ValueError(f"cft demo: --threads must be >= 1, got {count}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def demo_trainer(settings: DemoSettings, root: Path, epochs: int, **kwargs: Any) -> L.Trainer:
    """The demo's CPU Trainer (both stages of the start model and every fine-tuning): CSV logs under `root`,
    no checkpoints, no sanity check, a progress bar when `settings.progress`."""
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, inference_mode=False, default_root_dir=str(root),
        logger=L.pytorch.loggers.CSVLogger(str(root), name="", version=""), enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=settings.progress, num_sanity_val_steps=0,
        log_every_n_steps=5, **kwargs,
    )


def _train(settings: DemoSettings, data: Path, seed: int, epochs: int, lr: float, init: Path | None,
           log_dir: Path) -> torch.nn.Module:
    L.seed_everything(seed, workers=True)
    model = GuidedFineTuner(settings.backbone(None if init is None else str(init)), PlainFineTuning(), None, lr=lr,
                            weight_decay=0.05, lr_step_size=0, track_reference=False)
    dm = GuidanceDataModule(str(data / "images" / "train"), mask_kinds=[], class_fraction=1.0, images_per_class=None,
                            val_root=str(data / "images" / "val"), batch_size=64, seed=seed)
    with torch_threads(settings.threads):
        demo_trainer(settings, log_dir, epochs).fit(model, dm)
    return model.backbone


def _split_loader(root: Path, model: torch.nn.Module) -> tuple[torch.utils.data.DataLoader, list]:
    images = scan_image_folder(root)
    samples = build_samples(images, sorted(images), None, str(root))
    transform = build_transforms(resolve_data_config(model))[1]
    return torch.utils.data.DataLoader(GuidanceDataset(root, samples, transform), batch_size=128), samples


@torch.inference_mode()
def _features(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logit features, logits) of every image."""
    feats, logits = [], []
    for batch in loader:
        f = model.forward_head(model.forward_features(batch["image"]), pre_logits=True)
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 num_classes: int, weight_decay: float = 1e-3) -> float:
    """Top-1 on `test` of a multinomial logistic regression fitted on frozen `train` features (full-batch L-BFGS
    on standardised features): how well the parts can still be read off a model's representation."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, xt = (train - mean) / std, (test - mean) / std
    with torch.enable_grad():
        probe = torch.nn.Linear(x.shape[1], num_classes)
        opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(x), train_labels)
            loss = loss + weight_decay * probe.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return float((probe(xt).argmax(1) == test_labels).float().mean())


def profile(model: torch.nn.Module, data: Path, upstream: Path, num_classes: int) -> dict[str, float]:
    """What the calibration criteria read off a model (docs/demo.md):

    - `test_id_acc1`, `test_ood_acc1`: top-1 on the benchmark in `data`;
    - `bg_follow`: the share of OOD images off their class's background that the model assigns to the
      background's class (chance: 1/num_classes);
    - `probe_ood_acc1`: OOD top-1 of a linear probe on the model's frozen pre-logit features, fitted on the
      background-balanced upstream training images in `upstream` (do the features still carry the parts?).
    """
    model = model.eval()
    with open(data / "metadata.csv", newline="") as fh:
        background = {(r["split"], r["image"]): int(r["group_id"]) % num_classes for r in csv.DictReader(fh)}
    out: dict[str, float] = {}
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, root in (("test_id", data / "images" / "test_id"), ("test_ood", data / "images" / "test_ood"),
                        ("upstream", upstream / "images" / "train")):
        loader, samples = _split_loader(root, model)
        f, logits = _features(model, loader)
        labels = torch.tensor([s.label for s in samples])
        feats[split] = (f, labels)
        if split == "upstream":
            continue
        preds = logits.argmax(dim=1)
        out[f"{split}_acc1"] = float((preds == labels).float().mean())
        if split == "test_ood":
            bg = torch.tensor([background[(split, s.path)] for s in samples])
            off = bg != labels
            out["bg_follow"] = float((preds[off] == bg[off]).float().mean()) if off.any() else float("nan")
    out["probe_ood_acc1"] = linear_probe(*feats["upstream"], *feats["test_ood"], num_classes)
    return out


def _stage(settings: DemoSettings, name: str, recipe: dict[str, Any], train_data: Path, eval_data: Path,
           upstream: Path, seed: int, epochs: int, lr: float, init: Path | None, log_dir: Path) -> dict[str, Any]:
    """Train one stage (or reuse its cache entry) and return its record."""
    cache = _cache_dir()
    stem = f"{name}-{_recipe_key(recipe)}"
    weights, record_path = cache / f"{stem}.pth", cache / f"{stem}.json"
    stored = _cached(weights, record_path, recipe)
    if stored is not None:
        stage_note(f"seed {seed}: {name} model from the cache ({weights.name})", settings.progress)
        return {**stored, "weights": str(weights), "cached": True}
    stage_note(f"seed {seed}: training the {name} model ({epochs} epochs)", settings.progress)
    start = time.perf_counter()
    model = _train(settings, train_data, seed, epochs, lr, init, log_dir / name)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)  # until the new weights are complete, the entry reads as absent
    tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    record = {"recipe": recipe, "size": weights.stat().st_size, "sha256": file_sha256(weights),
              "train_seconds": round(seconds, 1),
              "profile": profile(model, eval_data, upstream, settings.benchmark.num_classes)}
    tmp_record = record_path.with_name(f"{record_path.name}.{os.getpid()}.tmp")
    tmp_record.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_record, record_path)
    return {**record, "weights": str(weights), "cached": False}


def build_start(settings: DemoSettings, data: Path, seed: int, out: Path) -> StartModel:
    """The starting model of `seed` (trained, or reused from the cache), recorded in `out/start.json`."""
    if settings.start not in STARTS:
        raise ValueError(f"cft demo: start must be one of {STARTS}, got {settings.start!r}")
    base = {"version": RECIPE_VERSION, "seed": seed, "backbone": asdict(settings.backbone(None)),
            "batch_size": 64, "weight_decay": 0.05}
    if settings.threads != 1:  # another thread count trains another model (DemoSettings.threads)
        base["threads"] = settings.threads
    stages = []
    upstream = upstream_spec(settings.benchmark)
    up_data = build_shortcut_parts(None, upstream, progress=settings.progress)
    if settings.start == "scratch":
        recipe = {**base, "stage": "scratch", "data": asdict(settings.benchmark),
                  "epochs": settings.scratch_epochs, "lr": settings.pretrain_lr}
        stages.append(_stage(settings, "scratch", recipe, data, data, up_data, seed, settings.scratch_epochs,
                             settings.pretrain_lr, None, out / "start"))
    else:
        recipe = {**base, "stage": "parts", "data": asdict(upstream), "epochs": settings.pretrain_epochs,
                  "lr": settings.pretrain_lr}
        parts = _stage(settings, "parts", recipe, up_data, data, up_data, seed, settings.pretrain_epochs,
                       settings.pretrain_lr, None, out / "start")
        recipe = {**base, "stage": "shortcut", "data": asdict(settings.benchmark), "init": parts["sha256"],
                  "epochs": settings.shortcut_epochs, "lr": settings.shortcut_lr}
        shortcut = _stage(settings, "shortcut", recipe, data, data, up_data, seed, settings.shortcut_epochs,
                          settings.shortcut_lr, Path(parts["weights"]), out / "start")
        stages += [parts, shortcut]
    start = StartModel(weights=stages[-1]["weights"], start=settings.start, stages=stages)
    out.mkdir(parents=True, exist_ok=True)
    (out / "start.json").write_text(json.dumps(start, indent=2) + "\n")
    return start

