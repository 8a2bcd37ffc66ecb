"""Data layer: image folders, few-shot selection, mask store, joint transforms and the Lightning DataModule.

Names are imported lazily (PEP 562), so light users such as the mask store or the smoke-data generator do not
pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "Augmentation": "transforms",
    "MaskStore": "mask_store",
    "concept_slug": "mask_store",
    "DataConfig": "transforms",
    "JointTransform": "transforms",
    "build_transforms": "transforms",
    "parse_data_config": "transforms",
    "IMAGE_EXTENSIONS": "image_io",
    "image_extensions": "image_io",
    "is_image_file": "image_io",
    "FewShotSelection": "image_folder",
    "GuidanceDataset": "image_folder",
    "Metadata": "metadata",
    "Sample": "image_folder",
    "build_samples": "image_folder",
    "imagenet_classes": "image_folder",
    "imagenet_class_names": "image_folder",
    "load_image": "image_io",
    "read_metadata": "metadata",
    "resolve_class_list": "image_folder",
    "scan_image_folder": "image_folder",
    "select_few_shot": "image_folder",
    "GuidanceDataModule": "datamodule",
    "choose_donors": "donors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
