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
the classifier all call it, so a window is embedded the same way everywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from detector.core.backbones import Backbone
from detector.core.features import ScaleFeatures
from detector.core.heads import FCHead
from detector.core.pooling import pool_windows, project_to_windows
from detector.core.spp import spp_length


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
        """[N, 5] int64: each box's scale index and its inclusive cell window (see pooling)."""
        return project_to_windows(feats, boxes, self.backbone, self.scale_rule, scale_index, self.projection, name)

    def pool5(self, feats: Sequence[ScaleFeatures], boxes: np.ndarray, scale_index: Optional[np.ndarray] = None,
              name: str = "boxes") -> torch.Tensor:
        """Scaled SPP vectors [N, D] of boxes in original-image pixels.  `scale_index` forces
        each box's scale (fine-tuning draws it at random); else the scale rule picks it."""
        pooled = pool_windows(feats, self.windows(feats, boxes, scale_index, name), self.levels)
        return pooled.mul_(self.pool5_scale)  # in place: a fresh [N, D] costs page faults

    def pool5_unique(self, feats: Sequence[ScaleFeatures], boxes: np.ndarray,
                     name: str = "boxes") -> tuple[torch.Tensor, np.ndarray]:
        """(scaled pool5 of the distinct windows [U, D], inverse [N]): box i's vector is row inverse[i].

        Boxes a few pixels apart often project onto the same cells at the same
        scale, so they share their SPP vector and everything computed from it;
        detect() pools and scores each distinct window once.
        """
        distinct, inverse = distinct_windows(self.windows(feats, boxes, None, name))
        return pool_windows(feats, distinct, self.levels).mul_(self.pool5_scale), inverse

    @torch.inference_mode()
    def embed(self, pool5: torch.Tensor) -> torch.Tensor:
        """Classifier features of scaled pool5 rows: the head's `layer` after ReLU (or pool5
        itself), times `feature_scale`."""
        if self.layer == "pool5":
            return pool5 * self.feature_scale  # a copy: callers keep pool5 for box regression
        return self.head.embed(pool5, self.layer).mul_(self.feature_scale)
