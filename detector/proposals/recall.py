"""Proposal recall: recall at IoU thresholds and average recall (AR) for the first n boxes
of each image, as in Hosang et al., "What makes for effective detection proposals?"."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

AR_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95 (Hosang et al.)
TOP_NS = (100, 300, 1000, 2000)


def _as_boxes(a, what: str, i: int) -> np.ndarray:
    arr = np.asarray(a, np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} of image {i}: expected an [N, 4] array, got shape {arr.shape}")
    return arr


def proposal_recall(proposals_list: Sequence[np.ndarray], gt_boxes_list: Sequence[np.ndarray],
                    gt_labels_list: Optional[Sequence[np.ndarray]] = None,
                    iou_thresholds: Sequence[float] = AR_IOUS, top_ns: Sequence[int] = TOP_NS,
                    difficult_list: Optional[Sequence[np.ndarray]] = None,
                    class_names: Optional[Sequence[str]] = None) -> dict:
    """Recall of ground truth by the first n proposals of each image.

    A GT box counts as recalled at threshold t when some proposal among the
    image's first n has IoU >= t with it (no one-to-one matching, as in Hosang
    et al., "What makes for effective detection proposals?").  Difficult GT
    boxes (`difficult_list`) are left out entirely.  An image with fewer than n
    proposals uses all it has.  AR is the mean recall over `iou_thresholds`
    (default 0.50:0.05:0.95).

    Returns a dict of numpy arrays:
      top_ns [T], iou_thresholds [K], num_images, num_gt,
      recall [T, K], ar [T], mean_proposals [T] (mean boxes used per image),
      per_class: {name (or int label): {"num_gt", "recall" [T, K], "ar" [T]}}
      (only when labels are given; classes with no non-difficult GT are left out).
    """
    import torch
    from torchvision.ops import box_iou

    n_img = len(proposals_list)
    if len(gt_boxes_list) != n_img:
        raise ValueError(f"{n_img} proposal arrays but {len(gt_boxes_list)} ground-truth arrays")
    for name, lst in (("gt_labels_list", gt_labels_list), ("difficult_list", difficult_list)):
        if lst is not None and len(lst) != n_img:
            raise ValueError(f"{name} has {len(lst)} entries for {n_img} images")
    ns = np.asarray(sorted(set(int(n) for n in top_ns)), np.int64)
    if len(ns) == 0 or ns.min() < 1:
        raise ValueError(f"top_ns must be positive integers, got {list(top_ns)}")
    ious = np.asarray(iou_thresholds, np.float64)

    best = []  # per image: [G, T] best IoU of each GT among the first n proposals
    labels_all, used = [], np.zeros(len(ns))
    for i in range(n_img):
        props = _as_boxes(proposals_list[i], "proposals", i)
        gt = _as_boxes(gt_boxes_list[i], "ground-truth boxes", i)
        labels = (np.zeros(len(gt), np.int64) if gt_labels_list is None
                  else np.asarray(gt_labels_list[i], np.int64).reshape(-1))
        keep = (np.ones(len(gt), bool) if difficult_list is None
                else ~np.asarray(difficult_list[i], bool).reshape(-1))
        if len(labels) != len(gt) or len(keep) != len(gt):
            raise ValueError(f"image {i}: {len(gt)} GT boxes but {len(labels)} labels / {len(keep)} flags")
        gt, labels = gt[keep], labels[keep]
        used += np.minimum(ns, len(props))
        if len(gt) == 0:
            continue
        if len(props) == 0:
            best.append(np.zeros((len(gt), len(ns))))
        else:
            iou = box_iou(torch.from_numpy(gt), torch.from_numpy(props)).numpy()
            iou = np.nan_to_num(iou, nan=0.0)  # zero-area boxes
            running = np.maximum.accumulate(iou, axis=1)  # best among the first j+1 proposals
            best.append(running[:, np.minimum(ns, len(props)) - 1])
        labels_all.append(labels)
    best_all = np.concatenate(best) if best else np.zeros((0, len(ns)))
    labels_cat = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)

    def summarise(b: np.ndarray) -> dict:
        hit = b[:, :, None] >= ious[None, None, :]  # [G, T, K]
        rec = hit.mean(0) if len(b) else np.full((len(ns), len(ious)), np.nan)
        return {"num_gt": int(len(b)), "recall": rec, "ar": rec.mean(1)}

    out = {"top_ns": ns, "iou_thresholds": ious, "num_images": n_img,
           "mean_proposals": used / max(n_img, 1), **summarise(best_all)}
    if gt_labels_list is not None:
        per = {}
        for lab in np.unique(labels_cat):
            name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else int(lab)
            per[name] = summarise(best_all[labels_cat == lab])
        out["per_class"] = per
    return out


def format_recall(result: Mapping, ious: Sequence[float] = (0.5, 0.7)) -> str:
    """A plain-text table: recall at each IoU in `ious` and AR, per n, overall and per class."""
    ns = [int(n) for n in result["top_ns"]]
    cols = [f"R@{t:g}" for t in ious] + ["AR"]
    lines = [f"{result['num_images']} images, {result['num_gt']} GT boxes (difficult excluded); "
             f"AR = mean recall over IoU {result['iou_thresholds'][0]:g}:"
             f"{result['iou_thresholds'][-1]:g}",
             f"{'class':<16}{'#gt':>6}  " + "  ".join(f"{c + '@' + str(n):>12}" for n in ns for c in cols)]
    rows = [("all", result)] + sorted(((str(k), v) for k, v in result.get("per_class", {}).items()))
    for name, r in rows:
        vals = []
        for ti, n in enumerate(ns):
            for t in ious:
                k = int(np.flatnonzero(np.isclose(result["iou_thresholds"], t))[0])
                vals.append(r["recall"][ti, k])
            vals.append(r["ar"][ti])
        lines.append(f"{name:<16}{r['num_gt']:>6}  " + "  ".join(f"{v:>12.3f}" for v in vals))
    lines.append("mean proposals used per image: " + ", ".join(
        f"{n}: {m:.0f}" for n, m in zip(ns, result["mean_proposals"])))
    return "\n".join(lines)


def recall_to_json(result):
    """A proposal_recall result with numpy arrays turned into lists (for json.dump)."""
    if isinstance(result, Mapping):
        return {str(k): recall_to_json(v) for k, v in result.items()}
    return result.tolist() if hasattr(result, "tolist") else result


def plot_recall(curves: Mapping[str, Mapping], path, ious: Sequence[float] = (0.5, 0.7)) -> None:
    """Recall (at each IoU in `ious`) and AR against the number of proposals, one PNG.

    `curves` maps a legend label to a proposal_recall result computed over many top_ns.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [f"recall @ IoU {t:g}" for t in ious] + ["average recall (IoU 0.5:0.95)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for label, res in curves.items():
        ns = res["top_ns"]
        for ax, t in zip(axes[0], list(ious) + [None]):
            if t is None:
                y = res["ar"]
            else:
                y = res["recall"][:, int(np.flatnonzero(np.isclose(res["iou_thresholds"], t))[0])]
            ax.plot(ns, y, label=label)
    for ax, title in zip(axes[0], panels):
        ax.set_xscale("log")
        ax.set_xlabel("number of proposals per image")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    from detector.cache import writing_to

    with writing_to(Path(path).parent, Path(path).name):
        fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_ns(max_n: int) -> list[int]:
    """About 30 proposal counts from 1 to max_n, evenly spaced on a log axis (for plots)."""
    return sorted({max(1, int(round(math.exp(x)))) for x in np.linspace(0, math.log(max(max_n, 1)), 30)}
                  | {int(max_n)})
