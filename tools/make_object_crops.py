#!/usr/bin/env python
"""Make a folder-per-class classification set (OUT/<split>/<class>/*.png) from the annotated
objects of a VOC-layout detection set: one square crop per object, with context around it
(detector/datasets/object_crops.py).  The same arguments give the same files.

  python tools/make_object_crops.py --voc ../shared/datasets/DeepPCB --out /work/runs/deeppcb_crops \\
      --max-per-class 150 50
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.cli import run_tool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", required=True, help="VOC-layout dataset root (Annotations/, JPEGImages/, ImageSets/)")
    ap.add_argument("--out", required=True, help="folder for OUT/<split>/<class>/*.png (outside the repository)")
    ap.add_argument("--splits", nargs="+", default=["trainval:train", "test:test"], metavar="VOC:OUT",
                    help="VOC split and the output split it becomes")
    ap.add_argument("--margin", type=float, default=0.5, help="context on each side, times the box's longer side")
    ap.add_argument("--max-per-class", type=int, nargs="+", default=None, metavar="N",
                    help="a seeded random subset of at most N objects per class (one N for every split, or one "
                         "per split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from detector.datasets.object_crops import make_object_crops
    from detector.errors import InputError

    pairs = []
    for s in args.splits:
        if s.count(":") != 1 or not all(s.split(":")):
            raise InputError(f"--splits: expected VOC_SPLIT:OUT_SPLIT, got {s!r}")
        pairs.append(tuple(s.split(":")))
    caps = args.max_per_class or [None]
    counts = make_object_crops(args.voc, args.out, pairs, args.margin, caps if len(caps) > 1 else caps[0], args.seed,
                               progress=not args.quiet)
    for split, per_class in counts.items():
        print(f"{args.out}/{split}: {sum(per_class.values())} crops, "
              + ", ".join(f"{c} {n}" for c, n in sorted(per_class.items())))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
