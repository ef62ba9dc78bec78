"""Selective search (OpenCV contrib), deterministic and split over threads.

    boxes = selective_search(rgb_image)            # [N, 4] float32 x1,y1,x2,y2, best first

Boxes follow the library's convention (detector.datasets.records): 0-based
continuous coordinates, a box covering pixels x..x+w-1 is [x, y, x+w, y+h].

Settings (BENCHMARKS.md, "Proposals", has the measurements behind them):

* base_k / inc_k = 50 / 50 (OpenCV: 150 / 150; R-CNN's fast mode: k = 50, 100):
  more, smaller segments, so higher recall at 2,000 boxes at the same time.
* resize: the search runs with the longer side at 500 px (near R-CNN's 500 px
  width); larger images give more, smaller boxes that top_k then cuts.
* min_size 8 (original pixels): keeps small VOC objects.
* mode fast, as in SPP-net (paper section 4.1).
* Order.  OpenCV sorts its boxes by `rand() * level` with the C library's
  rand() (cv2.setRNGSeed has no effect), so the order changes on every call
  while the *set* stays the same.  We sort the set by coordinates and apply a
  fixed-seed permutation (numpy): deterministic on every platform, and as good
  as or better than OpenCV's own order at 100-2,000 boxes.
* Threads.  OpenCV's process() runs on one core; its groupings (colour space
  x k) are independent, so `_opencv_rects` runs them on separate threads and
  gets the same set of boxes (tested against OpenCV's own switch).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

MODES = ("fast", "quality", "single")
# Bump when the post-processing below changes, so cached proposals are recomputed.
ALGO_VERSION = 1

DEFAULTS = dict(resize=500, min_size=8, top_k=2000, base_k=50, inc_k=50, sigma=0.8, seed=0)


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
                     num_threads: Optional[int] = None, max_upscale: float = 0.0) -> np.ndarray:
    """Selective-search boxes of an HxWx3 uint8 RGB image (or a path), best first.

    Returns float32 [N, 4] `x1, y1, x2, y2` in the original image's pixels,
    integer-valued, clipped to the image, each box at least `min_size` wide and
    high, no duplicates, at most `top_k` (None or 0: all).

    mode: fast | quality | single (OpenCV's switchToSelectiveSearchFast /
    Quality / switchToSingleStrategy; `single` uses k=base_k).
    resize: the image is resized so that its longer side is `resize` px
    (up or down) before the search; None or 0: as is.  max_upscale > 0: never
    enlarged by more than this factor (small images).
    base_k, inc_k, sigma: graph-segmentation settings passed to OpenCV.
    seed: the permutation that orders the boxes (see the module docstring).
    num_threads: threads to split the search over (the result does not depend
    on it); default cv2.getNumThreads(), which the proposal-cache worker
    processes set to 1.
    """
    import cv2

    from detector.images import load_image

    _check_options(mode, resize, min_size, top_k, base_k, inc_k, sigma)
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    threads = cv2.getNumThreads() if num_threads is None else int(num_threads)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    s = resize / max(h, w) if resize else 1.0
    if max_upscale > 0:
        s = min(s, float(max_upscale))
    if s != 1.0:
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


def search_options(p) -> dict:
    """selective_search keyword options (plus mode) from a ProposalConfig."""
    opts = {"mode": p.mode, **{k: getattr(p, k) for k in DEFAULTS}}
    if getattr(p, "max_upscale", 0) > 0:  # only when set: the default's cache key stays what it was
        opts["max_upscale"] = float(p.max_upscale)
    _check_options(opts["mode"], opts["resize"], opts["min_size"], opts["top_k"], opts["base_k"],
                   opts["inc_k"], opts["sigma"])
    return opts
