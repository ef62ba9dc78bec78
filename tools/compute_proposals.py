#!/usr/bin/env python
"""Compute selective-search proposals for a dataset split and cache them (parallel, resumable).

  python tools/compute_proposals.py --dataset data/BCCD --split trainval --workers 2
  python tools/compute_proposals.py --dataset data/BCCD --split test --set proposals.mode=quality
  python tools/compute_proposals.py --dataset data/BCCD --split test --export data/bccd_test_ss.npz
  torchrun --nproc-per-node 2 tools/compute_proposals.py --dataset data/BCCD --split trainval

Under torchrun each process searches its share of the images (balanced by pixels) into the
shared cache; rank 0 then reports on (and exports) all of them.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402
from detector.config import add_config_args, load_config  # noqa: E402
from detector.proposals import sharded_proposals  # noqa: E402
from detector.proposals import write_proposals_npz  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="VOC-layout dataset root, or a COCO annotation .json")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--split", default="trainval", help="ImageSets/Main/<split>.txt")
    ap.add_argument("--cache", default="data/cache/proposals", help="proposal cache root")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: proposals.workers; 0: every usable core)")
    ap.add_argument("--export", default=None, metavar="FILE.npz",
                    help="also write all boxes to one .npz file (detector.proposals.files format)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    cfg = load_config(args.config, args.overrides)
    from detector.datasets import load_dataset
    from detector.distributed import check_shared_folder, init_from_env

    w = init_from_env()
    ds = load_dataset(args.dataset, args.split, cfg.classes, args.image_dir)
    if w.main:
        print(f"{len(ds)} images, proposals: {cfg.proposals}")
    check_shared_folder(Path(args.cache))
    props = sharded_proposals(ds.records, args.cache, cfg.proposals, workers=args.workers,
                              progress=not args.no_progress and w.main)
    if not w.main:  # rank 0 reports and exports
        return 1 if props.failed else 0
    print(props.summary())
    counts = sorted(len(b) for b in props.values())
    if counts:
        print(f"boxes per image: median {counts[len(counts) // 2]}, min {counts[0]}, max {counts[-1]}")
    if args.export:
        write_proposals_npz(args.export, props)
        print(f"wrote {args.export}")
    return 1 if props.failed else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
