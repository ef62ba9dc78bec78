"""Console entry points (installed by setup.cfg)."""
import argparse
import sys
from pathlib import Path

DETECT_DOC = """Detect objects in images with a trained model; print them and write PNGs with boxes.

  spp-detect --model data/runs/demo/model.safetensors image1.jpg [image2.png ...] --out data/detections
"""


def detect_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=DETECT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="data/detections", help="folder for the drawn PNGs")
    ap.add_argument("--thresh", type=float, default=0.0, help="print and draw detections scoring above this")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="test.KEY=VALUE",
                    help="test-time settings, e.g. --set test.max_per_image=50 (after the images)")
    args = ap.parse_args(argv)

    import detector
    from detector.config import apply_test_overrides
    from detector.visualize import save_detections

    model = detector.load(args.model)
    apply_test_overrides(model.cfg, args.overrides)
    for path in args.images:
        res = model.detect(path)
        keep = res["scores"] >= args.thresh
        print(f"{path}: {int(keep.sum())} detections (score >= {args.thresh})")
        for b, s, n in zip(res["boxes"][keep], res["scores"][keep], [n for n, k in zip(res["label_names"], keep) if k]):
            print(f"  {n:<16} {s:7.3f}  [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}]")
        png = save_detections(path, res, Path(args.out) / (Path(path).stem + ".png"), args.thresh)
        print(f"  drawn: {png}")
    return 0


def detect_cli() -> int:
    return run_tool(detect_main)


def parse_training_args(parser: argparse.ArgumentParser, argv=None):
    """(args, config) of a training tool: its arguments plus --config / --set, logging set up,
    the resolved config printed (the run folder keeps a copy)."""
    import logging

    from .config import add_config_args, load_config

    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    print("config:\n" + cfg.dump())
    return args, cfg


def run_tool(main, argv=None) -> int:
    """Run a tool's main(); bad input (detector.errors.InputError: config, dataset, image,
    weights, model file) prints one line naming the problem and exits with 2, no traceback.
    So does a missing file: the tools' paths come from the user."""
    from .errors import InputError

    try:
        return main(argv)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
