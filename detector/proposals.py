"""Region proposals: selective search (OpenCV contrib) and proposal recall.

    boxes = selective_search(rgb_image)            # [N, 4] float32 x1,y1,x2,y2, best first
    result = proposal_recall(props, gt_boxes, gt_labels)

Boxes follow the library's convention (detector.datasets.records): 0-based
continuous coordinates, a box covering pixels x..x+w-1 is [x, y, x+w, y+h].

Settings and why, measured on BCCD test (72 images of 640x480, ~13 blood
cells of 30-230 px each); figures are recall@0.5 / recall@0.7 / AR over IoU
0.5:0.95 with the first 300 and 2000 boxes, from
`tools/eval_proposals.py --dataset BCCD --split test` and the same through
compute_proposals with the options changed:

* base_k / inc_k.  OpenCV's fast mode segments at k = base_k, base_k+inc_k,
  base_k+2*inc_k, with OpenCV's defaults 150/150; R-CNN's fast mode
  (selective_search_boxes.m) uses k = 50, 100.
    k=150 (~900 boxes):   @300 0.717/0.363/0.324   @2000 0.855/0.503/0.428
    k=50  (~1800 boxes):  @300 0.742/0.392/0.336   @2000 0.953/0.671/0.539
    k=30  (~2800 boxes):  @300 0.756/0.337/0.322   @2000 0.965/0.708/0.551
  at about the same time per image.  Default 50/50: near R-CNN's VOC-tuned
  values, clearly better than OpenCV's, and k=30's small gain at 2000 comes
  with a loss at 300.
* resize.  Longer side 500 (near R-CNN's 500 px width), k=50:
    500 px:               @300 0.742/0.392/0.336   @2000 0.953/0.671/0.539
    640 px (none):        @300 0.714/0.327/0.309   @2000 0.953/0.658/0.532
    800 px:               @300 0.662/0.299/0.281   @2000 0.962/0.640/0.525
  Larger images give more, smaller boxes, so top_k cuts more of them.
* min_size 8 (original pixels).  16 gave @300 0.769/0.377/0.343 and @2000
  0.956/0.675/0.540, the same within noise; 8 keeps small VOC objects.
* Modes at these settings (time: one thread, one 640x480 image; OpenCV's own
  process() uses one core, so num_threads > 1 splits its groupings over
  threads: fast 2.0 -> 1.1 s, quality 5.1 -> 3.3 s with 2 threads on 2 cores,
  same boxes; measured on a slower day than the figures below):
    fast     1.4 s, ~1800 boxes:  @300 0.742/0.392/0.336   @2000 0.953/0.671/0.539
    quality  4.5 s, ~6200 -> 2000: @300 0.815/0.451/0.387  @2000 0.969/0.752/0.593
    single   0.3 s, ~520 boxes:   @300 0.698/0.286/0.284   @2000 0.823/0.407/0.367
  Default fast, as in SPP-net (SPEC section 9).
* Order.  OpenCV sorts its boxes by `rand() * level` (C library rand(), not
  cv::RNG, so cv2.setRNGSeed has no effect; seeding libc's srand through ctypes
  does make it repeat on glibc).  The *set* it returns is the same on every
  call.  We therefore put the set in a canonical order (sorted by coordinates)
  and then apply a fixed-seed permutation (numpy), which is deterministic on
  every platform and needs no libc trick.  Measured on 36 BCCD test images
  (fast, k=50; AR at 100 / 300 / 1000 proposals): OpenCV's own seeded order
  0.119 / 0.245 / 0.404; reversed OpenCV order 0.125 / 0.315 / 0.443; area
  descending 0.005 / 0.066 / 0.467; seeded permutation (3 seeds)
  0.149-0.161 / 0.280-0.299 / 0.430-0.437.  Quality mode (~5400 boxes, so
  top_k=2000 truncates): OpenCV order 0.151 / 0.289 / 0.434 / 0.502 @2000,
  reversed 0.082 / 0.254 / 0.471 / 0.555, permutation 0.191-0.205 /
  0.339-0.347 / 0.481-0.487 / 0.548-0.553.  The permutation is the best or
  within seed noise of the best in every column but fast@300.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

MODES = ("fast", "quality", "single")
# Bump when the post-processing below changes, so cached proposals are recomputed.
ALGO_VERSION = 1

DEFAULTS = dict(resize=500, min_size=8, top_k=2000, base_k=50, inc_k=50, sigma=0.8, seed=0)

AR_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95 (Hosang et al.)
TOP_NS = (100, 300, 1000, 2000)


def _check_options(mode: str, resize, min_size, top_k, base_k, inc_k, sigma) -> None:
    if mode not in MODES:
        raise ValueError(f"selective search mode must be one of {', '.join(MODES)}, got {mode!r}")
    if resize is not None and (not isinstance(resize, (int, np.integer)) or resize < 0):
        raise ValueError(f"resize must be a non-negative integer or None, got {resize!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")
    if base_k <= 0 or inc_k < 0 or sigma < 0:
        raise ValueError(f"need base_k > 0, inc_k >= 0, sigma >= 0; got {base_k}, {inc_k}, {sigma}")


def _opencv_rects(bgr: np.ndarray, mode: str, base_k: int, inc_k: int, sigma: float,
                  threads: int = 1) -> np.ndarray:
    """OpenCV's selective-search rectangles (x, y, w, h), as a set (order undefined).

    threads > 1 splits the work across threads.  OpenCV's process() runs one
    hierarchical grouping per (colour image, segmentation k, strategy) and
    returns the union of their boxes, each grouping independent of the others,
    so the same units run in separate SelectiveSearchSegmentation objects give
    the same set (tests/test_proposals.py checks this against OpenCV's own
    switchToSelectiveSearchFast/Quality).  OpenCV releases the GIL while it
    works and runs each grouping on one core, so this is what makes a search
    use more than one core (BENCHMARKS.md, detect() per stage).
    """
    import cv2

    if threads <= 1 or mode == "single":
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        if mode == "fast":
            ss.switchToSelectiveSearchFast(int(base_k), int(inc_k), float(sigma))
        elif mode == "quality":
            ss.switchToSelectiveSearchQuality(int(base_k), int(inc_k), float(sigma))
        else:
            ss.switchToSingleStrategy(int(base_k), float(sigma))
        return np.asarray(ss.process(), np.float64).reshape(-1, 4)

    from concurrent.futures import ThreadPoolExecutor

    units = [(img, k) for img in _colour_images(bgr, mode) for k in _ks(mode, base_k, inc_k)]
    with ThreadPoolExecutor(max_workers=min(int(threads), len(units))) as pool:
        parts = list(pool.map(lambda u: _grouping_rects(u[0], u[1], mode, sigma), units))
    return np.concatenate([np.asarray(r, np.float64).reshape(-1, 4) for r in parts])


# The pieces of OpenCV's switchToSelectiveSearchFast / Quality
# (opencv_contrib modules/ximgproc/src/selectivesearchsegmentation.cpp), one per unit of work.
def _colour_images(bgr: np.ndarray, mode: str) -> list:
    import cv2

    hsv, lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV), cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if mode == "fast":
        return [hsv, lab]
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    rgi = cv2.merge([np.ascontiguousarray(bgr[:, :, 2]), np.ascontiguousarray(bgr[:, :, 1]), gray])
    # OpenCV means the 4th image to be the hue channel, but its second split() writes the
    # blue channel into the same buffer, so the hue image it searches is in fact blue.
    # Reproduced, so that both paths give the same boxes (tested).
    return [hsv, lab, gray, np.ascontiguousarray(bgr[:, :, 0]), rgi]


def _ks(mode: str, base_k: int, inc_k: int) -> list:
    n = 3 if mode == "fast" else 5
    return [int(base_k) + i * int(inc_k) for i in range(n)]


def _grouping_rects(image: np.ndarray, k: int, mode: str, sigma: float):
    import cv2

    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    gs = seg.createGraphSegmentation()  # OpenCV's defaults (min_size 100), then k and sigma, as the switch does
    gs.setK(float(k))
    gs.setSigma(float(np.float32(sigma)))  # the switch passes sigma as a C float; 0.8f != 0.8 changes the blur
    ss.addImage(image)
    ss.addGraphSegmentation(gs)
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
        seg.createSelectiveSearchSegmentationStrategyColor(), seg.createSelectiveSearchSegmentationStrategyFill(),
        seg.createSelectiveSearchSegmentationStrategyTexture(), seg.createSelectiveSearchSegmentationStrategySize()))
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
        seg.createSelectiveSearchSegmentationStrategyFill(), seg.createSelectiveSearchSegmentationStrategyTexture(),
        seg.createSelectiveSearchSegmentationStrategySize()))
    if mode == "quality":
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyFill())
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategySize())
    return ss.process()


def selective_search(image, mode: str = "fast", *, resize: Optional[int] = DEFAULTS["resize"],
                     min_size: float = DEFAULTS["min_size"], top_k: Optional[int] = DEFAULTS["top_k"],
                     base_k: int = DEFAULTS["base_k"], inc_k: int = DEFAULTS["inc_k"],
                     sigma: float = DEFAULTS["sigma"], seed: int = DEFAULTS["seed"],
                     num_threads: Optional[int] = None) -> np.ndarray:
    """Selective-search boxes of an HxWx3 uint8 RGB image (or a path), best first.

    Returns float32 [N, 4] `x1, y1, x2, y2` in the original image's pixels,
    integer-valued, clipped to the image, each box at least `min_size` wide and
    high, no duplicates, at most `top_k` (None or 0: all).

    mode: fast | quality | single (OpenCV's switchToSelectiveSearchFast /
    Quality / switchToSingleStrategy; `single` uses k=base_k).
    resize: the image is resized so that its longer side is `resize` px
    (up or down) before the search; None or 0: as is.
    base_k, inc_k, sigma: graph-segmentation settings passed to OpenCV.
    seed: the permutation that orders the boxes (see the module docstring).
    num_threads: threads to split the search over (the result does not depend
    on it); default cv2.getNumThreads(), which the proposal-cache worker
    processes set to 1.
    """
    import cv2

    from .images import load_image

    _check_options(mode, resize, min_size, top_k, base_k, inc_k, sigma)
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    threads = cv2.getNumThreads() if num_threads is None else int(num_threads)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if resize and max(h, w) != resize:
        s = resize / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    rh, rw = bgr.shape[:2]
    r = _opencv_rects(bgr, mode, base_k, inc_k, sigma, threads)

    # OpenCV's Rect(x, y, w, h) covers pixels x..x+w-1, i.e. [x, x+w) continuous;
    # scale each axis by its own factor (rounding made them differ slightly).
    sx, sy = w / rw, h / rh
    boxes = np.stack([r[:, 0] * sx, r[:, 1] * sy, (r[:, 0] + r[:, 2]) * sx, (r[:, 1] + r[:, 3]) * sy], 1)
    boxes = np.round(boxes)
    np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = boxes[keep]
    # Unique rows come back lexicographically sorted: that is the canonical order.
    boxes = np.unique(boxes, axis=0).reshape(-1, 4)
    boxes = boxes[np.random.default_rng(seed).permutation(len(boxes))]
    if top_k:
        boxes = boxes[:top_k]
    return boxes.astype(np.float32)


def search_options(cfg) -> dict:
    """selective_search keyword options (plus mode) from a ProposalConfig (or a whole Config).

    Fields the config does not have (base_k, inc_k, sigma, seed) take DEFAULTS.
    """
    p = getattr(cfg, "proposals", cfg)
    method = getattr(p, "method", "selective_search")
    if method != "selective_search":
        raise ValueError(f"proposals.method {method!r} is not supported; only 'selective_search' is")
    opts = {"mode": p.mode}
    for k, v in DEFAULTS.items():
        opts[k] = getattr(p, k, v)
    _check_options(opts["mode"], opts["resize"], opts["min_size"], opts["top_k"], opts["base_k"],
                   opts["inc_k"], opts["sigma"])
    return opts


# ---------------------------------------------------------------- recall

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


def recall_at(result: Mapping, iou: float, n: int, cls=None) -> float:
    """One number from a proposal_recall result (cls: a per_class key)."""
    r = result if cls is None else result["per_class"][cls]
    t = int(np.flatnonzero(result["top_ns"] == n)[0])
    k = int(np.flatnonzero(np.isclose(result["iou_thresholds"], iou))[0])
    return float(r["recall"][t, k])


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_ns(max_n: int) -> list[int]:
    """About 30 proposal counts from 1 to max_n, evenly spaced on a log axis (for plots)."""
    return sorted({max(1, int(round(math.exp(x)))) for x in np.linspace(0, math.log(max(max_n, 1)), 30)}
                  | {int(max_n)})
