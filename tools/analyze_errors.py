#!/usr/bin/env python
"""Where the missing AP goes: a TIDE-style error analysis of detection results, any detector's.

  python tools/analyze_errors.py --dataset ../shared/datasets/BCCD --detections data/runs/bccd/test_test
  python tools/analyze_errors.py --dataset ... --detections results.json --proposals props.npz
  python tools/analyze_errors.py --dataset ... --detections DIR --model data/runs/bccd_rpn/model.safetensors
  python tools/analyze_errors.py --dataset ... --detections DIR --ss-cache data/cache/proposals \\
      --config data/runs/bccd/config.yaml

--detections is a folder of the devkit's result files (comp4_det_<split>_<class>.txt, as
tools/test_voc.py and bench/peer_fasterrcnn.py write them) or a COCO results json (image ids
1..N in the split's order, category ids 1..K in class order: what those tools write; with a
COCO annotation file as --dataset, --json-ids dataset reads the file's own ids instead).

Prints two tables and writes them, with a plot, to --out (default: beside the detections):
  errors_<split>.txt / .png / .json
1. dAP per error type, mean and per class: the mAP gained if an oracle fixed that type alone
   (classification, localisation, both, duplicate, background, missed; then all false positives
   and all false negatives), with the number of errors of each type.  AP: VOC07 11-point
   (--metric 07), area, or COCO's 101-point as TIDE; devkit matching at IoU 0.5; see
   detector/metrics/error_analysis.py.
2. recall by class and by object size (COCO's small/medium/large by default, --size-edges to
   change): objects detected, missed, and with proposals (--proposals FILE, selective search
   through --ss-cache with the config's proposal settings, or --model: a model's own, learned or
   selective search) proposal recall at IoU 0.5 and 0.7 and
   the missed objects that no proposal covered.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from detector.config import add_config_args  # noqa: E402


def read_detections(path: Path, split: str, ds, comp_id: str, json_ids: str):
    """(boxes, labels, scores) per image from a devkit folder or a COCO json; a damaged file is
    an InputError naming it."""
    from detector.errors import InputError
    from detector.metrics.result_files import read_coco_results, read_voc_results

    image_ids = [r.image_id for r in ds.records]
    try:
        if path.is_dir():
            return read_voc_results(path, split, ds.class_names, image_ids, comp_id)
        if path.suffix.lower() == ".json":
            if json_ids == "dataset":
                if not hasattr(ds, "coco_image_ids"):
                    raise InputError("--json-ids dataset needs a COCO annotation file as --dataset")
                return read_coco_results(path, ds.coco_image_ids, ds.coco_category_ids)
            return read_coco_results(path, list(range(1, len(image_ids) + 1)),
                                     list(range(1, len(ds.class_names) + 1)))
    except ValueError as e:
        raise InputError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise InputError(f"{path}: --detections must be a folder of devkit result files or a COCO results .json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="VOC-layout dataset root, or a COCO annotation .json")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--detections", required=True, metavar="DIR|JSON",
                    help="devkit result files' folder or a COCO results json")
    ap.add_argument("--comp-id", default="comp4", help="prefix of the devkit files (<comp>_det_<split>_<class>.txt)")
    ap.add_argument("--json-ids", default="ours", choices=["ours", "dataset"],
                    help="a COCO json's ids: ours (images 1..N in split order, categories 1..K in class order, "
                         "as our tools write) or dataset (the COCO annotation file's own ids)")
    ap.add_argument("--classes", default=None, help="comma-separated class list in label order (default: the "
                                                    "config's classes, else the dataset's)")
    ap.add_argument("--metric", default="07", choices=["07", "area", "coco101"],
                    help="AP: VOC07 11-point, VOC2010+ area, or COCO's 101-point (TIDE's own), all at --fg-iou")
    ap.add_argument("--fg-iou", type=float, default=0.5, help="t_f: a match (TIDE's foreground IoU)")
    ap.add_argument("--bg-iou", type=float, default=0.1, help="t_b: below it with every object, a background error")
    ap.add_argument("--size-edges", type=float, nargs="+", default=[32, 96], metavar="PX",
                    help="object size bins, cut at these sqrt(area) values in pixels (default: COCO's 32 96)")
    prop = ap.add_mutually_exclusive_group()
    prop.add_argument("--proposals", default=None, metavar="FILE", help="proposals (.npz or R-CNN .mat) for recall")
    prop.add_argument("--ss-cache", default=None, metavar="DIR",
                      help="selective search through this cache (e.g. data/cache/proposals), with the config's "
                           "proposals.* settings (pass the model's config to reuse its cache)")
    prop.add_argument("--model", default=None, metavar="MODEL",
                      help="a trained model's own proposals: its learned ones, or selective search with its "
                           "settings through --model-cache")
    ap.add_argument("--model-cache", default="data/cache/proposals", metavar="DIR",
                    help="with --model and selective search: the proposal cache (default: data/cache/proposals)")
    ap.add_argument("--out", default=None, help="folder for errors_<split>.txt/.png/.json (default: beside "
                                                "--detections)")
    ap.add_argument("--title", default=None, help="plot title (default: the detections' name)")
    add_config_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from detector.config import load_config
    from detector.datasets import load_dataset
    from detector.errors import InputError
    from detector.metrics import error_analysis as ea

    if not 0 < args.bg_iou <= args.fg_iou <= 1:
        raise InputError(f"need 0 < --bg-iou <= --fg-iou <= 1 (got {args.bg_iou}, {args.fg_iou})")
    if any(e <= 0 for e in args.size_edges):
        raise InputError(f"--size-edges must be positive pixel sizes (got {args.size_edges})")
    cfg = load_config(args.config, args.overrides)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else cfg.classes
    ds = load_dataset(args.dataset, args.split, classes, args.image_dir)
    names = list(ds.class_names)
    recs = ds.records
    ids = [r.image_id for r in recs]
    dets = Path(args.detections)
    boxes, labels, scores = read_detections(dets, args.split, ds, args.comp_id, args.json_ids)
    gts = ([r.boxes for r in recs], [r.labels for r in recs], [r.difficult for r in recs])
    rep = ea.analyze_errors(boxes, labels, scores, *gts, n_classes=len(names), metric=args.metric,
                            fg_iou=args.fg_iou, bg_iou=args.bg_iou)

    props, source = None, "none"
    if args.proposals:
        from detector.proposals import load_proposals, proposals_for

        props = proposals_for(recs, load_proposals(args.proposals, ids))
        source = args.proposals
    elif args.ss_cache:
        from detector.proposals import compute_proposals, proposals_for

        props = proposals_for(recs, compute_proposals(recs, args.ss_cache, cfg.proposals))
        source = f"selective search ({cfg.proposals.mode}, top {cfg.proposals.top_k}) cached in {args.ss_cache}"
    elif args.model:
        import detector
        from detector.detection.evaluate import model_proposals
        from detector.proposals import proposals_for

        model = detector.load(args.model)
        props = proposals_for(recs, model_proposals(model, recs, args.model_cache))
        source = (f"learned proposals of {args.model} (at most {model.cfg.rpn.post_nms_top_n} per image)"
                  if model.learned_proposals else f"selective search of {args.model} through {args.model_cache}")
    bd = ea.recall_breakdown(gts[0], gts[1], rep["gt_state"], props, n_classes=len(names),
                             size_edges=args.size_edges)

    n_dets = sum(len(b) for b in boxes)
    head = (f"{ds.name}: {len(recs)} images; {n_dets} detections from {dets}; proposals: {source}")
    text = "\n\n".join([head, ea.format_errors(rep, names), ea.format_recall_breakdown(bd, names)])
    out = Path(args.out) if args.out else (dets if dets.is_dir() else dets.parent)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"errors_{args.split}"
    Path(f"{stem}.txt").write_text(text + "\n")
    summary = {k: rep[k] for k in ("metric", "fg_iou", "bg_iou", "ap", "map", "dap", "dap_per_class", "counts",
                                   "n_gt", "n_det", "n_tp")}
    Path(f"{stem}.json").write_text(json.dumps(ea.to_json({
        "dataset": str(args.dataset), "split": args.split, "detections": str(dets), "proposals": source,
        "class_names": names, "errors": summary, "recall": bd}), indent=1) + "\n")
    ea.plot_errors(rep, names, f"{stem}.png", bd, title=args.title or dets.name)
    print(text)
    print(f"\nwrote {stem}.txt, {stem}.png, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
