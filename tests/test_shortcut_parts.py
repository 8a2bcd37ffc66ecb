"""The generated shortcut-parts benchmark: determinism, the shortcut's statistics, masks, and damage repair."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cft_lightning.benchmarks import SPLITS, ShortcutPartsSpec, build_shortcut_parts, class_parts
from cft_lightning.benchmarks.shortcut_parts import MANIFEST
from cft_lightning.data import DataError, GuidanceDataModule, MaskStore
from cft_lightning.data.mask_store import concept_slug

SMALL = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=20, val_per_class=2, test_per_class=6, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shortcut_parts(tmp_path_factory.mktemp("sp") / "data", SMALL, progress=False)


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "metadata.csv") as fh:
        return list(csv.DictReader(fh))


def test_layout_and_bank(small: Path) -> None:
    bank = json.loads((small / "concepts.json").read_text())
    assert bank == {k: list(v) for k, v in class_parts(3).items()}
    for split in SPLITS:
        for name in bank:
            files = sorted((small / "images" / split / name).glob("*.png"))
            assert len(files) == SMALL.per_class(split)
    store = MaskStore(small / "masks")
    assert {"object", "concept"} <= set(store.kinds())
    rows = _rows(small)
    assert len(rows) == sum(3 * SMALL.per_class(s) for s in SPLITS)


def test_every_part_is_shared_and_no_two_classes_share_both() -> None:
    parts = class_parts(10)
    assert len(set(parts.values())) == 10
    counts = Counter(p for pair in parts.values() for p in pair)
    assert min(counts.values()) >= 2


def test_generation_is_deterministic(small: Path, tmp_path: Path) -> None:
    again = build_shortcut_parts(tmp_path / "again", SMALL, progress=False)
    a = json.loads((small / MANIFEST).read_text())["files"]
    b = json.loads((again / MANIFEST).read_text())["files"]
    images = [k for k in a if k.startswith("images/")]
    assert images and all(a[k] == b[k] for k in images)


def test_shortcut_statistics(tmp_path: Path) -> None:
    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=200, val_per_class=1, test_per_class=30,
                             spurious_rate=0.9)
    root = build_shortcut_parts(tmp_path / "stats", spec, progress=False, verify="none")
    rows = _rows(root)
    train = [r for r in rows if r["split"] == "train"]
    own = {name: i for i, name in enumerate(class_parts(3))}
    rate = np.mean([int(r["group_id"]) == own[r["label"]] * 3 + own[r["label"]] for r in train])
    assert all(r["group"] == f"{r['label']}|{r['background']}" for r in rows)
    assert abs(rate - 0.9) < 0.04  # 600 draws at p = 0.9
    ood = Counter(r["group"] for r in rows if r["split"] == "test_ood")
    assert len(ood) == 9 and set(ood.values()) == {10}  # every class on every background, equally often


def test_masks_are_consistent(small: Path) -> None:
    store = MaskStore(small / "masks")
    for name, parts in class_parts(3).items():
        rel = f"{name}/train_0001.png"
        obj, concept = store.read(rel, "object"), store.read(rel, "concept")
        union = np.zeros_like(concept)
        for part in parts:
            union |= store.read(rel, "concept", concept=part)
        assert np.array_equal(union, concept) and concept.any()
        assert not (concept & ~obj).any(), "parts lie inside the object"
        image = np.asarray(Image.open(small / "images" / "train" / rel))
        assert image.shape[:2] == obj.shape


def test_datamodule_reads_it_with_groups(small: Path) -> None:
    dm = GuidanceDataModule(
        str(small / "images" / "train"), masks=str(small / "masks"), mask_kinds=["concept", "object"],
        class_fraction=1.0, images_per_class=2, test_root=str(small / "images" / "test_ood"),
        metadata=str(small / "metadata.csv"), batch_size=4,
        data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0},
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["masks"]) == {"concept", "object"} and (batch["group"] >= 0).all()
    dm.setup("test")
    groups = {int(g) for b in dm.test_dataloader() for g in b["group"]}
    assert groups == set(range(9))


def _touch_rebuild(root: Path, spec: ShortcutPartsSpec, **kw) -> Path:
    return build_shortcut_parts(root, spec, progress=False, **kw)


def test_deleted_and_truncated_files_are_regenerated(small: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small, root)
    image = root / "images" / "val" / "beta" / "val_0001.png"
    mask = root / "masks" / "concept" / "gamma" / "test_id_0002.png"
    original_image, original_mask = image.read_bytes(), mask.read_bytes()
    image.unlink()
    mask.write_bytes(original_mask[: len(original_mask) // 2])  # truncated PNG
    _touch_rebuild(root, SMALL)
    assert image.read_bytes() == original_image and mask.read_bytes() == original_mask


def test_same_size_corruption_needs_full_verify(small: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small, root)
    path = root / "images" / "train" / "alpha" / "train_0003.png"
    good = path.read_bytes()
    path.write_bytes(good[:-8] + b"\0" * 8)
    _touch_rebuild(root, SMALL, verify="sizes")
    assert path.read_bytes() != good  # a size check cannot see it ...
    _touch_rebuild(root, SMALL, verify="full")
    assert path.read_bytes() == good  # ... a hash check can


def test_half_written_manifest_means_rebuild(small: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small, root)
    manifest = root / MANIFEST
    manifest.write_text(manifest.read_text()[:100])
    victim = root / "masks" / "concepts" / concept_slug("round eye") / "alpha" / "train_0000.png"
    victim.unlink()
    _touch_rebuild(root, SMALL)
    assert victim.is_file()
    assert json.loads(manifest.read_text())["complete"] is True


def test_other_spec_in_the_folder_is_rebuilt(small: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small, root)
    other = ShortcutPartsSpec(**{**SMALL.__dict__, "seed": 4})
    _touch_rebuild(root, other)
    assert json.loads((root / MANIFEST).read_text())["spec"]["seed"] == 4


def test_bad_spec_is_reported() -> None:
    with pytest.raises(DataError, match="num_classes"):
        ShortcutPartsSpec(num_classes=11)
    with pytest.raises(DataError, match="spurious_rate"):
        ShortcutPartsSpec(spurious_rate=1.5)
