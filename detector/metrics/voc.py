"""PASCAL VOC devkit AP (docs/design.md, "Evaluation"), as pure functions on arrays
(`detector.metrics.coco` has the COCO metrics).

VOC (`eval_detection_voc`, `calc_detection_voc_prec_rec`, `calc_detection_voc_ap`) follows the
devkit's `VOCevaldet.m` / `VOCap.m`; the call signature is chainercv's.  It is written by hand
because no maintained library implements the devkit's rules (the +1 pixel convention, difficult
objects, MATLAB's stable sort and its 11 recall thresholds); chainercv and py-faster-rcnn's
`voc_eval.py` each differ from the devkit in a detail (see `calc_detection_voc_ap`).

Box convention of the VOC functions: boxes are the devkit's 1-based inclusive pixel boxes
`xmin, ymin, xmax, ymax`; widths and heights are `x2 - x1 + 1` and so are intersections.  Our
library's boxes are 0-based continuous (`x1 = xmin - 1, x2 = xmax`); pass them through
`to_devkit_boxes` (adds 1 to x1 and y1) first.  The devkit's +1 IoU of the converted boxes is then
the continuous IoU of the originals (exactly in real arithmetic; up to float rounding, and exactly
for integer boxes), so detections and ground truth from our pipeline are scored as the devkit
would score the files `detector.metrics.result_files.write_voc_results` writes.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# The 11 recall thresholds of the devkit's `for t=0:0.1:1`.  MATLAB's colon operator builds the
# first half as a + k*d and the second half as b - k*d, so its values are the doubles nearest to
# k/10 except the 4th, 3*0.1 = 0.30000000000000004: a recall of exactly 0.3 does not reach that
# threshold in the devkit, and does not here.  (np.arange(0, 1.1, 0.1), used by chainercv and
# py-faster-rcnn, also gives 0.6000000000000001 and 0.7000000000000001, so they drop recalls of
# exactly 0.6 and 0.7 where the devkit keeps them.)
VOC07_RECALL_THRESHOLDS = np.array([k * 0.1 for k in range(6)] + [1.0 - k * 0.1 for k in (4, 3, 2, 1, 0)])


# --------------------------------------------------------------------------- box conventions

def to_devkit_boxes(boxes: np.ndarray) -> np.ndarray:
    """Our 0-based continuous `x1, y1, x2, y2` -> the devkit's 1-based inclusive boxes (float64)."""
    b = np.array(boxes, np.float64).reshape(-1, 4)
    b[:, :2] += 1.0
    return b


def from_devkit_boxes(boxes: np.ndarray) -> np.ndarray:
    """The devkit's 1-based inclusive boxes -> our 0-based continuous boxes (float64)."""
    b = np.array(boxes, np.float64).reshape(-1, 4)
    b[:, :2] -= 1.0
    return b


# --------------------------------------------------------------------------- input checking

def _float_array(x: Any, name: str, i: int, cols: Optional[int]) -> np.ndarray:
    try:
        a = np.asarray(x, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image {i}: {name} is not a numeric array ({e})") from None
    if cols is not None:
        if a.size == 0:
            a = a.reshape(0, cols)
        if a.ndim != 2 or a.shape[1] != cols:
            raise ValueError(f"image {i}: {name} has shape {a.shape}, expected (N, {cols})")
    else:
        if a.size == 0:
            a = a.reshape(0)
        if a.ndim != 1:
            raise ValueError(f"image {i}: {name} has shape {a.shape}, expected (N,)")
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"image {i}: {name} contains NaN or infinite values (first at row {row})")
    return a


def _label_array(x: Any, name: str, i: int) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1:
        raise ValueError(f"image {i}: {name} has shape {a.shape}, expected (N,)")
    if a.dtype.kind in "iu":
        out = a.astype(np.int64)
    elif a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        out = a.astype(np.int64)
    else:
        raise ValueError(f"image {i}: {name} must hold integer class indices (got dtype {a.dtype})")
    if (out < 0).any():
        raise ValueError(f"image {i}: {name} has a negative class index ({int(out.min())})")
    return out


