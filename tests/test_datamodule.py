"""Image folders, few-shot selection, metadata, image decoding, masks, joint transforms and GuidanceDataModule."""

from __future__ import annotations

import json
import random

import lightning as L
import numpy as np
import pytest
import torch
from _data_helpers import DATA_CONFIG, make_folder, make_masks, random_rgb, write_image

from cft_lightning.data import (
    DataError,
    GuidanceDataModule,
    GuidanceDataset,
    JointTransform,
    MaskStore,
    Sample,
    build_samples,
    imagenet_classes,
    load_image,
    read_metadata,
    resolve_class_list,
    scan_image_folder,
    select_few_shot,
)

COUNTS = {"ant": 5, "bee": 5, "cat": 5, "dog": 5}


@pytest.fixture
def folder(tmp_path):
    rels = make_folder(tmp_path / "train", COUNTS)
    make_masks(tmp_path / "masks", rels, kinds=("concept", "object"))
    return tmp_path


def _dm(folder, **kwargs) -> GuidanceDataModule:
    args = {"masks": str(folder / "masks"), "data_config": DATA_CONFIG, "batch_size": 4}
    return GuidanceDataModule(str(folder / "train"), **{**args, **kwargs})


# ------------------------------------------------------------------------------------------------ class lists
def test_class_lists(tmp_path):
    make_folder(tmp_path, {"b": 1, "a": 1})
    assert resolve_class_list(None, tmp_path) == ["a", "b"]
    assert resolve_class_list(["x", "y"]) == ["x", "y"]
    listing = tmp_path.parent / f"{tmp_path.name}_classes.txt"
    listing.write_text("zebra\n\nant\n")
    assert resolve_class_list(str(listing)) == ["zebra", "ant"]
    wnids = imagenet_classes()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and len(set(wnids)) == 1000
    with pytest.raises(DataError, match="does_not_exist.txt"):
        resolve_class_list("does_not_exist.txt")
    with pytest.raises(DataError, match="duplicates"):
        resolve_class_list(["a", "a"])


def test_imagenet_names_have_one_source_timm() -> None:
    # one list of ImageNet classes: timm's ImageNetInfo, no bundled copy that could drift from it
    from importlib import resources

    from timm.data import ImageNetInfo

    from cft_lightning.concepts.discovery import load_classes
    from cft_lightning.data import imagenet_class_names

    info = ImageNetInfo()
    assert imagenet_classes() == list(info.label_names())
    assert not resources.files("cft_lightning").joinpath("_data/imagenet_synsets.txt").is_file()
    names = imagenet_class_names()
    assert list(names) == imagenet_classes() and names["n01440764"] == "tench"
    assert load_classes("imagenet") == names  # `cft concepts --classes imagenet` reads the same source


def test_imagenet_labels_keep_imagenet_indices(tmp_path):
    wnids = imagenet_classes()
    make_folder(tmp_path, {wnids[1]: 1, wnids[500]: 1, wnids[999]: 1})
    samples = build_samples(scan_image_folder(tmp_path), wnids)
    assert sorted(s.label for s in samples) == [1, 500, 999]


def test_folder_not_in_class_list_is_an_error(tmp_path):
    make_folder(tmp_path, {"ant": 1, "stranger": 1})
    with pytest.raises(DataError, match="stranger"):
        build_samples(scan_image_folder(tmp_path), ["ant", "bee"], root=tmp_path)
    dm = GuidanceDataModule(str(tmp_path), mask_kinds=[], classes="imagenet", data_config=DATA_CONFIG)
    assert dm.num_classes == 1000
    with pytest.raises(DataError, match="ant"):
        dm.setup("fit")


def test_scan_ignores_readme_hidden_and_non_images(tmp_path):
    make_folder(tmp_path, {"b": 2, "a": 1})
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "a" / ".DS_Store").write_text("x")
    (tmp_path / "a" / "notes.txt").write_text("x")
    write_image(tmp_path / "a" / "UPPER.JPG", random_rgb(np.random.default_rng(0)), fmt="JPEG")
    with pytest.warns(UserWarning, match="README.md"):
        images = scan_image_folder(tmp_path)
    assert images == {"a": ["a/UPPER.JPG", "a/img_000.png"], "b": ["b/img_000.png", "b/img_001.png"]}


