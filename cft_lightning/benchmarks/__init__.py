"""Benchmarks shipped with or read by the package. `shortcut_parts` is generated locally (no download)."""

from cft_lightning.benchmarks.shortcut_parts import SPLITS, ShortcutPartsSpec, build_shortcut_parts, class_parts

__all__ = ["SPLITS", "ShortcutPartsSpec", "build_shortcut_parts", "class_parts"]
