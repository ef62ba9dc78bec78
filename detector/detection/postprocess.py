"""Test-time post-processing of SVM scores into detections (the release's test procedure;
docs/design.md, "Test").

Steps, as the original:
  1. keep, per class, the proposals scoring above the threshold (strictly);
  2. per-class NMS at IoU 0.3;
  3. keep at most 100 detections per image, over all classes (highest scores);
  4. box regression of the kept boxes only (scores unchanged);
  5. clip to the image [0, W] x [0, H];
  6. per-class NMS once more (second_nms).

The work is split so the detector can regress only the kept windows:
`select_detections` does 1-3 and returns proposal indices and labels; the
caller computes the refined boxes of just those (e.g. `BoxRegressor.predict`
on their features) and `finalize_detections` does 5-6.  `postprocess` chains
them, taking the regression as a callable (indices, labels) -> boxes or as
precomputed per-class deltas [M, K, 4].

Order is deterministic everywhere: descending score, then class, then
proposal index.  NMS itself is torchvision's; we hand it ranks rather than
scores so ties are processed in that order whatever its sort does.

Measured alternatives to the release's steps (BENCHMARKS.md, "Accuracy levers" and "Learned proposals and
the levers"; the defaults turn the first and the third on, `test.*` in detector/config.py):

- `refine` (`test.nms_after_regression`): each candidate window is regressed for its
  class *before* NMS, as Fast R-CNN does, so duplicates of one object converge onto one
  box and are suppressed while neighbours that overlap a little survive; no second NMS.
- `soft_sigma` > 0 (`test.soft_nms_sigma`): Gaussian soft-NMS (Bodla et al., ICCV 2017)
  instead of removing overlapping boxes: each later box's score above the class threshold
  is multiplied by exp(-IoU^2 / sigma) per higher box kept, and it drops out when that
  margin falls below `soft_min` of its original margin (SVM margins can be negative, so the
  decay applies to the margin above the threshold, which is positive for every candidate).
- `vote_iou` > 0 (`test.box_voting_iou`, with `refine`): box voting (Gidaris and Komodakis,
  ICCV 2015): after NMS each kept box becomes the mean of its class's refined candidates
  that overlap it by at least `vote_iou`, weighted by their margins above the threshold, so
  the many regressed windows on one object average their errors out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.ops import nms

from detector.detection.bbox_regression import decode
from detector.config import ConfigError, TestConfig

Regressor = Union[None, Callable[[np.ndarray, np.ndarray], np.ndarray], np.ndarray]


@dataclass
class Selection:
    """Detections after steps 1-3: rows of the input boxes, their classes, scores and boxes
    (the input rows, or their refined boxes when NMS ran on those), sorted by (score desc,
    label, index)."""

    indices: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64
    scores: np.ndarray  # [n] float32
    boxes: np.ndarray  # [n, 4] float32

    def __len__(self) -> int:
        return len(self.indices)


def class_thresholds(score_thresh, class_names: Sequence[str]) -> np.ndarray:
    """Per-class score thresholds [K] from one number, a list with one per class, or a mapping
    {class name: threshold} whose "*" entry (default: `TestConfig.score_thresh`) sets every class it does not name.
    A wrong length or an unknown class name is a ConfigError that lists the classes."""
    K, names = len(class_names), list(class_names)
    if isinstance(score_thresh, dict):
        unknown = sorted(k for k in score_thresh if k != "*" and k not in names)
        if unknown:
            raise ConfigError(f"test.score_thresh names unknown class(es) {unknown}; the classes are {names} "
                              "(and '*' for the rest)")
        rest = float(score_thresh.get("*", TestConfig.score_thresh))
        return np.array([float(score_thresh.get(n, rest)) for n in names], np.float64)
    thr = np.asarray(score_thresh, np.float64).reshape(-1)
    if len(thr) == 1:
        return np.repeat(thr, K)
    if thr.shape != (K,):
        raise ConfigError(f"test.score_thresh has {len(thr)} values for {K} classes {names}")
    return thr


def _order(scores: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.lexsort((indices, labels, -scores.astype(np.float64)))


def _nms_per_class(boxes: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Positions kept by per-class NMS; boxes must already be in priority order."""
    keep = []
    rank = torch.arange(len(boxes), 0, -1, dtype=torch.float64)  # strictly decreasing = our order
    bt = torch.from_numpy(np.ascontiguousarray(boxes, np.float64))
    for k in np.unique(labels):
        pos = np.flatnonzero(labels == k)
        kept = nms(bt[pos], rank[pos], float(iou)).numpy()
        keep.append(pos[kept])
    if not keep:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(keep))


