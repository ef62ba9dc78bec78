"""Image windows -> feature-map cells (paper appendix A), and the per-window scale choice.

Boxes are in our continuous pixel convention (`detector/datasets/records.py`):
a box covers pixels x1 .. x2-1, whose centres are x1+0.5 and x2-0.5.  A
backbone's cell j is centred on pixel `offset + stride*j`, i.e. at continuous
coordinate `offset + 0.5 + stride*j`.

Two projection rules:

- `"code"` (default; the authors' release): pull each edge inward by `pull`
  pixels (6.5 for ZF-5's stride 16; other strides get 6.5*stride/16) and snap
  it to the nearest cell centre.  With ZF-5 this is exactly
  `left = floor((x1 - 21 + 6.5)/16 + 0.5)`, `right = ceil((x2 - 21 - 6.5)/16 - 0.5)`
  on the original's 1-based inclusive pixels.
- `"paper"` (the appendix): the cells whose centres lie inside the box,
  `floor(x/S) + 1` .. `ceil(x/S) - 1` when every layer pads k//2.

A window that collapses (left > right) becomes the integer midpoint of the
two, and everything is clamped to the map.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np



def _release_pull(stride: int, pull: Optional[float]) -> float:
    """The "code" rule's inward pull of each edge: the release's 6.5 px at stride 16, scaled to the stride."""
    return 6.5 * stride / 16.0 if pull is None else pull


def project_boxes(boxes: np.ndarray, factor: float, stride: int, offset: float, map_size: tuple[int, int],
                  rule: str = "code", pull: Optional[float] = None) -> np.ndarray:
    """Map boxes (original-image pixels) to inclusive feature cells at one scale.

    `factor`: the image's resize factor at this scale; `map_size`: (h, w) of
    the feature map.  Both may also be per box ([N] arrays: boxes of several
    images at once).  Returns int64 [N, 4] cell windows `x1, y1, x2, y2`.
    Boxes must already be validated (`detector.core.boxes.check_boxes`).
    """
    b = np.asarray(boxes, dtype=np.float64) * np.reshape(factor, (-1, 1))
    h, w = (np.reshape(v, (-1, 1)) for v in map_size)
    centre0 = offset + 0.5
    first = b[:, :2] + 0.5  # centres of the first and last pixels covered
    last = b[:, 2:] - 0.5
    if rule == "code":
        p = _release_pull(stride, pull)
        lo = np.floor((first - centre0 + p) / stride + 0.5)
        hi = np.ceil((last - centre0 - p) / stride - 0.5)
    elif rule == "paper":
        lo = np.floor((first - centre0) / stride) + 1
        hi = np.ceil((last - centre0) / stride) - 1
    else:
        raise ValueError(f"projection rule must be 'code' or 'paper', got {rule!r}")
    collapsed = lo > hi
    mid = np.floor((lo + hi) / 2)
    lo = np.where(collapsed, mid, lo)
    hi = np.where(collapsed, mid, hi)
    lim = np.concatenate([w - 1, h - 1], axis=1).astype(np.float64)
    lo = np.clip(lo, 0, lim)
    hi = np.clip(hi, 0, lim)
    return np.concatenate([lo, hi], axis=1).astype(np.int64)


def choose_scales(boxes: np.ndarray, factors: Sequence[float], image_size: tuple[int, int],
                  rule: str = "paper") -> np.ndarray:
    """Index of the scale each window is pooled at, in multi-scale mode.

    `factors`: the resize factor of each scale, ascending; `image_size`: (W, H).
    paper: the scale at which the window's area is closest to 224*224.
    code:  `expected = round(208 * min(H, W) / sqrt(area))`, then the scale whose
           shorter side (factor * min(H, W)) is nearest to it.
    Ties go to the smaller scale (np.argmin takes the first).
    """
    b = np.asarray(boxes, dtype=np.float64)
    f = np.asarray(factors, dtype=np.float64)
    if len(f) == 1 or len(b) == 0:
        return np.zeros(len(b), dtype=np.int64)
    if np.any(np.diff(f) < 0):
        raise ValueError("factors must be ascending")
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)
    if rule == "paper":
        d = np.abs(area[:, None] * f[None, :] ** 2 - 224.0 * 224.0)
    elif rule == "code":
        short = min(image_size)
        expected = np.round(208.0 * short / np.sqrt(area))
        d = np.abs(expected[:, None] - f[None, :] * short)
    else:
        raise ValueError(f"scale rule must be 'paper' or 'code', got {rule!r}")
    return np.argmin(d, axis=1).astype(np.int64)


def window_boxes(windows: np.ndarray, factor: float, stride: int, offset: float, rule: str = "code",
                 pull: Optional[float] = None) -> np.ndarray:
    """What a window's features saw, in original-image pixels: the inverse of `project_boxes`.

    `windows`: int [N, 4] inclusive cells x1 y1 x2 y2 at one scale (or `factor` per row).  Each
    edge goes to the middle of the interval of box edges that `project_boxes` snaps onto it, so
    `project_boxes(window_boxes(w)) == w` for any window that neither collapsed nor was clamped.
    Box regression can take its targets from these boxes instead of the proposals
    (`bbox.reference: window`): the features know where the window lies, not where in its
    one-stride snapping interval the proposal's edge fell.  float64 [N, 4].
    """
    w = np.asarray(windows, dtype=np.float64).reshape(-1, 4)
    centre0 = offset + 0.5
    if rule == "code":
        p = _release_pull(stride, pull)
        first = centre0 - p + stride * w[:, :2]
        last = centre0 + p + stride * w[:, 2:]
    elif rule == "paper":
        first = centre0 + stride * (w[:, :2] - 0.5)
        last = centre0 + stride * (w[:, 2:] + 0.5)
    else:
        raise ValueError(f"projection rule must be 'code' or 'paper', got {rule!r}")
    return np.concatenate([first - 0.5, last + 0.5], axis=1) / np.reshape(factor, (-1, 1))
