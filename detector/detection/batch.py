"""Detection over a list of image files, as `tools/detect.py` (`spp-detect`) runs it: each
image's detections printed and drawn into a PNG; an image that cannot be read is reported on
one line and skipped, and the others are still processed."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from detector.errors import InputError


def output_paths(images: list[str], out_dir: Path, suffix: str = ".png") -> list[Path]:
    """One output path per input, unique for distinct inputs: the input's path relative to the
    inputs' common folder, under out_dir, with `suffix`."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in images]
    root = os.path.commonpath(parents) if parents else ""
    return [out_dir / Path(os.path.relpath(os.path.abspath(p), root)).with_suffix(suffix) for p in images]


def detect_files(model, images: Sequence[str], out_dir: Path, thresh: float = 0.0,
                 proposals_file: Optional[str] = None) -> list[str]:
    """Detect, print and draw every image (PNGs under `out_dir`, see output_paths); returns the
    images that could not be processed, after a last line that counts them."""
    from detector.detection.visualize import save_detections
    from detector.proposals import load_proposals

    props = load_proposals(proposals_file, [Path(p).stem for p in images]) if proposals_file else {}
    if props and model.learned_proposals:
        warnings.warn(f"the model's proposals are learned (proposals.method: rpn); {proposals_file}'s are used "
                      "instead")
    failed = []
    for path, png in zip(images, output_paths(list(images), Path(out_dir))):
        try:
            res = model.detect(path, proposals=props.get(Path(path).stem))
        except InputError as e:  # one bad image must not stop the rest
            print(f"error: {e}; skipped", file=sys.stderr)
            failed.append(path)
            continue
        keep = res["scores"] >= thresh
        print(f"{path}: {int(keep.sum())} detections (score >= {thresh})")
        names = [n for n, k in zip(res["label_names"], keep) if k]
        for b, s, n in zip(res["boxes"][keep], res["scores"][keep], names):
            print(f"  {n:<16} {s:7.3f}  [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}]")
        print(f"  drawn: {save_detections(path, res, png, thresh)}")
    if failed:
        print(f"{len(failed)} of {len(images)} images failed: {', '.join(failed)}", file=sys.stderr)
    return failed
