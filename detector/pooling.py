"""Image boxes -> SPP vectors: choose each box's scale, project it, pool it.

This joins `projection` (paper appendix A, section 4.1) and `spp` (section
2.2) for one image whose conv features are already computed at one or more
scales.  `detector.embedder.WindowEmbedder` is the interface the rest of the
library uses; these are its two steps.
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
    random); by default it follows `scale_rule` (paper section 4.1).
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
    """SPP vectors [N, C * sum(n*n)] (float32, on the maps' device) of `project_to_windows` rows."""
    C = int(scale_feats[0].features.shape[0])
    device = scale_feats[0].features.device
    if len(windows) and (windows[:, 0] == windows[0, 0]).all():
        # one scale (always, at 1 scale): no second [N, D] buffer and copy (~45 MB for BCCD)
        sf = scale_feats[int(windows[0, 0])]
        return spatial_pyramid_pool(sf.features, torch.from_numpy(windows[:, 1:]), levels).float()
    out = torch.empty((len(windows), spp_length(C, levels)), dtype=torch.float32, device=device)
    for k, sf in enumerate(scale_feats):
        sel = np.nonzero(windows[:, 0] == k)[0]
        if len(sel):
            pooled = spatial_pyramid_pool(sf.features, torch.from_numpy(windows[sel, 1:]), levels)
            out[torch.from_numpy(sel).to(device)] = pooled.float()
    return out
