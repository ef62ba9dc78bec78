#!/usr/bin/env python
"""Run a trained detector over a VOC-layout split and score it with the devkit's rules.

Writes devkit result files (comp4_det_<split>_<class>.txt) and a COCO results json to --out,
prints the per-class AP table and ends with `mAP = 0.xxxx`.

  python tools/test_voc.py --model data/runs/demo/model.safetensors --dataset data/synthetic --split test
  torchrun --nproc-per-node 2 tools/test_voc.py --model ... --dataset ...   # images split over processes

Under torchrun each process detects its share of the images; rank 0 gathers the detections,
scores them and writes the result files.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True, help="VOC-layout dataset root, or a COCO annotation .json")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--metric", default="07", choices=["07", "area"], help="VOC07 11-point or VOC2010+ area AP")
    ap.add_argument("--out", default=None, help="where result files go (default: next to the model)")
    ap.add_argument("--vis", type=int, default=0, help="also draw the first N images' detections")
    ap.add_argument("--vis-thresh", type=float, default=0.0, help="score threshold for drawing")
    ap.add_argument("--cache", default="data/cache", help="proposal cache root")
    ap.add_argument("--proposals", default=None, metavar="FILE",
                    help="published proposals (.mat or our .npz) instead of selective search")
    ap.add_argument("--no-box-regression", action="store_true")
    ap.add_argument("--coco", action="store_true", help="also print COCO AP@[.5:.95] via pycocotools")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="test.KEY=VALUE",
                    help="test-time settings, e.g. --set test.nms_iou=0.4 test.max_per_image=50")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import detector
    from detector.distributed import init_from_env
    from detector.datasets import load_dataset
    from detector.metrics.coco import coco_gt_from_arrays, eval_coco
    from detector.metrics.voc import detection_counts, format_ap_table
    from detector.detection.evaluate import detect_dataset, score_detections
    from detector.proposals import dataset_proposals
    from detector.metrics.result_files import write_coco_results, write_voc_results
    from detector.detection.visualize import save_detections

    w = init_from_env()
    model = detector.load(args.model, device=args.device)
    model.configure_test(args.overrides)
    # Labels follow the model's class list; an object of a class the model does not know is
    # an error naming its annotation file.
    ds = load_dataset(args.dataset, args.split, model.class_names, args.image_dir)
    out = Path(args.out) if args.out else Path(args.model).parent / f"test_{args.split}"
    props = dataset_proposals(args.proposals, ds.records) if args.proposals else None
    results, info = detect_dataset(model, ds, args.cache, progress=not args.quiet,
                                   box_regression=not args.no_box_regression, proposals=props)
    if not w.main:  # rank 0 scores and writes
        return 0
    ids = [r.image_id for r in ds]
    boxes = [r["boxes"] for r in results]
    labels = [r["labels"] for r in results]
    scores = [r["scores"] for r in results]
    write_voc_results(out, args.split, model.class_names, ids, boxes, labels, scores)
    coco_img_ids = list(range(1, len(ids) + 1))  # COCO ids of the images, in split order
    coco_cat_ids = list(range(1, len(model.class_names) + 1))
    coco_res = write_coco_results(out / f"coco_results_{args.split}.json", coco_img_ids, coco_cat_ids,
                                  boxes, labels, scores)
    for r, res in list(zip(ds.records, results))[: args.vis]:
        save_detections(r.path, res, out / "vis" / f"{r.image_id}.png", args.vis_thresh, r.boxes)
    ev = score_detections(ds, results, use_07_metric=args.metric == "07")
    n_gt, n_det = detection_counts(labels, [g.labels for g in ds], [g.difficult for g in ds],
                                   n_classes=len(model.class_names))
    print(f"{len(ds)} images, median {info['median_s_per_image']:.3f} s per image; results in {out}")
    if args.coco:
        gt = coco_gt_from_arrays([g.boxes for g in ds], [g.labels for g in ds], [g.difficult for g in ds],
                                 image_sizes=[(g.width, g.height) for g in ds])
        stats = eval_coco(gt, coco_res)
        print("COCO (pycocotools, VOC converted on the fly): "
              + ", ".join(f"{k}={v:.4f}" for k, v in list(stats.items())[:3]))
    print(format_ap_table(model.class_names, ev["ap"], ev["map"], n_gt=n_gt, n_det=n_det))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
