#!/usr/bin/env python
"""Image classification on an image-folder dataset (default: Oxford 17 Flowers): the
fixed-224 training, the multi-size training and the training on every test scale (the
classification default), each tested with every view scheme.

For each input mode (`classifier.input=crop224`, `multisize`, `scales`) it runs
`tools/train_classifier.py` (fresh run folder and conv-map cache, so the wall time includes
the conv maps) and `tools/test_classifier.py --views all`, then prints one table: top-1 and
top-5 error and seconds per image of `center`, `full`, `10`, `10crop` and `multi`, with the
training wall time and peak RSS.  Then the ratios the targets are about (`10crop` over `10`
in time, with the conv-pixel ratio that bounds it; `multi` against `center`), and the
channels-last speed-up of the trunk on the test images.

  python bench/classification.py [--dataset ../shared/datasets/flowers17] [--config configs/flowers17.yaml]
                                 [--modes crop224,multisize,scales] [--out data/bench/classification]

The per-scale errors behind `multi` come from `tools/test_classifier.py --views breakdown`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

MARKER = ".bench_classification"


def run_tool(args: list[str], log: Path) -> tuple[float, float]:
    """Run a tool as its own process; (wall seconds, peak RSS in MB) of that process alone."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT, cwd=common.ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed; see {log}")
    return wall, ru.ru_maxrss / 1024.0


def conv_pixel_ratio(paths, view_scale: int, view: int, max_size: int, divisor: int = 32) -> float:
    """Trunk input pixels of `10crop` (10 views of view x view) over `10` (the image and its
    mirror at shorter side view_scale, padded to the trunk's divisor), summed over the images."""
    from PIL import Image

    from detector.core.resize import resize_factor, resized_size

    crops = maps = 0
    for p in paths:
        with Image.open(p) as im:
            W, H = im.size
        w, h = resized_size(W, H, resize_factor(W, H, view_scale, max_size))
        maps += 2 * (-(-w // divisor) * divisor) * (-(-h // divisor) * divisor)
        crops += 10 * view * view
    return crops / maps


def channels_last_speedup(cfg, paths, repeats: int = 3) -> dict:
    """Median seconds per image of the trunk at the classifier's full-image scale, NCHW and
    channels-last (same inputs, same thread count), for one image per batch (detection,
    `full`) and for the image with its mirror image in one batch (what `10` and training do)."""
    import numpy as np
    import torch

    from detector.core.backbones import build_backbone
    from detector.core.features import FeatureExtractor
    from detector.images import load_image

    backbone = build_backbone(cfg.backbone)
    out = {}
    for cl in (False, True):
        ex = FeatureExtractor(backbone, [cfg.classifier.full_scale], cfg.features.max_size, "cpu", channels_last=cl)
        xs = []
        for p in paths:
            img = load_image(p)
            xs.append(ex.prepare(img, ex.factors(img.shape[1], img.shape[0])[0]))
        with torch.inference_mode():
            for batch in (1, 2):
                inputs = [x[None] if batch == 1 else torch.stack([x, x.flip(-1)]) for x in xs]
                ex.run_trunk(inputs[0])  # warm-up
                times = []
                for _ in range(repeats):
                    for x in inputs:
                        t = time.perf_counter()
                        ex.run_trunk(x)
                        times.append((time.perf_counter() - t) / batch)
                out[(cl, batch)] = float(np.median(times))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str((common.ROOT / ".." / "shared" / "datasets" / "flowers17").resolve()))
    ap.add_argument("--config", default=str(common.ROOT / "configs" / "flowers17.yaml"))
    ap.add_argument("--modes", default="crop224,multisize,scales", help="classifier.input values to train")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(common.ROOT / "data" / "bench" / "classification"),
                    help="work folder (wiped at the start if this script made it)")
    args = ap.parse_args(argv)

    from detector.config import load_config
    from detector.datasets.imagefolder import load_image_folder

    common.print_header("classification: view schemes after fixed-size, multi-size and every-test-scale training")
    out = Path(args.out).resolve()
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            ap.error(f"{out} exists, is not empty and was not made by this script")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by bench/classification.py\n")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    print(f"dataset {args.dataset}; config {args.config}; overrides {args.overrides or 'none'}; work folder {out}")
    rows, summary = [], {}
    for mode in modes:
        run = out / mode
        sets = [*args.overrides, f"classifier.input={mode}"]
        train_s, train_mb = run_tool(["tools/train_classifier.py", "--dataset", args.dataset, "--out", str(run),
                                      "--cache", str(out / f"cache_{mode}"), "--config", args.config, "--quiet",
                                      "--set", *sets], out / f"train_{mode}.log")
        test_s, test_mb = run_tool(["tools/test_classifier.py", "--model", str(run / "model.safetensors"),
                                    "--dataset", args.dataset, "--views", "all", "--quiet", "--out",
                                    str(run / "test")], out / f"test_{mode}.log")
        res = {r["scheme"]: r for r in json.loads((run / "test" / "results.json").read_text())}
        summary[mode] = res
        print(f"[{time.strftime('%H:%M:%S')}] {mode}: trained in {train_s:.0f} s (peak RSS {train_mb:.0f} MB); "
              f"all schemes tested in {test_s:.0f} s (peak RSS {test_mb:.0f} MB)", flush=True)
        for name, r in res.items():
            rows.append([mode, name, str(r["images"]), f"{r['top1_err']:.4f}", f"{r['top5_err']:.4f}",
                         f"{r['s_per_image']:.3f}", f"{train_s / 60:.1f}"])
    print()
    print(common.table(["training", "views", "images", "top1_err", "top5_err", "s/image", "train min"], rows))
    print()
    cfg = load_config(args.config, args.overrides)
    data = load_image_folder(args.dataset, "test")
    c = cfg.classifier
    pix = conv_pixel_ratio(data.paths, c.view_scale, c.view_size, cfg.features.max_size)
    for mode, res in summary.items():
        t10, tcrop = res["10"]["s_per_image"], res["10crop"]["s_per_image"]
        d10 = 100 * abs(res["10"]["top1_err"] - res["10crop"]["top1_err"])
        dmc = 100 * (res["multi"]["top1_err"] - res["center"]["top1_err"])
        print(f"{mode}: speed_10crop_over_10 = {tcrop / t10:.2f} (conv pixels 10crop/10 = {pix:.2f}); "
              f"|10 - 10crop| top-1 = {d10:.2f} points; multi - center top-1 = {dmc:+.2f} points; "
              f"multi top-1 = {res['multi']['top1_err']:.4f}; one test image = {100 / res['multi']['images']:.2f} points")
    t = channels_last_speedup(cfg, data.paths[::max(1, len(data.paths) // 24)][:24])
    for batch in (1, 2):
        print(f"trunk at shorter side {c.full_scale}, {batch} image(s) per batch: NCHW {t[(False, batch)] * 1000:.1f} ms, "
              f"channels-last {t[(True, batch)] * 1000:.1f} ms per image (median): "
              f"channels_last_speedup_batch{batch} = {t[(False, batch)] / t[(True, batch)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
