"""COCO metrics (AP@[.5:.95], AP50, ...) through pycocotools' COCOeval, on our continuous
boxes: ground truth from arrays (`coco_gt_from_arrays`, VOC datasets converted on the fly) and
detections as a results list or json (`detector.metrics.result_files`)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from detector.metrics.voc import check_ground_truth, count_classes

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_gt_from_arrays(gt_boxes: Sequence, gt_labels: Sequence, gt_difficults: Optional[Sequence] = None,
                        image_sizes: Optional[Sequence[tuple[int, int]]] = None, *,
                        image_ids: Optional[Sequence[int]] = None,
                        category_ids: Optional[Sequence[int]] = None,
                        class_names: Optional[Sequence[str]] = None) -> dict:
    """A COCO ground-truth dict from per-image arrays in OUR continuous convention.

    bbox = [x1, y1, x2 - x1, y2 - y1], area = w * h.  Image ids default to 1..N (in list order),
    category ids to label + 1, annotation ids run from 1 (pycocotools reads id 0 as "unmatched").
    image_sizes: optional (width, height) per image.  Difficult objects become iscrowd=1, which
    pycocotools ignores, but its crowd semantics are not the devkit's difficult semantics:
    a detection is compared to a crowd box by intersection over the *detection's* area, crowd
    boxes are matched only after every non-crowd box, and any number of detections may match one
    crowd box.  So COCO AP on these dicts can differ from VOC AP where difficult objects are close
    to other detections.
    """
    gb, gl, gd = check_ground_truth(gt_boxes, gt_labels, gt_difficults)
    n_img = len(gb)
    img_ids = list(range(1, n_img + 1)) if image_ids is None else [int(x) for x in image_ids]
    if len(img_ids) != n_img or len(set(img_ids)) != n_img:
        raise ValueError(f"image_ids must be {n_img} distinct ids")
    if image_sizes is not None and len(image_sizes) != n_img:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n_img} images")
    if class_names is not None:
        n_cls = count_classes(gl, len(class_names))
    elif category_ids is not None:
        n_cls = count_classes(gl, len(category_ids))
    else:
        n_cls = count_classes(gl, None)
    cat_ids = list(range(1, n_cls + 1)) if category_ids is None else [int(c) for c in category_ids]
    if len(cat_ids) < n_cls or len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"category_ids must be distinct and cover {n_cls} classes")
    names = [str(c) for c in class_names] if class_names is not None else [f"class_{k}" for k in range(len(cat_ids))]
    images = []
    for i, iid in enumerate(img_ids):
        im: dict[str, Any] = {"id": iid}
        if image_sizes is not None:
            im["width"], im["height"] = int(image_sizes[i][0]), int(image_sizes[i][1])
        images.append(im)
    anns = []
    for i in range(n_img):
        for b, lab, d in zip(gb[i], gl[i], gd[i]):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": img_ids[i], "category_id": cat_ids[int(lab)],
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": int(d)})
    cats = [{"id": c, "name": names[k] if k < len(names) else f"class_{k}"} for k, c in enumerate(cat_ids)]
    return {"images": images, "annotations": anns, "categories": cats}


def _quiet(fn, *args):
    """pycocotools prints progress on stdout; keep it out of our output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _check_coco_results(results: list, img_ids: set, cat_ids: set) -> None:
    for n, r in enumerate(results):
        if not isinstance(r, Mapping) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise ValueError(f"result {n}: expected a dict with image_id, category_id, bbox and score")
        if r["image_id"] not in img_ids:
            raise ValueError(f"result {n}: image_id {r['image_id']!r} is not in the ground truth")
        if r["category_id"] not in cat_ids:
            raise ValueError(f"result {n}: category_id {r['category_id']!r} is not in the ground truth")
        bb = np.asarray(r["bbox"], np.float64)
        if bb.shape != (4,) or not np.all(np.isfinite(bb)) or not np.isfinite(float(r["score"])):
            raise ValueError(f"result {n}: bbox must be 4 finite numbers and score finite "
                             f"(got {r['bbox']!r}, {r['score']!r})")


def eval_coco(coco_gt: Any, results: Any, *, print_summary: bool = False) -> dict[str, float]:
    """COCO bbox metrics with pycocotools' COCOeval.

    coco_gt: a COCO GT dict (e.g. `coco_gt_from_arrays`), a pycocotools COCO object, or a path to
    a GT json.  results: a list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"} or a
    path to such a json (see `detector.metrics.result_files`).  Returns the 12 standard stats by name
    (`COCO_STAT_NAMES`; pycocotools' -1 where a stat is undefined).  pycocotools' progress output
    is swallowed; print_summary=True prints its 12-line summary.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if isinstance(coco_gt, COCO):
        gt = coco_gt
    elif isinstance(coco_gt, Mapping):
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(coco_gt))
        _quiet(gt.createIndex)
    elif isinstance(coco_gt, (str, os.PathLike)):
        gt = _quiet(COCO, os.fspath(coco_gt))
    else:
        raise TypeError(f"coco_gt must be a dict, a COCO object or a path, not {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt.dataset:
            raise ValueError(f"COCO ground truth has no {key!r}")
    bad = [a.get("id") for a in gt.dataset["annotations"] if not a.get("id")]
    if bad:
        raise ValueError("COCO ground-truth annotation ids must be non-zero: pycocotools stores matches "
                         "as ids and reads 0 as 'unmatched'")

    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of dicts or a json path, not {type(results).__name__}")
    results = copy.deepcopy(results)  # loadRes adds keys to the dicts
    _check_coco_results(results, set(gt.getImgIds()), set(gt.getCatIds()))
    if results:
        dt = _quiet(gt.loadRes, results)
    else:  # loadRes cannot take an empty list
        dt = COCO()
        dt.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                      "annotations": []}
        _quiet(dt.createIndex)

    ev = COCOeval(gt, dt, "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    if print_summary:
        print(buf.getvalue(), end="")
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}