def test_empty_class_folder_is_an_error(tmp_path):
    make_folder(tmp_path, {"a": 1})
    (tmp_path / "empty_cls").mkdir()
    with pytest.raises(DataError, match="empty_cls"):
        scan_image_folder(tmp_path)


# ------------------------------------------------------------------------------------------------ few-shot selection
def test_selection_deterministic_and_independent_of_creation_order(tmp_path):
    counts = {f"c{k}": 6 for k in range(6)}
    order = [(c, i) for c, n in counts.items() for i in range(n)]
    make_folder(tmp_path / "one", counts, order=order)
    random.Random(1).shuffle(order)
    make_folder(tmp_path / "two", counts, order=order)
    picks = [
        select_few_shot(scan_image_folder(tmp_path / d), 2, 0.5, seed=3, val_images_per_class=1) for d in ("one", "two")
    ]
    assert picks[0] == picks[1]
    assert picks[0] == select_few_shot(scan_image_folder(tmp_path / "one"), 2, 0.5, seed=3, val_images_per_class=1)
    assert picks[0] != select_few_shot(scan_image_folder(tmp_path / "one"), 2, 0.5, seed=4, val_images_per_class=1)


def test_held_out_classes_disjoint_and_val_from_held_out(folder):
    dm = _dm(folder, images_per_class=2, class_fraction=0.5, val_images_per_class=2)
    assert dm.selection == _dm(folder, images_per_class=2, class_fraction=0.5, val_images_per_class=2).selection
    dm.setup("fit")
    assert len(dm.fine_tuning_classes) == 2 and len(dm.held_out_classes) == 2
    assert set(dm.fine_tuning_classes).isdisjoint(dm.held_out_classes)
    assert sorted(dm.fine_tuning_classes + dm.held_out_classes) == sorted(COUNTS)
    train = {dm.class_names[s.label] for s in dm.train_dataset.samples}
    val = {dm.class_names[s.label] for s in dm.val_dataset.samples}
    assert train == set(dm.fine_tuning_classes) and val == set(dm.held_out_classes)
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 4


def test_without_held_out_classes_val_uses_unused_images(folder):
    dm = _dm(folder, images_per_class=3, class_fraction=1.0, val_images_per_class=2)
    dm.setup("fit")
    assert dm.held_out_classes == []
    train, val = {s.path for s in dm.train_dataset.samples}, {s.path for s in dm.val_dataset.samples}
    assert len(train) == 12 and len(val) == 8 and train.isdisjoint(val)


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_groups_reach_the_batch(folder):
    rows = ["image,group,label,note", "ant/img_000.png,water,ant,x", "bee/img_001.png,land,1,y"]
    rows += [f"{c}/img_{i:03d}.png,land,,z" for c in ("cat", "dog") for i in range(5)]
    (folder / "meta.csv").write_text("\n".join(rows) + "\n")
    meta = read_metadata(folder / "meta.csv")
    assert meta.group_names == {0: "land", 1: "water"} and meta.extra["ant/img_000.png"] == {"note": "x"}
    dm = _dm(folder, metadata=str(folder / "meta.csv"), images_per_class=None, class_fraction=1.0)
    dm.setup("fit")
    assert dm.group_names == {0: "land", 1: "water"}
    groups = {s.path: s.group for s in dm.train_dataset.samples}
    assert groups["ant/img_000.png"] == 1 and groups["bee/img_001.png"] == 0 and groups["ant/img_001.png"] == -1
    batch = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=len(dm.train_dataset))))
    assert batch["group"].dtype == torch.int64
    assert {p: int(g) for p, g in zip(batch["path"], batch["group"])} == groups


def test_metadata_integer_groups(tmp_path):
    (tmp_path / "m.csv").write_text("image,group\na/1.png,3\na/2.png,0\n")
    meta = read_metadata(tmp_path / "m.csv")
    assert meta.groups == {"a/1.png": 3, "a/2.png": 0} and meta.group_names == {0: "0", 3: "3"}


def test_metadata_label_conflict_names_the_row(folder):
    (folder / "meta.csv").write_text("image,label\nant/img_000.png,ant\nbee/img_000.png,cat\n")
    with pytest.raises(DataError, match=r"meta\.csv line 3.*bee/img_000\.png"):
        _dm(folder, metadata=str(folder / "meta.csv")).setup("fit")
    (folder / "bad.csv").write_text("file,group\nx.png,1\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'image' column"):
        read_metadata(folder / "bad.csv")


