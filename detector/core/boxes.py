"""Box checks and small box operations shared by every stage (our pixel convention:
detector/datasets/records.py)."""
from __future__ import annotations

import numpy as np

from detector.errors import ProposalsError


def check_boxes(boxes: np.ndarray, width: int, height: int, name: str = "boxes") -> np.ndarray:
    """Validate [N, 4] x1, y1, x2, y2 boxes against a W x H image; a clear ProposalsError otherwise."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ProposalsError(f"{name} must be an [N, 4] array of x1, y1, x2, y2, got shape {b.shape}")
    if not np.isfinite(b).all():
        i = int(np.nonzero(~np.isfinite(b).all(1))[0][0])
        raise ProposalsError(f"{name}[{i}] = {b[i].tolist()} is not finite")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ProposalsError(f"{name}[{i}] = {b[i].tolist()} has x2 < x1 or y2 < y1")
    tol = 1e-3
    out = (b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > width + tol) | (b[:, 3] > height + tol)
    if out.any():
        i = int(np.nonzero(out)[0][0])
        raise ProposalsError(f"{name}[{i}] = {b[i].tolist()} lies outside the {width}x{height} image")
    return b


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """The boxes on the mirror image of a `width`-pixel-wide image."""
    out = np.array(boxes, copy=True)
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out
