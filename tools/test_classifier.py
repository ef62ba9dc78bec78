#!/usr/bin/env python
"""Test a trained SPP-net classifier on an image-folder split (DIR/<split>/<class>/*.jpg).

Prints top-1 and top-5 error and seconds per image for the view scheme asked, and per-class
top-1 accuracy.  The last two lines are `top1_err = 0.xxxx` and `top5_err = 0.xxxx` (with
`--views all`: of `multi`, the last scheme; with `--views breakdown`: of the model's own
scheme, classifier.test_views).  Schemes (docs/design.md, "Classification"): center (one
224 view), full (the whole image), 10 (corners + centre with flips, windows on one conv
map), 10crop (the same views as crops, each through the trunk), multi (6 scales x 18 views
+ 2 full-image views), all.  Without --views: the model's classifier.test_views (center
for a model trained with the classification defaults, which no multi-view set beat on both
flowers17 and DeepPCB crops; the tool says so in one line).

`--views breakdown`: top-1 / top-5 error of every view set from one pass over the conv
maps (center, full, 10, each test scale alone, the scales cumulated up to multi), with the
views' softmax averaged and with their logits averaged: which scales help, which hurt.

  python tools/test_classifier.py --model data/runs/flowers17/model.safetensors \\
      --dataset ../shared/datasets/flowers17 --views all
  torchrun --nproc-per-node 2 tools/test_classifier.py ...   # the images split over the processes
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from detector.classification.views import SCHEMES  # noqa: E402  (torch-free)

AVERAGES = ("softmax", "logits")  # detector.classification.classifier.AVERAGES (that module imports torch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True, help="image-folder root: DIR/<split>/<class>/*.jpg")
    ap.add_argument("--split", default="test")
    ap.add_argument("--views", default=None, choices=list(SCHEMES) + ["all", "breakdown"],
                    help="view scheme (default: the model's classifier.test_views)")
    ap.add_argument("--average", default=None, choices=list(AVERAGES),
                    help="combine a scheme's views by their softmax or their logits (default: the model's "
                         "classifier.average)")
    ap.add_argument("--out", default=None, help="also write predictions_<scheme>.csv and results.json here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import detector
    from detector.classification.defaults import CENTER_NOTE, CLASSIFICATION_DEFAULTS
    from detector.classification.evaluate import (format_breakdown, format_results, run_breakdown, run_scheme,
                                                  write_results)
    from detector.datasets.imagefolder import load_image_folder

    from detector.images import image_pixels
    from detector.distributed import init_from_env, log_shard, shard

    w = init_from_env()
    clf = detector.load_classifier(args.model)
    c = clf.cfg.classifier
    views, average = args.views or c.test_views, args.average or c.average
    data = load_image_folder(args.dataset, args.split, clf.class_names)
    mine = shard([image_pixels(p) for p in data.paths])  # all of them in one process
    log_shard("classify", len(mine))
    if views == "breakdown":
        table = run_breakdown(clf, data, progress=not args.quiet, mine=mine)
        results = [r for r in table if r["scheme"] == c.test_views and r["average"] == average]
    else:
        schemes = list(SCHEMES) if views == "all" else [views]
        results = [run_scheme(clf, data, s, progress=not args.quiet, mine=mine, average=average) for s in schemes]
    if not w.main:
        return 0
    skipped = data.skipped + results[0]["skipped"]
    print(f"{args.dataset}/{args.split}: {len(results[0]['labels'])} images, {len(clf.class_names)} classes"
          + (f"; skipped {len(skipped)} unreadable: " + ", ".join(p for p, _ in skipped[:5]) if skipped else ""))
    if not args.views and views == CLASSIFICATION_DEFAULTS["classifier.test_views"] == "center":
        print(CENTER_NOTE)
    print(f"views: {views}" + ("" if args.views else " (the model's classifier.test_views)")
          + f"; averaging the views' {average}" + ("" if args.average else " (the model's classifier.average)"))
    if views == "breakdown":
        print(format_breakdown(table))
        print(f"the model's own scheme ({c.test_views}, {average}):")
    print(format_results(results, clf.class_names))
    if args.out:
        write_results(Path(args.out), table if views == "breakdown" else results, clf.class_names)
        print(f"results in {args.out}")
    last = results[-1]
    print(f"top1_err = {last['top1_err']:.4f}")
    print(f"top5_err = {last['top5_err']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
