"""Errors a user can fix, in one place, under one base class.

Every error the package raises because of its input (a file, a config key, a model, an endpoint) derives from
:class:`CFTUserError`, and its message names what to fix (the file, folder, key, batch or variable). `cft`
catches `CFTUserError` in one place (`cft_lightning/cli.py`) and prints the message as one `cft: error: ...`
line (exit 1 for :class:`CommandFailed`, 2 for the others; `CFT_DEBUG=1` shows the traceback). New code raises
one of these, or a new subclass here, instead of a bare built-in exception. Each class also keeps the built-in
base it had before (`DataError` is a `ValueError`, ...), so `except ValueError` in user code still works.

This module imports nothing but the standard library, so the CLI can import it before any command runs.

A DataError raised inside a DataLoader worker process reaches the main process rebuilt by torch
(``ExceptionWrapper.reraise``) from a message that embeds the worker's whole traceback. The constructor
recognises that message and keeps only the original one-line message, so ``str(error)`` is the same with
any number of workers; the worker's traceback is kept in ``worker_traceback`` and as a note of the
exception (shown only where a traceback is printed, e.g. with ``CFT_DEBUG=1``).
"""

from __future__ import annotations

__all__ = [
    "BackboneError",
    "CFTUserError",
    "ChatError",
    "ChatUnavailable",
    "CommandFailed",
    "DataError",
    "NonFiniteLossError",
    "PluginError",
    "UnknownPluginError",
    "UnsupportedModelError",
    "UnsupportedPrecisionError",
    "original_message",
]

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback"


class CFTUserError(Exception):
    """An error the user can fix by changing an input; its message says which. `cft` prints it in one line."""


def original_message(message: str, exc_type: type[BaseException]) -> str | None:
    """The message the exception had in the DataLoader worker, recovered from torch's re-raise text
    ``Caught <Type> in DataLoader worker process N.\\nOriginal Traceback ...\\n<module>.<Type>: <message>``;
    None when ``message`` is not such a text."""
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_MARK in message):
        return None
    name = exc_type.__qualname__
    if exc_type.__module__ not in ("__main__", "builtins"):
        name = f"{exc_type.__module__}.{name}"
    # The last line naming the type starts the final exception's message (chained causes come before it).
    start = message.rfind(f"\n{name}: ")
    if start < 0:
        lines = [line for line in message.splitlines() if line.strip()]
        return lines[-1].strip() if lines else None
    return message[start + len(name) + 3 :].rstrip("\n")


class DataError(CFTUserError, ValueError):
    """A dataset, mask store, metadata or other input file is missing, malformed or inconsistent."""

    def __init__(self, message: object = "", *args: object) -> None:
        worker_traceback = None
        if isinstance(message, str):
            recovered = original_message(message, type(self))
            if recovered is not None:
                worker_traceback, message = message, recovered
        super().__init__(message, *args)
        self.worker_traceback: str | None = worker_traceback
        if worker_traceback is not None:
            self.add_note(worker_traceback)


class CommandFailed(CFTUserError, RuntimeError):
    """A command ran to its end but produced nothing, or less than the user's threshold (`--min_success`).

    Whatever it did produce is already written; the CLI prints the message in one line and exits with 1."""


class BackboneError(CFTUserError, ValueError):
    """A backbone spec that cannot be built (unknown model, missing or unreadable weights)."""


class UnsupportedModelError(CFTUserError, TypeError):
    """The model's structure is outside what a relevance method supports."""


class UnsupportedPrecisionError(CFTUserError, ValueError):
    """`trainer.precision` is one a relevance method or objective does not declare it supports (`precisions`)."""


class PluginError(CFTUserError, ValueError):
    """A plugin (relevance method, regularizer) that cannot be registered or built: a name registered twice, a
    preset or argument its class does not take, a `CFT_PLUGINS` module or entry point that does not import."""


class UnknownPluginError(PluginError):
    """A plugin spec that names no registered plugin and no importable subclass of the plugin kind's base."""


class NonFiniteLossError(CFTUserError, FloatingPointError):
    """A loss or gradient became NaN/inf; raised before the optimizer step, so no checkpoint gets it."""


class ChatError(RuntimeError):
    """An LLM endpoint failed for good on one request (after the client's retries). Not a user error by itself:
    the commands record it for that class or image and go on (`ChatRefusal` in `concepts/llm.py` is one)."""


class ChatUnavailable(CFTUserError, ChatError):
    """The endpoint cannot be used at all (unreachable, no key or a refused key, unknown model): no later
    request would fare better, so the command stops instead of skipping item after item."""
