"""A trained detector run over a dataset split, and the VOC scoring of its detections."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from detector.progress import progress_bar

from detector.datasets.records import Dataset
from detector.distributed import all_gather, log_shard, shard, world
from detector.detection.detector import SPPDetector, empty_result


def detect_dataset(model: SPPDetector, ds: Dataset, cache_root: Optional[str] = "data/cache",
                   progress: bool = True, box_regression: bool = True,
                   proposals: Optional[dict] = None) -> tuple[list[dict], dict]:
    """Detections for every image, in record order.  Proposals: `proposals` (image id ->
    boxes) when given (a model with learned proposals says once that it uses them instead);
    else the model's own: learned ones inside detect(), or selective search through the shared
    cache under `cache_root` (cache_root None: inside detect()).

    Under torchrun each rank detects its share of the images (balanced by pixels) and every
    rank gets all the results back, in record order."""
    w = world()
    mine = shard([r.width * r.height for r in ds.records])
    log_shard("detect", len(mine))
    records = [ds.records[i] for i in mine]
    if proposals is not None and model.learned_proposals and w.main:
        warnings.warn(f"the model's proposals are learned (proposals.method: rpn); the {len(proposals)} images' "
                      "given proposals are used instead")
    if proposals is None and cache_root is not None and not model.learned_proposals:
        from detector.proposals import compute_proposals

        proposals = compute_proposals(records, Path(cache_root) / "proposals", model.cfg.proposals,
                                      progress=progress and w.main)
    results, times = [], []
    for r in progress_bar(records, desc="detect", unit="img", disable=not progress or not w.main):
        props = None if proposals is None else proposals.get(r.image_id)
        if props is not None and len(props) == 0:
            results.append(empty_result())
            continue
        t = time.perf_counter()
        results.append(model.detect(r.path, proposals=props, box_regression=box_regression))
        times.append(time.perf_counter() - t)
    if w.distributed:
        ordered: list = [None] * len(ds)
        all_times = []
        for part_idx, part_res, part_times in all_gather((mine.tolist(), results, times)):
            for i, res in zip(part_idx, part_res):
                ordered[i] = res
            all_times += part_times
        results, times = ordered, all_times
    return results, {"images": len(ds), "median_s_per_image": float(np.median(times)) if times else 0.0}


def model_proposals(model: SPPDetector, records, proposal_cache: str = "data/cache/proposals",
                    workers: Optional[int] = None, progress: bool = True) -> dict:
    """image id -> a model's own proposals of each record: its learned ones (the conv maps computed
    per image, as detect() does), or selective search with its settings through the proposal cache
    folder `proposal_cache`."""
    if not model.learned_proposals:
        from detector.proposals import compute_proposals

        return compute_proposals(records, proposal_cache, model.cfg.proposals, workers=workers, progress=progress)
    from detector.images import load_image

    return {r.image_id: model.proposals(load_image(r.path))
            for r in progress_bar(records, desc="learned proposals", unit="img", disable=not progress)}


def score_detections(ds: Dataset, results: list[dict], use_07_metric: bool = True) -> dict:
    """VOC AP per class and mAP (devkit rules) of `results` against the dataset's ground truth."""
    from detector.metrics.voc import eval_detection_voc, to_devkit_boxes

    return eval_detection_voc([to_devkit_boxes(r["boxes"]) for r in results], [r["labels"] for r in results],
                              [r["scores"] for r in results], [to_devkit_boxes(g.boxes) for g in ds],
                              [g.labels for g in ds], [g.difficult for g in ds], iou_thresh=0.5,
                              use_07_metric=use_07_metric, n_classes=len(ds.class_names))
