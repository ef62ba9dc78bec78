"""Image boxes -> SPP vectors: choose each box's scale, project it, pool it.

This joins `projection` (SPEC §2) and `spp` (SPEC §3) for one image whose
conv features are already computed at one or more scales.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .backbones import Backbone
from .features import ScaleFeatures
from .projection import check_boxes, choose_scales, project_boxes
from .spp import DEFAULT_LEVELS, spatial_pyramid_pool, spp_length


def project_to_windows(scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray, backbone: Backbone,
                       scale_rule: str = "paper", scale_index: Optional[np.ndarray] = None,
                       projection: str = "code", name: str = "boxes") -> np.ndarray:
    """[N, 5] int64: each box's scale index and its inclusive feature-cell window x1 y1 x2 y2.

    `scale_index` forces the scale of each box (fine-tuning draws it at
    random); by default it follows `scale_rule` (SPEC §2).
    """
    W, H = scale_feats[0].image_size
    b = check_boxes(boxes, W, H, name)
    out = np.zeros((len(b), 5), np.int64)
    if len(b) == 0:
        return out
    if scale_index is None:
        scale_index = choose_scales(b, [sf.factor for sf in scale_feats], (W, H), scale_rule)
    out[:, 0] = scale_index
    for k, sf in enumerate(scale_feats):
        sel = np.nonzero(out[:, 0] == k)[0]
        if len(sel):
            out[sel, 1:] = project_boxes(b[sel], sf.factor, backbone.stride, backbone.offset, sf.map_size, projection)
    return out


def pool_windows(scale_feats: Sequence[ScaleFeatures], windows: np.ndarray,
                 levels: Sequence[int] = DEFAULT_LEVELS) -> torch.Tensor:
    """SPP vectors [N, C * sum(n*n)] (float32, CPU) of `project_to_windows` rows."""
    C = int(scale_feats[0].features.shape[0])
    if len(windows) and (windows[:, 0] == windows[0, 0]).all():
        # one scale (always, at 1 scale): no second [N, D] buffer and copy (~45 MB for BCCD)
        sf = scale_feats[int(windows[0, 0])]
        return spatial_pyramid_pool(sf.features, torch.from_numpy(windows[:, 1:]), levels).float().cpu()
    out = torch.empty((len(windows), spp_length(C, levels)), dtype=torch.float32)
    for k, sf in enumerate(scale_feats):
        sel = np.nonzero(windows[:, 0] == k)[0]
        if len(sel):
            pooled = spatial_pyramid_pool(sf.features, torch.from_numpy(windows[sel, 1:]), levels)
            out[torch.from_numpy(sel)] = pooled.float().cpu()
    return out


def pool_boxes(scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray, backbone: Backbone,
               levels: Sequence[int] = DEFAULT_LEVELS, scale_rule: str = "paper",
               scale_index: Optional[np.ndarray] = None, projection: str = "code",
               name: str = "boxes") -> torch.Tensor:
    """SPP vectors [N, C * sum(n*n)] (float32, CPU) for boxes in original-image pixels."""
    windows = project_to_windows(scale_feats, boxes, backbone, scale_rule, scale_index, projection, name)
    return pool_windows(scale_feats, windows, levels)


def pool_unique_boxes(scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray, backbone: Backbone,
                      levels: Sequence[int] = DEFAULT_LEVELS, scale_rule: str = "paper",
                      projection: str = "code", name: str = "boxes") -> tuple[torch.Tensor, np.ndarray]:
    """(SPP vectors [U, D] of the distinct windows, inverse [N]): row i of pool_boxes is row
    inverse[i] of the first.

    Boxes a few pixels apart often project onto the same cells at the same scale, so they
    have the same SPP vector and the same fc features; detect() pools and scores each such
    window once (BCCD at 688, stride 16: ~18% of selective search's boxes are repeats).
    """
    windows = project_to_windows(scale_feats, boxes, backbone, scale_rule, None, projection, name)
    if len(windows) == 0:
        return pool_windows(scale_feats, windows, levels), np.zeros(0, np.int64)
    distinct, inverse = np.unique(windows, axis=0, return_inverse=True)
    return pool_windows(scale_feats, distinct, levels), inverse.reshape(-1).astype(np.int64)
