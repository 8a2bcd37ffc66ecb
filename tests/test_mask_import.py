"""`cft masks import`: ImageNet-S segmentation PNGs and binary PNG folders into the mask store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cft_lightning.cli import main
from cft_lightning.data.mask_store import MaskStore


def imagenet_s_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_imagenet_s_ids_become_object_masks(tmp_path: Path, capsys: pytest.CaptureFixture):
    ids = np.zeros((6, 8), dtype=np.int64)
    ids[1:3, 1:4] = 5        # a class id below 256
    ids[3:5, 4:7] = 919      # a class id that needs G (919 = 151 + 256 * 3)
    ids[0, 7] = 1000         # ignore
    src = tmp_path / "seg"
    imagenet_s_png(src / "n01440764" / "ILSVRC2012_train_1.png", ids)
    imagenet_s_png(src / "n01443537" / "b.png", np.zeros((4, 4), dtype=np.int64))
    main(["masks", "import", "--format", "imagenet-s", "--src", str(src), "--out", str(tmp_path / "store"),
          "--no_progress"])
    assert "2 written, 0 kept (already there), 1 empty" in capsys.readouterr().out
    store = MaskStore(tmp_path / "store")
    got = store.read("n01440764/ILSVRC2012_train_1.JPEG", "object")  # the image's key finds the mask
    assert np.array_equal(got, (ids != 0) & (ids != 1000))
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["kinds"] == ["object"] and manifest["extra"]["import_object"]["format"] == "imagenet-s"
    # a rerun keeps what is there
    main(["masks", "import", "--format", "imagenet-s", "--src", str(src), "--out", str(tmp_path / "store"),
          "--no_progress"])
    assert "0 written, 2 kept" in capsys.readouterr().out


def test_binary_folder_becomes_any_kind_and_bad_masks_are_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    src = tmp_path / "bin"
    (src / "cls").mkdir(parents=True)
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[1:4, 2:] = 255
    Image.fromarray(mask).save(src / "cls" / "a.png")
    Image.fromarray((mask > 0).astype(np.uint8)).save(src / "cls" / "b.png")  # 0/1 valued
    main(["masks", "import", "--format", "binary", "--kind", "critic", "--src", str(src),
          "--out", str(tmp_path / "store"), "--no_progress"])
    store = MaskStore(tmp_path / "store")
    for name in ("a", "b"):
        assert np.array_equal(store.read(f"cls/{name}.jpg", "critic"), mask > 0)
    Image.fromarray(np.full((5, 5), 128, dtype=np.uint8)).save(src / "cls" / "c.png")
    with pytest.raises(SystemExit):
        main(["masks", "import", "--format", "binary", "--kind", "critic", "--src", str(src),
              "--out", str(tmp_path / "store"), "--no_progress"])
    assert "c.png is not binary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["masks", "import", "--format", "binary", "--src", str(src), "--out", str(tmp_path / "s2")])
    assert "needs --kind" in capsys.readouterr().err
