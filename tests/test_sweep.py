"""`cft sweep`: W&B sweep files run locally (grid, one process per run), resume, the ablation table; every
shipped sweep file renders into configs that parse; the W&B run's config is the CLI config without secrets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from cft_lightning.cli import main
from cft_lightning.smoke_data import generate
from cft_lightning.sweep import expand_grid, load_sweep, render_command, run_name
from cft_lightning.tracking import find_run_summary

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
SECRETS = {"OPENAI_API_KEY": "sk-sweep-secret-1122334455", "WANDB_API_KEY": "wandb-secret-5544332211"}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("smoke") / "data", classes=3, per_class=3, size=32, seed=1)


def smoke_overrides(data: Path, logs: Path | None = None) -> list[str]:
    return [f"--data.root={data / 'images' / 'train'}", f"--data.masks={data / 'masks'}",
            f"--data.val_root={data / 'images' / 'val'}", f"--data.test_root={data / 'images' / 'test'}",
            "--model.backbone.num_classes=3", '--model.backbone.model_kwargs={"img_size": 32, "patch_size": 8, '
            '"depth": 2}', *([f"--trainer.logger.init_args.save_dir={logs}"] if logs else []),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_two_run_sweep_end_to_end_and_resume(smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture):
    """The shipped smoke config as it is (its CSV logger pins save_dir: runs/smoke): every run's files live in
    the run's own folder under the sweep's, and nothing lands in runs/smoke, where `cft test --ckpt_path last`
    of the smoke config looks."""
    (tmp_path / "configs").mkdir()  # the sweep's command names configs/smoke.yaml relative to the working dir
    for name in ("smoke.yaml",):
        (tmp_path / "configs" / name).write_text((ROOT / "configs" / name).read_text())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    main(["sweep", str(ROOT / "configs" / "sweeps" / "smoke_lr.yaml"), "--out", str(out),
          *smoke_overrides(smoke_data)])
    assert not (tmp_path / "runs" / "smoke").exists(), "a sweep run wrote into the config's own folder"
    record = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["finished", "finished"]
    dirs = [Path(r["dir"]) for r in record["runs"]]
    assert dirs[0] != dirs[1] and [d.name for d in dirs] == ["000-lr=0.0001", "001-lr=0.001"]
    for run in dirs:  # each run fitted and tested in its own folder: config, logs, checkpoints, results together
        summary_path = find_run_summary(run)
        folder = summary_path.parent
        assert folder.parent.parent == run  # <run>/lightning_logs/version_0
        summary = json.loads(summary_path.read_text())
        assert summary["fit"]["status"] == summary["test"]["status"] == "finished"
        assert summary["fit"]["log_dir"] == summary["test"]["log_dir"] == str(folder)
        for name in ("config.yaml", "metrics.csv", "fine_tuning_classes.json", "checkpoints/last.ckpt"):
            assert (folder / name).is_file(), name
        assert Path(summary["test"]["results"]["json"]).parent == folder
        assert Path(summary["test"]["results"]["results_png"]).is_file()
    rows = record["table"]
    assert [r["model.lr"] for r in rows] == [1e-4, 1e-3]
    assert all(0.0 <= r["test/acc1"] <= 1.0 for r in rows)
    assert (out / "ablation.png").is_file() and "test/acc1" in (out / "ablation.md").read_text()
    assert "cft sweep smoke_lr: 2 run(s)" in capsys.readouterr().out
    # a rerun skips what finished
    main(["sweep", str(ROOT / "configs" / "sweeps" / "smoke_lr.yaml"), "--out", str(out),
          *smoke_overrides(smoke_data)])
    record = json.loads((out / "sweep.json").read_text())
    assert all(r["status"].startswith("skipped") for r in record["runs"])
    assert [r["test/acc1"] for r in record["table"]] == [r["test/acc1"] for r in rows]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_file_renders_configs_that_parse(path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["cft"])
    assert path.read_text().lstrip().startswith("#"), "sweep files open with a comment"
    spec = load_sweep(path)
    assert spec["program"] == "cft" and spec["method"] == "grid" and "${args}" in spec["command"]
    grid = expand_grid(spec["parameters"])
    names = {run_name(i, p, list(spec["parameters"])) for i, p in enumerate(grid)}
    assert len(names) == len(grid)
    for params in grid:
        command = render_command(spec["command"], "cft", params)
        args = command[command.index("cft_lightning") + 1:]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        out = capsys.readouterr()
        assert exit_info.value.code in (0, None), out.err
        config = yaml.safe_load(out.out)
        for key, value in params.items():
            if key == "config":
                continue
            node = config
            for part in key.split("."):
                node = node[part]
            got = node["class_path"] if isinstance(node, dict) and "class_path" in node else node
            assert got == value, key


def test_render_command_and_bad_files(tmp_path: Path):
    params = {"model.lr": 1e-6, "model.relevance": "cft_lightning.relevance.GradCAM"}
    cmd = render_command(["${env}", "${program}", "fit", "${args}"], "cft", params)
    assert cmd == [sys.executable, "-m", "cft_lightning", "fit", "--model.lr=1e-06",
                   "--model.relevance=cft_lightning.relevance.GradCAM"]
    assert render_command(["${interpreter}", "x.py", "${args_no_equals}"], "x.py", {"a": 1})[-2:] == ["--a", "1"]
    assert run_name(3, params, list(params)) == "003-lr=1e-06-relevance=GradCAM"
    bad = {"method": "bayes", "parameters": {"model.lr": {"values": [1]}}, "command": ["${args}"]}
    (tmp_path / "bayes.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="needs W&B's server"):
        load_sweep(tmp_path / "bayes.yaml")
    bad = {"method": "grid", "parameters": {"model.lr": {"min": 0, "max": 1}}, "command": ["${args}"]}
    (tmp_path / "dist.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="'values'"):
        load_sweep(tmp_path / "dist.yaml")


def test_wandb_run_config_is_the_cli_config_without_secrets(smoke_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """An offline W&B run of `cft fit --test_after_fit`: its config equals the saved (redacted) CLI config, it
    holds the results table and pictures, and no file the run wrote contains a key from the environment."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(sys, "argv", ["cft"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs"
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(runs), "project": "p"}}
    args = [*smoke_overrides(smoke_data, runs)[:-3], "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger={json.dumps(logger)}",
            f"--trainer.default_root_dir={runs}", "--trainer.max_epochs=1", "--test_after_fit=true",
            "--trainer.callbacks+=cft_lightning.callbacks.RelevanceOverlays",
            "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.num_images=2"]
    main(["fit", "--config", str(ROOT / "configs" / "smoke.yaml"), *args])
    run = wandb.run
    logged = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    wandb.finish()
    saved = yaml.safe_load(next(runs.rglob("config.yaml")).read_text())
    assert json.loads(json.dumps(logged)) == json.loads(json.dumps(saved))
    summary_path = find_run_summary(runs)
    summary = json.loads(summary_path.read_text())
    assert summary["fit"]["loggers"] == ["WandbLogger"] and summary["test"]["status"] == "finished"
    folder = summary_path.parent  # the run's own folder: <save_dir>/<project>/<run id>, not a shared one
    assert folder == runs / "p" / run.id and summary["fit"]["log_dir"] == str(folder)
    for name in ("config.yaml", "overlays/step_000001.png", "overlays.png", "results.png", "results.json",
                 "fine_tuning_classes.json", "checkpoints/last.ckpt"):
        assert (folder / name).is_file(), name
    offline = list(runs.rglob("run-*.wandb"))
    assert offline, "an offline W&B run was written"
    for path in runs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in SECRETS.values():
                assert secret.encode() not in data, path
    assert os.environ["WANDB_MODE"] == "offline"
