"""Image windows -> fixed-length vectors: the one object training and inference share.

A `WindowEmbedder` owns everything that turns a box on an image into the vector
a classifier reads:

- the backbone's geometry (stride, centre of cell 0) and the projection rule
  that maps a box onto feature cells (paper, appendix A);
- the scale rule that picks, in multi-scale mode, the scale a window is pooled
  at (paper section 4.1: the scale where the window is closest to 224x224);
- the pyramid levels (paper section 2.2; 1, 2, 3, 6 -> 50 bins);
- `pool5_scale`, which brings SPP vectors to a mean L2 norm of 20;
- the fc head, the layer whose activations the SVMs read, and the scale that
  brings those to norm 20 (R-CNN's recipe, kept by SPP-net).

Fine-tuning, the SVM feature pass, box regression, `SPPDetector.detect()` and
the classifier all call it, so a window is embedded the same way everywhere: it is the
only route from boxes to scaled pool5 (image by image, or from `StackedMaps` of many
images on a GPU), and `fit_pool5_scale` the only place the pool5 constant is estimated.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from detector.core.backbones import Backbone
from detector.core.boxes import check_boxes
from detector.core.features import ScaleFeatures
from detector.core.heads import FCHead
from detector.core.projection import choose_scales, project_boxes, window_boxes
from detector.core.spp import DEFAULT_LEVELS, spatial_pyramid_pool, spp_length


def norm_scale(sample, target: float = 20.0, what: str = "features") -> float:
    """The constant s that gives s * x a mean L2 norm of `target` over the sample rows.

    The one place the norm-20 rescaling is estimated (pool5 for fine-tuning and
    box regression, fc7 for the SVMs); a sample that is empty, not finite or all
    zero is an error, since the scale would be meaningless.
    """
    # Norms in the sample's own precision (float32 for pool5 and fc7), as training always did.
    if isinstance(sample, torch.Tensor):
        shape, finite = tuple(sample.shape), bool(torch.isfinite(sample).all()) if sample.numel() else True
        norms = sample.norm(dim=1) if sample.ndim == 2 else None
    else:
        x = np.asarray(sample)
        x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
        shape, finite = x.shape, bool(np.all(np.isfinite(x)))
        norms = np.linalg.norm(x, axis=1) if x.ndim == 2 else None
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty [N, D] sample to estimate the norm from, got shape {shape}")
    if not finite:
        raise ValueError(f"{what}: the sample contains NaN or inf")
    mean_norm = float(norms.mean())
    if mean_norm <= 0:
        raise ValueError(f"{what}: every sampled vector is zero, so it cannot be rescaled; check the backbone weights")
    return float(target) / mean_norm


def distinct_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of `windows` [N, 5] and each row's index among them [N]."""
    if len(windows) == 0:
        return windows, np.zeros(0, np.int64)
    distinct, row = np.unique(windows, axis=0, return_inverse=True)
    return distinct, row.reshape(-1).astype(np.int64)


def layer_dim(layer: str, pool5_dim: int, fc_dims) -> int:
    """Length of the features at `layer` (pool5, fc6 or fc7)."""
    return pool5_dim if layer == "pool5" else int(fc_dims[0 if layer == "fc6" else 1])


def _project(scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray, backbone: Backbone,
                       scale_rule: str = "paper", scale_index: Optional[np.ndarray] = None,
                       projection: str = "code", name: str = "boxes") -> np.ndarray:
    """[N, 5] int64: each box's scale index and its inclusive feature-cell window x1 y1 x2 y2."""
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


def _pool(scale_feats: Sequence[ScaleFeatures], windows: np.ndarray,
                 levels: Sequence[int] = DEFAULT_LEVELS) -> torch.Tensor:
    """Unscaled SPP vectors [N, C * sum(n*n)] (float32, on the maps' device) of `_project` rows."""
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


