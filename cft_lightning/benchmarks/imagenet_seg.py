"""ImageNet-Segmentation (Guillaumin et al. 2014; `gtsegs_ijcv.mat`): relevance-map alignment, Chefer et al.'s
protocol (Transformer-Explainability and RobustViT's segmentation test).

The file is MATLAB v7.3, i.e. HDF5: `/value/img` holds (N, 1) references to the images (stored
column-major, so each is transposed to H x W x 3), `/value/gt` (N, 1) references to cells that hold a
reference to the mask (H x W, 1 = object). Images are resized to the model's input size without cropping
(aspect not kept) and masks with nearest neighbour, as in the protocol; the relevance map explains the
model's predicted class and `cft test` scores pixel accuracy, mIoU and mAP (see evaluation/metrics.py).
Items carry label -1: there is no classification score on this set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cft_lightning.data.transforms import JointTransform
from cft_lightning.errors import DataError

__all__ = ["ImageNetSegmentation"]


class ImageNetSegmentation(torch.utils.data.Dataset):
    """The images and object masks of `gtsegs_ijcv.mat` (the HDF5 file is opened lazily in each worker)."""

    def __init__(self, path: str | os.PathLike[str], data_config: dict[str, Any]) -> None:
        try:
            import h5py
        except ImportError as exc:
            raise DataError("ImageNet-Segmentation (gtsegs_ijcv.mat, an HDF5 file) needs h5py: "
                            "pip install 'cft_lightning[benchmarks]'") from exc

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"ImageNet-Segmentation file {self.path} does not exist (gtsegs_ijcv.mat)")
        try:
            with h5py.File(self.path, "r") as f:
                self.length = len(f["/value/img"])
                if len(f["/value/gt"]) != self.length:
                    raise DataError(f"{self.path}: {self.length} images but {len(f['/value/gt'])} masks")
        except (OSError, KeyError) as exc:
            raise DataError(f"{self.path} is not a gtsegs_ijcv.mat HDF5 file with /value/img and /value/gt: {exc}") \
                from exc
        height, width = tuple(data_config["input_size"])[-2:]
        self.size = (int(width), int(height))
        self.transform = JointTransform({**dict(data_config), "crop_pct": 1.0}, train=False)
        self._file: Any = None

    def __len__(self) -> int:
        return self.length

    def _h5(self) -> Any:
        if self._file is None:  # h5py handles do not survive fork: one per worker process
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self._h5()
        image = np.asarray(f[f["/value/img"][index, 0]]).transpose(2, 1, 0)
        mask = np.asarray(f[f[f["/value/gt"][index, 0]][0, 0]]).transpose(1, 0)
        if image.shape[:2] != mask.shape:
            raise DataError(f"{self.path}: image {index} is {image.shape[:2]} but its mask is {mask.shape}")
        pil = Image.fromarray(image.astype(np.uint8)).resize(self.size, Image.BILINEAR)
        pil_mask = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize(self.size, Image.NEAREST)
        tensor, masks = self.transform(pil, {"object": np.asarray(pil_mask) > 0})
        return {
            "image": tensor,
            "label": torch.tensor(-1, dtype=torch.int64),
            "masks": masks,
            "path": f"{self.path.name}#{index}",
            "group": torch.tensor(-1, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
