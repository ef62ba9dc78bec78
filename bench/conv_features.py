#!/usr/bin/env python
"""Conv feature time per image (1 scale and the paper's 5 scales) and cache size per image per scale,
for the EfficientNet-Lite0 cuts and input memory layouts (contiguous, channels-last), on a VOC
dataset's images; the channels-last speed-up (median of per-image ratios) at the end.

  python bench/conv_features.py [--dataset ../shared/datasets/BCCD] [--images 12] [--one-scale]
"""
import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from detector.core.backbones import efficientnet_lite0  # noqa: E402
from detector.core.features import FeatureExtractor  # noqa: E402
from detector.images import load_image  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "BCCD"))
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--cuts", default="stride16,stride32")
    ap.add_argument("--layouts", default="contiguous,channels_last")
    ap.add_argument("--one-scale", action="store_true", help="688 only, not the paper's 5 scales too")
    args = ap.parse_args(argv)
    paths = sorted((Path(args.dataset) / "JPEGImages").glob("*.jpg"))[: args.images + 1]
    imgs = [load_image(p) for p in paths]
    print(f"# {len(imgs) - 1} images from {args.dataset} ({imgs[0].shape[1]}x{imgs[0].shape[0]}), "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'cut':<9} {'layout':<14} {'scales':<28} {'s/img (median)':>15} {'maps':<40} "
          f"{'fp16 cache KB/img/scale':>24}")
    per_image: dict = {}
    for cut in args.cuts.split(","):
        bb = efficientnet_lite0(cut=cut)
        for scales in ([688],) if args.one_scale else ([688], [480, 576, 688, 864, 1200]):
            # the layouts alternate image by image, so load on the machine affects both alike
            fxs = {lay: FeatureExtractor(bb, scales, 2000, "cpu", channels_last=lay == "channels_last")
                   for lay in args.layouts.split(",")}
            for fx in fxs.values():
                fx(imgs[0])  # warm-up
            times = {lay: [] for lay in fxs}
            outs = {}
            for im in imgs[1:]:
                for lay, fx in fxs.items():
                    t = time.perf_counter()
                    outs[lay] = fx(im)
                    times[lay].append(time.perf_counter() - t)
            for lay in fxs:
                per_image[(cut, str(scales), lay)] = times[lay]
                print_row(cut, lay, scales, times[lay], outs[lay])
    for (cut, scales, lay), ts in per_image.items():
        base = per_image.get((cut, scales, "contiguous"))
        if lay != "contiguous" and base:
            ratio = statistics.median(b / t for b, t in zip(base, ts))
            print(f"speedup_{lay}_{cut}_{'1scale' if scales == '[688]' else '5scales'} = {ratio:.2f}")
    return 0


def print_row(cut, lay, scales, ts, out) -> None:
    sizes = []
    for sf in out:
        buf = io.BytesIO()
        np.savez(buf, features=sf.features.numpy().astype(np.float16))
        sizes.append(len(buf.getvalue()) / 1024)
    shapes = " ".join("x".join(str(d) for d in sf.features.shape[1:]) for sf in out)
    print(f"{cut:<9} {lay:<14} {str(scales):<28} {statistics.median(ts):15.3f} {shapes:<40} "
          f"{statistics.mean(sizes):24.0f}")


if __name__ == "__main__":
    sys.exit(main())
