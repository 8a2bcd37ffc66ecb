"""Every shipped config parses, names real plugins and timm weights, and carries the paper's values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import yaml

from cft_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Table 8 of the CFT paper.
PAPER_LR = {"vit_b_cft": 5e-7, "deit3_cft": 8e-7, "dinov2_cft": 6e-7, "convnextv2_cft": 3e-6}


def _resolved(path: Path, capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err
    return yaml.safe_load(out.out)


def test_all_paper_configs_are_shipped() -> None:
    assert set(PAPER_LR) <= {p.stem for p in CONFIGS}
    assert "smoke" in {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])
    text = path.read_text()
    assert text.lstrip().startswith("#"), "configs open with a comment saying what they are for"
    config = _resolved(path, capsys)
    model = config["model"]
    name = model["backbone"]["name"]
    if model["backbone"]["pretrained"]:
        assert name in timm.list_pretrained(name), f"{name} is not a pretrained tag timm knows"
    else:
        assert timm.is_model(name)
    assert config["trainer"]["inference_mode"] is False, "relevance needs autograd in validation"
    if path.stem in PAPER_LR:
        assert model["lr"] == pytest.approx(PAPER_LR[path.stem])
        reg = model["regularizer"]["init_args"]
        assert model["regularizer"]["class_path"] == "cft_lightning.regularizers.CFT"
        assert (reg["concept_weight"], reg["non_concept_weight"], reg["align_weight"], reg["cls_weight"]) == (
            0.5, 1.2, 0.8, 0.2
        )
        assert reg["consistency_target"] == "self" and reg["loss_form"] == "paper"
        assert config["data"]["batch_size"] == 8 and config["trainer"]["max_epochs"] == 50
        assert config["data"]["images_per_class"] == 3 and config["data"]["class_fraction"] == 0.5
        assert config["data"]["classes"] == "imagenet"
    if path.stem == "vit_b_cft":
        assert name == "vit_base_patch16_224.orig_in21k_ft_in1k"
    if path.stem == "convnextv2_cft":
        assert "issue 5" in text, "the ConvNeXt config must say its relevance method comes later"
