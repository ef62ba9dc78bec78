#!/usr/bin/env python
"""One trained detector scored under several test-time settings, in one run: VOC07 mAP, area
mAP, COCO AP and AP50, per-class VOC07 AP, and detections per image, for each setting.

The conv maps and proposals of each test image are computed once and reused for every
setting, so the settings differ only in what they change (suppression, thresholds, the
per-image cap, scorer...).  Each setting is a space-separated list of test.KEY=VALUE items;
the first row is always the model's own settings.

  python bench/test_settings.py --model data/runs/bccd/model.safetensors \\
      --setting "test.nms_after_regression=true" \\
      --setting "test.nms_after_regression=true test.nms_iou=0.4" --setting "test.soft_nms_sigma=0.5"
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--dataset", default=common.DEFAULT_DATASET, help="a VOC-layout dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache", default=common.DEFAULT_CACHE, help="proposal cache root (selective search)")
    ap.add_argument("--setting", action="append", default=[], metavar='"test.KEY=VALUE ..."',
                    help="a test-time setting to score (repeatable)")
    args = ap.parse_args(argv)

    import numpy as np

    import detector
    from detector.config import apply_test_overrides
    from detector.datasets import load_dataset
    from detector.detection.evaluate import score_detections
    from detector.images import load_image
    from detector.metrics.coco import coco_gt_from_arrays, eval_coco
    from detector.metrics.result_files import coco_results_from_arrays
    from detector.progress import progress_bar

    common.print_header("one model under several test-time settings")
    model = detector.load(args.model)
    ds = load_dataset(args.dataset, args.split, model.class_names)
    settings = [[]] + [s.split() for s in args.setting]
    configs = []
    for items in settings:
        cfg = copy.deepcopy(model.cfg)
        apply_test_overrides(cfg, items)
        configs.append(cfg)
    print(f"model: {args.model}; {args.dataset} split {args.split}: {len(ds)} images")
    props = None
    if getattr(model.cfg.proposals, "method", "selective_search") == "selective_search":
        from detector.proposals import compute_proposals

        props = compute_proposals(ds.records, Path(args.cache) / "proposals", model.cfg.proposals, progress=False)
    own_cfg = model.cfg
    results = [[] for _ in settings]
    seconds = [0.0 for _ in settings]
    for r in progress_bar(ds.records, desc="test", unit="img"):
        img = load_image(r.path)
        maps = model.extractor(img)
        boxes = None if props is None else props[r.image_id]
        for k, cfg in enumerate(configs):
            model.cfg = cfg
            t = time.perf_counter()
            results[k].append(model.detect(img, proposals=boxes, features=maps))
            seconds[k] += time.perf_counter() - t
        model.cfg = own_cfg
    gt = coco_gt_from_arrays([g.boxes for g in ds], [g.labels for g in ds], [g.difficult for g in ds],
                             image_sizes=[(g.width, g.height) for g in ds])
    rows = []
    for items, res, sec in zip(settings, results, seconds):
        v07 = score_detections(ds, res, use_07_metric=True)
        area = score_detections(ds, res, use_07_metric=False)
        coco = eval_coco(gt, coco_results_from_arrays(list(range(1, len(ds) + 1)),
                                                      list(range(1, len(model.class_names) + 1)),
                                                      [x["boxes"] for x in res], [x["labels"] for x in res],
                                                      [x["scores"] for x in res]))
        rows.append([" ".join(items) or "(the model's own)", f"{v07['map']:.4f}", f"{area['map']:.4f}",
                     f"{coco['AP']:.4f}", f"{coco['AP50']:.4f}",
                     " ".join(f"{a:.4f}" for a in v07["ap"]), f"{np.mean([len(x['scores']) for x in res]):.1f}",
                     f"{sec / len(ds):.3f}"])
    print(common.table(["setting", "VOC07", "area", "COCO AP", "AP50", "VOC07 per class (" +
                        ", ".join(model.class_names) + ")", "dets/img", "s/img after conv"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
