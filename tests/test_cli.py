"""The `cft` command end to end: fit and test on the smoke config, config saving, errors, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cft_lightning.cli import REDACTED, main, redact
from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv sits beside `args`."""
    monkeypatch.setattr(sys, "argv", ["cft"])


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=3, per_class=3, size=32, seed=1)


def _args(data: Path, runs: Path, *extra: str, csv_logger: bool = True) -> list[str]:
    """Smoke-config overrides: generated data in tmp, 32 px, a 2-block model, logs under `runs`."""
    return [
        "--config", str(SMOKE),
        "--data.root", str(data / "images" / "train"),
        "--data.masks", str(data / "masks"),
        "--data.val_root", str(data / "images" / "val"),
        "--data.test_root", str(data / "images" / "test"),
        "--model.backbone.num_classes", "3",
        "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}',
        "--trainer.default_root_dir", str(runs),
        *(["--trainer.logger.init_args.save_dir", str(runs)] if csv_logger else []),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


def _metrics(version_dir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(version_dir / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def test_fit_then_test_with_last_checkpoint(smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    main(["fit", *_args(smoke_data, runs)])
    v0 = runs / "lightning_logs" / "version_0"
    assert (v0 / "config.yaml").is_file()
    assert (v0 / "checkpoints" / "last.ckpt").is_file()
    fit = _metrics(v0)
    for key in ("train/loss_epoch", "train/concept_epoch", "train/non_concept_epoch", "train/cls_epoch",
                "val/loss", "val/acc1", "val/ref_acc1", "train/acc1", "train/acc5"):
        assert key in fit, key
        assert fit[key] == fit[key], key  # not NaN
    assert "train/ref_acc1" not in fit  # the reference skips training batches unless asked to
    saved = yaml.safe_load((v0 / "config.yaml").read_text())
    assert saved["model"]["regularizer"]["class_path"] == "cft_lightning.regularizers.CFT"
    assert saved["data"]["root"] == str(smoke_data / "images" / "train")

    ckpt = torch.load(v0 / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all(k.startswith("backbone.") for k in ckpt["state_dict"]), "only the trainable backbone is saved"

    capsys.readouterr()
    main(["test", *_args(smoke_data, runs), "--ckpt_path", "last"])
    captured = capsys.readouterr()
    assert str(v0 / "checkpoints" / "last.ckpt") in captured.err
    v1 = runs / "lightning_logs" / "version_1"
    assert (v1 / "config.yaml").is_file(), "the test run saves its own config, beside its own logs"
    test = _metrics(v1)
    for key in ("test/acc1", "test/acc5", "test/ref_acc1", "test/ref_acc5"):
        assert 0.0 <= test[key] <= 1.0, key
    # The reference is the untouched start: the test run rebuilt it from the same spec and seed.
    assert test["test/acc5"] == 1.0  # 3 classes: top-5 clamps to top-3, which always hits

    main(["validate", *_args(smoke_data, runs), "--ckpt_path", "last"])
    val = _metrics(runs / "lightning_logs" / "version_2")
    assert {"val/loss", "val/concept", "val/acc1", "val/ref_acc1"} <= set(val)

    # predict: a flat folder of unlabelled images plus a class folder; one CSV row per image
    pred_root = tmp_path / "to_predict"
    (pred_root / "circle").mkdir(parents=True)
    test_images = sorted((smoke_data / "images" / "test").rglob("*.png"))
    shutil.copy(test_images[0], pred_root / "loose.png")
    shutil.copy(test_images[1], pred_root / "circle" / "a.png")
    main(["predict", *_args(smoke_data, runs), "--ckpt_path", "last", "--data.predict_root", str(pred_root)])
    with open(runs / "lightning_logs" / "version_3" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == ["circle/a.png", "loose.png"]
    by_path = {r["path"]: r for r in rows}
    assert by_path["loose.png"]["label"] == "-1" and by_path["circle/a.png"]["label"] == "0"
    for row in rows:
        assert 0 <= int(row["pred"]) < 3 and 0.0 < float(row["prob"]) <= 1.0
        assert row["ref_pred_name"] in ("circle", "square", "triangle")


def test_second_run_does_not_overwrite_config(smoke_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = _args(smoke_data, runs, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    main(["fit", *args])
    first = (runs / "lightning_logs" / "version_0" / "config.yaml").read_text()
    main(["fit", *args, "--model.lr", "0.001"])
    assert (runs / "lightning_logs" / "version_0" / "config.yaml").read_text() == first
    second = yaml.safe_load((runs / "lightning_logs" / "version_1" / "config.yaml").read_text())
    assert second["model"]["lr"] == 0.001


def test_wandb_runs_get_their_own_config(smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's log_dir is shared by all runs (Lightning #7679); configs go to <save_dir>/<project>/<run id>."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs"
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(runs), "project": "p"}}
    args = _args(smoke_data, runs, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                 "--trainer.logger", json.dumps(logger), csv_logger=False)
    import wandb

    main(["fit", *args])
    wandb.finish()  # a console run ends its process; in one process the next logger would reuse the run
    main(["fit", *args])
    wandb.finish()
    configs = sorted(runs.glob("p/*/config.yaml"))
    assert len(configs) == 2, list(runs.rglob("config*.yaml"))
    assert configs[0].parent != configs[1].parent


def test_print_config(smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(smoke_data, tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["relevance"]["class_path"] == "cft_lightning.relevance.AttnLRP"
    assert config["model"]["regularizer"]["init_args"]["non_concept_weight"] == 1.2
    assert not (tmp_path / "lightning_logs").exists(), "--print_config must not start a run"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.lrr", "3"], "model.lrr"),                                   # unknown key
        (["--data.batch_size", "four"], "data.batch_size"),                    # wrong type
        (["--model.regularizer.init_args.loss_form", "papr"], "loss_form"),    # not an allowed value
        (["--data.root", "/nonexistent/images"], "data.root"),                 # missing data path
        (["--model.backbone.name", "vit_tinyy_patch16_224"], "vit_tiny_patch16_224"),  # typo -> suggestion
        (["--model.lr", "-1"], "model.lr"),                                    # invalid value
    ],
)
def test_config_errors_are_one_clear_message(
    smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(smoke_data, tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "cft: error:" in err and expected in err, err
    assert len(err.strip().splitlines()) <= 6, err


def test_missing_masks_kind_is_reported(smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", *_args(smoke_data, tmp_path), "--data.mask_kinds", "[object]"])
    err = capsys.readouterr().err
    assert "data.mask_kinds" in err and "concept" in err


def test_ckpt_last_without_runs_is_reported(smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["test", *_args(smoke_data, tmp_path / "empty"), "--ckpt_path", "last"])
    assert "last" in capsys.readouterr().err


def test_redact_hides_secret_values() -> None:
    config = {"a": {"api_key": "sk-123", "openai_token": "t", "base_url": "http://x"}, "l": [{"password": "p"}],
              "api_key_env": None}
    out = redact(config)
    assert out["a"]["api_key"] == REDACTED and out["a"]["openai_token"] == REDACTED
    assert out["a"]["base_url"] == "http://x"
    assert out["l"][0]["password"] == REDACTED
    assert out["api_key_env"] is None
    assert config["a"]["api_key"] == "sk-123", "the input is not modified"


@pytest.mark.slow
def test_fit_under_ddp_two_cpu_processes(smoke_data: Path, tmp_path: Path) -> None:
    """`cft fit` with strategy ddp on 2 CPU processes (gloo): the console script relaunches itself per rank."""
    runs = tmp_path / "runs"
    cft = Path(sys.executable).parent / "cft"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    args = [str(cft), "fit", *_args(smoke_data, runs), "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v0 = runs / "lightning_logs" / "version_0"
    assert (v0 / "checkpoints" / "last.ckpt").is_file()
    assert len(list(runs.rglob("config*.yaml"))) == 1, "rank 0 alone writes the config"
    metrics = _metrics(v0)
    assert metrics["val/loss"] == metrics["val/loss"]
    assert "gloo" in proc.stderr or "distributed_backend=gloo" in proc.stdout + proc.stderr
    # validating the checkpoint on 2 processes and on 1 gives the same accuracies: every one of the 9 (odd)
    # validation images is seen by exactly one rank, none twice (Lightning's default sampler would pad)
    ckpt = str(v0 / "checkpoints" / "last.ckpt")
    found = {}
    for devices in ("2", "1"):
        out = tmp_path / f"validate{devices}"
        args = [str(cft), "validate", *_args(smoke_data, out), "--ckpt_path", ckpt, "--trainer.devices", devices,
                *(["--trainer.strategy", "ddp"] if devices == "2" else [])]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[devices] = _metrics(out / "lightning_logs" / "version_0")
    for key in ("val/acc1", "val/acc5", "val/ref_acc1"):
        assert found["2"][key] == found["1"][key], key
    assert found["2"]["val/loss"] == pytest.approx(found["1"]["val/loss"], rel=0.15)  # a mean of rank means


def test_benchmarks_flag_reaches_the_data_module(smoke_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """`cft test --benchmarks in_v2`: the flag selects the benchmark; a 3-class head cannot score ImageNet."""
    v2 = tmp_path / "v2"
    (v2 / "0").mkdir(parents=True)
    shutil.copy(next((smoke_data / "images" / "test").rglob("*.png")), v2 / "0" / "a.png")
    with pytest.raises(SystemExit):
        main(["test", *_args(smoke_data, tmp_path), "--benchmarks", "in_v2",
              "--data.benchmarks", json.dumps({"in_v2": str(v2)})])
    err = capsys.readouterr().err
    assert "cft: error:" in err and "['in_v2'] score ImageNet-1k logits" in err, err
    with pytest.raises(SystemExit):
        main(["test", *_args(smoke_data, tmp_path), "--benchmarks", "in_a"])
    assert "no root for ['in_a']" in capsys.readouterr().err
