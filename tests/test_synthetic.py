"""The built-in synthetic dataset (detector/datasets/synthetic.py): determinism, layout, balance,
and annotations that agree with the drawn pixels."""
from __future__ import annotations

import colorsys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detector.datasets.synthetic import STYLES, make_synthetic, render_image
from detector.datasets.voc import load_voc
from detector.images import load_image

W, H = 320, 240
HUES = {"circle": 0.0, "cross": 45.0, "square": 220.0, "triangle": 120.0}  # red, orange, blue, green (the spec)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", num_train=80, num_test=20, seed=0)


@pytest.fixture(scope="module")
def trainval(synth):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the generator's own data must load without a single repair
        return load_voc(synth, "trainval")


def test_deterministic_bytes(tmp_path):
    a = _files(make_synthetic(tmp_path / "a", num_train=6, num_test=2, seed=3))
    b = _files(make_synthetic(tmp_path / "b", num_train=6, num_test=2, seed=3))
    c = _files(make_synthetic(tmp_path / "c", num_train=6, num_test=2, seed=4))
    assert len(a) == 2 * 8 + 4 + 2 and a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)
    assert sum(a[k] != c[k] for k in a if k.endswith(".xml")) >= 6


def test_reuse_and_regenerate(tmp_path):
    root = make_synthetic(tmp_path / "d", num_train=5, num_test=2, seed=0)
    stamp = (root / "JPEGImages" / "000001.jpg").stat().st_mtime_ns
    make_synthetic(root, num_train=5, num_test=2, seed=0)
    assert (root / "JPEGImages" / "000001.jpg").stat().st_mtime_ns == stamp  # same parameters: skipped
    make_synthetic(root, num_train=4, num_test=1, seed=0)
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 5
    assert len((root / "ImageSets" / "Main" / "trainval.txt").read_text().split()) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic(tmp_path / "other", num_train=2, num_test=1)
    with pytest.raises(ValueError, match="classes must be"):
        make_synthetic(tmp_path / "e", classes=["circle", "hexagon"])


