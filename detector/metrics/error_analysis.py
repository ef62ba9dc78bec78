"""TIDE-style error analysis of detections (Bolya et al., "TIDE: A General Toolbox for Identifying
Object Detection Errors", ECCV 2020), under the VOC devkit's matching and AP, as pure functions.

`analyze_errors` says how much AP each kind of error costs: every false positive gets one type,
every undetected object may count as missed, and the dAP of a type is the mAP gained when the
errors of that type alone are fixed by an oracle (the rest left as they are).

Types of a false positive, tested in this order (tidecv's order, so the figures compare with
published TIDE figures); IoU is the max over the image's non-difficult GT of the kind named:

  loc     localisation: right class, t_b <= IoU < t_f.        Fix: it becomes the TP of that GT
  cls     classification: IoU >= t_f with a GT of another     (the highest-scoring such error of
          class.                                               each GT; a cls error moves to the
                                                               GT's class); the others, and any
                                                               whose GT is already detected, are
                                                               removed.
  dupe    duplicate: right class, IoU >= t_f, but the GT was   Fix: removed.
          taken by a higher-scoring detection.
  bkg     background: IoU < t_b with every GT.                Fix: removed.
  both    the rest: IoU in [t_b, t_f) with a GT of another     Fix: removed (we cannot tell which
          class, below t_b with its own class.                 GT it aimed at).
and of an object:
  missed  a non-difficult GT that no detection matched and     Fix: it leaves the positives (the
          that no loc or cls error aims at.                    class's recall rises).

Two more oracles, as TIDE's: "FP" removes every false positive; "FN" drops every undetected
object from the positives.  Fixing never lowers an AP, and fixing all six types gives AP 1.

Matching and AP are the devkit's (`detector.metrics.voc`): per class, detections ranked by score
(stable), each takes the GT of its class with the highest +1 IoU (difficult ones included: a
match to a difficult GT is neither TP nor FP), t_f = 0.5; so the base AP here equals
`eval_detection_voc` on the same arrays.  Difficult GT are otherwise invisible to the analysis.
AP (`metric`): "07", VOC07 11-point (the default, our headline figure); "area", VOC2010+; or
"coco101", COCO's 101-point interpolated AP at IoU t_f, which TIDE reports (so figures compare
with published TIDE dAP, x100).  A class that a fix leaves without positives (all its objects
missed) scores AP 1 there: nothing is left to find.

Why our own code and not `tidecv` (the authors' package, 1.0.1 of 2020, not updated since): it
computes COCO 101-point AP only, has no difficult objects (crowd-style ignore regions instead)
and no +1 convention, so its base AP is not the devkit's; it matches each detection greedily to
the best *unused* GT (the devkit counts a detection whose best GT is taken as a duplicate); and
it depends on opencv-python, which would replace the opencv-contrib-python-headless this toolkit
pins (both install `cv2`), plus seaborn and pandas.  One deliberate difference in the oracle:
tidecv lets the best error of a GT over cls *and* loc errors take the GT even when only one of
the types is fixed (so fixing loc can remove a loc error because an unfixed cls error scored
higher); here the best error among the types being fixed takes it (`tidecv_oracle=True` does as
tidecv).

Checked against tidecv 1.0.1 itself (bench/tidecv_agreement.py, tidecv in a separate venv):
with metric="coco101", tidecv_oracle=True and tidecv's recall thresholds (k/100; ours are
COCOeval's, see COCO_RECALL_THRESHOLDS), base AP, the count of every type and every dAP (the
six, FP and FN) agree exactly on random scenes, sparse and crowded.

`recall_breakdown` adds, per class and per object size: the share of objects detected, the
share missed (as above), and proposal recall at IoU 0.5 and 0.7 (the share of objects that some
proposal of their image covers, as `detector.proposals.recall`), with the missed objects that no
proposal covered (those the proposal stage lost, not the classifier).

Boxes are our 0-based continuous `x1, y1, x2, y2` throughout (converted with `to_devkit_boxes`
for the matching).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from detector.metrics.voc import (_devkit_overlaps, calc_detection_voc_ap, check_detections, check_ground_truth,
                                  count_classes, to_devkit_boxes)

FP_TYPES = ("cls", "loc", "both", "dupe", "bkg")
ERROR_TYPES = FP_TYPES + ("missed",)
SPECIAL_TYPES = ("FP", "FN")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "both cls+loc", "dupe": "duplicate",
               "bkg": "background", "missed": "missed", "FP": "all false positives", "FN": "all false negatives"}
TP, IGNORED = -1, -2  # det_type codes besides FP_TYPES' indices
# COCOeval's recall thresholds for "coco101" (np.linspace: 10 of them are 1 ulp off k/100, which
# tidecv uses; a recall landing exactly on one of those is read at the next PR point by COCOeval)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_SIZE_EDGES = (32.0, 96.0)  # sqrt(area) px: COCO's small < 32^2 <= medium < 96^2 <= large


METRICS = {"07": "VOC07 11-point", "area": "VOC2010+ area", "coco101": "COCO 101-point"}


def _ap(prec: np.ndarray, rec: np.ndarray, metric: str) -> float:
    if metric != "coco101":
        return float(calc_detection_voc_ap([prec], [rec], metric == "07")[0])
    # COCOeval's (and tidecv's): the precision envelope read at recall 0, 0.01, .., 1 (first
    # point reaching each), 0 past the largest recall
    p = np.maximum.accumulate(np.nan_to_num(prec, nan=0.0)[::-1])[::-1]
    i = np.searchsorted(rec, COCO_RECALL_THRESHOLDS, side="left")
    return float(np.where(i < len(p), p[np.minimum(i, len(p) - 1)], 0.0).mean()) if len(p) else 0.0


def analyze_errors(pred_boxes: Sequence, pred_labels: Sequence, pred_scores: Sequence,
                   gt_boxes: Sequence, gt_labels: Sequence, gt_difficults: Optional[Sequence] = None, *,
                   n_classes: Optional[int] = None, metric: str = "07",
                   fg_iou: float = 0.5, bg_iou: float = 0.1, tidecv_oracle: bool = False) -> dict:
    """TIDE-style split of the missing AP (module docstring: the types, their fixes, the AP).

    Per-image lists, as `eval_detection_voc` takes them but with boxes in our 0-based continuous
    convention.  Returns a dict:
      metric, fg_iou, bg_iou, n_classes;
      ap [K] (base AP, NaN for a class without non-difficult GT), map;
      dap {type: mean dAP} and dap_per_class {type: [K]} for ERROR_TYPES + SPECIAL_TYPES;
      counts {type: [K]}: false positives of each type by predicted class, missed objects by class;
      n_gt, n_det, n_tp [K];
      det_type: per image, an int per detection: TP (-1), IGNORED (-2, matched a difficult GT) or
        the index in FP_TYPES;
      gt_state: per image, an int per GT: 0 detected, 1 covered by a loc/cls error, 2 missed,
        -1 difficult.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not 0 < bg_iou <= fg_iou <= 1:
        raise ValueError(f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou {bg_iou}, fg_iou {fg_iou}")
    pb, pl, ps = check_detections(pred_boxes, pred_labels, pred_scores)
    gb, gl, gd = check_ground_truth(gt_boxes, gt_labels, gt_difficults)
    if len(pb) != len(gb):
        raise ValueError(f"predictions cover {len(pb)} images but ground truth covers {len(gb)}")
    n_cls = count_classes(pl + gl, n_classes)

    # Per detection (images concatenated, rows in order): the IoUs the matching and the types need.
    cols = {k: [] for k in ("best_gt", "passes", "loc_iou", "loc_gt", "cls_iou", "cls_gt", "any_iou")}
    g0 = 0
    for i in range(len(pb)):
        n, m = len(pb[i]), len(gb[i])
        if n == 0:
            g0 += m
            continue
        if m == 0:
            ov = np.zeros((n, 1))  # a dummy GT nobody can match, so the reductions below have a column
            same, keep = np.zeros((n, 1), bool), np.zeros(1, bool)
        else:
            ov = np.maximum(_devkit_overlaps(to_devkit_boxes(pb[i]), to_devkit_boxes(gb[i])), 0.0)
            same, keep = pl[i][:, None] == gl[i][None, :], ~gd[i]
        ov_same = np.where(same, ov, -1.0)
        j = np.argmax(ov_same, axis=1)  # the devkit's choice: first max, difficult GT included
        cols["best_gt"].append(j + g0)
        cols["passes"].append(ov_same[np.arange(n), j] >= fg_iou)
        for name, mask in (("loc", same & keep), ("cls", ~same & keep)):
            o = np.where(mask, ov, 0.0)
            k = np.argmax(o, axis=1)
            cols[f"{name}_iou"].append(o[np.arange(n), k])
            cols[f"{name}_gt"].append(k + g0)
        cols["any_iou"].append(np.where(keep[None, :], ov, 0.0).max(1))
        g0 += m
    d = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    for k in ("best_gt", "loc_gt", "cls_gt"):
        d[k] = d[k].astype(np.int64)
    d["passes"] = d["passes"].astype(bool)
    labels = np.concatenate(pl) if pl else np.zeros(0, np.int64)
    scores = np.concatenate(ps) if ps else np.zeros(0)
    g_labels = np.concatenate(gl) if gl else np.zeros(0, np.int64)
    g_diff = np.concatenate(gd) if gd else np.zeros(0, bool)
    n_det_all = len(labels)

    # The devkit's matching: per class in score order, the first claim of a GT is the TP.
    ignored = np.zeros(n_det_all, bool)
    ignored[d["passes"]] = g_diff[d["best_gt"][d["passes"]]]
    tp = np.zeros(n_det_all, bool)
    for c in range(n_cls):
        sel = np.flatnonzero(labels == c)
        order = sel[np.argsort(-scores[sel], kind="stable")]
        cand = order[d["passes"][order] & ~ignored[order]]
        _, first = np.unique(d["best_gt"][cand], return_index=True)
        tp[cand[first]] = True
    gt_used = np.zeros(len(g_labels), bool)
    gt_used[d["best_gt"][tp]] = True

    # Types of the false positives, in tidecv's order.
    fp = ~tp & ~ignored
    loc_iou, cls_iou = d["loc_iou"], d["cls_iou"]
    is_loc = fp & (loc_iou >= bg_iou) & (loc_iou < fg_iou)
    is_cls = fp & ~is_loc & (cls_iou >= fg_iou)
    is_dupe = fp & ~is_loc & ~is_cls & (loc_iou >= fg_iou)
    is_bkg = fp & ~is_loc & ~is_cls & ~is_dupe & (d["any_iou"] < bg_iou)
    is_both = fp & ~is_loc & ~is_cls & ~is_dupe & ~is_bkg
    det_type = np.full(n_det_all, IGNORED, np.int64)
    det_type[tp] = TP
    for t, mask in zip(FP_TYPES, (is_cls, is_loc, is_both, is_dupe, is_bkg)):
        det_type[mask] = FP_TYPES.index(t)
    target = np.where(is_cls, d["cls_gt"], np.where(is_loc, d["loc_gt"], -1))

    covered = np.zeros(len(g_labels), bool)  # an undetected GT that a loc/cls error aims at
    aims = target[target >= 0]
    covered[aims[~gt_used[aims]]] = True
    missed = ~g_diff & ~gt_used & ~covered
    n_pos = np.bincount(g_labels[~g_diff], minlength=n_cls)

    def ap_after(fix: set) -> np.ndarray:
        keep = np.ones(n_det_all, bool)
        new_tp, new_labels = tp.copy(), labels.copy()
        pos = n_pos.copy()
        if "FP" in fix:
            keep &= ~fp
        if "FN" in fix:
            pos -= np.bincount(g_labels[~g_diff & ~gt_used], minlength=n_cls)
        for t, mask in (("both", is_both), ("dupe", is_dupe), ("bkg", is_bkg)):
            if t in fix:
                keep &= ~mask
        fixing = (is_loc & ("loc" in fix)) | (is_cls & ("cls" in fix))
        if fixing.any():
            keep &= ~fixing  # removed, except each free GT's best error below
            rivals = (is_loc | is_cls) if tidecv_oracle else fixing
            idx = np.flatnonzero(rivals & ~gt_used[np.maximum(target, 0)])
            idx = idx[np.lexsort((idx, -scores[idx]))]  # best score first; ties: input order
            _, first = np.unique(target[idx], return_index=True)
            win = idx[first]
            win = win[fixing[win]]
            keep[win], new_tp[win] = True, True
            new_labels[win] = g_labels[target[win]]
        if "missed" in fix:
            pos -= np.bincount(g_labels[missed], minlength=n_cls)
        ap = np.full(n_cls, np.nan)
        for c in range(n_cls):
            if n_pos[c] == 0:
                continue
            if pos[c] == 0:
                ap[c] = 1.0  # nothing left to find
                continue
            sel = np.flatnonzero(keep & (new_labels == c))
            order = sel[np.argsort(-scores[sel], kind="stable")]
            t_c = np.cumsum(new_tp[order]).astype(np.float64)
            f_c = np.cumsum(~new_tp[order] & ~ignored[order]).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = t_c / (t_c + f_c)
            ap[c] = _ap(prec, t_c / pos[c], metric)
        return ap

    base = ap_after(set())
    valid = n_pos > 0
    mean = (lambda a: float(a[valid].mean()) if valid.any() else float("nan"))
    dap, dap_pc = {}, {}
    for t in ERROR_TYPES + SPECIAL_TYPES:
        fixed = ap_after({t})
        dap_pc[t] = fixed - base
        dap[t] = mean(fixed) - mean(base)
    counts = {t: np.bincount(labels[det_type == k], minlength=n_cls) for k, t in enumerate(FP_TYPES)}
    counts["missed"] = np.bincount(g_labels[missed], minlength=n_cls)

    gt_state = np.where(g_diff, -1, np.where(gt_used, 0, np.where(covered, 1, 2)))
    det_split = np.cumsum([len(x) for x in pl])[:-1]
    gt_split = np.cumsum([len(x) for x in gl])[:-1]
    return {"metric": METRICS[metric], "fg_iou": float(fg_iou), "bg_iou": float(bg_iou),
            "n_classes": n_cls, "ap": base, "map": mean(base), "dap": dap, "dap_per_class": dap_pc,
            "counts": counts, "n_gt": n_pos, "n_det": np.bincount(labels, minlength=n_cls),
            "n_tp": np.bincount(labels[tp], minlength=n_cls),
            "det_type": np.split(det_type, det_split) if pl else [],
            "gt_state": np.split(gt_state, gt_split) if gl else []}


# --------------------------------------------------------------------------- recall by class and size

def _continuous_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of 0-based continuous boxes (0 for zero-area pairs)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def size_names(edges: Sequence[float]) -> list[str]:
    """Bin names for sqrt(area) edges: COCO's small/medium/large for (32, 96), else ranges in px."""
    edges = [float(e) for e in edges]
    if tuple(edges) == COCO_SIZE_EDGES:
        return ["small", "medium", "large"]
    lo = [0.0] + edges
    hi = edges + [math.inf]
    return [f"<{h:g}px" if a == 0 else (f">={a:g}px" if math.isinf(h) else f"{a:g}-{h:g}px") for a, h in zip(lo, hi)]


def recall_breakdown(gt_boxes: Sequence, gt_labels: Sequence, gt_state: Sequence,
                     proposals: Optional[Sequence] = None, *, n_classes: int,
                     size_edges: Sequence[float] = COCO_SIZE_EDGES, ious: Sequence[float] = (0.5, 0.7)) -> dict:
    """Per class and per object size (sqrt of the box area in px, bins cut at `size_edges`):
    n_gt, detected and missed shares (from `analyze_errors`' gt_state; difficult GT left out)
    and, with `proposals` (per image [P, 4], our convention, all of them used), proposal recall
    at each IoU in `ious` and the number of missed objects that no proposal covers at ious[0].

    Returns {"ious", "size_edges", "size_names", "by_class": rows, "by_size": rows, "all": row};
    a row: {"n_gt", "detected", "missed", "proposal_recall" [len(ious)] or None,
    "missed_unproposed" or None}; shares are NaN for an empty row.
    """
    edges = sorted(float(e) for e in size_edges)
    ious = [float(t) for t in ious]
    if len(gt_boxes) != len(gt_state) or len(gt_labels) != len(gt_state):
        raise ValueError("gt_boxes, gt_labels and gt_state must have one entry per image")
    if proposals is not None and len(proposals) != len(gt_boxes):
        raise ValueError(f"proposals cover {len(proposals)} images but ground truth covers {len(gt_boxes)}")
    size, lab, state, best = [], [], [], []
    for i in range(len(gt_boxes)):
        b = np.asarray(gt_boxes[i], np.float64).reshape(-1, 4)
        st = np.asarray(gt_state[i]).reshape(-1)
        keep = st >= 0
        b = b[keep]
        size.append(np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)))
        lab.append(np.asarray(gt_labels[i], np.int64).reshape(-1)[keep])
        state.append(st[keep])
        if proposals is not None:
            p = np.asarray(proposals[i], np.float64).reshape(-1, 4)
            best.append(_continuous_iou(b, p).max(1) if len(p) and len(b) else np.zeros(len(b)))
    size = np.concatenate(size) if size else np.zeros(0)
    lab = np.concatenate(lab) if lab else np.zeros(0, np.int64)
    state = np.concatenate(state) if state else np.zeros(0, np.int64)
    best_iou = np.concatenate(best) if proposals is not None and best else None
    size_bin = np.searchsorted(edges, size, side="right")

    def row(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        share = (lambda m: float(m[mask].mean()) if n else float("nan"))
        out = {"n_gt": n, "detected": share(state == 0), "missed": share(state == 2),
               "proposal_recall": None, "missed_unproposed": None}
        if best_iou is not None:
            out["proposal_recall"] = [share(best_iou >= t) for t in ious]
            out["missed_unproposed"] = int((mask & (state == 2) & (best_iou < ious[0])).sum())
        return out

    return {"ious": ious, "size_edges": edges, "size_names": size_names(edges),
            "by_class": [row(lab == c) for c in range(n_classes)],
            "by_size": [row(size_bin == k) for k in range(len(edges) + 1)],
            "all": row(np.ones(len(lab), bool))}


# --------------------------------------------------------------------------- reports

def _f(v: float, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_errors(report: Mapping, class_names: Sequence[str]) -> str:
    """The dAP table: one row per error type, mean and per class, with counts per class."""
    names = [str(c) for c in class_names]
    w = max([12] + [len(n) for n in names])
    lines = [f"TIDE-style error analysis: {report['metric']} AP, devkit matching at IoU {report['fg_iou']:g}, "
             f"background below IoU {report['bg_iou']:g}; mAP {_f(report['map'])}, missing {_f(1 - report['map'])}",
             "dAP: the mAP gained if an oracle fixed that type alone; (n): false positives of the type by "
             "predicted class, or objects missed"]
    head = f"{'error':<22}{'dAP':>8}  " + "  ".join(f"{n:>{w}}" for n in names)
    lines += [head, "-" * len(head)]
    for t in ERROR_TYPES + SPECIAL_TYPES:
        if t == SPECIAL_TYPES[0]:
            lines.append("-" * len(head))
        cells = []
        for k in range(len(names)):
            v = report["dap_per_class"][t][k]
            cnt = f" ({int(report['counts'][t][k])})" if t in report["counts"] else ""
            cells.append(f"{_f(float(v)) + cnt:>{w}}")
        lines.append(f"{ERROR_NAMES[t]:<22}{_f(report['dap'][t]):>8}  " + "  ".join(cells))
    lines.append(f"{'AP':<22}{_f(report['map']):>8}  "
                 + "  ".join(f"{_f(float(v)):>{w}}" for v in report["ap"][:len(names)]))
    lines.append(f"{'GT / detections / TP':<22}{'':>8}  " + "  ".join(
        f"{f'{g}/{d}/{t}':>{w}}" for g, d, t in zip(report["n_gt"], report["n_det"], report["n_tp"])))
    return "\n".join(lines)


def format_recall_breakdown(bd: Mapping, class_names: Sequence[str]) -> str:
    """Per class and per size: objects, detected, missed and proposal recall."""
    prop = bd["all"]["proposal_recall"] is not None
    head = f"{'':<16}{'#gt':>6}{'detected':>10}{'missed':>8}"
    if prop:
        head += "".join(f"{f'prop R@{t:g}':>12}" for t in bd["ious"]) + f"{'missed, no proposal':>22}"
    lines = ["Recall by class and by object size (sqrt of box area: "
             + ", ".join(f"{n}" for n in bd["size_names"])
             + (f", cut at {', '.join(f'{e:g}' for e in bd['size_edges'])} px" if bd["size_edges"] else "")
             + "); detected = matched at IoU >= t_f by some detection (any score); proposal recall: "
             + ("all proposals of the image" if prop else "no proposals given"),
             head, "-" * len(head)]

    def fmt(name: str, r: Mapping) -> str:
        s = f"{name:<16}{r['n_gt']:>6}{_f(r['detected'], '.3f'):>10}{_f(r['missed'], '.3f'):>8}"
        if prop:
            s += "".join(f"{_f(v, '.3f'):>12}" for v in r["proposal_recall"]) + f"{r['missed_unproposed']:>22}"
        return s

    lines.append(fmt("all", bd["all"]))
    lines += [fmt(str(n), r) for n, r in zip(class_names, bd["by_class"])]
    lines.append("-" * len(head))
    lines += [fmt(n, r) for n, r in zip(bd["size_names"], bd["by_size"])]
    return "\n".join(lines)


def to_json(obj):
    """numpy arrays and scalars -> lists and numbers, NaN -> None, recursively, for json.dump."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json(obj.item())
    return obj


def plot_errors(report: Mapping, class_names: Sequence[str], path, breakdown: Optional[Mapping] = None,
                title: str = "") -> None:
    """One PNG: dAP per error type (mean and per class); with `breakdown`, recall per class and
    per size (detected, and proposal recall when there are proposals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(c) for c in class_names]
    types = list(ERROR_TYPES + SPECIAL_TYPES)
    n_panels = 1 + (2 if breakdown is not None else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(6.5 + 4.5 * (n_panels - 1), 4.6), squeeze=False)
    ax = axes[0][0]
    y = np.arange(len(types))
    h = 0.8 / (len(names) + 1)
    mean = [report["dap"][t] for t in types]
    ax.barh(y - 0.4 + h / 2, mean, height=h, color="black", label="mean")
    cmap = plt.get_cmap("tab10")
    for k, n in enumerate(names):
        vals = [float(np.nan_to_num(report["dap_per_class"][t][k])) for t in types]
        ax.barh(y - 0.4 + h * (k + 1.5), vals, height=h, color=cmap(k % 10), label=n)
    for yi, v in zip(y, mean):
        ax.text(max(v, 0) + 0.002, yi - 0.4 + h / 2, f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [ERROR_NAMES[t] for t in types])
    ax.invert_yaxis()
    ax.axhline(len(ERROR_TYPES) - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"dAP ({report['metric']}, fixing that type alone)")
    ax.set_title(f"{title + ': ' if title else ''}mAP {report['map']:.3f}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, axis="x", alpha=0.3)
    if breakdown is not None:
        prop = breakdown["all"]["proposal_recall"] is not None
        series = [("detected", lambda r: r["detected"])]
        if prop:
            series += [(f"proposals R@{t:g}", (lambda k: lambda r: r["proposal_recall"][k])(k))
                       for k, t in enumerate(breakdown["ious"])]
        for ax, rows, labels, what in ((axes[0][1], breakdown["by_class"], names, "class"),
                                       (axes[0][2], breakdown["by_size"], breakdown["size_names"], "object size")):
            x = np.arange(len(rows))
            wd = 0.8 / len(series)
            for s, (lab, get) in enumerate(series):
                vals = [float(np.nan_to_num(get(r))) for r in rows]
                ax.bar(x - 0.4 + wd * (s + 0.5), vals, width=wd, label=lab, color=plt.get_cmap("Set2")(s))
            ax.set_xticks(x, [f"{n}\n({r['n_gt']})" for n, r in zip(labels, rows)], fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"recall by {what} (#objects)", fontsize=10)
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
