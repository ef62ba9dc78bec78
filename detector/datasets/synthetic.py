"""The built-in synthetic detection dataset, written in the VOC layout.

Each class has its own shape, texture and hue (with jitter, so colour alone is not a
pixel lookup):

    circle    ellipse     dotted        red
    square    rectangle   striped       blue
    triangle  triangle    checkered     green
    cross     plus sign   ringed        yellow-orange

Objects are 24-140 px per side with aspect ratios 0.6-1.7, 1-6 per image, drawn
over smooth random low-saturation gradients with blotches, faint strokes and pixel
noise.  Later objects may hide part of earlier ones (at most 35% of an object's
pixels, box IoU at most 0.25 so NMS at 0.3 never has to suppress a true object);
like VOC, an occluded object keeps its full box and gets <occluded>1</occluded>.
Objects are listed in drawing order (later ones on top).  Boxes are the tight boxes
of the drawn shapes, fully inside the image.

Image i depends only on (seed, i), so files are byte-identical for the same seed.
Splits: trainval = the first `num_train` images (every 5th of them is in val, the
rest in train), test = the next `num_test`.  root/classes.txt lists the classes (sorted, the
order `load_voc` gives them),
root/synthetic.json the parameters: a later call with the same parameters skips the
work, one with other parameters regenerates.
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from detector.cache import atomic_write_json, make_dir, writing_to
from detector.datasets.validate import DatasetError

GENERATOR_VERSION = 1
PARAMS_FILE = "synthetic.json"
MIN_SIDE, MAX_SIDE = 24, 140
MAX_OBJECTS = 6
MAX_IOU = 0.25  # between any two object boxes
MIN_VISIBLE = 0.65  # fraction of an object's pixels left visible by later objects
JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Style:
    shape: str
    texture: str
    hue: float  # degrees


STYLES: dict[str, _Style] = {
    "circle": _Style("ellipse", "dots", 0.0),
    "square": _Style("rect", "stripes", 220.0),
    "triangle": _Style("triangle", "checks", 120.0),
    "cross": _Style("cross", "rings", 45.0),
}
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "cross", "square", "triangle")
HUE_JITTER = 15.0  # degrees either way; classes sit >= 45 degrees apart


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32) * 255.0


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth low-saturation gradient + blotches + faint strokes (float32 RGB)."""
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85))
    a = rng.uniform(0, 2 * np.pi)
    # Everything smooth is built on an 8x smaller grid and upsampled once (full-size numpy is slow here).
    sw, sh = w // 8 + 2, h // 8 + 2
    t = np.arange(sw, dtype=np.float32)[None, :] * np.cos(a) + np.arange(sh, dtype=np.float32)[:, None] * np.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    small = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    # Blotches: a coarse random grid, mostly brightness, a little colour.
    gh, gw = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    coarse = rng.normal(0, 1, (gh, gw, 1)) * 22 + rng.normal(0, 1, (gh, gw, 3)) * 5
    small += cv2.resize(coarse.astype(np.float32), (sw, sh), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(0, 5))):
        col = tuple(float(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.2, 0.9)))
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p0, p1, col, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            axes = (int(rng.integers(8, 60)), int(rng.integers(8, 60)))
            cv2.ellipse(img, p0, axes, float(rng.uniform(0, 180)), 0, 360, col, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_mask(rng: np.random.Generator, shape: str, w: int, h: int) -> np.ndarray:
    # Pixel centres, so the mask's tight box is the annotated box.
    py, px = (g.astype(np.float32) + 0.5 for g in np.ogrid[0:h, 0:w])
    if shape == "ellipse":
        return ((px - w / 2) / (w / 2)) ** 2 + ((py - h / 2) / (h / 2)) ** 2 <= 1.0
    if shape == "rect":
        return np.ones((h, w), bool)
    if shape == "triangle":
        ax = w * rng.uniform(0.3, 0.7)  # apex position along the top edge
        if rng.random() < 0.5:
            py = h - py  # apex at the bottom instead
        left, right = ax * (1 - py / h), ax + (w - ax) * (py / h)
        return (px >= left) & (px <= right)
    if shape == "cross":
        tx, ty = rng.uniform(0.3, 0.45) * w / 2, rng.uniform(0.3, 0.45) * h / 2
        return (np.abs(px - w / 2) <= tx) | (np.abs(py - h / 2) <= ty)
    raise ValueError(f"unknown shape {shape}")


def _texture(rng: np.random.Generator, texture: str, w: int, h: int) -> np.ndarray:
    """Boolean map: True where the second (darker) tone goes."""
    yy, xx = (g.astype(np.float32) for g in np.ogrid[0:h, 0:w])
    if texture == "dots":
        p, r = rng.uniform(7, 10), rng.uniform(1.8, 2.8)
        dx = (xx + rng.uniform(0, p)) % p - p / 2
        dy = (yy + rng.uniform(0, p)) % p - p / 2
        return dx * dx + dy * dy <= r * r
    if texture == "stripes":
        p, a = rng.uniform(6, 10), rng.uniform(0, np.pi)
        return ((xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, p)) % p) < p / 2
    if texture == "checks":
        c = rng.uniform(5, 8)
        return ((np.floor((xx + rng.uniform(0, c)) / c) + np.floor((yy + rng.uniform(0, c)) / c)) % 2) == 1
    if texture == "rings":
        p = rng.uniform(6, 9)
        return (np.hypot(xx - w / 2, yy - h / 2) % p) < p / 2
    raise ValueError(f"unknown texture {texture}")


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a against boxes b (tiny arrays inside the placement loop; torchvision would cost more)."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def render_image(seed: int, index: int, image_size: tuple[int, int] = (320, 240),
                 classes: Sequence[str] = DEFAULT_CLASSES) -> tuple[np.ndarray, list[dict]]:
    """Draw synthetic image `index`: (HxWx3 uint8 RGB, objects in drawing order).

    Each object is {"label", "name", "box": [x1, y1, x2, y2] (ints, our convention), "occluded": bool}.
    """
    w_img, h_img = image_size
    rng = np.random.default_rng([seed, index])
    img = _background(rng, w_img, h_img)
    owner = np.full((h_img, w_img), -1, np.int32)  # which object is visible at each pixel
    areas: list[int] = []
    visible = np.zeros(0, np.int64)  # visible pixels per object
    objects: list[dict] = []
    max_side_w, max_side_h = min(MAX_SIDE, w_img), min(MAX_SIDE, h_img)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(len(classes)))
        style = STYLES[classes[label]]
        for _try in range(30):
            s = np.exp(rng.uniform(np.log(MIN_SIDE * 1.05), np.log(MAX_SIDE * 0.8)))
            ar = np.exp(rng.uniform(np.log(0.6), np.log(1.7)))
            w = int(np.clip(round(s * np.sqrt(ar)), MIN_SIDE, max_side_w))
            h = int(np.clip(round(s / np.sqrt(ar)), MIN_SIDE, max_side_h))
            x0, y0 = int(rng.integers(0, w_img - w + 1)), int(rng.integers(0, h_img - h + 1))
            mask = _shape_mask(rng, style.shape, w, h)
            ys, xs = np.nonzero(mask)
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float64)
            if objects and _box_iou(box, np.array([o["box"] for o in objects], np.float64)).max() > MAX_IOU:
                continue
            region = owner[y0:y0 + h, x0:x0 + w]
            hidden = np.bincount(region[mask & (region >= 0)], minlength=len(objects))
            if len(objects) and ((visible - hidden) < MIN_VISIBLE * np.asarray(areas)).any():
                continue
            break
        else:
            continue  # no room for this object
        hue = style.hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
        sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)
        tone1 = _hsv(hue, sat, val)
        tone2 = _hsv(hue + rng.uniform(-5, 5), sat, val * rng.uniform(0.45, 0.6))
        second = _texture(rng, style.texture, w, h)
        colours = np.where(second[..., None], tone2, tone1)
        # A soft brightness ramp across the object, like uneven lighting.
        g = rng.uniform(-0.12, 0.12, 2)
        yy, xx = (g.astype(np.float32) for g in np.ogrid[0:h, 0:w])
        colours = colours * (1 + g[0] * (xx / w - 0.5) + g[1] * (yy / h - 0.5))[..., None]
        patch = img[y0:y0 + h, x0:x0 + w]
        patch[mask] = colours[mask]
        owner[y0:y0 + h, x0:x0 + w][mask] = len(objects)
        areas.append(int(mask.sum()))
        visible = np.append(visible - hidden, areas[-1])
        objects.append({"label": label, "name": classes[label], "box": [int(v) for v in box], "occluded": False})
    for k, o in enumerate(objects):
        o["occluded"] = bool(visible[k] < areas[k])
    img = cv2.GaussianBlur(img, (0, 0), 0.6)  # soften the hard drawn edges a little
    # Pixel noise: the sum of two uniform bytes is triangular, close enough to Gaussian and 5x cheaper.
    u = rng.integers(0, 256, (2, *img.shape), dtype=np.uint8)
    noise = cv2.add(u[0], u[1], dtype=cv2.CV_32F) - np.float32(255)
    img = cv2.scaleAdd(noise, rng.uniform(3, 8) / 104.5, img)  # 104.5: std of that sum
    # max(., 0) then a saturating, rounding cast to uint8 (OpenCV's is much faster than numpy's clip/round).
    return cv2.convertScaleAbs(cv2.max(img, 0.0)), objects


