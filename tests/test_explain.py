"""`cft explain`: overlays for a checkpoint's Original and fine-tuned model, or for any timm model."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from PIL import Image

from cft_lightning.cli import main
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import CFT
from cft_lightning.relevance import AttnLRP
from cft_lightning.smoke_data import generate


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    data = generate(root / "data", classes=3, per_class=2, size=32, seed=0)
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
    model = GuidedFineTuner(spec, CFT(), AttnLRP(), lr=1e-3)
    dm = GuidanceDataModule(str(data / "images" / "train"), masks=str(data / "masks"), images_per_class=2,
                            class_fraction=1.0, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        limit_val_batches=0)
    trainer.fit(model, dm)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"data": data, "ckpt": ckpt, "root": root}


def test_checkpoint_overlays_show_original_and_fine_tuned_with_masks(run: dict[str, Path], tmp_path: Path):
    images = run["data"] / "images" / "test"
    main(["explain", "--ckpt", str(run["ckpt"]), "--images", str(images), "--masks", str(run["data"] / "masks"),
          "--out", str(tmp_path), "--batch_size", "4", "--no_progress", "--classes", str(run["data"] / "images" /
                                                                                       "train")])
    record = json.loads((tmp_path / "explain.json").read_text())
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    classes = ["circle", "square", "triangle"]  # the sorted class folders the model was trained on
    assert len(record["images"]) == len(files) == 6
    for entry, rel in zip(record["images"], files):
        assert set(entry) == {"image", "png", "original", "fine_tuned", "true_class", "true_name"}
        assert entry["png"] == str(tmp_path / rel)
        assert entry["true_name"] == rel.split("/")[0] == classes[entry["true_class"]]  # from the image's folder
        for who in ("original", "fine_tuned"):
            assert entry[who]["predicted_name"] == classes[entry[who]["predicted_class"]]
        assert entry["original"]["explained_class"] == entry["original"]["predicted_class"]
        with Image.open(entry["png"]) as im:  # image | mask | original | fine_tuned | colour bar, labels under
            assert 2.2 * im.height < im.width < 4 * im.height


def test_any_timm_model_with_a_weight_file_and_a_fixed_target(tmp_path: Path, run: dict[str, Path]):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    image = run["data"] / "images" / "test" / sorted(p.name for p in (run["data"] / "images" / "test").iterdir())[0]
    first = sorted(image.iterdir())[0]
    main(["explain", "--model", "vit_tiny_patch16_224", "--weights", str(tmp_path / "w.pth"), "--num_classes", "3",
          "--images", str(first), "--method", "gradcam", "--target", "2", "--out", str(tmp_path / "o"),
          "--no_progress"])
    record = json.loads((tmp_path / "o" / "explain.json").read_text())
    assert record["method"] == "gradcam" and record["images"][0]["model"]["explained_class"] == 2
    assert (tmp_path / "o" / first.with_suffix(".png").name).is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "vit_tiny_patch16_224"], "--pretrained"),
        (["--model", "vit_tiny_patch16_224", "--pretrained", "--target", "cat"], "--target"),
    ],
)
def test_bad_arguments_are_one_line_errors(extra, message, tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as info:
        main(["explain", "--images", str(tmp_path), *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_masks_are_reported(run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        main(["explain", "--ckpt", str(run["ckpt"]), "--images", str(run["data"] / "images" / "test"),
              "--masks", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "have no 'concept' mask" in capsys.readouterr().err


def test_class_list_of_the_wrong_size_is_a_one_line_error(run: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(SystemExit) as info:
        main(["explain", "--ckpt", str(run["ckpt"]), "--images", str(run["data"] / "images" / "test"),
              "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "o"), "--no_progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--classes" in err and "2 classes, but the model has 3 outputs" in err
