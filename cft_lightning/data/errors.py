"""Error type for bad data inputs.

Every problem with files on disk (missing paths, corrupt images, masks that do not match their image, an
unknown class folder, a malformed metadata CSV, ...) is raised as :class:`DataError`, and its message names the
offending file, folder, argument or key, so the user can fix the input without reading a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, mask store or metadata input is missing, malformed or inconsistent."""


class CommandFailed(RuntimeError):
    """A command ran to its end but produced nothing, or less than the user's threshold (`--min_success`).

    Whatever it did produce is already written; the CLI prints the message in one line and exits with 1."""
