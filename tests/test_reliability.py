"""Bad input the other test files do not cover: garbage and 16-bit images, an unknown key in a YAML config, a
checkpoint that would run pickled code, a mask store made from another concept bank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cft_lightning.cli import main
from cft_lightning.data.image_io import load_image
from cft_lightning.errors import DataError
from cft_lightning.smoke_data import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("rel") / "data", classes=3, per_class=3, size=32, seed=1)


def test_garbage_bytes_image_is_named(tmp_path: Path):
    path = tmp_path / "c" / "garbage.jpg"
    path.parent.mkdir()
    path.write_bytes(os.urandom(2048))
    with pytest.raises(DataError, match="garbage.jpg"):
        load_image(path)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "xray.png")  # mode I;16
    assert Image.open(tmp_path / "xray.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "xray.png"))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)  # a ramp stays a ramp
    floats = np.linspace(-3, 5, 100).reshape(10, 10).astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.reshape(-1).astype(int)) >= 0).all()


def test_unknown_key_in_a_yaml_config_is_one_clear_message(smoke: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cft"])
    (tmp_path / "bad.yaml").write_text("model:\n  lrr: 3\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs" / "smoke.yaml"), "--config", str(tmp_path / "bad.yaml"),
              "--data.root", str(smoke / "images" / "train")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "lrr" in err and "cft: error:" in err, err


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does with torch.load(weights_only=False)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_that_would_run_pickled_code_are_refused(smoke: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cft"])
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(str(marker))}, evil)
    with pytest.raises(SystemExit):
        main(["explain", "--ckpt", str(evil), "--images", str(smoke / "images" / "test"), "--out",
              str(tmp_path / "x")])
    assert "refused" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(ROOT / "configs" / "smoke.yaml"), "--ckpt_path", str(evil),
              "--data.root", str(smoke / "images" / "train"), "--data.masks", str(smoke / "masks"),
              "--data.test_root", str(smoke / "images" / "test"), "--model.backbone.num_classes", "3",
              "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}',
              "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cft: error:" in err and "Traceback" not in err, err[-800:]
    assert not marker.exists(), "the pickled payload ran"


def test_a_store_made_from_another_concept_bank_is_refused(tmp_path: Path, capsys):
    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.benchmarks.shortcut_parts import class_parts

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=2, val_per_class=1, test_per_class=1)
    data = build_shortcut_parts(tmp_path / "sp", spec, progress=False)
    bank = {cls: list(parts) for cls, parts in class_parts(3).items()}
    (tmp_path / "a.json").write_text(json.dumps(bank))
    (tmp_path / "b.json").write_text(json.dumps({k: v[:1] for k, v in bank.items()}))
    args = ["masks", "generate", "--images", str(data / "images" / "train"), "--out", str(tmp_path / "store"),
            "--grounder", "oracle", "--oracle_masks", str(data / "masks"), "--accelerator", "cpu", "--devices", "1",
            "--no_progress"]
    main([*args, "--concepts", str(tmp_path / "a.json")])
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["concept_bank"]["path"].endswith("a.json") and manifest["models"]["grounder"] == "oracle"
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*.png"))
    with pytest.raises(SystemExit):
        main([*args, "--concepts", str(tmp_path / "b.json")])
    assert "was made from the concept bank" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*.png")) == before  # untouched
    main([*args, "--concepts", str(tmp_path / "a.json")])  # the same bank: a resume, allowed


def test_soft_masks_in_a_store_read_at_half_intensity(tmp_path: Path):
    """A grayscale (anti-aliased) mask PNG put into a store by another tool reads as pixels >= 128, by design;
    the importers, by contrast, refuse non-binary files (tests/test_mask_import.py)."""
    from cft_lightning.data.mask_store import MaskStore

    store = MaskStore(tmp_path)
    soft = np.array([[0, 100, 127], [128, 200, 255]], dtype=np.uint8)
    store.path("c/x.png", "object").parent.mkdir(parents=True)
    Image.fromarray(soft, mode="L").save(store.path("c/x.png", "object"))
    assert (store.read("c/x.png", "object") == (soft >= 128)).all()
