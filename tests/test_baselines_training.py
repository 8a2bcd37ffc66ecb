"""The baselines inside the training loop: a few steps on a tiny ViT without NaN, the weights move, every
loss term is logged; and LVLM-VA's alignment-set mixing (sampler, data module, start-up check)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cft_lightning.data.alignment import AlignmentMixSampler, alignment_slots
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.errors import DataError
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import RRDA, RRR, GradMask, LVLMCritic, RobustViT
from cft_lightning.relevance import GradientRollout
from cft_lightning.smoke_data import generate

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke data (3 classes x 2 images per split) plus `critic` masks (the object's complement, i.e. what a
    perfect critic calls spurious) for 2 of the 6 training images: the alignment set."""
    out = generate(tmp_path_factory.mktemp("baselines") / "data", classes=NUM_CLASSES, per_class=2, size=32, seed=0)
    store = MaskStore(out / "masks")
    root = out / "images" / "train"
    train = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    for rel in train[:2]:
        store.write(rel, "critic", ~store.read(rel, "object"))
    return out


def datamodule(data: Path, **overrides: Any) -> GuidanceDataModule:
    kwargs: dict[str, Any] = dict(
        root=str(data / "images" / "train"), masks=str(data / "masks"), mask_kinds=["object"],
        val_root=str(data / "images" / "val"), images_per_class=2, class_fraction=1.0, batch_size=3,
    )
    kwargs.update(overrides)
    return GuidanceDataModule(**kwargs)


def fine_tuner(regularizer: Any, relevance: Any = None) -> GuidedFineTuner:
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
    return GuidedFineTuner(spec, regularizer, relevance, lr=1e-3)


def trainer(tmp_path: Path, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, max_epochs=2, inference_mode=False,
        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


CASES = {
    "rrr": (lambda: (RRR(grad_weight=1.0, cls_weight=1.0), None), {}, {"cls", "grad"}),
    "gradmask": (lambda: (GradMask(), None), {}, {"cls", "saliency"}),
    "gradmask_authors": (lambda: (GradMask(form="authors", penalty_weight=1.0, penalty_growth=0.5), None), {},
                         {"cls", "saliency"}),
    "rrda": (lambda: (RRDA(), None), {}, {"cls", "augmented"}),
    "robust_vit": (lambda: (RobustViT(), GradientRollout()), {}, {"background", "foreground", "seg", "cls"}),
    "lvlm_critic": (lambda: (LVLMCritic(alignment_ratio=1 / 3), None),
                    {"mask_kinds": [], "alignment_kind": "critic", "alignment_ratio": 1 / 3}, {"cls", "grad"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_baseline_trains_a_few_steps_without_nan(name: str, data: Path, tmp_path: Path):
    make, data_kwargs, terms = CASES[name]
    model = fine_tuner(*make())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tr = trainer(tmp_path)
    tr.fit(model, datamodule=datamodule(data, **data_kwargs))
    assert tr.global_step >= 4
    after = model.backbone.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    with open(Path(tr.logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {f"train/{t}_step" for t in terms} | {"train/loss_step"} <= logged
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert losses and all(np.isfinite(losses))


def test_gradmask_schedule_follows_the_global_step(data: Path, tmp_path: Path):
    reg = GradMask(form="authors", penalty_weight=1.0, penalty_growth=0.5)
    tr = trainer(tmp_path, max_epochs=1)
    tr.fit(fine_tuner(reg), datamodule=datamodule(data))
    assert reg._step == tr.global_step - 1 > 0  # the last step's index


# --------------------------------------------------------------------------------------------------
# alignment-set mixing


def test_alignment_slots():
    assert alignment_slots(8, 0.5) == 4 and alignment_slots(8, 0.01) == 1 and alignment_slots(8, 0.99) == 7
    for bad in ((1, 0.5), (8, 0.0), (8, 1.0)):
        with pytest.raises(ValueError):
            alignment_slots(*bad)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_batch_of_every_rank_holds_the_alignment_share(replicas: int):
    align = [3, 7]
    sampler = AlignmentMixSampler(20, align, batch_size=4, ratio=0.5, seed=1, num_replicas=replicas)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % (4 * replicas) == 0
    seen_main: set[int] = set()
    for rank in range(replicas):
        stream = order[rank::replicas]  # what DistributedSamplerWrapper (shuffle off) hands to this rank
        for b in range(0, len(stream), 4):
            batch = stream[b : b + 4]
            assert all(i in align for i in batch[:2])  # oversampled: 2 alignment images cycle through 2 slots
            seen_main.update(batch[2:])
    assert seen_main == set(range(20))  # every training image is seen each epoch


def test_sampler_reshuffles_per_epoch_and_is_deterministic():
    a = AlignmentMixSampler(12, [0, 1, 2, 3, 4], batch_size=4, ratio=0.25, seed=0)
    b = AlignmentMixSampler(12, [0, 1, 2, 3, 4], batch_size=4, ratio=0.25, seed=0)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    with pytest.raises(ValueError, match="alignment set is empty"):
        AlignmentMixSampler(12, [], batch_size=4, ratio=0.25)


def test_datamodule_mixes_critic_samples_into_every_batch(data: Path):
    dm = datamodule(data, mask_kinds=[], alignment_kind="critic", alignment_ratio=1 / 3,
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                 "interpolation": "bilinear", "crop_pct": 1.0})
    dm.setup("fit")
    assert dm.mask_kinds == ["critic"]
    assert len(dm.train_dataset.indices_with("critic")) == 2
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # ceil(6 images / 2 non-alignment slots per batch of 3)
    main = []
    for batch in batches:
        has_critic = batch["masks"]["critic"].flatten(1).amax(dim=1) > 0
        assert bool(has_critic[0])  # the alignment slot (first) holds a critic-masked image
        main += batch["path"][1:]
    assert sorted(main) == sorted(s.path for s in dm.train_dataset.samples)  # each image once per epoch
    # images outside the alignment set carry an all-zero critic mask (no penalty, cross-entropy only)
    assert sum(bool(b["masks"]["critic"][i].amax() > 0) for b in batches for i in range(3)) < 9


def test_datamodule_without_any_critic_mask_fails_clearly(data: Path, tmp_path: Path):
    masks = tmp_path / "masks"
    shutil.copytree(data / "masks", masks)
    shutil.rmtree(masks / "critic")
    dm = datamodule(data, masks=str(masks), mask_kinds=[], alignment_kind="critic",
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                 "interpolation": "bilinear", "crop_pct": 1.0})
    with pytest.raises(DataError, match="critique stage"):
        dm.setup("fit")


def test_lvlm_critic_alignment_set_has_one_source(data: Path, tmp_path: Path):
    """The data module takes the alignment set (mask kind, ratio) from the regularizer's declaration; data
    settings that disagree are refused in one line."""
    dm = datamodule(data, mask_kinds=[], batch_size=4)
    trainer(tmp_path).fit(fine_tuner(LVLMCritic(alignment_ratio=0.25)), datamodule=dm)
    assert (dm.alignment_kind, dm.alignment_ratio) == ("critic", 0.25) and "critic" in dm.mask_kinds
    with pytest.raises(DataError, match="differ from the regularizer's alignment set"):
        trainer(tmp_path).fit(fine_tuner(LVLMCritic()),
                              datamodule=datamodule(data, alignment_kind="critic", alignment_ratio=0.25,
                                                    batch_size=4))
