"""Training windows matched to the ground truth: the one place where each window (every
ground-truth box, then every proposal, of an image) gets its best-overlapping ground-truth
box, that IoU, that box's class, and its best IoU with each class.

Fine-tuning draws foreground (IoU >= 0.5, labelled with the matched box's class) and
background windows from it, the SVM rows read each window's per-class IoU (negatives are
below 0.3 for the class), and box regression takes the windows overlapping their matched
box by more than 0.5 as examples, with that box as the target (paper section 4.1; R-CNN).
IoUs are computed once, in float64, with torchvision's `box_iou`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class Windows:
    boxes: np.ndarray  # [M, 4] float32: ground truth first, then proposals
    is_gt: np.ndarray  # [M] bool
    gt_labels: np.ndarray  # [M] int64: class of ground-truth rows, -1 for proposals
    max_iou: np.ndarray  # [M] float64: best IoU with any ground-truth box (0 when the image has none)
    matched: np.ndarray  # [M] int64: index of that box in gt_boxes (the first on ties; 0 when there is none)
    labels: np.ndarray  # [M] int64: class of that box (-1 when the image has none)
    gt_boxes: np.ndarray  # [G, 4] float32
    class_iou: np.ndarray  # [M, K] float32: best IoU with the ground truth of each class

    def __len__(self) -> int:
        return len(self.boxes)

    def matched_boxes(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """The matched ground-truth box of each window (of `rows`), [n, 4] float32."""
        m = self.matched if rows is None else self.matched[rows]
        return self.gt_boxes[m] if len(self.gt_boxes) else np.zeros((len(m), 4), np.float32)

    def softmax_targets(self, rows: np.ndarray, fg_iou: float) -> np.ndarray:
        """Fine-tuning's targets of `rows`: 1 + the matched class for foreground, 0 for background."""
        return np.where(self.max_iou[rows] >= fg_iou, 1 + self.labels[rows], 0).astype(np.int64)

    def regression_rows(self, iou_thresh: float) -> np.ndarray:
        """Box regression's examples: windows whose IoU with their matched box exceeds
        `iou_thresh` (strictly; SPP-net 0.5, R-CNN 0.6), ground-truth boxes included."""
        return np.flatnonzero(self.max_iou > iou_thresh)


def match_windows(gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray, num_classes: int) -> Windows:
    """The ground-truth boxes and the proposals of one image, each matched to its
    best-overlapping ground-truth box (see the module docstring)."""
    gt = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gl = np.asarray(gt_labels, np.int64).reshape(-1)
    if len(gl) != len(gt):
        raise ValueError(f"match_windows: {len(gt)} ground-truth boxes but {len(gl)} labels")
    props = np.asarray(proposals, np.float32).reshape(-1, 4)
    boxes = np.concatenate([gt, props], 0)
    M, G = len(boxes), len(gt)
    is_gt = np.arange(M) < G
    gt_labels_m = np.full(M, -1, np.int64)
    gt_labels_m[:G] = gl
    class_iou = np.zeros((M, num_classes), np.float32)
    if G and M:
        iou = box_iou(torch.from_numpy(boxes.astype(np.float64)), torch.from_numpy(gt.astype(np.float64))).numpy()
        iou = np.nan_to_num(iou, nan=0.0)  # two boxes without area
        matched = iou.argmax(1)
        max_iou = iou[np.arange(M), matched]
        for k in np.unique(gl):
            class_iou[:, k] = iou[:, gl == k].max(1)
        labels = gl[matched]
    else:
        matched = np.zeros(M, np.int64)
        max_iou = np.zeros(M, np.float64)
        labels = np.full(M, -1, np.int64)
    return Windows(boxes, is_gt, gt_labels_m, max_iou.astype(np.float64), matched.astype(np.int64),
                   labels.astype(np.int64), gt, class_iou)
