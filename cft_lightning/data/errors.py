"""Error type for bad data inputs.

Every problem with files on disk (missing paths, corrupt images, masks that do not match their image, an
unknown class folder, a malformed metadata CSV, ...) is raised as :class:`DataError`, and its message names the
offending file, folder, argument or key, so the user can fix the input without reading a traceback.

A DataError raised inside a DataLoader worker process reaches the main process rebuilt by torch
(``ExceptionWrapper.reraise``) from a message that embeds the worker's whole traceback. The constructor
recognises that message and keeps only the original one-line message, so ``str(error)`` is the same with
any number of workers; the worker's traceback is kept in ``worker_traceback`` and as a note of the
exception (shown only where a traceback is printed, e.g. with ``CFT_DEBUG=1``).
"""

from __future__ import annotations

__all__ = ["DataError", "original_message"]

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback"


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


class DataError(ValueError):
    """A dataset, mask store or metadata input is missing, malformed or inconsistent."""

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


class CommandFailed(RuntimeError):
    """A command ran to its end but produced nothing, or less than the user's threshold (`--min_success`).

    Whatever it did produce is already written; the CLI prints the message in one line and exits with 1."""
