"""Small images (issue 17, item 12): model kwargs a model does not take, the data's size against the model's
input size, and `cft explain --ckpt` with the run's own data config and `--layer`."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cft_lightning.cli import main
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.models.backbone import BackboneError, build_backbone
from cft_lightning.models.fine_tuner import DATA_CONFIG_KEY
from cft_lightning.models.input_size import input_size_warning
from cft_lightning.regularizers import CFT
from cft_lightning.relevance import LayerGradXActivation
from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]
DATA_32 = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
           "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", classes=3, per_class=2, size=32, seed=3)


def _datamodule(data: Path, data_config: dict | None) -> GuidanceDataModule:
    return GuidanceDataModule(str(data / "images" / "train"), masks=str(data / "masks"), images_per_class=2,
                              class_fraction=1.0, val_root=str(data / "images" / "val"), batch_size=3,
                              data_config=data_config)


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, inference_mode=False, limit_train_batches=1, limit_val_batches=1,
                     enable_checkpointing=False)


# ---------------------------------------------------------------- kwargs a model does not take
def test_a_kwarg_the_model_does_not_take_is_named() -> None:
    spec = BackboneSpec("test_resnet", pretrained=False, num_classes=3, model_kwargs={"img_size": 32})
    with pytest.raises(BackboneError) as info:
        build_backbone(spec)
    message = str(info.value)
    assert "model.backbone.model_kwargs" in message and "'test_resnet'" in message and "'img_size'" in message
    assert "data.data_config" in message and "\n" not in message


def test_a_kwarg_the_model_does_not_take_is_one_cli_line(data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.root", str(data / "images" / "train"),
              "--data.masks", str(data / "masks"), "--model.backbone.name", "test_resnet",
              "--model.backbone.model_kwargs", '{"img_size": 32}', "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("cft: error:")]
    assert len(lines) == 1 and "'img_size'" in lines[0] and "'test_resnet'" in lines[0], err


# ---------------------------------------------------------------- the data's size against the model's
def test_input_size_warning_rule() -> None:
    up = input_size_warning((32, 32), (3, 224, 224), "resnet18")
    assert up is not None and "upsampled 7.0x" in up and "data.data_config" in up and "[3, 32, 32]" in up
    vit = input_size_warning((32, 32), (3, 224, 224), "vit_tiny_patch16_224", patch_model=True)
    assert vit is not None and "model.backbone.model_kwargs.img_size: 32" in vit
    down = input_size_warning((1024, 768), (3, 224, 224), "resnet18")
    assert down is not None and "downsampled" in down
    assert input_size_warning((375, 500), (3, 224, 224), "resnet18") is None  # ImageNet photos: a usual resize
    assert input_size_warning((64, 64), (3, 32, 32), "m") is None  # exactly 2x: fine
    assert input_size_warning(None, (3, 224, 224), "m") is None


def _size_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "the data's images are about" in str(w.message)]


def test_small_images_on_a_224_model_warn_once(data: Path, tmp_path: Path) -> None:
    model = GuidedFineTuner(BackboneSpec("resnet18", pretrained=False, num_classes=3), CFT(),
                            LayerGradXActivation(), lr=1e-3)
    assert model.data_config["input_size"][-1] == 224
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.validate(model, datamodule=_datamodule(data, None))
        trainer.validate(model, datamodule=_datamodule(data, None))
    found = _size_warnings(record)
    assert len(found) == 1, found
    assert "32x32" in found[0] and "224x224" in found[0] and "resnet18" in found[0] and "data.data_config" in found[0]


def test_no_warning_with_a_data_config_or_a_matching_model(data: Path, tmp_path: Path) -> None:
    cnn = GuidedFineTuner(BackboneSpec("resnet18", pretrained=False, num_classes=3), CFT(), LayerGradXActivation())
    vit = GuidedFineTuner(BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                                       model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1}), CFT(),
                          LayerGradXActivation())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path).validate(cnn, datamodule=_datamodule(data, DATA_32))
        _trainer(tmp_path).validate(vit, datamodule=_datamodule(data, None))
    assert _size_warnings(record) == []


# ---------------------------------------------------------------- cft explain --ckpt: the run's data config
@pytest.fixture(scope="module")
def cnn_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a tiny ResNet fitted at 32 px through data.data_config (its timm config says 160 px)."""
    root = tmp_path_factory.mktemp("cnn_run")
    torch.manual_seed(0)
    model = GuidedFineTuner(BackboneSpec("test_resnet", pretrained=False, num_classes=3), CFT(),
                            LayerGradXActivation(), lr=1e-3)
    assert model.data_config["input_size"][-1] == 160
    trainer = _trainer(root)
    trainer.fit(model, _datamodule(data, DATA_32))
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def _explain(ckpt: Path, data: Path, out: Path, *extra: str) -> dict:
    main(["explain", "--ckpt", str(ckpt), "--images", str(data / "images" / "test"), "--out", str(out),
          "--no_progress", *extra])
    return json.loads((out / "explain.json").read_text())


def test_explain_uses_the_runs_data_config(cnn_run: Path, data: Path, tmp_path: Path) -> None:
    saved = torch.load(cnn_run, weights_only=True, map_location="cpu")[DATA_CONFIG_KEY]
    assert saved["input_size"] == [3, 32, 32] and saved["mean"] == [0.5, 0.5, 0.5]
    record = _explain(cnn_run, data, tmp_path / "a", "--method", "grad_x_act")
    assert record["data_config"]["input_size"] == [3, 32, 32] and record["data_config"]["std"] == [0.25] * 3
    assert record["layer"] == "layer3"  # a ResNet's default feature layer (timm's feature_info)


def test_explain_reads_an_older_runs_saved_config(cnn_run: Path, data: Path, tmp_path: Path) -> None:
    """A checkpoint without the entry: `data.data_config` of the run's config.yaml (<run>/checkpoints/x.ckpt)."""
    state = torch.load(cnn_run, weights_only=True, map_location="cpu")
    del state[DATA_CONFIG_KEY]
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"data_config": {**DATA_32, "input_size": [3, 48, 48]}}}))
    record = _explain(run / "checkpoints" / "last.ckpt", data, tmp_path / "o", "--method", "gradcam")
    assert record["data_config"]["input_size"] == [3, 48, 48]


def test_explain_layer_flag(cnn_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = _explain(cnn_run, data, tmp_path / "a", "--method", "gradcam", "--layer", "layer2")
    assert record["layer"] == "layer2" and len(record["images"]) == 6
    for extra, expected in ((["--method", "gradcam", "--layer", "layer9"], "'layer9'"),
                            (["--method", "ixg", "--layer", "layer2"], "--layer applies to")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            _explain(cnn_run, data, tmp_path / "b", *extra)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("cft: error:") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
