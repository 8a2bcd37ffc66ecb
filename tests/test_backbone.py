"""The backbone spec: timm model creation, local weight files, the data config and the frozen reference.

Everything runs offline on tiny random ViTs; no weights are ever downloaded.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cft_lightning.models.backbone import (
    BackboneError,
    BackboneSpec,
    build_backbone,
    freeze,
    resolve_data_config,
    state_dict_of,
)

NAME = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


def spec(**kw) -> BackboneSpec:
    kw.setdefault("model_kwargs", dict(TINY))
    kw.setdefault("pretrained", False)
    return BackboneSpec(NAME, **kw)


def saved_model(tmp_path, num_classes=None, suffix=".pth", **model_kwargs):
    """A tiny random model and the path of its state_dict written in the given format."""
    torch.manual_seed(0)
    model = build_backbone(spec(num_classes=num_classes, model_kwargs={**TINY, **model_kwargs}))
    with torch.no_grad():  # a non-zero head bias too, so every tensor identifies the file
        model.head.bias.normal_()
    weights = state_dict_of(model)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    return weights, path


def assert_loaded(model, weights, skip=()):
    state = model.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        if key.split(".")[0] in skip:
            continue
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------------------------------
# building


def test_build_random_model_with_num_classes():
    model = build_backbone(spec(num_classes=5))
    assert isinstance(model, VisionTransformer)
    assert model.num_classes == 5 and model.head.out_features == 5
    assert len(model.blocks) == 2 and tuple(model.patch_embed.img_size) == (32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_num_classes_none_keeps_the_default_head():
    assert build_backbone(spec()).head.out_features == 1000


def test_pretrained_tag_is_accepted_with_random_weights():
    model = build_backbone(BackboneSpec(f"{NAME}.augreg_in21k_ft_in1k", pretrained=False, model_kwargs=TINY))
    assert isinstance(model, VisionTransformer)


def test_builds_differ_by_seed_so_weight_checks_are_meaningful():
    torch.manual_seed(0)
    a = build_backbone(spec())
    torch.manual_seed(1)
    b = build_backbone(spec())
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("num_classes", [0, -3])
def test_non_positive_num_classes_raises(num_classes):
    with pytest.raises(BackboneError, match="model.backbone.num_classes"):
        build_backbone(spec(num_classes=num_classes))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_22", "vit_tiny_patch16_22.augreg_in21k"])
def test_unknown_name_raises_with_suggestion(name):
    with pytest.raises(BackboneError, match="model.backbone.name") as info:
        build_backbone(BackboneSpec(name, pretrained=False))
    message = str(info.value)
    assert repr(name) in message
    assert "Similar names" in message and "vit_tiny_patch16_224" in message
    assert isinstance(info.value, ValueError)


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(BackboneError, match="model.backbone.name") as info:
        build_backbone(BackboneSpec("qqqqqqqqqqqqqqqq", pretrained=False))
    assert "Similar names" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# local weight files


@pytest.mark.parametrize("pretrained", [True, False])
def test_checkpoint_pth_is_loaded(tmp_path, pretrained):
    """checkpoint_path implies loading, whatever `pretrained` says."""
    weights, path = saved_model(tmp_path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    model = build_backbone(spec(pretrained=pretrained, checkpoint_path=str(path)))
    assert_loaded(model, weights)


def test_checkpoint_safetensors_is_loaded(tmp_path):
    pytest.importorskip("safetensors")
    weights, path = saved_model(tmp_path, suffix=".safetensors")
    torch.manual_seed(123)
    model = build_backbone(spec(pretrained=True, checkpoint_path=str(path)))
    assert_loaded(model, weights)


def test_checkpoint_path_expands_user(tmp_path, monkeypatch):
    weights, path = saved_model(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.manual_seed(123)
    model = build_backbone(spec(pretrained=True, checkpoint_path=f"~/{path.name}"))
    assert_loaded(model, weights)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_with_other_num_classes_recreates_the_head(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    weights, path = saved_model(tmp_path, suffix=suffix)  # 1000-class head
    model = build_backbone(spec(pretrained=True, checkpoint_path=str(path), num_classes=7))
    assert model.head.weight.shape == (7, 192) and weights["head.weight"].shape == (1000, 192)
    assert_loaded(model, {k: v for k, v in weights.items()}, skip=("head",))
    assert not torch.equal(model.head.bias, weights["head.bias"][:7])


def test_checkpoint_with_its_own_num_classes_keeps_its_head(tmp_path):
    weights, path = saved_model(tmp_path, num_classes=5)
    torch.manual_seed(123)
    model = build_backbone(spec(pretrained=True, checkpoint_path=str(path), num_classes=5))
    assert_loaded(model, weights)


def test_checkpoint_of_another_architecture_raises(tmp_path):
    _, path = saved_model(tmp_path)  # depth 2
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path") as info:
        build_backbone(spec(checkpoint_path=str(path), model_kwargs={**TINY, "depth": 3}))
    assert "does not fit" in str(info.value) and "missing" in str(info.value) and "blocks.2" in str(info.value)


def test_checkpoint_of_another_architecture_raises_with_new_head(tmp_path):
    _, path = saved_model(tmp_path)  # depth 2
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path"):
        build_backbone(spec(checkpoint_path=str(path), num_classes=7, model_kwargs={**TINY, "depth": 3}))


def test_missing_checkpoint_raises(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path") as info:
        build_backbone(spec(checkpoint_path=str(path)))
    assert "no such file" in str(info.value) and str(path) in str(info.value)


def test_directory_as_checkpoint_raises(tmp_path):
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path"):
        build_backbone(spec(checkpoint_path=str(folder)))


def test_checkpoint_with_wrong_suffix_raises(tmp_path):
    weights, _ = saved_model(tmp_path)
    path = tmp_path / "weights.txt"
    torch.save(weights, path)  # a valid state_dict, but not named as a weight file
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path") as info:
        build_backbone(spec(checkpoint_path=str(path)))
    assert "not a weight file" in str(info.value) and ".safetensors" in str(info.value)


def test_unreadable_checkpoint_raises(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="model.backbone.checkpoint_path") as info:
        build_backbone(spec(checkpoint_path=str(path)))
    assert "cannot read" in str(info.value) and str(path) in str(info.value)


def test_pretrained_without_checkpoint_offline_raises_helpful_error(tmp_path, monkeypatch):
    """Offline mode makes the hub fail at once (no retries): huggingface_hub reads HF_HUB_OFFLINE at import,
    so the module constant is patched as well as the environment; an empty cache dir rules out cached
    weights."""
    constants = pytest.importorskip("huggingface_hub.constants")
    if not hasattr(constants, "HF_HUB_OFFLINE") or not hasattr(constants, "HF_HUB_CACHE"):
        pytest.skip("this huggingface_hub has no offline / cache constants to patch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError) as info:
        build_backbone(spec(pretrained=True))
    message = str(info.value)
    assert "could not fetch pretrained weights" in message and repr(NAME) in message
    assert "--model.backbone.checkpoint_path" not in message and "model.backbone.checkpoint_path" in message
    assert "pretrained: false" not in message  # random weights make no sense for fine-tuning
    assert "HF_HUB_OFFLINE=1" in message and f"timm.create_model('{NAME}', pretrained=True)" in message
    with pytest.raises(BackboneError) as info:  # a command with its own flag names it
        build_backbone(spec(pretrained=True), weights_flag="--weights")
    assert "with --weights." in str(info.value)


# --------------------------------------------------------------------------------------------------
# data config, freezing, state dicts


@pytest.mark.parametrize("img_size", [32, (32, 48)])
def test_resolve_data_config_uses_the_models_own_size(img_size):
    import timm.data

    model = build_backbone(spec(model_kwargs={**TINY, "img_size": img_size}))
    config = resolve_data_config(model)
    hw = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert config["input_size"] == (3, *hw)
    # timm alone reports the pretrained tag's 224 px, which this model rejects; everything else is timm's
    timm_config = dict(timm.data.resolve_data_config({}, model=model))
    assert timm_config["input_size"] == (3, 224, 224)
    with pytest.raises((AssertionError, RuntimeError)):  # a fixed-size ViT rejects other sizes
        model(torch.zeros(1, *timm_config["input_size"]))
    assert model(torch.zeros(1, *config["input_size"])).shape == (1, 1000)
    assert {k: v for k, v in config.items() if k != "input_size"} == {
        k: v for k, v in timm_config.items() if k != "input_size"
    }


def test_freeze_sets_eval_and_no_grad():
    model = build_backbone(spec(num_classes=3))
    model.train()
    assert model.training and all(p.requires_grad for p in model.parameters())
    out = freeze(model)
    assert out is model
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_state_dict_of_is_a_detached_copy():
    model = build_backbone(spec(num_classes=3))
    copy = state_dict_of(model)
    assert set(copy) == set(model.state_dict())
    assert all(not v.requires_grad and v.device.type == "cpu" for v in copy.values())
    before = copy["head.weight"].clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(copy["head.weight"], before)


def test_fine_tuning_checkpoint_loads_as_backbone(tmp_path):
    """A `cft fit` checkpoint (Lightning format, keys under `backbone.`) can start another run."""
    weights, _ = saved_model(tmp_path, num_classes=5)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in weights.items()}, "epoch": 3}, path)
    model = build_backbone(spec(checkpoint_path=str(path), num_classes=5))
    assert_loaded(model, weights)


def test_dinov2_file_with_head_keeps_its_head(tmp_path):
    """timm's DINOv2 pretrained config has no head (num_classes 0): a file's 1000-class head must survive."""
    kwargs = {"img_size": 28, "patch_size": 14, "depth": 1, "embed_dim": 24, "num_heads": 2}
    torch.manual_seed(0)
    source = build_backbone(BackboneSpec("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=10,
                                         model_kwargs=kwargs))
    weights = state_dict_of(source)
    torch.save(weights, tmp_path / "dino.pth")
    model = build_backbone(BackboneSpec("vit_small_patch14_reg4_dinov2.lvd142m", num_classes=10, model_kwargs=kwargs,
                                        checkpoint_path=str(tmp_path / "dino.pth")))
    assert_loaded(model, weights)
