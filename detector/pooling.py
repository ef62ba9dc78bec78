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


def pool_boxes(scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray, backbone: Backbone,
               levels: Sequence[int] = DEFAULT_LEVELS, scale_rule: str = "paper",
               scale_index: Optional[np.ndarray] = None, projection: str = "code",
               name: str = "boxes") -> torch.Tensor:
    """SPP vectors [N, C * sum(n*n)] (float32, CPU) for boxes in original-image pixels.

    `scale_index` forces the scale of each box (fine-tuning draws it at
    random); by default it follows `scale_rule` (SPEC §2).
    """
    W, H = scale_feats[0].image_size
    b = check_boxes(boxes, W, H, name)
    C = int(scale_feats[0].features.shape[0])
    out = torch.empty((len(b), spp_length(C, levels)), dtype=torch.float32)
    if len(b) == 0:
        return out
    if scale_index is None:
        scale_index = choose_scales(b, [sf.factor for sf in scale_feats], (W, H), scale_rule)
    for k, sf in enumerate(scale_feats):
        sel = np.nonzero(scale_index == k)[0]
        if len(sel) == 0:
            continue
        cells = project_boxes(b[sel], sf.factor, backbone.stride, backbone.offset, sf.map_size, projection)
        pooled = spatial_pyramid_pool(sf.features, torch.from_numpy(cells), levels)
        out[torch.from_numpy(sel)] = pooled.float().cpu()
    return out
