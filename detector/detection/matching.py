"""Training windows: each candidate box (ground truth and proposals) with its best
ground-truth match, from which fine-tuning, SVM and regression examples are drawn."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class Windows:
    boxes: np.ndarray  # [M, 4] float32: ground truth first, then proposals
    is_gt: np.ndarray  # [M] bool
    gt_labels: np.ndarray  # [M] int64: class of ground-truth rows, -1 for proposals
    max_iou: np.ndarray  # [M] best IoU with any GT
    best_gt: np.ndarray  # [M] index of that GT (0 when there is none)
    class_iou: np.ndarray  # [M, K] best IoU with the GT of each class


def label_windows(gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray, num_classes: int) -> Windows:
    gt = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gl = np.asarray(gt_labels, np.int64).reshape(-1)
    props = np.asarray(proposals, np.float32).reshape(-1, 4)
    boxes = np.concatenate([gt, props], 0)
    M, G = len(boxes), len(gt)
    is_gt = np.zeros(M, bool)
    is_gt[:G] = True
    labels = np.full(M, -1, np.int64)
    labels[:G] = gl
    class_iou = np.zeros((M, num_classes), np.float32)
    if G and M:
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()
        best_gt = iou.argmax(1)
        max_iou = iou.max(1)
        for k in np.unique(gl):
            class_iou[:, k] = iou[:, gl == k].max(1)
    else:
        best_gt = np.zeros(M, np.int64)
        max_iou = np.zeros(M, np.float32)
    return Windows(boxes, is_gt, labels, max_iou.astype(np.float32), best_gt.astype(np.int64), class_iou)
