"""The concept bank file that `cft concepts` writes, `cft concepts validate` filters and the mask stage reads:

    {"format": "cft_lightning.concepts/1",
     "concepts": {"<class id>": ["<concept>", ...], ...},
     "provenance": {...}}          # what made it: discovery's model and prompts, or validation's thresholds

A plain {class id: [concept, ...]} mapping is read as well. Discovery (`discovery.py`) and validation
(`validate.py`) both import this module and not each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cft_lightning._io import atomic_write
from cft_lightning.errors import DataError

__all__ = ["FORMAT", "load_concept_bank", "write_concept_bank"]

FORMAT = "cft_lightning.concepts/1"


def load_concept_bank(path: str | Path) -> dict[str, list[str]]:
    """The {class: [concept, ...]} of a bank file (this module's format, or a plain mapping)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    bank = data.get("concepts", data) if isinstance(data, dict) else None
    if not isinstance(bank, dict) or not all(isinstance(v, list) for v in bank.values()):
        raise DataError(f"concept bank {path} must map class names to lists of concepts")
    return {str(k): [str(c) for c in v] for k, v in bank.items()}


def write_concept_bank(path: str | Path, doc: dict[str, Any]) -> None:
    """Write a bank document (indented JSON) atomically, creating the parent folder."""
    text = json.dumps(doc, indent=2) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))
