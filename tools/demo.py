#!/usr/bin/env python
"""The end-to-end demo on the built-in synthetic dataset (no downloads, CPU):

  1. generate data/synthetic (VOC layout, seeded);
  2. train the whole pipeline with configs/synthetic.yaml into data/runs/demo;
  3. test on the test split and print the per-class AP table and mAP;
  4. draw detections on a few test images (data/runs/demo/test_test/vis/*.png).

Rerunning resumes: finished stages and caches are reused.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detector.cli import run_tool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "synthetic"))
    ap.add_argument("--out", default=str(ROOT / "data" / "runs" / "demo"))
    ap.add_argument("--cache", default=str(ROOT / "data" / "cache"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "synthetic.yaml"))
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    from tools import make_synthetic, test_voc, train

    t0 = time.perf_counter()
    print("== 1/3 synthetic dataset ==")
    make_synthetic.main(["--out", args.data])
    print("== 2/3 training ==")
    rc = train.main(["--dataset", args.data, "--out", args.out, "--cache", args.cache, "--config", args.config,
                     *(["--set", *args.overrides] if args.overrides else [])])
    if rc:
        return rc
    print("== 3/3 test ==")
    rc = test_voc.main(["--model", str(Path(args.out) / "model.safetensors"), "--dataset", args.data,
                        "--split", "test", "--cache", args.cache, "--vis", "6", "--vis-thresh", "0.0"])
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; pictures in {Path(args.out) / 'test_test' / 'vis'}")
    return rc


if __name__ == "__main__":
    sys.exit(run_tool(main))
