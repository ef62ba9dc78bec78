"""Console entry points (installed by setup.cfg) and the tools' error boundary."""
import argparse
import os
import sys
import warnings
from pathlib import Path

DETECT_DOC = """Detect objects in images with a trained model; print them and write PNGs with boxes.

  spp-detect --model data/runs/demo/model.safetensors image1.jpg [image2.png ...] --out data/detections

Each drawn PNG mirrors its image's path relative to the folder all inputs share, so a/x.jpg
and b/x.jpg become OUT/a/x.png and OUT/b/x.png.  An image that cannot be read is reported on
one line and skipped; the others are still processed.  Exit status: 0 when every image was
processed, 1 when some could not be (the last line says how many), 2 for bad input before
any image (model file, --set).
"""


def output_paths(images: list[str], out_dir: Path, suffix: str = ".png") -> list[Path]:
    """One output path per input, unique for distinct inputs: the input's path relative to the
    inputs' common folder, under out_dir, with `suffix`."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in images]
    root = os.path.commonpath(parents) if parents else ""
    return [out_dir / Path(os.path.relpath(os.path.abspath(p), root)).with_suffix(suffix) for p in images]


def detect_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=DETECT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="data/detections", help="folder for the drawn PNGs (input paths mirrored)")
    ap.add_argument("--thresh", type=float, default=0.0, help="print and draw detections scoring above this")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="test.KEY=VALUE",
                    help="test-time settings, e.g. --set test.max_per_image=50 (after the images)")
    ap.add_argument("--proposals", default=None, metavar="FILE",
                    help="published proposals (.mat or our .npz), keyed by each image's file name without extension")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    args = ap.parse_args(argv)

    import detector
    from detector.errors import InputError
    from detector.proposals import load_proposals
    from detector.detection.visualize import save_detections

    model = detector.load(args.model, device=args.device)
    model.configure_test(args.overrides)
    props = load_proposals(args.proposals, [Path(p).stem for p in args.images]) if args.proposals else {}
    failed = []
    for path, png in zip(args.images, output_paths(args.images, Path(args.out))):
        try:
            res = model.detect(path, proposals=props.get(Path(path).stem))
        except InputError as e:  # one bad image must not stop the rest
            print(f"error: {e}; skipped", file=sys.stderr)
            failed.append(path)
            continue
        keep = res["scores"] >= args.thresh
        print(f"{path}: {int(keep.sum())} detections (score >= {args.thresh})")
        names = [n for n, k in zip(res["label_names"], keep) if k]
        for b, s, n in zip(res["boxes"][keep], res["scores"][keep], names):
            print(f"  {n:<16} {s:7.3f}  [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}]")
        print(f"  drawn: {save_detections(path, res, png, args.thresh)}")
    if failed:
        print(f"{len(failed)} of {len(args.images)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def detect_cli() -> int:
    return run_tool(detect_main)


def parse_training_args(parser: argparse.ArgumentParser, argv=None):
    """(args, config) of a training tool: its arguments plus --config / --set (and --device, if
    the tool has it), logging set up, the resolved config printed once (by torchrun's rank 0;
    the run folder keeps a copy)."""
    import logging

    from detector.config import add_config_args, load_config

    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = getattr(args, "device", None)
    cfg = load_config(args.config, args.overrides + ([f"features.device={device}"] if device else []))
    if os.environ.get("RANK", "0") == "0":
        print("config:\n" + cfg.dump())
    return args, cfg


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def run_tool(main, argv=None) -> int:
    """Run a tool's main(); bad input (detector.errors.InputError: config, dataset, image,
    weights, model file) prints one line naming the problem and exits with 2, no traceback.
    So does a missing file: the tools' paths come from the user.  Warnings print as one line
    each, without the source line that raised them."""
    from detector.errors import InputError

    warnings.formatwarning = _one_line_warning
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as e:
        from detector.distributed import world

        print(f"error: {world()}: {e}" if world().distributed else f"error: {e}", file=sys.stderr)
        return 2
