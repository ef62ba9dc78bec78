"""Write the built-in synthetic VOC-layout dataset (skipped when it already exists with the same parameters).

  python tools/make_synthetic.py --out data/synthetic [--train 200 --test 100 --seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402


def main(argv=None) -> int:
    from detector.datasets.synthetic import DEFAULT_CLASSES, make_synthetic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/synthetic", help="dataset directory")
    ap.add_argument("--train", type=int, default=200, help="trainval images (every 5th is in val)")
    ap.add_argument("--test", type=int, default=100, help="test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"), help="image size")
    ap.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), help=f"subset of {list(DEFAULT_CLASSES)}")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = make_synthetic(args.out, num_train=args.train, num_test=args.test, image_size=tuple(args.size),
                          seed=args.seed, classes=args.classes)
    print(f"{root}: {args.train} trainval + {args.test} test images ready in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
