"""Mask generation and import for the mask store (`cft masks`)."""

from cft_lightning.masks.importers import imagenet_s_object_mask, import_binary_masks, import_imagenet_s

__all__ = ["generate_masks", "imagenet_s_object_mask", "import_binary_masks", "import_imagenet_s"]
