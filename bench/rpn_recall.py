#!/usr/bin/env python
"""Learned proposals (detector.proposals.rpn) against selective search: proposal recall on a test split.

Trains the proposal head on the training split's cached conv maps (the feature cache that
`tools/train.py` fills with the same config: the maps are found, not recomputed, when that
run's cache is given), then proposes on the test split and prints recall at IoU 0.5 / 0.7 and
AR (IoU 0.5:0.95) at 100 / 300 / 1000 / 2000 boxes next to selective search's (from the
proposal cache, computed there if missing), the training time and the time per image of
the proposal step alone (from the conv map to boxes; the conv pass is shared with SPP).

  python bench/rpn_recall.py --dataset ../shared/datasets/BCCD --config configs/bccd.yaml --cache data/cache
  python bench/rpn_recall.py --dataset ../shared/datasets/DeepPCB --train-split trainval300 --split test100

Ends with `rpn_recall07_300 = X` and `ss_recall07_300 = Y`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from detector.config import add_config_args, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache", default="data/cache", help="cache root (features/ and proposals/ below it)")
    ap.add_argument("--out", default="data/bench/rpn_recall", help="checkpoint and results folder")
    ap.add_argument("--iterations", type=int, default=None, help="default: RPNTrainConfig's")
    ap.add_argument("--images-per-batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--sizes", type=float, nargs="+", default=None, help="anchor sizes (default: derived)")
    ap.add_argument("--ratios", type=float, nargs="+", default=None, help="anchor ratios h/w (default: derived)")
    ap.add_argument("--size-quantiles", type=float, nargs=2, default=None, help="derived sizes span these quantiles")
    ap.add_argument("--pre-nms", type=int, default=6000)
    ap.add_argument("--post-nms", type=int, default=2000)
    ap.add_argument("--nms", type=float, default=0.7)
    ap.add_argument("--min-size", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_config_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    import torch

    from detector.core.backbones import build_backbone
    from detector.core.feature_cache import FeatureCache, MapMemory
    from detector.core.features import FeatureExtractor
    from detector.datasets import load_dataset
    from detector.proposals import compute_proposals, format_recall, proposal_recall, proposals_for, recall_to_json
    from detector.proposals.rpn import (RPN, ProposalSettings, RPNTrainConfig, anchor_recall, check_training_boxes,
                                        derive_anchors)

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    train_ds = load_dataset(args.dataset, args.train_split, cfg.classes)
    test_ds = load_dataset(args.dataset, args.split, list(train_ds.class_names))
    check_training_boxes([r.boxes for r in train_ds])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the conv maps exactly as detector/detection/train/pipeline.py finds them
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone)
    extractor = FeatureExtractor(backbone, cfg.features.scales, cfg.features.max_size, cfg.features.device)
    fcache = FeatureCache(Path(args.cache) / "features", extractor, cfg.features.cache_dtype)
    maps = MapMemory(fcache, 4096)
    flips = cfg.finetune.flip
    missing = sum(not fcache.complete(r.path, f) for r in train_ds for f in ((False, True) if flips else (False,)))
    print(f"feature cache {fcache.dir}: {missing} training maps missing (computed now)" if missing
          else f"feature cache {fcache.dir}: every training map cached")

    tc = RPNTrainConfig(flip=flips)
    for k in ("iterations", "images_per_batch", "lr"):
        if getattr(args, k) is not None:
            setattr(tc, k, getattr(args, k))
    if args.iterations is not None:
        tc.lr_steps = (int(round(args.iterations * 0.75)),)
    spec = derive_anchors([r.boxes for r in train_ds], [(r.width, r.height) for r in train_ds], cfg.features.scales,
                          cfg.features.max_size, backbone.stride, backbone.offset, sizes=args.sizes, ratios=args.ratios,
                          **({"size_quantiles": tuple(args.size_quantiles)} if args.size_quantiles else {}))
    print(f"anchors: {spec.rule}")
    settings = ProposalSettings(args.pre_nms, args.post_nms, args.nms, args.min_size)
    rpn = RPN(backbone.channels, spec, settings, seed=cfg.seed)

    from detector.proposals.rpn import train_rpn

    t = time.perf_counter()
    for r in train_ds:  # read (or compute) every map once, outside the timed training
        for f in ((False, True) if flips else (False,)):
            maps.get(r.path, f)
    load_s = time.perf_counter() - t
    ckpt = out / "rpn_ckpt.pt"
    if ckpt.exists():
        ckpt.unlink()  # a timed run: never resume
    t = time.perf_counter()
    info = train_rpn(rpn, lambda i, f: maps.get(train_ds.records[i].path, f), [r.boxes for r in train_ds], tc,
                     seed=cfg.seed, checkpoint=ckpt)
    train_s = time.perf_counter() - t
    print(f"training: {train_s:.1f} s for {tc.iterations} iterations ({load_s:.1f} s reading maps before); {info}")
    maps.clear()

    # test maps: from the cache when there, else computed (and stored) here
    test_maps = [fcache.get(r.path) for r in test_ds]
    first = test_maps[0][0]
    a_rec = anchor_recall(spec, [r.boxes for r in test_ds], [m[0].map_size for m in test_maps],
                          [m[0].factor for m in test_maps])
    print(f"anchors alone: {100 * a_rec:.1f}% of test boxes have an anchor at IoU >= 0.7 "
          f"(map {first.map_size} at factor {first.factor:.3f})")
    for m in test_maps[:3]:  # warm-up
        rpn.propose(m)
    times, props = [], []
    float_maps = [[type(sf)(sf.scale, sf.factor, sf.features.float(), sf.image_size) for sf in m] for m in test_maps]
    for m in float_maps:  # detect() hands float32 maps over; time the proposal step alone
        t = time.perf_counter()
        props.append(rpn.propose(m)[0])
        times.append(time.perf_counter() - t)
    print(f"proposal step: median {1000 * np.median(times):.1f} ms / image, mean {1000 * np.mean(times):.1f} ms "
          f"({torch.get_num_threads()} threads), {np.mean([len(p) for p in props]):.0f} boxes per image")
    times300 = []
    s300 = ProposalSettings(args.pre_nms, 300, args.nms, args.min_size)
    for m in float_maps:  # what detect() would keep (Faster R-CNN's 300 at test time)
        t = time.perf_counter()
        rpn.propose(m, s300)
        times300.append(time.perf_counter() - t)
    print(f"proposal step with post_nms_top_n 300: median {1000 * np.median(times300):.1f} ms / image")

    ss = compute_proposals(test_ds.records, Path(args.cache) / "proposals", cfg.proposals)
    ss_boxes = proposals_for(test_ds.records, ss)
    gts = ([r.boxes for r in test_ds], [r.labels for r in test_ds], [r.difficult for r in test_ds])
    ns = (100, 300, 1000, 2000)
    res = {}
    for name, boxes in (("rpn", props), ("selective_search", ss_boxes)):
        res[name] = proposal_recall(boxes, gts[0], gts[1], top_ns=ns, difficult_list=gts[2],
                                    class_names=test_ds.class_names)
        print(f"\n{test_ds.name}/{args.split}: {name}")
        print(format_recall(res[name]))
    k5, k7 = (int(np.flatnonzero(np.isclose(res["rpn"]["iou_thresholds"], t))[0]) for t in (0.5, 0.7))
    print(f"\n| {test_ds.name} {args.split} | " + " | ".join(f"R@0.7 {n}" for n in ns) + " | "
          + " | ".join(f"AR {n}" for n in ns) + " |")
    for name in res:
        r = res[name]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["recall"][:, k7]) + " | "
              + " | ".join(f"{v:.3f}" for v in r["ar"]) + " |")
    summary = {"dataset": test_ds.name, "train_split": args.train_split, "split": args.split,
               "anchors": spec.to_json(), "train_config": {k: v for k, v in vars(tc).items()},
               "settings": vars(settings), "train_seconds": round(train_s, 1), "train_info": info,
               "propose_ms_median": round(1000 * float(np.median(times)), 2),
               "propose_ms_median_post300": round(1000 * float(np.median(times300)), 2),
               "anchor_recall07": a_rec, "threads": torch.get_num_threads(),
               "recall": {k: recall_to_json(v) for k, v in res.items()}}
    (out / "recall.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    i300 = ns.index(300)
    print(f"rpn_recall05_300 = {res['rpn']['recall'][i300, k5]:.4f}")
    print(f"rpn_recall07_300 = {res['rpn']['recall'][i300, k7]:.4f}")
    print(f"ss_recall07_300 = {res['selective_search']['recall'][i300, k7]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
