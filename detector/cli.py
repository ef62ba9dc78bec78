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
    from detector.detection.batch import detect_files

    model = detector.load(args.model, device=args.device)
    model.configure_test(args.overrides)
    failed = detect_files(model, args.images, Path(args.out), args.thresh, args.proposals)
    return 1 if failed else 0


def detect_cli() -> int:
    return run_tool(detect_main)


def parse_training_args(parser: argparse.ArgumentParser, argv=None, classification: bool = False):
    """(args, config) of a training tool: its arguments plus --config / --set (and --device, if
    the tool has it), logging set up, the resolved config printed once (by torchrun's rank 0;
    the run folder keeps a copy).  `classification`: the config starts from the classification
    defaults (detector.classification.defaults) rather than detection's, and a line before it
    says which."""
    import logging

    from detector.config import add_config_args, load_config

    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = getattr(args, "device", None)
    overrides = args.overrides + ([f"features.device={device}"] if device else [])
    if classification:
        from detector.classification.defaults import load_classification_config

        cfg, line = load_classification_config(args.config, overrides)
    else:
        cfg, line = load_config(args.config, overrides), "config:"
    if os.environ.get("RANK", "0") == "0":
        print(line + "\n" + cfg.dump())
    return args, cfg


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' (0-based i) -> (i, N), with a clear error for anything else."""
    from detector.errors import InputError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need 0 <= i < N")
    return i, n


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def run_tool(main, argv=None) -> int:
    """Run a tool's main(); bad input (detector.errors.InputError: config, dataset, image,
    weights, model file) prints one line naming the problem and exits with 2, no traceback.
    So does a missing file (the tools' paths come from the user) and a full, over-quota or
    read-only disk (detector.errors.DiskError, or any such OSError).  Warnings print as one
    line each, without the source line that raised them."""
    from detector.cache import DISK_ERRNOS, disk_error
    from detector.errors import InputError

    warnings.formatwarning = _one_line_warning
    try:
        return main(argv)
    except OSError as e:  # a full disk met by a write that no library wrapper saw
        if e.errno not in DISK_ERRNOS and not isinstance(e, FileNotFoundError):
            raise
        return _error(disk_error(e, Path(e.filename).parent if e.filename else "the output folder")
                      if e.errno in DISK_ERRNOS else e)
    except InputError as e:
        return _error(e)


def _error(e: Exception) -> int:
    from detector.distributed import world

    print(f"error: {world()}: {e}" if world().distributed else f"error: {e}", file=sys.stderr)
    return 2
