#!/usr/bin/env python
"""Train an SPP-net detector on a VOC-layout dataset: proposals -> conv features ->
fine-tuning -> SVMs -> box regression -> RUN_DIR/model.safetensors.  Stages resume.

  python tools/train.py --dataset data/synthetic --out data/runs/demo --config configs/synthetic.yaml
  torchrun --nproc-per-node 2 tools/train.py --dataset ... --out ...      # K processes, or N machines:
  torchrun --nnodes N --nproc-per-node K --rdzv-backend c10d --rdzv-endpoint HOST:PORT tools/train.py ...

Under torchrun the per-image stages are split over the processes, fine-tuning runs with
DistributedDataParallel, the SVM classes are shared out and rank 0 trains the box regressors;
--cache and --out must be on a file system every node shares (README, "Many machines").
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import parse_training_args, run_tool  # noqa: E402
from detector.detection.train.stages import STAGE_NAMES  # noqa: E402  (torch-free)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="VOC-layout dataset root, or a COCO annotation .json")
    ap.add_argument("--image-dir", default=None, help="COCO only: the images' folder (default: the json's folder)")
    ap.add_argument("--out", required=True, help="run directory (model, stages, checkpoints)")
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--cache", default="data/cache", help="proposal and feature cache root")
    ap.add_argument("--stop-after", default="model", choices=STAGE_NAMES, help="run the stages up to this one")
    ap.add_argument("--proposals", default=None, metavar="FILE",
                    help="published proposals (R-CNN/Fast R-CNN .mat, or our .npz from compute_proposals.py "
                         "--export) instead of selective search; every training image must be in it")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets features.device)")
    args, cfg = parse_training_args(ap, argv)
    # imported here: spawned proposal workers re-import this script and need not load torch
    from detector.distributed import init_from_env
    from detector.detection.train.pipeline import train

    init_from_env()
    path = train(args.dataset, args.out, cfg, args.train_split, args.cache, progress=not args.quiet,
                 stop_after=args.stop_after, image_dir=args.image_dir, proposals_file=args.proposals)
    return 0 if path is not None or args.stop_after != "model" else 1


if __name__ == "__main__":
    sys.exit(run_tool(main))
