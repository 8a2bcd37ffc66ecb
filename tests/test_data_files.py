"""Odd files in the data folders: every image format Pillow reads is used, every other file is named (a
summary line and `skipped_files.txt` in the run's log dir)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from _data_helpers import DATA_CONFIG, make_folder, make_masks, random_rgb, write_image
from PIL import Image, features

from cft_lightning.data import DataError, GuidanceDataModule, GuidanceDataset, JointTransform, Sample
from cft_lightning.data.image_folder import scan_image_folder
from cft_lightning.data.image_io import image_extensions, is_image_file
from cft_lightning.data.run_files import SKIPPED_FILE

# formats this Pillow writes, by extension: each must be found by the scan and load as RGB
_CANDIDATES = {".gif": "GIF", ".tga": "TGA", ".ppm": "PPM", ".pcx": "PCX", ".qoi": "QOI", ".jpe": "JPEG",
               ".apng": "PNG", ".sgi": "SGI", ".ico": "ICO", ".im": "IM", ".dib": "DIB", ".jp2": "JPEG2000",
               ".webp": "WEBP"}
_NEEDS = {"JPEG2000": "jpg_2000", "WEBP": "webp"}  # optional codecs of the Pillow build
WRITABLE = {ext: fmt for ext, fmt in _CANDIDATES.items()
            if fmt in Image.SAVE and (fmt not in _NEEDS or features.check(_NEEDS[fmt]))}


def test_image_extensions_follow_pillow_and_leave_out_non_images():
    exts = set(image_extensions())
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo"} <= exts
    assert {".gif", ".tga", ".ppm", ".pcx", ".apng"} <= set(WRITABLE) <= exts
    for ext, fmt in Image.registered_extensions().items():
        if fmt in ("JPEG", "PNG", "GIF", "TIFF", "BMP", "PPM", "TGA"):
            assert ext in exts, ext
    for name in ("doc.pdf", "page.ps", "fig.eps", "clip.mpg", "cube.fits", "data.h5", "a.grib", "x.iim",
                 "vector.wmf", "notes.txt", "labels.csv", ".hidden.png", "noext", "archive.tar.gz"):
        assert not is_image_file(name), name
    assert is_image_file("UPPER.GIF") and is_image_file("x.Tiff")


def test_every_pillow_format_in_a_class_folder_is_scanned_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    for ext, fmt in WRITABLE.items():
        write_image(tmp_path / "c" / f"x{ext}", random_rgb(rng), fmt=fmt)
    skipped: list[str] = []
    images = scan_image_folder(tmp_path, skipped=skipped)
    assert images == {"c": sorted(f"c/x{ext}" for ext in WRITABLE)} and skipped == []
    dataset = GuidanceDataset(tmp_path, [Sample(rel, 0) for rel in images["c"]], JointTransform(DATA_CONFIG, False))
    for i in range(len(dataset)):
        assert dataset[i]["image"].shape == (3, 32, 32), dataset.samples[i].path


def test_skipped_files_are_named_in_one_line(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 1})
    for name in ("a/notes.txt", "a/scan.pdf", "b/sub/meta.json", "b/x.fits", "a/z1.csv", "a/z2.csv", "a/z3.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "a" / ".DS_Store").write_text("x")  # hidden: ignored, not reported
    (tmp_path / "README.md").write_text("x")  # not a class folder
    skipped: list[str] = []
    scan_image_folder(tmp_path, skipped=skipped)
    assert sorted(skipped) == sorted(["README.md", "a/notes.txt", "a/scan.pdf", "a/z1.csv", "a/z2.csv", "a/z3.csv",
                                      "b/sub/meta.json", "b/x.fits"])
    with pytest.warns(UserWarning) as record:
        scan_image_folder(tmp_path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(f"skipped 8 file(s) in {tmp_path}") and "README.md, a/notes.txt" in messages[0]
    assert messages[0].endswith(", ...")  # the first five names, then an ellipsis


def test_a_class_folder_with_only_other_files_names_them(tmp_path):
    make_folder(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "photo.heic-unknown").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*b contains no images .*photo\.heic-unknown"):
        scan_image_folder(tmp_path)


class _TinyModel(L.LightningModule):
    data_config = DATA_CONFIG

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(batch["image"].mean((2, 3))), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_run_folder_lists_every_skipped_file_and_gif_images_train(tmp_path):
    rels = make_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    write_image(tmp_path / "train" / "a" / "moving.gif", random_rgb(np.random.default_rng(3)), fmt="GIF")
    make_masks(tmp_path / "masks", [*rels, "a/moving.gif"])
    others = [f"b/extra_{i}.txt" for i in range(7)] + ["c/report.pdf"]
    for rel in others:
        (tmp_path / "train" / rel).write_text("x")
    dm = GuidanceDataModule(str(tmp_path / "train"), masks=str(tmp_path / "masks"), images_per_class=None,
                            class_fraction=1.0, data_config=DATA_CONFIG, batch_size=7)
    trainer = L.Trainer(max_epochs=1, default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                        limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"skipped 8 file\(s\)") as record:
        trainer.fit(_TinyModel(), dm)
    summary = [str(w.message) for w in record if "skipped" in str(w.message)]
    listing = Path(trainer.log_dir, SKIPPED_FILE)
    assert len(summary) == 1 and summary[0].endswith(f"full list in {listing}")
    assert listing.read_text().splitlines() == [str(tmp_path / "train" / rel) for rel in sorted(others)]
    assert "a/moving.gif" in {s.path for s in dm.train_dataset.samples}
