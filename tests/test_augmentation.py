"""The training augmentation (`data.augmentation`): the default is the CFT release's random crop and flip;
`hflip: 0` really removes the flip and `crop: center` the random crop, for image and masks alike."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _data_helpers import DATA_CONFIG, make_folder, make_masks
from PIL import Image
from torchvision.transforms import v2

from cft_lightning.cli import main
from cft_lightning.data import Augmentation, DataError, GuidanceDataModule, JointTransform

REPO = Path(__file__).resolve().parents[1]
# crop_pct 1: the resize keeps the 32 px image and the 32 px random crop is the whole image, so a training
# output is either the evaluation output or its mirror image
IDENTITY = {**DATA_CONFIG, "crop_pct": 1.0}


def _asymmetric() -> tuple[Image.Image, np.ndarray]:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[4:28, 2:9] = 255  # a bar at the left
    mask = image[..., 0] > 0
    return Image.fromarray(image), mask


def _flipped_count(transform: JointTransform, seeds: int = 24) -> int:
    """How many of `seeds` seeded training passes mirror the image; checks the mask moves with it."""
    image, mask = _asymmetric()
    plain, _ = JointTransform(IDENTITY, train=False)(image, {"concept": mask})
    flips = 0
    for seed in range(seeds):
        torch.manual_seed(seed)
        out, masks = transform(image, {"concept": mask})
        mirrored = torch.equal(out, plain.flip(-1))
        assert mirrored or torch.equal(out, plain), seed
        want = torch.from_numpy(mask)
        assert torch.equal(masks["concept"].bool(), want.flip(-1) if mirrored else want)
        flips += mirrored
    return flips


def test_default_augmentation_is_unchanged():
    """Resize, random crop, horizontal flip with p = 0.5, as before `data.augmentation` existed."""
    steps = JointTransform(DATA_CONFIG, train=True).pipeline.transforms
    assert [type(s) for s in steps] == [v2.Resize, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    assert steps[2].p == 0.5
    assert Augmentation() == Augmentation(crop="random", hflip=0.5)
    assert 0 < _flipped_count(JointTransform(IDENTITY, train=True)) < 24


def test_hflip_zero_never_flips():
    transform = JointTransform(IDENTITY, train=True, augmentation={"hflip": 0.0})
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in transform.pipeline.transforms)
    assert _flipped_count(transform) == 0
    assert _flipped_count(JointTransform(IDENTITY, train=True, augmentation=Augmentation(hflip=1.0))) == 24


def test_center_crop_without_flip_is_the_evaluation_transform():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    train = JointTransform(DATA_CONFIG, train=True, augmentation={"crop": "center", "hflip": 0})
    evaluation = JointTransform(DATA_CONFIG, train=False)
    for seed in range(4):
        torch.manual_seed(seed)
        assert torch.equal(train(image)[0], evaluation(image)[0])


def test_bad_augmentation_names_the_key():
    with pytest.raises(DataError, match=r"data\.augmentation\.hflip"):
        Augmentation(hflip=1.5)
    with pytest.raises(DataError, match=r"data\.augmentation\.crop"):
        Augmentation(crop="random_resized")
    with pytest.raises(DataError, match=r"unknown key\(s\) \['vflip'\]"):
        Augmentation.parse({"vflip": 0.5})


def test_datamodule_trains_with_the_configured_augmentation(tmp_path):
    rels = make_folder(tmp_path / "train", {"a": 2, "b": 2})
    make_masks(tmp_path / "masks", rels)
    dm = GuidanceDataModule(str(tmp_path / "train"), masks=str(tmp_path / "masks"), data_config=IDENTITY,
                            class_fraction=1.0, augmentation={"hflip": 0})
    dm.setup("fit")
    assert dm.train_dataset.transform.augmentation == Augmentation(crop="random", hflip=0.0)
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in dm.train_dataset.transform.pipeline.transforms)
    evaluation = JointTransform(IDENTITY, train=False)
    for i, sample in enumerate(dm.train_dataset.samples):  # the identity crop and no flip: the plain image
        item = dm.train_dataset[i]
        plain, _ = evaluation(Image.open(tmp_path / "train" / sample.path).convert("RGB"))
        assert torch.equal(item["image"], plain)


def test_cli_sets_and_checks_the_augmentation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cft"])
    base = ["fit", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.root", str(tmp_path),
            "--data.mask_kinds", "[]"]
    make_folder(tmp_path, {"a": 1})
    with pytest.raises(SystemExit):
        main([*base, "--data.augmentation.hflip", "0", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["augmentation"] == {"crop": "random", "hflip": 0.0}
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--data.augmentation.hflip", "2", "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cft: error:" in err and "data.augmentation.hflip" in err and "Traceback" not in err
