"""An unreadable image gives the same one-line error with any number of DataLoader workers, in `cft fit`,
`validate`, `test` and `predict` (torch re-raises a worker's exception from a text with its traceback)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from _data_helpers import DATA_CONFIG, make_folder

from cft_lightning.cli import main
from cft_lightning.data import DataError, GuidanceDataset, JointTransform, Sample
from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]


def _corrupt_loader(tmp_path: Path, workers: int) -> torch.utils.data.DataLoader:
    make_folder(tmp_path / "img", {"a": 3})
    (tmp_path / "img" / "a" / "img_001.png").write_bytes(b"\x89PNG not really")
    samples = [Sample(f"a/img_00{i}.png", 0) for i in range(3)]
    dataset = GuidanceDataset(tmp_path / "img", samples, JointTransform(DATA_CONFIG, False))
    return torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_errors_keep_the_one_line_message(tmp_path, workers):
    with pytest.raises(DataError) as info:
        next(iter(_corrupt_loader(tmp_path, workers)))
    message = str(info.value)
    assert message.startswith(f"image file {tmp_path / 'img' / 'a' / 'img_001.png'} cannot be read: ")
    assert "\n" not in message and "DataLoader worker" not in message and "Traceback" not in message
    if workers:  # the worker's traceback is kept for debugging, outside the message
        assert "Original Traceback" in info.value.worker_traceback
        assert info.value.__notes__ == [info.value.worker_traceback]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=3, per_class=3, size=32, seed=1)


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_unreadable_image_under_workers_is_one_cft_error(smoke_data, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(sys, "argv", ["cft"])
    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    split = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}[command]
    broken = sorted((data / "images" / split).rglob("*.png"))
    for path in broken:  # every image of the split, whichever the loader reads first
        path.write_bytes(b"not an image")
    args = [
        command, "--config", str(REPO / "configs" / "smoke.yaml"),
        "--data.root", str(data / "images" / "train"), "--data.masks", str(data / "masks"),
        "--data.val_root", str(data / "images" / "val"), "--data.test_root", str(data / "images" / "test"),
        "--data.predict_root", str(data / "images" / "test"), "--data.num_workers", "2",
        "--model.backbone.num_classes", "3",
        "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 1}',
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cft: error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"cft: error: image file {data / 'images' / split}") and "cannot be read" in errors[0]
    assert "Traceback" not in err and "DataLoader worker" not in err, err
