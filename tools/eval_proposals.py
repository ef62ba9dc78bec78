#!/usr/bin/env python
"""Proposal recall on a dataset split: recall at IoU 0.5 / 0.7 and AR (IoU 0.5:0.95), per class.

  python tools/eval_proposals.py --dataset data/BCCD --split test               # cached selective search
  python tools/eval_proposals.py --dataset data/VOC2007 --split test --proposals voc_2007_test.mat
  python tools/eval_proposals.py --dataset data/BCCD --split test --plot recall.png --json recall.json
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from detector.config import add_config_args, load_config  # noqa: E402
from detector.proposals import compute_proposals, proposals_for  # noqa: E402
from detector.proposals import load_proposals  # noqa: E402
from detector.proposals import (TOP_NS, curve_ns, format_recall, plot_recall, proposal_recall,  # noqa: E402
                                recall_to_json)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="VOC-layout dataset root, or a COCO annotation .json")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--proposals", default=None, metavar="FILE",
                     help="R-CNN .mat or our .npz; default: selective search through the cache")
    src.add_argument("--model", default=None, metavar="MODEL",
                     help="a trained detector: its own proposals (learned ones from its conv maps, or its "
                          "selective-search settings)")
    ap.add_argument("--cache", default="data/cache/proposals", help="proposal cache root")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: proposals.workers; 0: every usable core)")
    ap.add_argument("--top-ns", type=int, nargs="+", default=list(TOP_NS), help="proposal counts to report")
    ap.add_argument("--plot", default=None, metavar="OUT.png", help="recall vs number of proposals")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="write the figures as JSON")
    add_config_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    cfg = load_config(args.config, args.overrides)
    from detector.datasets import load_dataset

    ds = load_dataset(args.dataset, args.split, cfg.classes, args.image_dir)
    ids = [r.image_id for r in ds.records]
    if args.proposals:
        props = load_proposals(args.proposals, ids)
        source = args.proposals
    elif args.model:
        import detector
        from detector.detection.evaluate import model_proposals

        model = detector.load(args.model)
        props = model_proposals(model, ds.records, args.cache, workers=args.workers)
        source = (f"learned proposals of {args.model} (at most {model.cfg.rpn.post_nms_top_n} per image)"
                  if model.learned_proposals else f"selective search {model.cfg.proposals} of {args.model}")
    else:
        props = compute_proposals(ds.records, args.cache, cfg.proposals, workers=args.workers)
        print(props.summary())
        source = f"selective search {cfg.proposals}"
    boxes = proposals_for(ds.records, props)
    gts = ([r.boxes for r in ds.records], [r.labels for r in ds.records], [r.difficult for r in ds.records])
    res = proposal_recall(boxes, gts[0], gts[1], top_ns=args.top_ns, difficult_list=gts[2],
                          class_names=ds.class_names)
    print(f"{ds.name}: {source}")
    print(format_recall(res))
    if args.json:
        from detector.cache import atomic_write_json

        atomic_write_json(args.json, recall_to_json(res))
    if args.plot:
        curve = proposal_recall(boxes, gts[0], gts[1], top_ns=curve_ns(max(len(b) for b in boxes) or 1),
                                difficult_list=gts[2])
        plot_recall({Path(args.proposals).name if args.proposals else cfg.proposals.mode: curve}, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
