"""Crops run through the trunk on their own: the 10-crop test baseline and the training crops.

A crop is a view box (detector.classification.views: original-image pixels, corners on integer pixels
of the resized image) cut from the image resized to its scale, or from the mirror image's
resize for a flipped view, optionally resized again to `out_size` (multi-size training,
paper section 3.1.3: "we resize the aforementioned 224x224 region to 180x180", so the
two sizes differ in resolution only, not in content), normalised and padded like a
whole image (features.FeatureExtractor.prepare) and run through the trunk.  The crops
of one call share a size, so they go through the trunk as one batch.

`CropCache` keeps the training crops' maps: one float16 file per image and size, with
the maps of every crop position, then of the same positions on the mirror image.
"""
from __future__ import annotations

import os
from typing import Optional

import cv2
import numpy as np
import torch

from detector.cache import atomic_save_npz, load_npz
from detector.core.feature_cache import FeatureCache
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.images import load_image
from detector.core.resize import resize_factor, resized_size
from detector.classification.views import view_boxes

CROP_VERSION = 1  # bump when cutting or resizing crops changes


def resized_image(image: np.ndarray, scale: int, max_size: int, flip: bool = False) -> tuple[np.ndarray, float]:
    """The image (its mirror image if `flip`) resized as FeatureExtractor does for `scale`, and the factor."""
    img = np.ascontiguousarray(image[:, ::-1]) if flip else image
    H, W = img.shape[:2]
    f = resize_factor(W, H, scale, max_size)
    w, h = resized_size(W, H, f)
    return (img if (w, h) == (W, H) else cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)), f


def cut_crops(resized: np.ndarray, factor: float, boxes: np.ndarray, out_size: Optional[int] = None) -> list:
    """The boxes' pixels (original-image boxes times `factor`, rounded to the integer corners
    views have), each resized so that a full view becomes out_size x out_size."""
    Hs, Ws = resized.shape[:2]
    px = np.rint(np.asarray(boxes, np.float64) * factor).astype(np.int64)
    px = np.clip(px, 0, [Ws, Hs, Ws, Hs])
    crops = []
    for x1, y1, x2, y2 in px:
        c = resized[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
        if out_size is not None:
            k = out_size / max(c.shape[:2])  # a clipped (non-square) crop keeps its aspect
            c = cv2.resize(c, (max(1, round(c.shape[1] * k)), max(1, round(c.shape[0] * k))),
                           interpolation=cv2.INTER_LINEAR)
        crops.append(np.ascontiguousarray(c))
    return crops


@torch.inference_mode()
def crop_maps(extractor: FeatureExtractor, crops: list) -> list[ScaleFeatures]:
    """Each crop through the trunk (one batch per crop size): its own map, with factor 1,
    so that its whole-crop box is [0, 0, width, height] in its own pixels."""
    out: list = [None] * len(crops)
    sizes = {}
    for i, c in enumerate(crops):
        sizes.setdefault(c.shape[:2], []).append(i)
    for (h, w), idx in sizes.items():
        maps = extractor.run_trunk(torch.stack([extractor.prepare(crops[i], 1.0) for i in idx]))
        for i, m in zip(idx, maps):
            out[i] = ScaleFeatures(crops[i].shape[0], 1.0, m, (w, h))
    return out


class CropCache(FeatureCache):
    """Maps of an image's training crops: `positions` views of `size` at `scale` (paper: 224
    at 256), then the same on the mirror image, each resized to the size asked for."""

    def __init__(self, root: str | os.PathLike, extractor: FeatureExtractor, dtype: str, scale: int, size: int,
                 positions: str):
        self.crop = {"scale": int(scale), "size": int(size), "positions": positions, "version": CROP_VERSION}
        super().__init__(root, extractor, dtype, extra={"crops": self.crop})

    def crop_file(self, image_path: str, out_size: int):
        return self.dir / f"{self._digest(str(image_path))}_crops{out_size}.npz"

    def get_crops(self, image_path: str, out_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """([n, C, h, w] maps, (width, height) of a crop in its own pixels), from disk or computed."""
        z = load_npz(self.crop_file(image_path, out_size))
        if z is not None and {"features", "crop_size"} <= set(z):
            return torch.from_numpy(z["features"]), tuple(int(v) for v in z["crop_size"])
        img = load_image(image_path)
        H, W = img.shape[:2]
        c = self.crop
        boxes = view_boxes(W, H, c["scale"], c["size"], c["positions"], self.extractor.max_size)
        crops = []
        for flip in (False, True):  # mirror-symmetric positions: the same boxes on the mirror image
            resized, f = resized_image(img, c["scale"], self.extractor.max_size, flip)
            crops += cut_crops(resized, f, boxes, None if out_size == c["size"] else out_size)
        maps = crop_maps(self.extractor, crops)
        arr = torch.stack([m.features for m in maps]).cpu().numpy().astype(self.dtype)
        size = maps[0].image_size
        atomic_save_npz(self.crop_file(image_path, out_size), features=arr, crop_size=np.array(size, np.int64))
        return torch.from_numpy(arr), size