def test_layout_and_splits(synth, trainval):
    split = {s: (synth / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert len(split["trainval"]) == 80 and len(split["test"]) == 20 and len(split["val"]) == 16
    assert sorted(split["train"] + split["val"]) == sorted(split["trainval"])
    assert not set(split["trainval"]) & set(split["test"])
    assert (synth / "classes.txt").read_text().split() == trainval.class_names == sorted(STYLES)
    test = load_voc(synth, "test")
    assert test.class_names == trainval.class_names


def test_boxes_sizes_counts_and_overlap(trainval):
    n_per_image = []
    for r in trainval:
        assert (r.width, r.height) == (W, H) and load_image(r.path).shape == (H, W, 3)
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
        sides = np.concatenate([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]])
        assert sides.min() >= 20 and sides.max() <= 140  # shapes may lose a pixel row to pixel-centre sampling
        n_per_image.append(len(b))
        iou = box_iou(torch.from_numpy(b), torch.from_numpy(b)).fill_diagonal_(0)
        assert float(iou.max()) <= 0.25 + 1e-6
    assert min(n_per_image) >= 1 and max(n_per_image) <= 6
    assert len(set(n_per_image)) >= 5  # the count varies
    widths = np.concatenate([r.boxes[:, 2] - r.boxes[:, 0] for r in trainval])
    heights = np.concatenate([r.boxes[:, 3] - r.boxes[:, 1] for r in trainval])
    aspect = widths / heights
    assert widths.min() < 40 and widths.max() > 100  # varied scale
    assert aspect.min() < 0.8 and aspect.max() > 1.25  # varied aspect ratio


def test_class_balance_and_occlusion(synth, trainval):
    labels = np.concatenate([r.labels for r in trainval])
    counts = np.bincount(labels, minlength=len(trainval.class_names))
    assert counts.min() >= 0.6 * counts.mean(), counts
    # Some objects are partly hidden (and say so in the xml, as VOC does), most are not.
    xml = "".join((synth / "Annotations" / f"{r.image_id}.xml").read_text() for r in trainval)
    occluded, total = xml.count("<occluded>1</occluded>"), xml.count("<object>")
    assert total == len(labels) and 0.03 * total < occluded < 0.5 * total


def _isolated(boxes: np.ndarray, k: int, margin: int = 13) -> bool:
    x1, y1, x2, y2 = boxes[k]
    if x1 - margin < 0 or y1 - margin < 0 or x2 + margin > W or y2 + margin > H:
        return False
    others = np.delete(boxes, k, 0)
    return not ((others[:, 0] < x2 + margin) & (others[:, 2] > x1 - margin)
                & (others[:, 1] < y2 + margin) & (others[:, 3] > y1 - margin)).any()


def _patch(im: np.ndarray, x: int, y: int) -> np.ndarray:
    return im[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)


def _edge_checks(im: np.ndarray, box) -> tuple[list[bool], list[bool]]:
    """At each side's midpoint: (inside differs from just outside, just outside matches further out)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    pts = [((x1 + 2, my), (x1 - 4, my), (x1 - 8, my)), ((x2 - 3, my), (x2 + 3, my), (x2 + 7, my)),
           ((mx, y1 + 2), (mx, y1 - 4), (mx, y1 - 8)), ((mx, y2 - 3), (mx, y2 + 3), (mx, y2 + 7))]
    dist = lambda p, q: float(np.abs(_patch(im, *p) - _patch(im, *q)).sum())  # noqa: E731
    return [dist(a, o) > 40 for a, o, _ in pts], [dist(o, f) < 40 for _, o, f in pts]


def test_annotations_match_drawn_pixels(trainval):
    """Boxes sit on the drawn shapes: the centre is not background, the box is neither too big nor too small.

    Ellipses, rectangles and crosses reach the middle of every side of their box, so just inside
    each side's midpoint is object and just outside is smooth background.  Boxes grown or shrunk
    by 4 px must fail the same checks, which shows the checks can see a wrong box."""
    centre_ok, contrast, smooth, grown, shrunk = [], [], [], [], []
    hue_err = []
    for r in trainval:
        im = load_image(r.path).astype(np.float32)
        b = r.boxes.astype(int)
        for k, box in enumerate(b):
            if not _isolated(b, k):
                continue
            name = trainval.class_names[r.labels[k]]
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            centre = _patch(im, cx, cy)
            outs = [(box[0] - 4, cy), (box[2] + 3, cy), (cx, box[1] - 4), (cx, box[3] + 3)]
            centre_ok.append(min(float(np.abs(centre - _patch(im, *o)).sum()) for o in outs) > 40)
            h = colorsys.rgb_to_hsv(*(centre / 255.0))[0] * 360
            hue_err.append(abs((h - HUES[name] + 180) % 360 - 180))
            if name == "triangle":  # its apex and slanted sides need not touch the side midpoints
                continue
            c, s = _edge_checks(im, box)
            contrast += c
            smooth += s
            grown += _edge_checks(im, box + np.array([-4, -4, 4, 4]))[0]
            shrunk += _edge_checks(im, box + np.array([4, 4, -4, -4]))[1]
    assert len(centre_ok) >= 60 and len(contrast) >= 4 * 40
    assert np.mean(centre_ok) == 1.0
    assert max(hue_err) < 25  # hue jitter is +-15 degrees around the class hue
    assert np.mean(contrast) >= 0.97 and np.mean(smooth) >= 0.9
    assert np.mean(grown) < 0.5 and np.mean(shrunk) < 0.5


def test_render_matches_files(synth, trainval):
    """The JPEG on disk is the rendered image (up to compression), and the xml boxes are its objects."""
    smooth = lambda a: cv2.GaussianBlur(a.astype(np.float32), (0, 0), 2.0)  # noqa: E731  (JPEG drops pixel noise)
    for i in (0, 7):
        rgb, objects = render_image(0, i, (W, H), sorted(STYLES))
        rec = trainval.records[i]
        on_disk = smooth(load_image(rec.path))
        assert np.abs(on_disk - smooth(rgb)).mean() < 2
        assert np.abs(on_disk - smooth(render_image(0, i + 1, (W, H), sorted(STYLES))[0])).mean() > 10
        np.testing.assert_array_equal(rec.boxes, np.array([o["box"] for o in objects], np.float32).reshape(-1, 4))
        assert [trainval.class_names[k] for k in rec.labels] == [o["name"] for o in objects]
