"""LVLM-VA's recipe on an image folder with a metadata CSV of groups (docs/critique.md, the ISIC configs):
ERM fit, `cft critique` through the vision stub, the LVLM-VA fit on its masks, `cft test` with WGA; the
shipped configs run with a tiny random-weight CNN in place of ResNet-50."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _vision_stub import SECRET, VisionStub, serve

from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
from cft_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def overrides(data: Path, runs: Path) -> list[str]:
    images = data / "images"
    return ["--model.backbone.name", "test_resnet", "--model.backbone.pretrained", "false",
            "--model.backbone.num_classes", "3", "--data.root", str(images / "train"),
            "--data.val_root", str(images / "val"), "--data.test_root", str(images / "test_ood"),
            "--data.metadata", str(data / "metadata.csv"), "--data.batch_size", "6", "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(runs),
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def test_erm_critique_align_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["cft"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=6, val_per_class=2, test_per_class=3,
                             decoy=True, background_shortcut=False)
    data = build_shortcut_parts(tmp_path / "data", spec, progress=False)
    erm = CONFIGS / "isic_erm_resnet50.yaml"
    main(["fit", "--config", str(erm), *overrides(data, tmp_path / "erm")])
    ckpt = tmp_path / "erm" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    stub = VisionStub()
    server = serve(stub)
    try:
        (tmp_path / "d.yaml").write_text("'*': the creature's body and its two parts decide the class\n")
        main(["critique", "--ckpt", str(ckpt), "--data", str(data / "images" / "train"), "--descriptions",
              str(tmp_path / "d.yaml"), "--out", str(tmp_path / "critic_masks"), "--samples", "6", "--segments", "3",
              "--llm", "vision-model", "--base_url", f"http://127.0.0.1:{server.server_address[1]}/v1",
              "--no_progress"])
    finally:
        server.shutdown()
    summary = json.loads((tmp_path / "critic_masks" / "critique" / "summary.json").read_text())
    assert summary["masks_written"] == 6 and summary["attribution"] == "deeplift_shap"

    snippet = CONFIGS / "baselines" / "lvlm_va_resnet50.yaml"
    aligned = [*overrides(data, tmp_path / "lvlm"), "--data.masks", str(tmp_path / "critic_masks"),
               "--model.backbone.checkpoint_path", str(ckpt)]
    main(["fit", "--config", str(erm), "--config", str(snippet), *aligned])
    main(["test", "--config", str(erm), "--config", str(snippet), *aligned, "--ckpt_path", "last"])
    results = json.loads(next((tmp_path / "lvlm").rglob("results.json")).read_text())
    split = next(iter(results["splits"].values()))
    assert split["num_images"] == 9
    for metric in ("acc1", "worst_group_acc", "mean_group_acc"):
        assert set(split["metrics"][metric]) >= {"original", "fine_tuned"}, metric
    assert len(split["groups"]) == 9  # (class, decoy colour): 3 x 3, balanced in test_ood
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".csv", ".md", ".ckpt"):
            assert SECRET.encode() not in path.read_bytes(), path
