#!/usr/bin/env python
"""Where `model.detect()` spends its time: median per stage over test images.

Warms up on the first --warmup images (sorted by id), then times `model.detect()` on the
next --images and prints the median of each stage from a `detector.timing.StageTimer`: proposals
(selective search), resize, conv, projection + SPP, fc, SVM, box regression, NMS, total.
Images are decoded before the timer starts (decoding is reported on its own line, outside
`total`).  Ends with

  total_s = X        median of the per-image totals
  overhead_frac = Y  median over images of (total - proposals - conv) / total

  python bench/detect_stages.py [--model data/runs/bccd/model.safetensors] [--images 20]
                                [--scales 480,576,688,864,1200] [--proposals live|cache]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

# (row label, key in StageTimer.times)
STAGES = [("proposals", "proposals"), ("resize", "resize"), ("conv", "conv"),
          ("projection + SPP", "spp"), ("fc", "fc"), ("SVM", "svm"), ("box regression", "bbox"), ("NMS", "nms")]
TOTAL_TARGET_S = 1.5
OVERHEAD_TARGET = 0.15


def set_scales(model, scales: list[int]) -> None:
    """Time the model at other feature scales: same weights, a rebuilt feature extractor."""
    from detector.core.features import FeatureExtractor

    if max(scales) > model.cfg.features.max_size:
        print(f"note: scales above the model's max_size ({model.cfg.features.max_size}) are capped by it")
    model.cfg.features.scales = list(scales)
    model.extractor = FeatureExtractor(model.backbone, scales, model.cfg.features.max_size, str(model.extractor.device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--dataset", default=common.DEFAULT_DATASET, help="a VOC-layout dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=20, help="timed images (after the warm-up ones)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scales", default=None, help="override the model's feature scales, e.g. 480,576,688,864,1200")
    ap.add_argument("--proposals", default="live", metavar="live|cache|FILE",
                    help="live: selective search inside detect() (what a new image costs); cache: boxes from "
                         "the proposal cache are passed in, so the proposals row is only their check; FILE: "
                         "boxes from a proposals file (.npz from compute_proposals.py --export, or R-CNN .mat)")
    ap.add_argument("--cache", default=common.DEFAULT_CACHE, help="proposal cache root (--proposals cache)")
    ap.add_argument("--no-box-regression", action="store_true")
    ap.add_argument("--device-path", action="store_true",
                    help="score with the device path (every window's deltas with its scores, one copy back) even on "
                         "the CPU, to compare it with the host path (only the kept windows regressed)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="test.KEY=VALUE",
                    help="test-time settings of the model, e.g. --set test.max_per_image=50")
    ap.add_argument("--search-threads", type=int, default=None,
                    help="cv2.setNumThreads, which selective search splits its work over (default: OpenCV's choice)")
    args = ap.parse_args(argv)
    if args.images < 1 or args.warmup < 0:
        ap.error("--images must be >= 1 and --warmup >= 0")

    import numpy as np
    import torch

    import detector
    from detector.images import load_image
    from detector.datasets import load_dataset
    from detector.timing import StageTimer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.search_threads:
        import cv2

        cv2.setNumThreads(args.search_threads)
    common.print_header("detect() per-stage times")
    model = detector.load(args.model)
    model.configure_test(args.overrides)
    if args.device_path:
        model.use_device_path(True)
    if args.scales:
        set_scales(model, common.parse_int_list(args.scales, "--scales"))
    scales = model.extractor.scales
    ds = load_dataset(args.dataset, args.split, model.class_names)
    recs = common.first_by_id(ds.records, None)
    warm, timed = recs[: args.warmup], recs[args.warmup: args.warmup + args.images]
    if not timed:
        print(f"note: the split has only {len(recs)} images; timing the warm-up images again")
        timed = recs[: args.images]
    if len(timed) < args.images:
        print(f"note: only {len(timed)} images left after the warm-up (asked for {args.images})")

    props = {}
    if args.proposals == "cache":
        from detector.proposals import compute_proposals

        p = model.cfg.proposals
        props = compute_proposals(warm + timed, Path(args.cache) / "proposals", p, progress=False)
    elif args.proposals != "live":
        from detector.proposals import dataset_proposals

        props = dataset_proposals(args.proposals, warm + timed)

    print(f"model:     {args.model}")
    print(f"dataset:   {args.dataset} split {args.split}: warm-up on {len(warm)} images, timed on {len(timed)} "
          f"(sorted by id: {timed[0].image_id} .. {timed[-1].image_id})")
    print(f"scales:    {scales}  (max_size {model.cfg.features.max_size}; device {model.extractor.device})")
    print(f"proposals: {args.proposals} (selective search {model.cfg.proposals.mode}, top_k "
          f"{model.cfg.proposals.top_k}); box regression {'off' if args.no_box_regression else 'on'}; "
          f"{'device' if model.device_path else 'host'} path")
    print()

    def run(rec):
        t = time.perf_counter()
        img = load_image(rec.path)
        decode = time.perf_counter() - t
        timer = StageTimer()
        res = model.detect(img, proposals=props.get(rec.image_id), box_regression=not args.no_box_regression,
                           timer=timer)
        return decode, res, dict(timer.times, total=timer.total), timer.counts

    for rec in warm:
        run(rec)
    rows, decodes, n_props, n_dets, distinct, skipped = [], [], [], [], [], []
    for rec in timed:
        decode, res, t, counts = run(rec)
        if "spp" not in t:  # detect() returned early: no proposals survived
            skipped.append(rec.image_id)
            continue
        rows.append(t)
        decodes.append(decode)
        n_dets.append(len(res["scores"]))
        n_props.append(counts["proposals"])
        distinct.append(counts["windows"] / counts["proposals"])
    if not rows:
        print("no image produced timings (no proposals on any of them)")
        return 1
    if skipped:
        print(f"note: {len(skipped)} images had no proposals and are left out: {skipped[:5]}")

    total = np.array([t["total"] for t in rows])
    med_total = float(np.median(total))
    table_rows = []
    accounted = np.zeros(len(rows))
    for label, key in STAGES:
        v = np.array([t.get(key, 0.0) for t in rows])
        accounted += v
        table_rows.append([label, f"{np.median(v):.4f}", f"{100 * np.median(v) / med_total:.1f}%",
                           f"{v.min():.4f}", f"{v.max():.4f}"])
    rest = total - accounted
    table_rows.append(["other (unlisted glue)", f"{np.median(rest):.4f}", f"{100 * np.median(rest) / med_total:.1f}%",
                       f"{rest.min():.4f}", f"{rest.max():.4f}"])
    table_rows.append(["total", f"{med_total:.4f}", "100.0%", f"{total.min():.4f}", f"{total.max():.4f}"])
    print(common.table(["stage", "median s", "of total", "min s", "max s"], table_rows))
    print(f"(image decode, before detect() and not in total: median {common.median(decodes):.4f} s)")
    if args.proposals == "live":
        print("(proposals = selective search on the decoded image, inside detect())")
    else:
        print("(proposals came from the cache: that row is only their validation; total excludes selective search)")
    print(f"proposals per image: median {common.median(n_props):.0f}, of which distinct (scale, window) pooled and "
          f"scored: median {100 * common.median(distinct):.1f}%; detections per image: median {common.median(n_dets):.0f}")

    props_t = np.array([t["proposals"] for t in rows])
    conv_t = np.array([t.get("conv", 0.0) for t in rows])
    frac = (total - props_t - conv_t) / total
    ratio_of_medians = (med_total - np.median(props_t) - np.median(conv_t)) / med_total
    no_prop = total - props_t
    print(f"total without proposals: median {np.median(no_prop):.4f} s")
    print(f"overhead_frac is the median over images of the per-image (total - proposals - conv) / total; "
          f"the ratio of the medians is {ratio_of_medians:.4f}")
    print()
    where = f"{len(scales)} scale{'s' if len(scales) > 1 else ''}, {torch.get_num_threads()} threads"
    note = "" if len(scales) == 1 else f"; the target is for 1 scale, this run uses {len(scales)}"
    print(f"total_s = {med_total:.4f}  # target <= {TOTAL_TARGET_S} s at 1 scale on 2 cores ({where}): "
          f"{common.check_target(med_total <= TOTAL_TARGET_S)}{note}")
    med_frac = float(np.median(frac))
    print(f"overhead_frac = {med_frac:.4f}  # target <= {OVERHEAD_TARGET}: "
          f"{common.check_target(med_frac <= OVERHEAD_TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
