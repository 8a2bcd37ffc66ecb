"""Every shipped config parses, names real plugins and timm weights, and carries the paper's values."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import timm
import yaml

from cft_lightning import regularizers
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
    assert "keep fp32" not in text, "every guided objective supports bf16-mixed (docs/relevance.md)"
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
        assert config["trainer"]["precision"] == "bf16-mixed", "the paper configs train in bf16 on GPUs"
    if path.stem == "vit_b_cft":
        assert name == "vit_base_patch16_224.orig_in21k_ft_in1k"
    if path.stem == "convnextv2_cft":
        assert model["relevance"]["class_path"] == "cft_lightning.relevance.LayerGradXActivation"


# --------------------------------------------------------------------------------------------------
# baseline snippets, layered over the backbone configs

SNIPPETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "baselines").glob("*.yaml"))
BASES = {"vit_b": "vit_b_cft", "dinov2": "dinov2_cft", "deit3": "deit3_cft", "convnextv2": "convnextv2_cft",
         "resnet50": "isic_erm_resnet50"}
# CFT paper Table 8: (class, {init_arg: value}, lr) per method and backbone.
TABLE8 = {
    "rrr": {"vit_b": ({"cls_weight": 2e-6, "grad_weight": 1e-10}, 2e-6),
            "dinov2": ({"cls_weight": 2e-8, "grad_weight": 1e-10}, 1e-5),
            "deit3": ({"cls_weight": 2e-6, "grad_weight": 1e-10}, 5e-6),
            "convnextv2": ({"cls_weight": 2e-6, "grad_weight": 1e-8}, 3e-6)},
    "gradmask": {k: ({"cls_weight": 0.1, "penalty_weight": 50.0}, lr)
                 for k, lr in (("vit_b", 1e-3), ("dinov2", 5e-3), ("deit3", 1e-3), ("convnextv2", 5e-2))},
    "rrda": {k: ({}, lr) for k, lr in (("vit_b", 2e-6), ("dinov2", 1e-5), ("deit3", 5e-6), ("convnextv2", 3e-6))},
    "robust_vit": {"vit_b": ({"background_weight": 2.0, "foreground_weight": 0.3, "temperature": 1.0}, 3e-6),
                   "deit3": ({"background_weight": 2.0, "foreground_weight": 0.3, "temperature": 0.65}, 8e-7)},
    "lvlm_va": {"vit_b": ({"grad_weight": 1.0, "alignment_ratio": 0.5}, 2e-6),
                "resnet50": ({"grad_weight": 1.0, "alignment_ratio": 0.5}, 1e-5)},  # LVLM-VA's ISIC recipe
}
CLASSES = {"rrr": "RRR", "gradmask": "GradMask", "rrda": "RRDA", "robust_vit": "RobustViT", "lvlm_va": "LVLMCritic"}


def test_every_table8_baseline_has_a_snippet_for_every_backbone() -> None:
    names = {p.stem for p in SNIPPETS}
    for method, per_backbone in TABLE8.items():
        assert {f"{method}_{k}" for k in per_backbone} <= names
    assert {f"{m}_{k}" for m in ("rrr", "gradmask", "rrda") for k in BASES if k != "resnet50"} <= names


@pytest.mark.parametrize("path", SNIPPETS, ids=[p.stem for p in SNIPPETS])
def test_baseline_snippet_parses_over_its_base_config(path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])
    text = path.read_text()
    assert text.lstrip().startswith("#")
    method, backbone = next((m, path.stem[len(m) + 1:]) for m in TABLE8 if path.stem.startswith(m + "_"))
    base = Path(__file__).resolve().parents[1] / "configs" / f"{BASES[backbone]}.yaml"
    assert f"--config configs/{base.name} --config configs/baselines/{path.name}" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(base), "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err
    config = yaml.safe_load(out.out)
    model = config["model"]
    assert model["regularizer"]["class_path"] == f"cft_lightning.regularizers.{CLASSES[method]}"
    values, lr = TABLE8[method][backbone]
    args = model["regularizer"]["init_args"]
    for key, want in values.items():
        if method == "rrr" and key == "grad_weight":
            want *= 8  # Table 8's weight is for the penalty summed over the paper's batch of 8; ours is per image
        assert args[key] == pytest.approx(want), key
    if method in ("rrr", "lvlm_va"):  # per image: the weight means the same at any batch size
        assert args["reduction"] == "sum"
    assert model["lr"] == pytest.approx(lr)
    # nothing of CFT's objective leaks through the layering
    assert set(args) <= set(inspect.signature(getattr(regularizers, CLASSES[method])).parameters)
    assert config["trainer"]["default_root_dir"] == f"runs/{path.stem}"
    assert (model["relevance"] is None) == (method != "robust_vit")
    if method == "lvlm_va":
        # one source: the regularizer declares the alignment set, the data module takes it from there
        assert config["data"]["alignment_kind"] is None  # not set in the data section
        assert args["alignment_ratio"] == 0.5 and model["regularizer"]["init_args"]["mask_kind"] == "critic"
    else:
        assert config["data"]["mask_kinds"] == [args["mask_kind"]]
