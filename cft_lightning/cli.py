"""The `cft` command: one entry point for every stage.

    cft fit --config configs/vit_b_cft.yaml          # Trainer subcommands: LightningCLI (`_lightning_cli.py`)
    cft test --config configs/vit_b_cft.yaml --ckpt_path last
    cft demo | explain | concepts | masks | critique | sweep   # tools with their own parsers
    cft --help                                       # every command, one line each

This module imports nothing heavy: `cft --help` and the tools' `--help` come back without importing Lightning,
and each command imports what it needs when it runs. Errors a user can fix (bad config or data, an endpoint
that cannot be reached, a run that produced nothing: a `CFTUserError` of `cft_lightning/errors.py`) end in one
`cft: error: ...` line and a non-zero exit: 1 for a run that produced less than asked (`CommandFailed`), 2 for
anything else; `CFT_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import shutil
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from cft_lightning.errors import CFTUserError, CommandFailed

__all__ = ["COMMANDS", "TOOLS", "main"]

# `cft <tool>`: the stages and utilities with their own parsers (module with a `main(argv)`)
TOOLS = {
    "demo": "cft_lightning.demo",
    "explain": "cft_lightning.explain",
    "concepts": "cft_lightning.concepts.discovery",
    "masks": "cft_lightning.masks.cli",
    "critique": "cft_lightning.critique.cli",
    "sweep": "cft_lightning.sweep",
}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
# every command with its one-line summary, in the order of a project (cft --help)
COMMANDS = {
    "fit": "fine-tune a model with a guidance objective (cft fit --config configs/vit_b_cft.yaml)",
    "validate": "validation loop of a checkpoint",
    "test": "test a checkpoint: ID/OOD splits, robustness benchmarks, relevance and decision diagnostics",
    "predict": "predictions of a checkpoint on an image folder (predictions.csv)",
    "demo": "the embedded CPU demo: does guided fine-tuning repair a shortcut? (docs/demo.md)",
    "explain": "relevance overlays (PNG) for images, from a checkpoint or a timm model",
    "concepts": "concepts per class with an LLM; `cft concepts validate`: occurrence and coverage filtering",
    "masks": "build the mask store: `cft masks import` existing masks, `cft masks generate` with Grounded-SAM",
    "critique": "LVLM-VA corrective masks for a trained model (mask kind `critic`)",
    "sweep": "run a W&B sweep file's grid locally, one `cft fit` per run, and plot the ablation",
}

def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    """The errors `cft <command>` prints as one line instead of a traceback: every `CFTUserError` (what the
    package raises for bad input, cft_lightning/errors.py), plus the built-in ones libraries raise for it."""
    import pickle

    if command in TOOLS:
        extra: tuple[type[BaseException], ...] = (ImportError,)  # a missing optional extra: the message says which
    else:  # jsonargparse: an unknown key; torch: a checkpoint that would run pickled code (weights_only refuses it)
        extra = (KeyError, pickle.UnpicklingError)
    return (CFTUserError, ValueError, FileNotFoundError, *extra)


def usage() -> str:
    """The text of `cft --help`."""
    width = max(map(len, COMMANDS))
    lines = ["usage: cft <command> [options]      (cft <command> --help: the command's options)", "",
             "Explanation-guided fine-tuning of image classifiers (Concept-Guided Fine-Tuning and baselines).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Docs: README.md and docs/ (docs/demo.md, docs/results.md, docs/reliability.md).",
              "CFT_DEBUG=1 shows full tracebacks instead of one-line errors."]
    return "\n".join(lines) + "\n"


def _help_cache_key(argv: list[str]) -> str:
    """What a Trainer subcommand's help depends on: the package's sources, the versions of the libraries that
    generate it, the terminal width and the arguments."""
    from importlib import metadata

    package = Path(__file__).parent
    stamps = sorted(f"{p.relative_to(package)}:{p.stat().st_mtime_ns}" for p in package.rglob("*.py"))
    versions = []
    for dist in ("lightning", "jsonargparse", "timm", "torch"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=-")
    columns = shutil.get_terminal_size().columns
    payload = "\n".join([*stamps, *versions, str(columns), sys.executable, *argv])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def _trainer_help(argv: list[str]) -> None:
    """`cft fit|validate|test|predict --help`: generated once (Lightning takes seconds to import), then read
    from `$CFT_CACHE/help/` (default `~/.cache/cft_lightning/help/`) until the package or a library changes."""
    folder = Path(os.environ.get("CFT_CACHE") or Path.home() / ".cache" / "cft_lightning") / "help"
    path = folder / f"{argv[0]}-{_help_cache_key(argv)}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        from cft_lightning._lightning_cli import run

        buffer = io.StringIO()
        with redirect_stdout(buffer):
            try:
                run(argv)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise
        text = buffer.getvalue()
        try:  # a read-only home still gets its help, just not cached
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
    sys.stdout.write(text)
    raise SystemExit(0)


def _fail(err: BaseException) -> None:
    if os.environ.get("CFT_DEBUG"):
        raise err
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"cft: error: {message}", file=sys.stderr)
    raise SystemExit(1 if isinstance(err, CommandFailed) else 2) from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the `cft` console script."""
    # Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates: noise for every user, nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        from cft_lightning import __version__

        print(f"cft_lightning {__version__}")
        return
    command = argv[0]
    if command not in COMMANDS and not command.startswith("-"):
        from difflib import get_close_matches

        close = get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"cft: error: unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)} (cft --help)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        if command in TOOLS:
            importlib.import_module(TOOLS[command]).main(argv[1:])
        elif len(argv) == 2 and argv[1] in ("-h", "--help") and command in TRAINER_COMMANDS:
            _trainer_help(argv)
        else:
            from cft_lightning._lightning_cli import run

            run(argv)
    except Exception as err:
        if isinstance(err, _user_errors(command)):
            _fail(err)
        raise


def __getattr__(name: str) -> Any:
    """`CFTCLI`, `RunConfigSaver`, `redact`, `REDACTED` still import from here (they live in `_lightning_cli`)."""
    if name in ("CFTCLI", "RunConfigSaver", "redact", "REDACTED"):
        return getattr(importlib.import_module("cft_lightning._lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
