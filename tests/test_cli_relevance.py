"""`cft test` with every registered relevance method class (`list_relevance()`), on a tiny ViT and a tiny CNN
(issue 17, item 10).

Each architecture is fitted once (CFT with Grad-CAM, the run that used to crash at test time), then tested from
its checkpoint with each method: relevance runs on the fine-tuned model and on the frozen reference (no
parameter and no input requires grad), in `test_step` (alignment metrics) and for `overlays.png`. A method that
cannot explain the architecture fails with one `cft: error:` line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cft_lightning.cli import main
from cft_lightning.relevance import list_relevance, relevance_class
from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
DATA_32 = json.dumps({"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                      "interpolation": "bilinear", "crop_pct": 1.0})
ARCHITECTURES = {
    "vit": ["--model.backbone.name", "vit_tiny_patch16_224",
            "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}'],
    "cnn": ["--model.backbone.name", "test_resnet", "--model.backbone.model_kwargs", "{}",
            "--data.data_config", DATA_32],
}
# every class behind a registered name, by class path (a preset such as cp_lrp is its class again)
CLASSES = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in map(relevance_class, list_relevance())}
METHODS = sorted(CLASSES, key=lambda path: path.rsplit(".", 1)[-1])


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=3, per_class=2, size=32, seed=1)


def _args(data: Path, runs: Path, arch: str, *extra: str) -> list[str]:
    return [
        "--config", str(SMOKE),
        "--data.root", str(data / "images" / "train"),
        "--data.masks", str(data / "masks"),
        "--data.val_root", str(data / "images" / "val"),
        "--data.test_root", str(data / "images" / "test"),
        "--model.backbone.num_classes", "3",
        *ARCHITECTURES[arch],
        "--trainer.default_root_dir", str(runs),
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def checkpoint(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """last.ckpt of one CFT + Grad-CAM epoch of an architecture (fitted on first use)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            runs = tmp_path_factory.mktemp(f"runs_{arch}")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "argv", ["cft"])
                main(["fit", *_args(smoke_data, runs, arch, "--model.relevance", "cft_lightning.relevance.GradCAM")])
            cache[arch] = next(runs.rglob("last.ckpt"))
        return cache[arch]

    return get


def test_every_relevance_method_is_found() -> None:
    names = {path.rsplit(".", 1)[-1] for path in METHODS}
    assert len(names) >= 8 and {"GradCAM", "LayerGradXActivation", "ZennitLRP", "AttnLRP", "IIA"} <= names


@pytest.mark.parametrize("method", METHODS, ids=lambda path: path.rsplit(".", 1)[-1])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cft_test_with_every_relevance_method(arch: str, method: str, smoke_data: Path, tmp_path: Path,
                                              checkpoint: Callable[[str], Path],
                                              capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(arch)
    runs = tmp_path / "runs"
    args = ["test", *_args(smoke_data, runs, arch, "--model.relevance", method), "--ckpt_path", str(ckpt)]
    cls, name = CLASSES[method], method.rsplit(".", 1)[-1]
    if name == "IIA":
        args += ["--model.relevance.steps", "2"]
    capsys.readouterr()
    if arch not in cls.families:  # the class flag: e.g. the attention methods cannot explain a CNN
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err, err
        lines = [line for line in err.strip().splitlines() if line.startswith("cft: error:")]
        assert len(lines) == 1 and f"model.relevance {name} cannot explain test_resnet" in lines[0], err
        return
    main(args)
    results = json.loads(next(runs.rglob("results.json")).read_text())
    assert results["run"]["relevance"].endswith(f".{name}")  # the command line's method, not the checkpoint's
    metrics = results["splits"]["test"]["metrics"]
    for key in ("pixel_acc", "concept_share"):  # relevance ran on both models in test_step
        assert set(metrics[key]) >= {"fine_tuned", "original"}, (key, metrics[key])
    assert next(runs.rglob("overlays.png")).is_file()  # and again for the pictures


def test_a_method_that_cannot_explain_the_backbone_fails_at_construction_without_a_guided_objective() -> None:
    """Relevance used only by `cft test` (alignment, overlays) is checked too, in eval mode."""
    from cft_lightning.models import BackboneSpec, GuidedFineTuner
    from cft_lightning.regularizers import PlainFineTuning
    from cft_lightning.relevance import AttnLRP, UnsupportedModelError

    spec = BackboneSpec("test_resnet", pretrained=False, num_classes=3)
    with pytest.raises(UnsupportedModelError, match="model.relevance AttnLRP cannot explain test_resnet"):
        GuidedFineTuner(spec, PlainFineTuning(), AttnLRP())
