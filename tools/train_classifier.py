#!/usr/bin/env python
"""Train an SPP-net image classifier on an image-folder dataset (DIR/train/<class>/*.jpg):
conv maps cached once, fc layers trained on SPP vectors -> RUN_DIR/model.safetensors.
Interrupt it and run it again: it resumes from its last epoch.  Under torchrun the conv maps
are split over the processes (on a shared --cache) and rank 0 trains the fc layers.

Without --config it starts from the classification defaults (detector/classification/defaults.py,
the same as configs/classification.yaml: stride-32 trunk, trained on the views of every test
scale); a --config file and --set go on top of them.

  python tools/train_classifier.py --dataset ../shared/datasets/flowers17 --out data/runs/flowers17
  python tools/train_classifier.py --dataset ... --out ... --config configs/flowers17.yaml  # 224 crops only
  torchrun --nproc-per-node 2 tools/train_classifier.py --dataset ... --out ... --config ...
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import parse_training_args, run_tool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="image-folder root: DIR/train/<class>/*.jpg")
    ap.add_argument("--out", required=True, help="run directory (model, checkpoint, summary)")
    ap.add_argument("--cache", default="data/cache", help="conv-map cache root")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args, cfg = parse_training_args(ap, argv, classification=True)
    from detector.classification.training import train_classifier
    from detector.distributed import init_from_env

    init_from_env()
    path = train_classifier(args.dataset, args.out, cfg, args.cache, progress=not args.quiet)
    if path is not None:  # under torchrun: rank 0
        print(f"model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
