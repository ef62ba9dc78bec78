"""Detection over a dataset split and its scoring: devkit files, COCO json, AP table."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .datasets.records import Dataset
from .model import SPPDetector


def check_classes(model: SPPDetector, ds: Dataset) -> None:
    if list(model.class_names) != list(ds.class_names):
        raise ValueError(f"the model was trained for classes {model.class_names}, the dataset has "
                         f"{ds.class_names}; pass the training class list (--set classes=[...]) or retrain")


def run_detection(model: SPPDetector, ds: Dataset, cache_root: Optional[str] = "data/cache",
                  progress: bool = True, box_regression: bool = True) -> tuple[list[dict], dict]:
    """Detections for every image (proposals from the shared cache when `cache_root` is given)."""
    proposals = None
    if cache_root is not None:
        from .proposal_cache import compute_proposals

        p = model.cfg.proposals
        proposals = compute_proposals(ds.records, Path(cache_root) / "proposals", p, workers=p.workers,
                                      progress=progress)
    results, times = [], []
    for r in tqdm(ds.records, desc="detect", unit="img", disable=not progress):
        props = None if proposals is None else proposals.get(r.image_id)
        if props is not None and len(props) == 0:
            results.append(model._empty())
            continue
        t = time.perf_counter()
        results.append(model.detect(r.path, proposals=props, box_regression=box_regression))
        times.append(time.perf_counter() - t)
    return results, {"images": len(ds), "median_s_per_image": float(np.median(times)) if times else 0.0}


def score(ds: Dataset, results: list[dict], use_07_metric: bool = True) -> dict:
    from .evaluation import eval_detection_voc, to_devkit_boxes

    return eval_detection_voc([to_devkit_boxes(r["boxes"]) for r in results], [r["labels"] for r in results],
                              [r["scores"] for r in results], [to_devkit_boxes(g.boxes) for g in ds],
                              [g.labels for g in ds], [g.difficult for g in ds], iou_thresh=0.5,
                              use_07_metric=use_07_metric, n_classes=len(ds.class_names))
