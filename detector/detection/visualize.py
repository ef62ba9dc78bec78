"""Draw detections on an image and save a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from detector.images import load_image

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]


def tag_position(x1: float, y1: float, w: float, h: float, width: int, height: int) -> tuple[float, float]:
    """Top-left corner of a w x h label tag for a box whose top-left is (x1, y1): above the box
    when it fits, else inside its top edge, and always shifted to stay within the image."""
    ty = y1 - h if y1 - h >= 0 else y1
    return max(0.0, min(x1, width - w)), max(0.0, min(ty, height - h))


def draw_detections(image, result: dict, score_thresh: float = 0.0, gt_boxes: Sequence | None = None) -> Image.Image:
    """A copy of `image` with the detections scoring above `score_thresh` drawn (and GT in white, dashed-free)."""
    im = Image.fromarray(load_image(image))
    d = ImageDraw.Draw(im)
    if gt_boxes is not None:
        for b in np.asarray(gt_boxes).reshape(-1, 4):
            d.rectangle([float(v) for v in b], outline=(255, 255, 255), width=1)
    for box, score, label, name in zip(result["boxes"], result["scores"], result["labels"], result["label_names"]):
        if score < score_thresh:
            continue
        c = _PALETTE[int(label) % len(_PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        d.rectangle([x1, y1, x2, y2], outline=c, width=2)
        tag = f"{name} {score:.2f}"
        tx, ty = tag_position(x1, y1, d.textlength(tag) + 4, 11, im.width, im.height)
        d.rectangle([tx, ty, tx + d.textlength(tag) + 4, ty + 11], fill=c)
        d.text((tx + 2, ty), tag, fill=(255, 255, 255))
    return im


def save_detections(image, result: dict, path: str | Path, score_thresh: float = 0.0, gt_boxes=None) -> Path:
    """The drawn image as a PNG at `path`, written atomically."""
    import io

    from detector.cache import atomic_write_bytes

    buf = io.BytesIO()
    draw_detections(image, result, score_thresh, gt_boxes).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
