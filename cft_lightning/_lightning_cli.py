"""`cft fit|validate|test|predict`: LightningCLI over `GuidedFineTuner` and `GuidanceDataModule`.

    cft fit --config configs/vit_b_cft.yaml
    cft test --config configs/vit_b_cft.yaml --ckpt_path last
    cft fit --config configs/smoke.yaml --print_config

Imported by `cft_lightning.cli.main` only for these subcommands (Lightning takes seconds to import). Every
plugin (backbone, relevance method, regularizer, logger, callbacks) is chosen in YAML with
`class_path`/`init_args`. Each run's resolved config is written beside its logs under a name no other
run uses, with secrets redacted.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any, NoReturn

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from cft_lightning._registry import load_plugins
from cft_lightning.callbacks import PredictionWriter
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.errors import DataError
from cft_lightning.models.fine_tuner import GuidedFineTuner
from cft_lightning.tracking import ensure_wandb_mode, log_config, run_dir, write_run_summary

__all__ = ["CFTCLI", "REDACTED", "RunConfigSaver", "redact", "run"]

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|token|password|credential)", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(config: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys (api_key, token, ...) replaced."""
    if isinstance(config, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "") else redact(v))
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def _free_path(directory: str, stem: str = "config") -> str:
    path = os.path.join(directory, f"{stem}.yaml")
    n = 1
    while os.path.exists(path):
        path = os.path.join(directory, f"{stem}-{n}.yaml")
        n += 1
    return path


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run's own directory (`config.yaml`; `config-<n>.yaml` if a resumed
    or second stage of the same run already wrote one), never overwriting, with secrets redacted."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer)
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            config = redact(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))
            path = _free_path(folder)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as fh:
                yaml.safe_dump(config, fh, sort_keys=False)
            os.replace(tmp, path)
            self.saved_path = path
            log_config(trainer, config)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _newest_last_checkpoint(root: str) -> str | None:
    candidates = glob.glob(os.path.join(root, "**", "last*.ckpt"), recursive=True)
    return max(candidates, key=os.path.getmtime) if candidates else None


_SUBCOMMAND_TITLES = {
    "fit": "fit: train, validating as configured (Trainer.fit); --ckpt_path resumes a run",
    "validate": "validate: one validation epoch of a checkpoint (Trainer.validate)",
    "test": "test: the test splits and benchmarks of a checkpoint, its Original beside it (Trainer.test)",
    "predict": "predict: predictions.csv for the prediction images (Trainer.predict)",
}


def _pin_logger_dirs(config: Any) -> None:
    """Every logger writes under `trainer.default_root_dir`, so a run's files stay in one folder of its own
    (`tracking.run_dir`) and a sweep run's under the sweep's, whatever `save_dir` a config file pins."""
    trainer = config.get("trainer")
    if trainer is None:
        return
    root = trainer.get("default_root_dir") or os.getcwd()
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(logger, "init_args", None)
        if init is None or "save_dir" not in init:
            continue
        old = init.get("save_dir")
        if old not in (None, ".", "") and os.path.abspath(str(old)) != os.path.abspath(str(root)):
            print(f"cft: {str(getattr(logger, 'class_path', 'logger')).rsplit('.', 1)[-1]} save_dir {old} -> "
                  f"{root} (trainer.default_root_dir: every run's files go under it)", file=sys.stderr)
        init.save_dir = root


class _Parser(LightningArgumentParser):
    """Config errors as one short message (the full usage is `cft <subcommand> --help`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("CFT_DEBUG"):
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"cft: error: {message.strip()}\n(options: {prog} --help)\n")
        raise SystemExit(2)


class CFTCLI(LightningCLI):
    """LightningCLI with the project's defaults and a `--ckpt_path last` that works across processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_kwargs", {"prog": "cft", "default_env": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", _Parser)
        super().__init__(GuidedFineTuner, GuidanceDataModule, *args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list | tuple) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning puts a `--ckpt_path FILE`'s saved hyperparameters over `model.*`: keep the command line's
        `--model.*` flags on top (refusing those that change the network: `cli_ckpt.py`, docs/results.md)."""
        from cft_lightning.cli_ckpt import honour_model_overrides

        sub = self.config.get("subcommand")
        if sub:
            self._resolve_last(sub)  # first, so that `last`'s hyperparameters are applied like a file's
        before = self.config.clone()
        super()._parse_ckpt_path()
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and os.path.isfile(ckpt_path):
            honour_model_overrides(before, self.config, sub, getattr(self, "_argv", []), ckpt_path)

    def _resolve_last(self, sub: str) -> None:
        """`--ckpt_path last` -> the newest last*.ckpt under trainer.default_root_dir (Lightning looks only in this
        run's new checkpoint folder: `fit` would silently start over, `test` would fail)."""
        if self.config[sub].get("ckpt_path") != "last":
            return
        root = self.config[sub].trainer.get("default_root_dir") or os.getcwd()
        found = _newest_last_checkpoint(root)
        if sub == "fit":  # resume from it, or start fresh if there is none
            print(f"cft: resuming from {found}" if found else f"cft: no last*.ckpt under {root!r}: starting fresh",
                  file=sys.stderr)
        elif found is None:
            raise DataError(
                f"--ckpt_path last: no last*.ckpt under {root!r} (trainer.default_root_dir); run `cft fit` "
                "with this config first, or pass the checkpoint's path"
            )
        else:
            print(f"cft: using checkpoint {found}", file=sys.stderr)
        self.config[sub].ckpt_path = found

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """Lightning titles the subcommand's own options with the first line of the Trainer method's docstring,
        which `test` cuts mid-sentence: our own titles instead."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for group in parser._action_groups:
            if any(getattr(action, "dest", None) == "ckpt_path" for action in group._group_actions):
                group.title = _SUBCOMMAND_TITLES.get(subcommand, group.title)
                group.description = None
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--benchmarks", type=str | None, default=None,
            help="test: benchmarks to run: 'all' (every configured one) or comma-separated names (in_val, in_v2, "
            "in_a, in_r, in_sketch, objectnet, si_score_location, si_score_rotation, si_score_size, imagenet_seg); "
            "roots from data.benchmarks or CFT_BENCHMARK_<NAME>",
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit: then test the best checkpoint (the last weights without a monitored checkpoint) in the same "
            "run, as one sweep run",
        )

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub:
            _pin_logger_dirs(self.config[sub])
        chosen = self.config[sub].get("benchmarks") if sub else None
        if chosen is not None:
            self.config[sub].data.benchmark_names = chosen

    def after_fit(self) -> None:
        """`run_summary.json` for the fit; with `--test_after_fit`, test in the same process and summarise."""
        write_run_summary(self.trainer, "fit")
        sub = self.config.get("subcommand")
        if not (sub == "fit" and self.config[sub].get("test_after_fit")) or self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        ckpt = "best" if callback is not None and getattr(callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self.after_test()

    def after_test(self) -> None:
        write_run_summary(self.trainer, "test", {"results": getattr(self.model, "results_paths", None)})

    def before_predict(self) -> None:
        """`cft predict` writes predictions.csv into the run's log directory."""
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter(class_names=self.datamodule.class_names))


def run(args: list[str]) -> None:
    """Run a Trainer subcommand (`fit`, `validate`, `test`, `predict`) with the project's CLI."""
    ensure_wandb_mode()  # no W&B key: offline runs (wandb sync uploads them later) instead of a start-up error
    load_plugins()  # CFT_PLUGINS modules and entry points: their classes resolve by their short class name too
    CFTCLI(args=args)
