"""LVLM-VA's critique stage (`cft critique`): low-entropy sampling, attributions, PPEPS-WGM segments, critic and
judge, corrective masks (mask kind `critic`) for the `LVLMCritic` regularizer.

The names below load their module on first use, so `cft critique --help` imports neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CriticAndJudge": "critic",
    "OracleCritic": "critic",
    "parse_verdicts": "critic",
    "effect_mass": "ppeps",
    "fit_weighted_gmm": "ppeps",
    "ppeps_segments": "ppeps",
    "CritiqueSettings": "run",
    "run_critique": "run",
    "lowest_entropy": "sampling",
    "predictive_entropy": "sampling",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"cft_lightning.critique.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
