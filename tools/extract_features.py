#!/usr/bin/env python
"""Compute and cache conv feature maps per image and per scale (float16, atomic, resumable).

  python tools/extract_features.py --dataset data/synthetic --split trainval
  python tools/extract_features.py --images path/to/folder --shard 0/2   # and 1/2 in another process
  torchrun --nproc-per-node 2 tools/extract_features.py --dataset data/synthetic --split trainval

Under torchrun each process takes its share of the images (balanced by pixels), so --shard
is not needed there.
"""
import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import parse_shard, run_tool  # noqa: E402
from detector.config import add_config_args, load_config  # noqa: E402
from detector.errors import DatasetError, InputError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="VOC-layout dataset root, or a COCO annotation .json")
    src.add_argument("--images", help="a folder of images")
    ap.add_argument("--split", default="trainval", help="ImageSets/Main/<split>.txt (with --dataset)")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--cache", default="data/cache/features", help="feature cache root")
    ap.add_argument("--shard", default="0/1", help="i/N: this process takes the i-th of N shares of the images "
                                                   "(balanced by pixels, as torchrun's processes do)")
    ap.add_argument("--flip", action="store_true", help="also cache the mirror images (fine-tuning augmentation)")
    add_config_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    cfg = load_config(args.config, args.overrides)
    from detector.core.feature_cache import extract_all
    from detector.detection.train.pipeline import feature_source
    from detector.distributed import check_shared_folder, init_from_env, log_shard, shard as share
    from detector.images import image_pixels, list_images

    w = init_from_env()
    i, n = parse_shard(args.shard)
    if w.distributed and (i, n) != (0, 1):
        raise InputError("--shard splits the images by hand; under torchrun the processes split them already")
    if w.distributed:
        i, n = w.rank, w.size
        check_shared_folder(Path(args.cache))
    if args.dataset:
        from detector.datasets import load_dataset

        paths = [r.path for r in load_dataset(args.dataset, args.split, cfg.classes, args.image_dir)]
    else:
        paths = list_images(args.images)
    if not paths:
        raise DatasetError(f"{args.images}: no image files found (.jpg, .png, ...)")
    paths = sorted(paths)
    paths = [paths[k] for k in share([image_pixels(p) for p in paths], size=n, rank=i)]
    log_shard("features", len(paths))
    print(f"backbone={cfg.backbone.name} scales={cfg.features.scales} max_size={cfg.features.max_size}")
    cache = feature_source(cfg, args.cache)[2]  # the cache training reads (the first blocks' maps, if some train)
    t0 = time.perf_counter()
    stats = extract_all(paths, cache, flips=(False, True) if args.flip else (False,))
    dt = time.perf_counter() - t0
    print(f"{stats['images']} images in shard {i}/{n}: {stats['computed']} computed, "
          f"{stats['cached']} already cached, {len(stats['failed'])} skipped (unreadable); "
          f"{dt:.1f} s; cache {cache.dir}")
    for p, why in stats["failed"]:
        print(f"  skipped {p}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
