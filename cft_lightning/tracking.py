"""Experiment tracking around the `cft` command: W&B offline by default, the run's config and results in W&B,
images to whichever loggers take them, and a run summary file the sweep runner reads.

- `ensure_wandb_mode()`: with no W&B key (no `WANDB_API_KEY`, no `api.wandb.ai` entry in ~/.netrc) and no
  `WANDB_MODE`, W&B runs offline (`wandb sync` uploads later) instead of failing at start-up.
- `log_config(trainer, config)`: the resolved CLI config, secrets redacted, into every W&B logger's run config.
- `log_results(trainer, payload, images)`: the `cft test` table as a W&B table, and PNGs as images.
- `log_images(trainer, key, images, step)`: numpy images to W&B (`log_image`) and TensorBoard (`add_image`);
  CSV loggers take none.
- `run_dir(trainer)`: the one folder of this run, where every file of it goes (config, logs, checkpoints,
  results, pictures, the class split, the summary), whatever the logger: a CSV or TensorBoard logger's
  versioned `log_dir`; for W&B, whose `log_dir` is shared by all runs, `<save_dir>/<project>/<run id>`
  (where Lightning puts its checkpoints); without a logger, `default_root_dir`.
- `write_run_summary(trainer, stage, path)`: the last logged metrics, run folder, checkpoints and results
  paths as JSON in the run folder (`run_summary.json`), so a sweep can table runs whatever their loggers.
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cft_lightning._io import atomic_write

__all__ = ["ensure_wandb_mode", "find_run_summary", "log_config", "log_images", "log_results", "run_dir",
           "wandb_key_available", "write_run_summary"]

SUMMARY = "run_summary.json"


def wandb_key_available() -> bool:
    """A W&B key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def ensure_wandb_mode() -> str | None:
    """Set `WANDB_MODE=offline` when no key is available and no mode is set; returns the mode in force."""
    if "WANDB_MODE" not in os.environ and not wandb_key_available():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE")


def run_dir(trainer: Any) -> str:
    """The folder of this run's files (see the module docstring). Call it on every rank: it broadcasts."""
    directory = trainer.log_dir or trainer.default_root_dir
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None) is None:  # e.g. W&B: trainer.log_dir is save_dir
        version = getattr(logger, "version", None)
        if version is not None:
            directory = os.path.join(directory, str(getattr(logger, "name", "") or ""), str(version))
    return directory


def find_run_summary(root: str | os.PathLike[str]) -> Path | None:
    """The newest `run_summary.json` under `root` (a run's `default_root_dir`), or None."""
    found = sorted(Path(root).rglob(SUMMARY), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
    return found[-1] if found else None


def _loggers(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "loggers", None) or [])


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def log_config(trainer: Any, config: dict[str, Any]) -> None:
    """The config (already redacted) into the run config of every W&B logger (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in _loggers(trainer):
        if _is_wandb(logger):
            logger.experiment.config.update(config, allow_val_change=True)


def log_images(trainer: Any, key: str, images: Sequence[np.ndarray], captions: Sequence[str] | None = None,
               step: int | None = None) -> None:
    """(H, W, 3) uint8 images to the loggers that take images (rank 0 only)."""
    if not trainer.is_global_zero or not images:
        return
    for logger in _loggers(trainer):
        if _is_wandb(logger):
            extra = {"caption": list(captions)} if captions else {}
            logger.log_image(key=key, images=list(images), step=step, **extra)
        elif type(logger).__name__ == "TensorBoardLogger":
            for i, image in enumerate(images):
                logger.experiment.add_image(f"{key}/{i}", image, global_step=step or 0, dataformats="HWC")


def log_results(trainer: Any, payload: dict[str, Any], pictures: dict[str, str] | None = None) -> None:
    """The `cft test` results as a W&B table (`test/results`) and its pictures as images (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    rows = [[split, metric, v.get("original"), v.get("fine_tuned"), v.get("delta")]
            for split, data in payload["splits"].items() for metric, v in data["metrics"].items()]
    for logger in _loggers(trainer):
        if _is_wandb(logger):
            logger.log_table(key="test/results", columns=["split", "metric", "original", "fine_tuned", "delta"],
                             data=rows)
    for name, path in (pictures or {}).items():
        from PIL import Image

        log_images(trainer, f"test/{name}", [np.asarray(Image.open(path).convert("RGB"))])


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_run_summary(trainer: Any, stage: str, extra: dict[str, Any] | None = None) -> Path | None:
    """Merge this stage's outcome into `<run folder>/run_summary.json` (rank 0); returns its path.
    Call it on every rank: `trainer.log_dir` is a broadcast."""
    log_dir = run_dir(trainer)
    if not trainer.is_global_zero:
        return None
    path = Path(log_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    checkpoint = getattr(trainer, "checkpoint_callback", None)
    summary[stage] = {
        "status": "interrupted" if getattr(trainer, "interrupted", False) else "finished",
        "metrics": {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())},
        "log_dir": log_dir,
        "loggers": [type(lg).__name__ for lg in _loggers(trainer)],
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "last_checkpoint": getattr(checkpoint, "last_model_path", None) or None,
        **(extra or {}),
    }
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return path