def _box_votes(boxes: np.ndarray, margins: np.ndarray, labels: np.ndarray, keep: np.ndarray,
               iou: float) -> np.ndarray:
    """Box voting: each kept box [len(keep), 4] replaced by the mean of its class's candidates
    overlapping it by at least `iou` (itself included), weighted by their margins above the
    class threshold (positive for every candidate)."""
    from torchvision.ops import box_iou

    out = np.asarray(boxes[keep], np.float64).copy()
    for k in np.unique(labels[keep]):
        mine = np.flatnonzero(labels[keep] == k)
        pos = np.flatnonzero(labels == k)
        b = torch.from_numpy(np.asarray(boxes[pos], np.float64))
        near = box_iou(torch.from_numpy(out[mine]), b).numpy() >= iou  # [kept of k, candidates of k]
        near[np.arange(len(mine)), np.searchsorted(pos, keep[mine])] = True  # itself, even with no area
        w = near * margins[pos][None, :]
        out[mine] = (w @ b.numpy()) / w.sum(1, keepdims=True)
    return out.astype(np.float32)


def _soft_nms_per_class(boxes: np.ndarray, margins: np.ndarray, labels: np.ndarray, sigma: float,
                        min_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian soft-NMS per class on positive margins: (positions kept, their decayed margins).
    Boxes are in priority order; at each step the highest remaining margin is kept (ties: the
    earlier position)."""
    from torchvision.ops import box_iou

    kept, out = [], []
    for k in np.unique(labels):
        pos = np.flatnonzero(labels == k)
        m = margins[pos].astype(np.float64)
        floor = m * min_frac
        iou = box_iou(torch.from_numpy(np.asarray(boxes[pos], np.float64)),
                      torch.from_numpy(np.asarray(boxes[pos], np.float64))).numpy()
        alive = np.ones(len(pos), bool)
        while alive.any():
            j = int(np.flatnonzero(alive)[np.argmax(m[alive])])
            kept.append(pos[j])
            out.append(m[j])
            alive[j] = False
            m[alive] *= np.exp(-iou[j, alive] ** 2 / sigma)
            alive &= m >= floor
    order = np.argsort(kept, kind="stable")
    return np.asarray(kept, np.int64)[order], np.asarray(out, np.float64)[order]


def _check_inputs(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"postprocess: boxes must be [M, 4], got shape {boxes.shape}")
    if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"postprocess: scores must be [M, K] with M = {boxes.shape[0]}, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("postprocess: scores contain NaN")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("postprocess: boxes contain NaN or inf")
    return boxes, scores


def select_detections(boxes: np.ndarray, scores: np.ndarray,
                      score_thresh: Union[float, Sequence[float], np.ndarray] = -1.5,
                      nms_iou: float = 0.3, max_per_image: Optional[int] = 100,
                      refine: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None,
                      soft_sigma: float = 0.0, soft_min: float = 0.01, vote_iou: float = 0.0) -> Selection:
    """Steps 1-3.  score_thresh: scalar or one per class (see class_thresholds; a mapping
    here is keyed by the class index as a string); max_per_image None: no cap.
    refine(indices, labels) -> boxes: NMS runs on each candidate's refined box for its class
    instead of its proposal box; soft_sigma > 0: soft-NMS; vote_iou > 0: box voting (see the
    module docstring)."""
    boxes, scores = _check_inputs(boxes, scores)
    num_classes = scores.shape[1]
    thr = class_thresholds(score_thresh, [str(k) for k in range(num_classes)])
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"postprocess: max_per_image must be >= 1 or None, got {max_per_image}")
    idx, lab = np.nonzero(scores.astype(np.float64) > thr[None, :])
    sc = scores[idx, lab]
    o = _order(sc, lab, idx)
    idx, lab, sc = idx[o], lab[o], sc[o]
    cand = boxes[idx] if refine is None else np.asarray(refine(idx, lab), np.float32).reshape(-1, 4)
    if soft_sigma > 0:
        keep, margin = _soft_nms_per_class(cand, sc.astype(np.float64) - thr[lab], lab, soft_sigma, soft_min)
        sc = (margin + thr[lab[keep]]).astype(np.float32)
        idx, lab, cand = idx[keep], lab[keep], cand[keep]
        o = _order(sc, lab, idx)  # decayed scores: back into priority order
        idx, lab, sc, cand = idx[o], lab[o], sc[o], cand[o]
    else:
        keep = _nms_per_class(cand, lab, nms_iou)  # sorted positions: order preserved
        voted = _box_votes(cand, sc.astype(np.float64) - thr[lab], lab, keep, vote_iou) if vote_iou > 0 else None
        idx, lab, sc, cand = idx[keep], lab[keep], sc[keep], cand[keep] if voted is None else voted
    if max_per_image is not None:
        idx, lab, sc, cand = idx[:max_per_image], lab[:max_per_image], sc[:max_per_image], cand[:max_per_image]
    return Selection(idx.astype(np.int64), lab.astype(np.int64), sc.astype(np.float32), cand.astype(np.float32))


def finalize_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                        image_size: tuple[int, int], nms_iou: float = 0.3, second_nms: bool = True,
                        indices: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Steps 5-6 on the (refined) kept boxes; indices (proposal rows) break score ties.
    Returns boxes [n, 4] float32, scores [n] float32, labels [n] int64, indices [n] int64."""
    w, h = image_size
    if not (w > 0 and h > 0):
        raise ValueError(f"postprocess: image_size must be positive (W, H), got {image_size}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    indices = np.arange(len(boxes), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if not (len(boxes) == len(scores) == len(labels) == len(indices)):
        raise ValueError(f"postprocess: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels, "
                         f"{len(indices)} indices")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("postprocess: refined boxes contain NaN or inf")
    boxes = boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    o = _order(scores, labels, indices)
    boxes, scores, labels, indices = boxes[o], scores[o], labels[o], indices[o]
    if second_nms:
        keep = _nms_per_class(boxes, labels, nms_iou)
        boxes, scores, labels, indices = boxes[keep], scores[keep], labels[keep], indices[keep]
    return {"boxes": boxes, "scores": scores, "labels": labels, "indices": indices}


def postprocess(boxes: np.ndarray, scores: np.ndarray, image_size: tuple[int, int],
                score_thresh: Union[float, Sequence[float], np.ndarray] = -1.5, nms_iou: float = 0.3,
                max_per_image: Optional[int] = 100, regressor: Regressor = None,
                second_nms: bool = True) -> dict[str, np.ndarray]:
    """The whole test procedure from proposal boxes [M, 4] and SVM scores [M, K] to final detections.

    regressor: None (no box regression); a callable (indices, labels) -> refined
    boxes [n, 4] for the kept proposal rows and their classes; or deltas
    [M, K, 4] (per proposal and class), decoded for the kept pairs.
    image_size: (W, H).  Returns dict(boxes, scores, labels, indices), sorted by
    descending score, then class, then proposal index.
    """
    boxes, scores = _check_inputs(boxes, scores)
    sel = select_detections(boxes, scores, score_thresh, nms_iou, max_per_image)
    kept = boxes[sel.indices]
    if regressor is None:
        refined = kept
    elif callable(regressor):
        refined = np.asarray(regressor(sel.indices, sel.labels), np.float32)
        if refined.shape != (len(sel), 4):
            raise ValueError(f"postprocess: the regressor returned shape {refined.shape}, expected ({len(sel)}, 4)")
    else:
        deltas = np.asarray(regressor)
        if deltas.shape != (len(boxes), scores.shape[1], 4):
            raise ValueError(f"postprocess: regression deltas must be [M, K, 4] = "
                             f"({len(boxes)}, {scores.shape[1]}, 4), got {deltas.shape}")
        refined = decode(kept, deltas[sel.indices, sel.labels]) if len(sel) else kept
    return finalize_detections(refined, sel.scores, sel.labels, image_size, nms_iou, second_nms, sel.indices)
