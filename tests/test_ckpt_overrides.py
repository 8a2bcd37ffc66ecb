"""`cft test --ckpt_path FILE --model.*`: command-line model flags are honoured over the checkpoint's saved
hyperparameters; flags that change the network are refused in one line (issue 17, item 11)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from cft_lightning.cli import main
from cft_lightning.cli_ckpt import command_line_model_keys, honour_model_overrides
from cft_lightning.errors import DataError
from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cft"])


def _args(data: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--config", str(SMOKE),
        "--data.root", str(data / "images" / "train"),
        "--data.masks", str(data / "masks"),
        "--data.val_root", str(data / "images" / "val"),
        "--data.test_root", str(data / "images" / "test"),
        "--model.backbone.num_classes", "3",
        "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}',
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
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, last.ckpt) of one smoke epoch (track_reference true, AttnLRP)."""
    root = tmp_path_factory.mktemp("overrides")
    data = generate(root / "data", classes=3, per_class=2, size=32, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["cft"])
        main(["fit", *_args(data, root / "runs")])
    return data, next((root / "runs").rglob("last.ckpt"))


def _results(runs: Path) -> dict:
    return json.loads(next(runs.rglob("results.json")).read_text())


def test_command_line_model_flags_win_over_the_checkpoint(fitted: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    data, ckpt = fitted
    capsys.readouterr()
    main(["test", *_args(data, tmp_path / "a", "--model.track_reference", "false",
                         "--model.relevance", "cft_lightning.relevance.GradCAM"), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert "model.track_reference" in err and "model.relevance" in err, err  # said, once, on one line
    results = _results(tmp_path / "a")
    assert results["run"]["relevance"].endswith(".GradCAM")
    assert "original" not in results["splits"]["test"]["metrics"]["acc1"], "the reference was still tested"
    # without flags, the checkpoint's own settings: the reference and AttnLRP
    main(["test", *_args(data, tmp_path / "b"), "--ckpt_path", str(ckpt)])
    results = _results(tmp_path / "b")
    assert results["run"]["relevance"].endswith(".AttnLRP")
    assert "original" in results["splits"]["test"]["metrics"]["acc1"]


def test_the_checkpoint_replaces_the_config_files_model_settings(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    """A second `--config` that edits model.* is not the command line: the checkpoint's values hold."""
    data, ckpt = fitted
    edit = tmp_path / "edit.yaml"
    edit.write_text("model:\n  track_reference: false\n")
    main(["test", *_args(data, tmp_path / "c"), "--config", str(edit), "--ckpt_path", str(ckpt)])
    assert "original" in _results(tmp_path / "c")["splits"]["test"]["metrics"]["acc1"]


def test_ckpt_path_last_applies_the_checkpoints_settings_like_a_file(fitted: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """`--ckpt_path last` is resolved before Lightning reads a checkpoint's hyperparameters, so the newest
    last.ckpt's settings hold as a named file's do (they used to be skipped for `last`), and command-line
    `--model.*` flags still win over them."""
    data = fitted[0]
    runs = tmp_path / "runs"
    main(["fit", *_args(data, runs, "--model.track_reference", "false")])

    def tested(*flags: str) -> dict:
        before = set(runs.rglob("results.json"))
        main(["test", *_args(data, runs), *flags, "--ckpt_path", "last"])
        (new,) = set(runs.rglob("results.json")) - before
        return json.loads(new.read_text())["splits"]["test"]["metrics"]["acc1"]

    assert "original" not in tested()  # the config says track_reference: true; the checkpoint's false holds
    assert "original" in tested("--model.track_reference", "true")  # the command line wins


@pytest.mark.parametrize(("flag", "value"), [("--model.backbone.num_classes", "4"),
                                             ("--model.backbone.model_kwargs", '{"img_size": 32, "depth": 3}'),
                                             ("--model.backbone.name", "vit_small_patch16_224")])
def test_flags_that_change_the_network_are_refused_in_one_line(fitted: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture, flag: str,
                                                               value: str) -> None:
    data, ckpt = fitted
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["test", *_args(data, tmp_path), flag, value, "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cft: error:")]
    assert len(lines) == 1 and flag in lines[0] and str(ckpt) in lines[0], err


def test_flag_keys_and_plugin_init_args() -> None:
    argv = ["test", "--config", "x.yaml", "--model.lr=0.1", "--model.relevance.layer", "stages.-1",
            "--data.batch_size", "2", "--model.lr", "0.2", "--model", "{}"]
    assert command_line_model_keys(argv) == ["model.lr", "model.relevance.layer", "model"]
    plugin = Namespace(class_path="cft_lightning.relevance.GradCAM", init_args=Namespace(layer="stages.-1"))
    before = Namespace(test=Namespace(model=Namespace(lr=0.2, relevance=plugin, track_reference=True)))
    after = Namespace(test=Namespace(model=Namespace(
        lr=1.0, track_reference=True,
        relevance=Namespace(class_path="cft_lightning.relevance.GradCAM", init_args=Namespace(layer=None)))))
    changed = honour_model_overrides(before, after, "test", ["--model.relevance.layer", "stages.-1"], "c.ckpt")
    assert changed == ["model.relevance.layer"]
    assert after.test.model.relevance.init_args.layer == "stages.-1" and after.test.model.lr == 1.0
    arch = Namespace(test=Namespace(model=Namespace(backbone=Namespace(name="a", num_classes=3, model_kwargs={}))))
    with pytest.raises(DataError, match="model.backbone.num_classes"):
        other = arch.clone()
        other.test.model.backbone.num_classes = 5
        honour_model_overrides(other, arch, "test", ["--model.backbone", "{}"], "c.ckpt")
