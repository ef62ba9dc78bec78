#!/usr/bin/env python
"""SPP pooling speed: 2,000 windows, the range-max table against torchvision's roi_pool (both exact).

  python bench/spp_pool.py [--windows 2000] [--repeats 7]
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from detector.core.spp import spatial_pyramid_pool  # noqa: E402


def windows(g, H, W, n, max_side):
    x1 = torch.randint(0, W, (n,), generator=g)
    y1 = torch.randint(0, H, (n,), generator=g)
    x2 = torch.minimum(x1 + torch.randint(0, max_side, (n,), generator=g), torch.tensor(W - 1))
    y2 = torch.minimum(y1 + torch.randint(0, max_side, (n,), generator=g), torch.tensor(H - 1))
    return torch.stack([x1, y1, x2, y2], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    cases = [("256x64x64 (ZF-5 conv5, 1024 px image)", (256, 64, 64), 40),
             ("112x43x58 (EfficientNet-Lite0 s16, BCCD at 688)", (112, 43, 58), 30)]
    print(f"{'map':<50} {'table s':>9} {'roi_pool s':>11} {'speed-up':>9}  identical")
    for name, (C, H, W), side in cases:
        g = torch.Generator().manual_seed(0)
        f = torch.randn(C, H, W, generator=g)
        win = windows(g, H, W, args.windows, side)
        res = {}
        for m in ("table", "roi_pool"):
            spatial_pyramid_pool(f, win, method=m)  # warm-up
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = spatial_pyramid_pool(f, win, method=m)
                ts.append(time.perf_counter() - t)
            res[m] = (statistics.median(ts), out)
        same = torch.equal(res["table"][1], res["roi_pool"][1])
        print(f"{name:<50} {res['table'][0]:9.3f} {res['roi_pool'][0]:11.3f} "
              f"{res['roi_pool'][0] / res['table'][0]:8.1f}x  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