def _voc_xml(image_id: str, w: int, h: int, objects: list[dict]) -> str:
    parts = [f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{image_id}.jpg</filename>\n"
             "\t<source>\n\t\t<database>detector synthetic</database>\n\t</source>\n"
             f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
             "\t<segmented>0</segmented>\n"]
    for o in objects:
        x1, y1, x2, y2 = o["box"]  # to VOC's 1-based inclusive pixels
        parts.append(f"\t<object>\n\t\t<name>{o['name']}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>0</truncated>\n\t\t<occluded>{int(o['occluded'])}</occluded>\n"
                     f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1 + 1}</xmin>\n"
                     f"\t\t\t<ymin>{y1 + 1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n"
                     "\t\t</bndbox>\n\t</object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


_ENTRIES = ("Annotations", "ImageSets", "JPEGImages", "classes.txt")


def _params(num_train: int, num_test: int, image_size, seed: int, classes) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_test": int(num_test),
            "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed), "classes": list(classes),
            "jpeg_quality": JPEG_QUALITY}


def _is_complete(root: Path, params: dict) -> bool:
    try:
        stored = json.loads((root / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    n = params["num_train"] + params["num_test"]
    return (stored == params and len(list((root / "Annotations").glob("*.xml"))) == n
            and len(list((root / "JPEGImages").glob("*.jpg"))) == n
            and all((root / "ImageSets" / "Main" / f"{s}.txt").is_file() for s in ("train", "val", "trainval", "test")))


def make_synthetic(root: str | os.PathLike, num_train: int = 200, num_test: int = 100,
                   image_size: tuple[int, int] = (320, 240), seed: int = 0,
                   classes: Sequence[str] = DEFAULT_CLASSES) -> Path:
    """Write (or reuse) the synthetic VOC-layout dataset at `root`; returns `root` as a Path.

    num_train images make up trainval (every 5th of them is val), num_test make up test.
    classes: names from `STYLES` (default all four), used in sorted order.  An existing dataset written with
    the same parameters is left as it is; one with other parameters is replaced.  A
    non-empty `root` that is not a synthetic dataset is never touched (FileExistsError).
    """
    root = Path(root)
    # Sorted, so classes.txt agrees with load_voc's label order when it is given no class_names.
    classes = sorted(str(c) for c in classes)
    unknown = [c for c in classes if c not in STYLES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {sorted(STYLES)}, got {classes}")
    w, h = int(image_size[0]), int(image_size[1])
    if w < MIN_SIDE + 1 or h < MIN_SIDE + 1:
        raise ValueError(f"image_size {image_size} is too small for objects of at least {MIN_SIDE} px")
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    params = _params(num_train, num_test, (w, h), seed, classes)
    if _is_complete(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not (root / PARAMS_FILE).is_file():
        raise FileExistsError(f"{root}: exists and is not a synthetic dataset written by make_synthetic; "
                              "choose another directory or remove it")
    make_dir(root.parent)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        with writing_to(root.parent, f"the synthetic dataset {root.name}"):
            _write_all(tmp, num_train, num_test, (w, h), seed, classes)
        root.mkdir(exist_ok=True)
        # Drop the marker first: an interrupted swap must not look complete.
        (root / PARAMS_FILE).unlink(missing_ok=True)
        for name in _ENTRIES:
            old = root / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            os.replace(tmp / name, old)
        atomic_write_json(root / PARAMS_FILE, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_all(out: Path, num_train: int, num_test: int, image_size: tuple[int, int], seed: int,
               classes: list[str]) -> None:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(1, num_train + num_test + 1)]
    for i, image_id in enumerate(ids):
        rgb, objects = render_image(seed, i, image_size, classes)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise DatasetError(f"{out}: JPEG encoding failed for image {image_id}")
        (out / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
        (out / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, *image_size, objects))
    trainval, test = ids[:num_train], ids[num_train:]
    splits = {"trainval": trainval, "val": trainval[4::5], "test": test,
              "train": [x for k, x in enumerate(trainval) if k % 5 != 4]}
    for name, lst in splits.items():
        (out / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{x}\n" for x in lst))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