class WindowEmbedder:
    """Boxes on an image's conv maps -> scaled SPP vectors (pool5) -> classifier features."""

    def __init__(self, backbone: Backbone, levels: Sequence[int] = (1, 2, 3, 6), scale_rule: str = "paper",
                 projection: str = "code", pool5_scale: float = 1.0, head: Optional[FCHead] = None,
                 layer: str = "fc7", feature_scale: float = 1.0):
        self.backbone = backbone
        self.levels = tuple(int(n) for n in levels)
        self.scale_rule = scale_rule
        self.projection = projection
        self.pool5_scale = float(pool5_scale)
        self.head = head
        self.layer = layer if head is not None else "pool5"
        self.feature_scale = float(feature_scale)

    @classmethod
    def from_config(cls, cfg, backbone: Backbone, head: Optional[FCHead] = None, pool5_scale: float = 1.0,
                    feature_scale: float = 1.0) -> "WindowEmbedder":
        return cls(backbone, cfg.spp.levels, cfg.features.scale_rule, cfg.spp.projection, pool5_scale, head,
                   cfg.svm.layer, feature_scale)

    @property
    def pool5_dim(self) -> int:
        return spp_length(self.backbone.channels, self.levels)

    @property
    def feature_dim(self) -> int:
        """Length of `embed()`'s vectors."""
        return layer_dim(self.layer, self.pool5_dim, None if self.head is None else self.head.fc_dims)

    def windows(self, feats: Sequence[ScaleFeatures], boxes: np.ndarray, scale_index: Optional[np.ndarray] = None,
                name: str = "boxes") -> np.ndarray:
        """[N, 5] int64: each box's scale index and its inclusive feature-cell window x1 y1 x2 y2.
        `scale_index` forces each box's scale (fine-tuning draws it at random); else the scale
        rule picks it (paper section 4.1)."""
        return _project(feats, boxes, self.backbone, self.scale_rule, scale_index, self.projection, name)

    def pool5_windows(self, feats: Sequence[ScaleFeatures], windows: np.ndarray) -> torch.Tensor:
        """Scaled SPP vectors [N, D] of `windows()` rows."""
        return _pool(feats, windows, self.levels).mul_(self.pool5_scale)  # in place: a fresh [N, D] costs page faults

    def window_boxes(self, feats: Sequence[ScaleFeatures], windows: np.ndarray) -> np.ndarray:
        """float64 [N, 4]: what each `windows()` row's features saw, in original-image pixels
        (`detector.core.projection.window_boxes` at the row's scale)."""
        windows = np.asarray(windows, np.int64).reshape(-1, 5)
        factors = np.array([sf.factor for sf in feats], np.float64)[windows[:, 0]]
        return window_boxes(windows[:, 1:], factors, self.backbone.stride, self.backbone.offset, self.projection)

    def pool5(self, feats: Sequence[ScaleFeatures], boxes: np.ndarray, scale_index: Optional[np.ndarray] = None,
              name: str = "boxes") -> torch.Tensor:
        """Scaled SPP vectors [N, D] of boxes in original-image pixels."""
        return self.pool5_windows(feats, self.windows(feats, boxes, scale_index, name))

    def pool5_stacked(self, maps: "StackedMaps", slots: np.ndarray, boxes: np.ndarray,
                      scale_index: Optional[np.ndarray] = None) -> torch.Tensor:
        """Scaled SPP vectors [B, D] of boxes (original pixels of their own slot's image) on the
        maps of many images at once: one roi_pool call per level (the GPU fine-tuning path)."""
        return maps._pool(self.backbone, self.levels, self.projection, slots, boxes, scale_index).mul_(self.pool5_scale)

    def pool5_unique(self, feats: Sequence[ScaleFeatures], boxes: np.ndarray,
                     name: str = "boxes") -> tuple[torch.Tensor, np.ndarray]:
        """(scaled pool5 of the distinct windows [U, D], inverse [N]): box i's vector is row inverse[i].

        Boxes a few pixels apart often project onto the same cells at the same
        scale, so they share their SPP vector and everything computed from it;
        detect() pools and scores each distinct window once.
        """
        distinct, inverse = distinct_windows(self.windows(feats, boxes, None, name))
        return self.pool5_windows(feats, distinct), inverse

    def unscaled(self) -> "WindowEmbedder":
        """The same projection and pyramid with pool5_scale 1 and no head (to sample raw pool5)."""
        return WindowEmbedder(self.backbone, self.levels, self.scale_rule, self.projection)

    def fit_pool5_scale(self, sample: Callable[["WindowEmbedder"], torch.Tensor], target: float = 20.0) -> float:
        """Set (and return) `pool5_scale`, the constant that gives pool5 a mean L2 norm of `target`
        over a sample (R-CNN's norm-20 rescaling, kept by SPP-net).  `sample(e)` pools the sample
        windows through `e`, an unscaled copy of this embedder: detection draws training windows
        over all images, classification training crops or whole images."""
        self.pool5_scale = norm_scale(sample(self.unscaled()), target, "pool5 features")
        return self.pool5_scale

    @torch.inference_mode()
    def class_probabilities(self, pool5: torch.Tensor) -> torch.Tensor:
        """The head's softmax [N, classes] of scaled pool5 rows (eval mode: no dropout)."""
        return torch.softmax(self.head(pool5), dim=1)

    @torch.inference_mode()
    def embed(self, pool5: torch.Tensor) -> torch.Tensor:
        """Classifier features of scaled pool5 rows: the head's `layer` after ReLU (or pool5
        itself), times `feature_scale`."""
        if self.layer == "pool5":
            return pool5 * self.feature_scale  # a copy: callers keep pool5 for box regression
        return self.head.embed(pool5, self.layer).mul_(self.feature_scale)


class StackedMaps:
    """Every training image's conv maps (and its mirror image's) stacked in one zero-padded
    tensor per scale on a device, so a fine-tuning batch of windows from ~100 images is pooled
    with one `roi_pool` call per pyramid level instead of one call per image and level.

    Padding never changes a result: a window's cells lie inside its own map.  Meant for a
    GPU, where the maps stay resident (BCCD: ~650 MB as float32; the training pipeline uses it
    when they fit in `features.ram_cache_mb`).  The same code runs on the CPU (tests compare it
    with per-image pooling).  `WindowEmbedder.pool5_stacked` pools from it.
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

    def _pool(self, backbone, levels: Sequence[int], projection: str, slots: np.ndarray, boxes: np.ndarray,
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