def _as_list(x: Any, name: str) -> list:
    try:
        return list(x)
    except TypeError:
        raise ValueError(f"{name} must be a sequence with one entry per image") from None


def check_detections(pred_boxes: Sequence, pred_labels: Sequence, pred_scores: Sequence
                     ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Validate per-image detections: equal list lengths, [N,4] boxes, [N] labels and scores,
    finite values, non-negative integer labels.  Returns float64 / int64 arrays."""
    pb, pl, ps = (_as_list(pred_boxes, "pred_boxes"), _as_list(pred_labels, "pred_labels"),
                  _as_list(pred_scores, "pred_scores"))
    if not len(pb) == len(pl) == len(ps):
        raise ValueError(f"per-image lists differ in length: pred_boxes {len(pb)}, pred_labels {len(pl)}, "
                         f"pred_scores {len(ps)}")
    boxes, labels, scores = [], [], []
    for i in range(len(pb)):
        b = _float_array(pb[i], "pred_boxes", i, 4)
        s = _float_array(ps[i], "pred_scores", i, None)
        lab = _label_array(pl[i], "pred_labels", i)
        if not len(b) == len(lab) == len(s):
            raise ValueError(f"image {i}: pred_boxes ({len(b)}), pred_labels ({len(lab)}) and pred_scores "
                             f"({len(s)}) differ in length")
        boxes.append(b), labels.append(lab), scores.append(s)
    return boxes, labels, scores


def check_ground_truth(gt_boxes: Sequence, gt_labels: Sequence, gt_difficults: Optional[Sequence] = None
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Validate per-image ground truth; `gt_difficults` None (or a None entry) means none difficult."""
    gb, gl = _as_list(gt_boxes, "gt_boxes"), _as_list(gt_labels, "gt_labels")
    gd = [None] * len(gb) if gt_difficults is None else _as_list(gt_difficults, "gt_difficults")
    if not len(gb) == len(gl) == len(gd):
        raise ValueError(f"per-image lists differ in length: gt_boxes {len(gb)}, gt_labels {len(gl)}, "
                         f"gt_difficults {len(gd)}")
    boxes, labels, diffs = [], [], []
    for i in range(len(gb)):
        b = _float_array(gb[i], "gt_boxes", i, 4)
        lab = _label_array(gl[i], "gt_labels", i)
        if gd[i] is None:
            d = np.zeros(len(b), bool)
        else:
            d = np.asarray(gd[i])
            if d.size == 0:
                d = d.reshape(0)
            if d.ndim != 1 or d.dtype.kind not in "biu" or not np.isin(d, (0, 1)).all():
                raise ValueError(f"image {i}: gt_difficults must be a 1-d array of booleans (got dtype "
                                 f"{d.dtype}, shape {d.shape})")
            d = d.astype(bool)
        if not len(b) == len(lab) == len(d):
            raise ValueError(f"image {i}: gt_boxes ({len(b)}), gt_labels ({len(lab)}) and gt_difficults "
                             f"({len(d)}) differ in length")
        boxes.append(b), labels.append(lab), diffs.append(d)
    return boxes, labels, diffs


def count_classes(labels: Iterable[np.ndarray], n_classes: Optional[int]) -> int:
    top = max((int(a.max()) for a in labels if len(a)), default=-1)
    if n_classes is None:
        return top + 1
    if top >= n_classes:
        raise ValueError(f"a label ({top}) is >= n_classes ({n_classes})")
    return int(n_classes)


# --------------------------------------------------------------------------- VOC devkit AP

def _devkit_overlaps(bb: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[N, M] devkit IoU with +1 widths, -inf where the intersection is empty (the devkit's
    `iw>0 & ih>0` test leaves ovmax at -inf there).  Operation order follows VOCevaldet.m."""
    iw = np.minimum(bb[:, None, 2], gt[None, :, 2]) - np.maximum(bb[:, None, 0], gt[None, :, 0]) + 1
    ih = np.minimum(bb[:, None, 3], gt[None, :, 3]) - np.maximum(bb[:, None, 1], gt[None, :, 1]) + 1
    valid = (iw > 0) & (ih > 0)
    inter = iw * ih
    area_b = (bb[:, 2] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 1] + 1)
    area_g = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    ua = area_b[:, None] + area_g[None, :] - inter
    return np.where(valid, inter / np.where(valid, ua, 1.0), -np.inf)


def calc_detection_voc_prec_rec(pred_boxes: Sequence, pred_labels: Sequence, pred_scores: Sequence,
                                gt_boxes: Sequence, gt_labels: Sequence,
                                gt_difficults: Optional[Sequence] = None, iou_thresh: float = 0.5,
                                *, n_classes: Optional[int] = None
                                ) -> tuple[list[Optional[np.ndarray]], list[Optional[np.ndarray]]]:
    """Per-class precision and recall curves under the devkit's matching rules.

    Arguments are per-image lists (boxes in the devkit's +1 convention, see the module docstring).
    Per class, detections of all images are ranked by descending score with a stable sort; ties
    keep input order (image by image, then row order within an image), as MATLAB's stable
    `sort(-confidence)` keeps the order of the lines of the devkit's result file, which
    `write_voc_results` writes in that same order.  Each detection takes the GT of its class in
    its image with the highest IoU (difficult ones included; the first such GT on a tie).  If that
    IoU >= iou_thresh: a difficult GT makes it neither TP nor FP, an unmatched GT makes it a TP and
    marks the GT, an already matched GT makes it a FP (duplicate).  Otherwise it is a FP.
    Difficult objects are not counted as positives.

    Returns (prec, rec), lists of length n_classes (default: max label over predictions and ground
    truth + 1).  prec[l] is None for a class that appears in neither; rec[l] is None for a class
    with no non-difficult GT.  Precision is NaN where no detection has counted yet (tp + fp = 0,
    i.e. only difficult matches so far).
    """
    pb, pl, ps = check_detections(pred_boxes, pred_labels, pred_scores)
    gb, gl, gd = check_ground_truth(gt_boxes, gt_labels, gt_difficults)
    if len(pb) != len(gb):
        raise ValueError(f"predictions cover {len(pb)} images but ground truth covers {len(gb)}")
    n_cls = count_classes(pl + gl, n_classes)

    # Per detection: whether its best GT passes the threshold, and that GT's global index.
    best_gt, passes, gt_offset = [], [], 0
    for i in range(len(pb)):
        n, m = len(pb[i]), len(gb[i])
        g = np.full(n, -1, np.int64)
        ok = np.zeros(n, bool)
        if n and m:
            ov = _devkit_overlaps(pb[i], gb[i])
            ov[pl[i][:, None] != gl[i][None, :]] = -np.inf
            j = np.argmax(ov, axis=1)  # first maximum, as the devkit's strict `ov>ovmax`
            ok = ov[np.arange(n), j] >= iou_thresh
            g = np.where(ok, j + gt_offset, -1)
        best_gt.append(g), passes.append(ok)
        gt_offset += m
    labels = np.concatenate(pl) if pl else np.zeros(0, np.int64)
    scores = np.concatenate(ps) if ps else np.zeros(0)
    best_gt = np.concatenate(best_gt) if best_gt else np.zeros(0, np.int64)
    passes = np.concatenate(passes) if passes else np.zeros(0, bool)
    gt_labels_all = np.concatenate(gl) if gl else np.zeros(0, np.int64)
    gt_diff_all = np.concatenate(gd) if gd else np.zeros(0, bool)
    difficult_hit = passes & gt_diff_all[np.maximum(best_gt, 0)] if len(gt_diff_all) else passes

    prec: list[Optional[np.ndarray]] = [None] * n_cls
    rec: list[Optional[np.ndarray]] = [None] * n_cls
    present = set(labels.tolist()) | set(gt_labels_all.tolist())
    for c in range(n_cls):
        if c not in present:
            continue
        n_pos = int(np.count_nonzero((gt_labels_all == c) & ~gt_diff_all))
        sel = np.flatnonzero(labels == c)
        order = sel[np.argsort(-scores[sel], kind="stable")]
        cand = passes[order] & ~difficult_hit[order]
        tp = np.zeros(len(order), bool)
        cand_pos = np.flatnonzero(cand)
        _, first = np.unique(best_gt[order][cand_pos], return_index=True)  # first claim of each GT
        tp[cand_pos[first]] = True
        fp = ~tp & ~difficult_hit[order]
        tp_c, fp_c = np.cumsum(tp).astype(np.float64), np.cumsum(fp).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec[c] = tp_c / (tp_c + fp_c)
        if n_pos > 0:
            rec[c] = tp_c / n_pos
    return prec, rec


def calc_detection_voc_ap(prec: Sequence[Optional[np.ndarray]], rec: Sequence[Optional[np.ndarray]],
                          use_07_metric: bool = True) -> np.ndarray:
    """AP per class from `calc_detection_voc_prec_rec`'s curves; NaN where prec or rec is None.

    use_07_metric=True (VOC2007): mean over the 11 devkit thresholds t (`VOC07_RECALL_THRESHOLDS`,
    the values of MATLAB's 0:0.1:1) of the max precision at recall >= t, 0 if none.
    use_07_metric=False (VOC2010+, `VOCap.m`): area under the precision envelope, with sentinels
    (0, 0) and (1, 0), the precision made non-increasing from the right, summed over recall steps.
    NaN precisions (only difficult matches so far) count as 0.  That equals the devkit, whose
    MATLAB `max` skips NaN, except in one degenerate case: when every precision at recall >= t is
    NaN the devkit's AP becomes NaN, here that threshold contributes 0.
    """
    if len(prec) != len(rec):
        raise ValueError(f"prec has {len(prec)} classes but rec has {len(rec)}")
    ap = np.full(len(prec), np.nan)
    for c, (p, r) in enumerate(zip(prec, rec)):
        if p is None or r is None:
            continue
        p = np.nan_to_num(np.asarray(p, np.float64), nan=0.0)
        r = np.asarray(r, np.float64)
        if p.shape != r.shape:
            raise ValueError(f"class {c}: prec and rec differ in shape ({p.shape} vs {r.shape})")
        if use_07_metric:
            total = 0.0
            for t in VOC07_RECALL_THRESHOLDS:
                m = r >= t
                total += (p[m].max() if m.any() else 0.0) / 11
            ap[c] = total
        else:
            mrec = np.concatenate(([0.0], r, [1.0]))
            mpre = np.concatenate(([0.0], p, [0.0]))
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]
            i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
            ap[c] = np.sum((mrec[i] - mrec[i - 1]) * mpre[i])
    return ap


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    ok = ~np.isnan(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


def eval_detection_voc(pred_boxes: Sequence, pred_labels: Sequence, pred_scores: Sequence,
                       gt_boxes: Sequence, gt_labels: Sequence, gt_difficults: Optional[Sequence] = None,
                       iou_thresh: float = 0.5, use_07_metric: bool = True,
                       *, n_classes: Optional[int] = None) -> dict:
    """PASCAL VOC devkit evaluation (chainercv's signature, the devkit's rules).

    Per-image lists of numpy arrays: pred_boxes [N,4], pred_labels [N] (0-based), pred_scores [N],
    gt_boxes [M,4], gt_labels [M], gt_difficults [M] bool (None: no difficult objects).
    Boxes are the devkit's 1-based inclusive `x1, y1, x2, y2` (+1 widths and intersections); pass
    our continuous boxes through `to_devkit_boxes`, which makes the +1 IoU equal their continuous
    IoU.  Matching, tie-breaking and the two metrics: see `calc_detection_voc_prec_rec` and
    `calc_detection_voc_ap`.

    Returns {"ap": float64 array of length n_classes (default max label + 1 over predictions and
    ground truth), NaN for a class without non-difficult ground truth; "map": nanmean of ap}.
    A class with ground truth but no detections has AP 0.  NaN or infinite inputs and mismatched
    lengths raise ValueError naming the image and the array.
    """
    prec, rec = calc_detection_voc_prec_rec(pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels,
                                            gt_difficults, iou_thresh, n_classes=n_classes)
    ap = calc_detection_voc_ap(prec, rec, use_07_metric)
    return {"ap": ap, "map": _nanmean(ap)}


def detection_counts(pred_labels: Sequence, gt_labels: Sequence, gt_difficults: Optional[Sequence] = None,
                     n_classes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(non-difficult GT per class, detections per class), e.g. for `format_ap_table`."""
    pl = [_label_array(x, "pred_labels", i) for i, x in enumerate(_as_list(pred_labels, "pred_labels"))]
    gl = [_label_array(x, "gt_labels", i) for i, x in enumerate(_as_list(gt_labels, "gt_labels"))]
    gd = [None] * len(gl) if gt_difficults is None else _as_list(gt_difficults, "gt_difficults")
    if len(gd) != len(gl):
        raise ValueError(f"gt_labels covers {len(gl)} images but gt_difficults {len(gd)}")
    n = count_classes(pl + gl, n_classes)
    n_gt, n_det = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for lab, d in zip(gl, gd):
        keep = np.ones(len(lab), bool) if d is None else ~np.asarray(d, bool).reshape(-1)
        if len(keep) != len(lab):
            raise ValueError("gt_labels and gt_difficults differ in length")
        n_gt += np.bincount(lab[keep], minlength=n)
    for lab in pl:
        n_det += np.bincount(lab, minlength=n)
    return n_gt, n_det


def format_ap_table(class_names: Sequence[str], ap: np.ndarray, map_value: float,
                    n_gt: Optional[Sequence[int]] = None, n_det: Optional[Sequence[int]] = None) -> str:
    """A per-class AP table with aligned columns, ending with the line `mAP = 0.xxxx`.

    `ap` may be shorter than class_names (classes past its end print as nan).
    """
    ap = np.asarray(ap, np.float64).reshape(-1)
    if len(ap) > len(class_names):
        raise ValueError(f"ap has {len(ap)} entries but there are only {len(class_names)} class names")
    for name, col in (("n_gt", n_gt), ("n_det", n_det)):
        if col is not None and len(col) < len(ap):
            raise ValueError(f"{name} has {len(col)} entries, fewer than ap ({len(ap)})")

    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.4f}"

    width = max([len("class")] + [len(str(c)) for c in class_names])
    header = f"{'class':<{width}}  {'AP':>6}"
    header += f"  {'n_gt':>7}" if n_gt is not None else ""
    header += f"  {'n_det':>8}" if n_det is not None else ""
    lines = [header, "-" * len(header)]
    for k, name in enumerate(class_names):
        v = ap[k] if k < len(ap) else float("nan")
        row = f"{str(name):<{width}}  {fmt(v):>6}"
        if n_gt is not None:
            row += f"  {int(n_gt[k]) if k < len(n_gt) else 0:>7d}"
        if n_det is not None:
            row += f"  {int(n_det[k]) if k < len(n_det) else 0:>8d}"
        lines.append(row)
    lines.append("-" * len(header))
    lines.append(f"mAP = {fmt(float(map_value))}")
    return "\n".join(lines)
