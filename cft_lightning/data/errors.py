"""The data layer's errors, which live in `cft_lightning.errors` (imported here so old imports keep working)."""

from __future__ import annotations

from cft_lightning.errors import CommandFailed, DataError, original_message

__all__ = ["CommandFailed", "DataError", "original_message"]
