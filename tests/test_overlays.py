"""One overlay helper (issue 18, item 4): `explain_models` + `save_overlays` in `evaluation/overlays.py`, and the
four pictures that go through it (the `RelevanceOverlays` callback, `cft test`, `cft explain`, `cft demo`), each
de-normalised with the data's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cft_lightning.evaluation import overlays
from cft_lightning.relevance import InputGradient

CONFIG = {"input_size": (3, 16, 16), "mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7), "interpolation": "bilinear",
          "crop_pct": 1.0}


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_explain_models_explains_each_model_in_eval_mode_and_skips_none() -> None:
    images = torch.randn(2, 3, 8, 8)
    original, tuned = cnn(0), cnn(1).train()
    explained = overlays.explain_models({"original": original.eval(), "missing": None, "fine_tuned": tuned},
                                        InputGradient(), images, torch.tensor([2, 0]))
    assert list(explained) == ["original", "fine_tuned"]
    for rel in explained.values():
        assert rel.maps.shape == (2, 8, 8) and rel.logits.shape == (2, 3) and rel.targets.tolist() == [2, 0]
    assert tuned.training and not original.training  # each model's mode is restored
    with torch.no_grad():  # in eval mode (no dropout): the logits are those of model.eval()
        assert torch.allclose(explained["fine_tuned"].logits, tuned.eval()(images), atol=1e-6)
    assert not torch.equal(explained["original"].maps, explained["fine_tuned"].maps)


def test_save_overlays_denormalises_with_the_data_config_and_names_the_classes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = torch.tensor(CONFIG["mean"]).view(1, 3, 1, 1), torch.tensor(CONFIG["std"]).view(1, 3, 1, 1)
    images = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    explained = overlays.explain_models({"original": cnn(0), "fine_tuned": cnn(1)}, InputGradient(), images)
    seen: dict[str, Any] = {}

    def capture(shown: np.ndarray, masks: Any, maps: dict, path: Path, **kwargs: Any) -> Path:
        seen.update(kwargs, shown=shown, masks=masks, maps=maps, path=path)
        return path

    monkeypatch.setattr(overlays, "overlay_grid", capture)
    masks = np.zeros((2, 16, 16))
    overlays.save_overlays(tmp_path / "o.png", images, CONFIG, explained, ["cat", "dog", "emu"],
                           labels=torch.tensor([1, -1]), masks=masks, mask_title="object mask")
    assert np.array_equal(seen["shown"], pixels.numpy())  # the data's mean/std undone exactly
    assert list(seen["maps"]) == list(seen["predictions"]) == ["original", "fine_tuned"]
    assert seen["true_classes"] == ["dog", ""] and seen["masks"] is masks and seen["mask_title"] == "object mask"
    for name, rel in explained.items():
        assert seen["predictions"][name] == [["cat", "dog", "emu"][int(k)] for k in rel.logits.argmax(1)]
    overlays.save_overlays(tmp_path / "p.png", images, CONFIG, explained, labels=[0, 2], label_names=["x", "y", "z"])
    assert seen["true_classes"] == ["x", "z"] and seen["predictions"]["original"][0].startswith("class ")
    monkeypatch.undo()  # the real picture: image | mask | two overlays, one row per image
    path = overlays.save_overlays(tmp_path / "sub" / "real.png", images, CONFIG, explained, masks=masks)
    with Image.open(path) as im:
        assert path == tmp_path / "sub" / "real.png" and 1.2 * im.height < im.width < 3.5 * im.height


# ---------------------------------------------------------------------------------------- the four call sites
@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every `save_overlays` call (passed through, so the pictures are still written)."""
    recorded: list[dict[str, Any]] = []
    real = overlays.save_overlays

    def spy(path: Any, images: Any, data_config: Any, explained: Any, *args: Any, **kwargs: Any) -> Path:
        recorded.append({"path": Path(path), "config": dict(data_config), "models": list(explained)})
        return real(path, images, data_config, explained, *args, **kwargs)

    monkeypatch.setattr(overlays, "save_overlays", spy)
    return recorded


def test_callback_and_cft_test_draw_through_the_helper_with_the_datas_config(
        tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    from cft_lightning.callbacks import RelevanceOverlays
    from cft_lightning.data.datamodule import GuidanceDataModule
    from cft_lightning.models import BackboneSpec, GuidedFineTuner
    from cft_lightning.regularizers import PlainFineTuning
    from cft_lightning.smoke_data import generate

    data = generate(tmp_path / "data", classes=3, per_class=2, size=16, seed=0)
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2})
    model = GuidedFineTuner(spec, PlainFineTuning(), InputGradient(), lr=1e-3)
    assert model.data_config["mean"] != CONFIG["mean"]  # the data's normalisation is not the model's
    dm = GuidanceDataModule(str(data / "images" / "train"), mask_kinds=[], class_fraction=1.0, batch_size=3,
                            data_config=CONFIG, test_root=str(data / "images" / "test"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, default_root_dir=tmp_path / "run",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, inference_mode=False,
                        callbacks=[RelevanceOverlays(every_n_steps=1, num_images=2)])
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    root = tmp_path / "run"
    assert [c["path"] for c in calls] == [root / "overlays" / "step_000001.png", root / "overlays.png"]
    for call in calls:
        assert call["path"].is_file() and call["models"] == ["original", "fine_tuned"]
        assert call["config"] == CONFIG


def test_cft_explain_draws_through_the_helper(tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    from cft_lightning.explain import _collect, explain
    from cft_lightning.smoke_data import generate

    data = generate(tmp_path / "data", classes=2, per_class=1, size=16, seed=0)
    images = _collect([str(data / "images" / "test")])
    records = explain({"original": cnn(0).eval(), "fine_tuned": cnn(1).eval()}, InputGradient(), images,
                      tmp_path / "out", progress=False, data_config=CONFIG, batch_size=3)
    assert [c["path"] for c in calls] == [Path(r["png"]) for r in records] and len(records) == 2
    assert all(c["config"] == CONFIG and c["models"] == ["original", "fine_tuned"] for c in calls)
    assert all(Path(r["png"]).is_file() for r in records)


def test_cft_demo_draws_through_the_helper(tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.demo import DemoSettings, _overlays
    from cft_lightning.models import build_backbone

    spec = ShortcutPartsSpec(num_classes=2, image_size=32, train_per_class=2, val_per_class=1, test_per_class=2)
    data = build_shortcut_parts(tmp_path / "data", spec, progress=False)
    settings = DemoSettings(out=str(tmp_path / "out"), methods=["plain"], benchmark=spec, depth=1, embed_dim=24)
    seed_dir = Path(settings.out) / "seed_0"
    (seed_dir / "plain").mkdir(parents=True)
    for seed, path in ((0, seed_dir / "start.pth"), (1, seed_dir / "plain" / "fine_tuned.pth")):
        torch.manual_seed(seed)
        torch.save(build_backbone(settings.backbone(None)).state_dict(), path)
    (seed_dir / "start.json").write_text(json.dumps({"weights": str(seed_dir / "start.pth")}))
    path = _overlays(settings, {"data": str(data)}, 2)
    assert path == Path(settings.out) / "overlays.png" and path.is_file()
    assert [c["path"] for c in calls] == [path] and calls[0]["models"] == ["original", "plain"]
    from cft_lightning.models.backbone import resolve_data_config

    assert calls[0]["config"] == resolve_data_config(build_backbone(settings.backbone(None)))
