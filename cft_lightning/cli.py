"""The `cft` command: LightningCLI over `GuidedFineTuner` and `GuidanceDataModule`.

    cft fit --config configs/vit_b_cft.yaml
    cft test --config configs/vit_b_cft.yaml --ckpt_path last
    cft fit --config configs/smoke.yaml --print_config

Every plugin (backbone, relevance method, regularizer, logger, callbacks) is chosen in YAML with
`class_path`/`init_args`. Each run's resolved config is written beside its logs under a name no other
run uses, with secrets redacted. Configuration and data errors end in one `cft: error: ...` line
(`CFT_DEBUG=1` shows the traceback instead).
"""

from __future__ import annotations

import glob
import importlib
import os
import pickle
import re
import sys
import warnings
from typing import Any, NoReturn

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from cft_lightning.callbacks import PredictionWriter
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.data.errors import DataError
from cft_lightning.models.backbone import BackboneError
from cft_lightning.models.fine_tuner import GuidedFineTuner, NonFiniteLossError
from cft_lightning.relevance._vit import UnsupportedModelError
from cft_lightning.tracking import ensure_wandb_mode, log_config, write_run_summary

__all__ = ["CFTCLI", "RunConfigSaver", "main", "redact"]

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


def _run_dir(trainer: Trainer) -> str:
    """The directory of this run's logs: the logger's versioned dir, or save_dir/name/version for loggers
    (like W&B) whose `log_dir` is shared between runs. Must be called on every rank (it broadcasts)."""
    log_dir = trainer.log_dir or trainer.default_root_dir
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None) is None:  # e.g. W&B: trainer.log_dir is save_dir
        version = getattr(logger, "version", None)
        if version is not None:
            log_dir = os.path.join(log_dir, str(getattr(logger, "name", "") or ""), str(version))
    return log_dir


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
        run_dir = _run_dir(trainer)
        if trainer.is_global_zero:
            os.makedirs(run_dir, exist_ok=True)
            config = redact(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))
            path = _free_path(run_dir)
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
        before = self.config.clone()
        super()._parse_ckpt_path()
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and os.path.isfile(ckpt_path):
            honour_model_overrides(before, self.config, sub, getattr(self, "_argv", []), ckpt_path)

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
        chosen = self.config[sub].get("benchmarks") if sub else None
        if chosen is not None:
            self.config[sub].data.benchmark_names = chosen
        if sub == "fit" and self.config[sub].get("ckpt_path") == "last":
            # Lightning looks for last.ckpt only in this run's (new) checkpoint folder and would silently start
            # over; resume from the newest one under default_root_dir instead, or start fresh if there is none.
            root = self.config[sub].trainer.get("default_root_dir") or os.getcwd()
            found = _newest_last_checkpoint(root)
            print(f"cft: resuming from {found}" if found else f"cft: no last*.ckpt under {root!r}: starting fresh",
                  file=sys.stderr)
            self.config[sub].ckpt_path = found
        if sub in ("validate", "test", "predict") and self.config[sub].get("ckpt_path") == "last":
            root = self.config[sub].trainer.get("default_root_dir") or os.getcwd()
            found = _newest_last_checkpoint(root)
            if found is None:
                raise DataError(
                    f"--ckpt_path last: no last*.ckpt under {root!r} (trainer.default_root_dir); run `cft fit` "
                    "with this config first, or pass the checkpoint's path"
                )
            print(f"cft: using checkpoint {found}", file=sys.stderr)
            self.config[sub].ckpt_path = found

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


# `cft <tool>`: the stages and utilities with their own parsers (module with a `main(argv)`)
TOOLS = {
    "demo": "cft_lightning.demo",
    "explain": "cft_lightning.explain",
    "concepts": "cft_lightning.concepts.discovery",
    "masks": "cft_lightning.masks.cli",
    "critique": "cft_lightning.critique.cli",
    "sweep": "cft_lightning.sweep",
}
# pickle.UnpicklingError: a checkpoint torch refuses to load weights-only (it would run pickled code)
# NonFiniteLossError: training stopped on a NaN/inf loss or gradient (the message names the batch)
_USER_ERRORS = (DataError, BackboneError, UnsupportedModelError, ValueError, KeyError, FileNotFoundError,
                pickle.UnpicklingError, NonFiniteLossError)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `cft` console script."""
    # Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates: noise for every user, nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in TOOLS:  # not Trainer subcommands: their own parsers
        command = importlib.import_module(TOOLS[argv[0]]).main
        try:
            command(argv[1:])
        except (DataError, BackboneError, UnsupportedModelError, ValueError, ImportError, FileNotFoundError) as err:
            if os.environ.get("CFT_DEBUG"):
                raise
            print(f"cft: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    ensure_wandb_mode()  # no W&B key: offline runs (wandb sync uploads them later) instead of a start-up error
    try:
        CFTCLI(args=args)
    except _USER_ERRORS as err:
        if os.environ.get("CFT_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cft: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
