"""The synthetic smoke dataset: deterministic, idempotent, consistent masks, loadable by GuidanceDataModule."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from _data_helpers import DATA_CONFIG

from cft_lightning.data import DataError, GuidanceDataModule, MaskStore
from cft_lightning.smoke_data import generate, main

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("smoke"), classes=4, per_class=4, size=32, seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_for_same_seed(tmp_path, smoke):
    start = time.perf_counter()
    other = generate(tmp_path / "again", classes=4, per_class=4, size=32, seed=0)
    assert time.perf_counter() - start < 2.0
    a, b = _files(smoke), _files(other)
    assert a.keys() == b.keys()
    for name in a:
        if name != "masks/manifest.json":  # records the absolute path of the concept bank
            assert a[name].read_bytes() == b[name].read_bytes(), name
    different = generate(tmp_path / "seed1", classes=4, per_class=4, size=32, seed=1)
    assert (different / "images/train/circle/train_000.png").read_bytes() != a[
        "images/train/circle/train_000.png"
    ].read_bytes()


def test_rerun_is_a_no_op_and_params_are_pinned(tmp_path):
    out = generate(tmp_path / "d", classes=2, per_class=2, size=32)
    before = {name: p.stat().st_mtime_ns for name, p in _files(out).items()}
    generate(out, classes=2, per_class=2, size=32)
    assert {name: p.stat().st_mtime_ns for name, p in _files(out).items()} == before
    (out / "images/train/circle/train_000.png").unlink()  # an interrupted run is completed
    generate(out, classes=2, per_class=2, size=32)
    assert (out / "images/train/circle/train_000.png").is_file()
    with pytest.raises(DataError, match="smoke_data.json"):
        generate(out, classes=3, per_class=2, size=32)


def test_layout_concepts_and_masks(smoke):
    bank = json.loads((smoke / "concepts.json").read_text())
    assert sorted(bank) == ["circle", "cross", "square", "triangle"]
    assert all(len(concepts) == 2 for concepts in bank.values())
    for split in SPLITS:
        assert len(list((smoke / "images" / split).rglob("*.png"))) == 16
    store = MaskStore(smoke / "masks")
    assert store.kinds() == ["concept", "object"] and len(store.concepts()) == 8
    manifest = store.read_manifest()
    assert manifest["kinds"] == ["concept", "object"] and manifest["concept_bank"]["sha256"]
    for cls, concepts in bank.items():
        rel = f"{cls}/val_001.png"
        concept, obj = store.read(rel, "concept"), store.read(rel, "object")
        parts = [store.read(rel, "concept", concept=c) for c in concepts]
        assert concept.shape == (32, 32) and all(p.any() for p in parts)
        assert np.array_equal(concept, parts[0] | parts[1])
        assert not (concept & ~obj).any() and obj.sum() > concept.sum()


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--classes", "2", "--per_class", "1", "--size", "24", "--seed", "3"])
    assert "6 images of 2 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "images").rglob("*.png"))) == 6


def test_loads_through_datamodule(smoke):
    dm = GuidanceDataModule(
        str(smoke / "images/train"),
        masks=str(smoke / "masks"),
        mask_kinds=["concept", "object"],
        metadata=str(smoke / "metadata.csv"),
        images_per_class=3,
        class_fraction=0.5,
        test_root=str(smoke / "images/test"),
        batch_size=4,
        data_config=DATA_CONFIG,
    )
    dm.setup("fit")
    assert dm.class_names == ["circle", "cross", "square", "triangle"] and dm.num_classes == 4
    assert len(dm.fine_tuning_classes) == 2 and dm.group_names == {0: "noise", 1: "stripes"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert batch["masks"]["concept"].shape == (4, 32, 32) and batch["masks"]["object"].shape == (4, 32, 32)
    assert set(batch["masks"]["concept"].unique().tolist()) == {0.0, 1.0}
    assert len(batch["path"]) == 4 and batch["group"].min() >= 0 and batch["index"].shape == (4,)
    labels = {dm.class_names[int(lbl)] for lbl in batch["label"]}
    assert labels <= set(dm.fine_tuning_classes)
    dm.setup("test")
    test_batch = next(iter(dm.test_dataloader()))
    assert set(test_batch["masks"]) == {"concept", "object"} and test_batch["label"].dtype == torch.int64
