"""Image boxes -> SPP vectors: choose each box's scale, project it, pool it.

This joins `projection` (paper appendix A, section 4.1) and `spp` (section
2.2) for one image whose conv features are already computed at one or more
scales.  `detector.core.embedder.WindowEmbedder` is the interface the rest of the
library uses; these are its two steps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from detector.core.backbones import Backbone
from detector.core.features import ScaleFeatures
from detector.core.projection import check_boxes, choose_scales, project_boxes
from detector.core.spp import DEFAULT_LEVELS, spatial_pyramid_pool, spp_length


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


class StackedMaps:
    """Every training image's conv maps (and its mirror image's) stacked in one zero-padded
    tensor per scale on a device, so a fine-tuning batch of windows from ~100 images is pooled
    with one `roi_pool` call per pyramid level instead of one call per image and level.

    Padding never changes a result: a window's cells lie inside its own map.  Meant for a
    GPU, where the maps stay resident (BCCD: ~650 MB as float32); `fits()` says whether they
    would.  The same code runs on the CPU (tests compare it with per-image pooling).
    """

    def __init__(self, maps: Sequence[Sequence[ScaleFeatures]], device):
        """maps[s]: the ScaleFeatures of slot s (one image in one orientation), all scales."""
        n_scales = len(maps[0])
        self.device = torch.device(device)
        self.factor = np.array([[m[k].factor for m in maps] for k in range(n_scales)])  # [scale, slot]
        self.map_h = np.array([[m[k].map_size[0] for m in maps] for k in range(n_scales)])
        self.map_w = np.array([[m[k].map_size[1] for m in maps] for k in range(n_scales)])
        self.stacks = []
        for k in range(n_scales):
            C = int(maps[0][k].features.shape[0])
            stack = torch.zeros((len(maps), C, int(self.map_h[k].max()), int(self.map_w[k].max())),
                                dtype=torch.float32, device=self.device)
            for s, m in enumerate(maps):
                f = m[k].features
                stack[s, :, : f.shape[1], : f.shape[2]] = f.to(self.device, torch.float32)
            self.stacks.append(stack)

    @staticmethod
    def nbytes(maps_shapes: Sequence[tuple]) -> int:
        """float32 bytes of the stacks for maps of these (slots, C, h, w)-like shapes per scale."""
        return sum(4 * s * c * h * w for s, c, h, w in maps_shapes)

    def pool(self, backbone, levels: Sequence[int], projection: str, slots: np.ndarray, boxes: np.ndarray,
             scale_index: Optional[np.ndarray] = None) -> torch.Tensor:
        """Unscaled SPP vectors [B, D] of boxes (original pixels of their own slot's image)."""
        from torchvision.ops import roi_pool

        k_of = np.zeros(len(boxes), np.int64) if scale_index is None else np.asarray(scale_index)
        C = self.stacks[0].shape[1]
        out = torch.empty((len(boxes), spp_length(C, levels)), dtype=torch.float32, device=self.device)
        for k in np.unique(k_of):
            sel = np.flatnonzero(k_of == k)
            s = slots[sel]
            cells = project_boxes(boxes[sel], self.factor[k, s], backbone.stride, backbone.offset,
                                  (self.map_h[k, s], self.map_w[k, s]), projection)
            rois = torch.from_numpy(np.concatenate([s[:, None], cells], 1)).to(self.device, torch.float32)
            pooled = [roi_pool(self.stacks[k], rois, (n, n), 1.0).reshape(len(sel), -1) for n in levels]
            out[torch.from_numpy(sel).to(self.device)] = torch.cat(pooled, 1)
        return out