# ------------------------------------------------------------------------------------------------ image decoding
@pytest.mark.parametrize(
    ("mode", "fmt", "ext"),
    [("L", "PNG", "png"), ("RGBA", "PNG", "png"), ("P", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("LA", "PNG", "png")],
)
def test_image_modes_load_as_rgb(tmp_path, mode, fmt, ext):
    path = write_image(tmp_path / "c" / f"x.{ext}", random_rgb(np.random.default_rng(0)), mode=mode, fmt=fmt)
    assert load_image(path).mode == "RGB"
    ds = GuidanceDataset(tmp_path, [Sample(f"c/x.{ext}", 0)], JointTransform(DATA_CONFIG, train=False))
    assert ds[0]["image"].shape == (3, 32, 32)


def test_truncated_and_empty_images_raise_with_file_name(tmp_path):
    path = write_image(tmp_path / "c" / "trunc.jpg", random_rgb(np.random.default_rng(0), 64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    (tmp_path / "c" / "zero.jpg").write_bytes(b"")
    ds = GuidanceDataset(
        tmp_path, [Sample("c/trunc.jpg", 0), Sample("c/zero.jpg", 0)], JointTransform(DATA_CONFIG, False)
    )
    with pytest.raises(DataError, match="trunc.jpg"):
        ds[0]
    with pytest.raises(DataError, match="zero.jpg"):
        ds[1]


# ------------------------------------------------------------------------------------------------ masks
def test_mask_size_mismatch_names_both_files(tmp_path):
    write_image(tmp_path / "img" / "c" / "x.png", random_rgb(np.random.default_rng(0), 32, 40))
    MaskStore(tmp_path / "m").write("c/x.png", "concept", np.ones((32, 32), dtype=bool))
    ds = GuidanceDataset(
        tmp_path / "img",
        [Sample("c/x.png", 0)],
        JointTransform(DATA_CONFIG, False),
        MaskStore(tmp_path / "m"),
        ["concept"],
    )
    with pytest.raises(DataError, match=r"concept/c/x\.png is 32x32.*img/c/x\.png is 40x32"):
        ds[0]


def test_missing_mask_policies(folder):
    store = MaskStore(folder / "masks")
    store.path("ant/img_000.png", "concept").unlink()
    samples = build_samples(scan_image_folder(folder / "train"), sorted(COUNTS))
    tf = JointTransform(DATA_CONFIG, train=False)
    with pytest.raises(DataError, match=r"1 mask file\(s\) missing.*ant/img_000\.png"):
        GuidanceDataset(folder / "train", samples, tf, store, ["concept", "object"], "error")
    with pytest.warns(UserWarning, match="dropping 1 image"):
        dropped = GuidanceDataset(folder / "train", samples, tf, store, ["concept", "object"], "drop")
    assert len(dropped) == len(samples) - 1 and "ant/img_000.png" not in {s.path for s in dropped.samples}
    with pytest.warns(UserWarning, match="all-zero masks for 1"):
        empty = GuidanceDataset(folder / "train", samples, tf, store, ["concept", "object"], "empty")
    item = empty[[s.path for s in empty.samples].index("ant/img_000.png")]
    assert item["masks"]["concept"].sum() == 0 and item["masks"]["object"].sum() > 0
    with pytest.raises(DataError, match="missing_masks"):
        GuidanceDataset(folder / "train", samples, tf, store, ["concept"], "ignore")


# ------------------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_mask_aligned(seed):
    rng = np.random.default_rng(seed)
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), dtype=bool)
    top, left = rng.integers(4, 20), rng.integers(4, 24)  # off-centre, so a flip or crop shift would show
    image[top : top + 14, left : left + 9] = 255
    mask[top : top + 14, left : left + 9] = True
    config = {**DATA_CONFIG, "interpolation": "nearest", "crop_pct": 0.8}
    torch.manual_seed(seed)
    out, masks = JointTransform(config, train=True)(load_pil(image), {"concept": mask})
    bright = out.mean(0) > 0
    assert masks["concept"].dtype == torch.float32 and set(masks["concept"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks["concept"].bool(), bright)


def test_bilinear_transform_masks_stay_binary_and_overlap_image():
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    image[10:30, 15:40] = 255
    out, masks = JointTransform(DATA_CONFIG, train=False)(load_pil(image), {"object": image[..., 0] > 0})
    m = masks["object"]
    assert set(m.unique().tolist()) == {0.0, 1.0}
    bright = out.mean(0) > 0.5
    iou = (bright & m.bool()).sum() / (bright | m.bool()).sum()
    assert iou > 0.85


def test_normalisation_uses_given_mean_and_std():
    colour = np.array([200, 100, 50], dtype=np.uint8)
    image = np.broadcast_to(colour, (36, 36, 3)).copy()
    out, masks = JointTransform(DATA_CONFIG, train=False)(load_pil(image), None)
    assert masks == {} and out.shape == (3, 32, 32)
    expected = (colour / 255.0 - np.array(DATA_CONFIG["mean"])) / np.array(DATA_CONFIG["std"])
    np.testing.assert_allclose(out.mean((1, 2)).numpy(), expected, atol=1e-5)
    with pytest.raises(DataError, match="mean"):
        JointTransform({"input_size": (3, 8, 8), "std": (1, 1, 1)}, train=False)


def load_pil(array):
    from PIL import Image

    return Image.fromarray(array)


# ------------------------------------------------------------------------------------------------ DataModule
@pytest.mark.parametrize("argument", ["root", "masks", "val_root", "test_root", "metadata"])
def test_missing_paths_name_the_argument(folder, argument):
    kwargs = {argument: str(folder / "nowhere")}
    root = kwargs.pop("root", str(folder / "train"))
    with pytest.raises(DataError, match=rf"data\.{argument}: .*nowhere does not exist"):
        GuidanceDataModule(root, **{"masks": str(folder / "masks"), **kwargs})


def test_datamodule_argument_checks(folder):
    with pytest.raises(DataError, match="data.masks"):
        GuidanceDataModule(str(folder / "train"))  # default mask_kinds=[concept] needs a store
    with pytest.raises(DataError, match="missing_masks"):
        GuidanceDataModule(str(folder / "train"), mask_kinds=[], missing_masks="skip")
    with pytest.raises(DataError, match=r"data\.classes: .*nope\.txt"):
        GuidanceDataModule(str(folder / "train"), mask_kinds=[], classes=str(folder / "nope.txt"))
    with pytest.raises(DataError, match="data_config"):
        GuidanceDataModule(str(folder / "train"), mask_kinds=[]).setup("fit")


def test_datamodule_batch_contract(folder):
    dm = _dm(folder, mask_kinds=["concept", "object"], test_root=str(folder / "train"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert set(batch["masks"]) == {"concept", "object"}
    for m in batch["masks"].values():
        assert m.shape == (4, 32, 32) and m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(batch["path"], list) and all(isinstance(p, str) for p in batch["path"])
    assert batch["group"].tolist() == [-1] * 4 and batch["index"].dtype == torch.int64
    dm.setup("test")
    assert set(next(iter(dm.test_dataloader()))["masks"]) == {"concept", "object"}


def test_val_root_masks_loaded_only_when_complete(folder):
    rels = make_folder(folder / "val", {"ant": 2, "bee": 2}, seed=9)
    renamed = [r.replace("img_", "val_") for r in rels]
    for r, n in zip(rels, renamed):
        (folder / "val" / r).rename(folder / "val" / n)
    make_masks(folder / "masks", renamed[:3], kinds=("concept",))
    make_masks(folder / "masks", renamed, kinds=("object",))
    dm = _dm(folder, mask_kinds=["concept", "object"], val_root=str(folder / "val"), eval_batch_size=3)
    with pytest.warns(UserWarning, match="'concept' exists for only 3/4"):
        dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["masks"]) == {"object"} and batch["image"].shape[0] == 3


class _TinyModel(L.LightningModule):
    data_config = DATA_CONFIG

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)

    def training_step(self, batch, batch_idx):
        logits = self.head(batch["image"].mean((2, 3)))
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_mask_mean", batch["masks"]["concept"].mean(), batch_size=batch["image"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_fit_reads_model_data_config_and_writes_selection(folder):
    dm = GuidanceDataModule(str(folder / "train"), masks=str(folder / "masks"), images_per_class=2, seed=5)
    trainer = L.Trainer(
        max_epochs=1,
        default_root_dir=str(folder / "runs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(_TinyModel(), dm)
    record = json.loads((folder / "runs").rglob("fine_tuning_classes.json").__next__().read_text())
    assert record["seed"] == 5 and record["fine_tuning_classes"] == dm.fine_tuning_classes
    assert record["held_out_classes"] == dm.held_out_classes and len(record["train_images"]) == 4
