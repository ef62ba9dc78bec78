"""Detection result files: the VOC devkit's per-class txt files and COCO results json.

Both take and return per-image lists (boxes in our 0-based continuous `x1, y1, x2, y2`), so a
test run can be written once and re-scored later without re-running detection.

Numbers are written with the shortest decimal that reads back to the same float64 (positional,
never exponent notation, which MATLAB's textread also reads), so reading a file back gives the
very values written and the same AP: float32 inputs come back exactly; float64 boxes may move by
one ulp of (1 + |x1|) through the devkit's +1 shift.  Readers return float64 boxes and scores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detector.cache import atomic_write_bytes
from detector.metrics.voc import check_detections


def _num(v: float) -> str:
    return np.format_float_positional(float(v), unique=True, trim="-")


def _check_names(values: Sequence[str], what: str) -> list[str]:
    out = [str(v) for v in values]
    for v in out:
        if not v or any(ch.isspace() for ch in v) or "/" in v or os.sep in v:
            raise ValueError(f"{what} {v!r} is empty or holds whitespace or a path separator; "
                             "the devkit's files cannot hold it")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}s are not unique")
    return out


def voc_results_path(out_dir: str | os.PathLike, split: str, class_name: str, comp_id: str = "comp4") -> Path:
    """The devkit's name for a class's result file: `<comp>_det_<split>_<class>.txt`."""
    return Path(out_dir) / f"{comp_id}_det_{split}_{class_name}.txt"


def write_voc_results(out_dir: str | os.PathLike, split: str, class_names: Sequence[str],
                      image_ids: Sequence[str], pred_boxes: Sequence, pred_labels: Sequence,
                      pred_scores: Sequence, comp_id: str = "comp4") -> list[Path]:
    """Write one devkit file per class (empty files included; the devkit expects all of them).

    Each line: `image_id score x1 y1 x2 y2`, boxes in the devkit's 1-based inclusive convention
    (our x1 + 1, y1 + 1, x2, y2).  Lines go image by image, in row order within an image: the
    devkit breaks score ties by line order, so this is the order `eval_detection_voc` uses too.
    Files are written atomically.  Returns the paths, in class order.
    """
    names = _check_names(class_names, "class name")
    ids = _check_names(image_ids, "image id")
    boxes, labels, scores = check_detections(pred_boxes, pred_labels, pred_scores)
    if len(boxes) != len(ids):
        raise ValueError(f"{len(ids)} image ids but detections for {len(boxes)} images")
    lines: list[list[str]] = [[] for _ in names]
    for i, iid in enumerate(ids):
        if len(labels[i]) and labels[i].max() >= len(names):
            raise ValueError(f"image {i} ({iid}): label {int(labels[i].max())} but only {len(names)} classes")
        for b, lab, s in zip(boxes[i], labels[i], scores[i]):
            lines[lab].append(f"{iid} {_num(s)} {_num(b[0] + 1)} {_num(b[1] + 1)} {_num(b[2])} {_num(b[3])}\n")
    paths = []
    for k, name in enumerate(names):
        p = voc_results_path(out_dir, split, name, comp_id)
        atomic_write_bytes(p, "".join(lines[k]).encode())
        paths.append(p)
    return paths


def read_voc_results(out_dir: str | os.PathLike, split: str, class_names: Sequence[str],
                     image_ids: Sequence[str], comp_id: str = "comp4"
                     ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Read devkit result files back into per-image (boxes, labels, scores), our convention.

    Within an image, detections come class by class, each class in file order; per class that
    is the order the devkit sees, so AP is unchanged.  Every class file must exist.
    """
    names = _check_names(class_names, "class name")
    ids = _check_names(image_ids, "image id")
    index = {iid: i for i, iid in enumerate(ids)}
    per_img: list[list[tuple[int, list[float]]]] = [[] for _ in ids]
    for k, name in enumerate(names):
        p = voc_results_path(out_dir, split, name, comp_id)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing result file (one per class is expected)")
        with open(p) as f:
            for ln, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 6:
                    raise ValueError(f"{p}:{ln}: expected 'image_id score x1 y1 x2 y2', got {line.strip()!r}")
                if parts[0] not in index:
                    raise ValueError(f"{p}:{ln}: unknown image id {parts[0]!r}")
                try:
                    vals = [float(x) for x in parts[1:]]
                except ValueError:
                    raise ValueError(f"{p}:{ln}: not a number in {line.strip()!r}") from None
                if not all(np.isfinite(vals)):
                    raise ValueError(f"{p}:{ln}: NaN or infinite value in {line.strip()!r}")
                per_img[index[parts[0]]].append((k, vals))
    boxes, labels, scores = [], [], []
    for dets in per_img:
        arr = np.array([v for _, v in dets], np.float64).reshape(-1, 5)
        b = arr[:, 1:5].copy()
        b[:, :2] -= 1.0
        boxes.append(b)
        labels.append(np.array([k for k, _ in dets], np.int64))
        scores.append(arr[:, 0].copy())
    return boxes, labels, scores


def coco_results_from_arrays(coco_image_ids: Sequence[int], category_ids: Sequence[int], pred_boxes: Sequence,
                             pred_labels: Sequence, pred_scores: Sequence) -> list[dict[str, Any]]:
    """COCO results list: one {"image_id", "category_id", "bbox": [x1, y1, x2-x1, y2-y1], "score"}
    per detection, image by image in row order.  coco_image_ids[i] is the COCO id of image i
    (e.g. `[id_map[r.image_id] for r in dataset]`); category_ids[label] the category id."""
    boxes, labels, scores = check_detections(pred_boxes, pred_labels, pred_scores)
    img_ids = [int(x) for x in coco_image_ids]
    cat_ids = [int(c) for c in category_ids]
    if len(img_ids) != len(boxes):
        raise ValueError(f"{len(img_ids)} COCO image ids but detections for {len(boxes)} images")
    out = []
    for i, iid in enumerate(img_ids):
        if len(labels[i]) and labels[i].max() >= len(cat_ids):
            raise ValueError(f"image {i}: label {int(labels[i].max())} but only {len(cat_ids)} category ids")
        for b, lab, s in zip(boxes[i], labels[i], scores[i]):
            out.append({"image_id": iid, "category_id": cat_ids[lab],
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(s)})
    return out


def write_coco_results(path: str | os.PathLike, coco_image_ids: Sequence[int], category_ids: Sequence[int],
                       pred_boxes: Sequence, pred_labels: Sequence, pred_scores: Sequence) -> list[dict[str, Any]]:
    """Write `coco_results_from_arrays(...)` as json (atomically); returns the list."""
    res = coco_results_from_arrays(coco_image_ids, category_ids, pred_boxes, pred_labels, pred_scores)
    atomic_write_bytes(path, json.dumps(res, separators=(",", ":")).encode())
    return res


def read_coco_results(path_or_list: str | os.PathLike | list, coco_image_ids: Sequence[int],
                      category_ids: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """COCO results (json path or list) -> per-image (boxes, labels, scores) in the order of
    coco_image_ids, our continuous convention, rows in file order."""
    src = str(path_or_list) if isinstance(path_or_list, (str, os.PathLike)) else "results"
    if isinstance(path_or_list, (str, os.PathLike)):
        with open(path_or_list) as f:
            try:
                res = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}: not valid json ({e})") from None
    else:
        res = path_or_list
    if not isinstance(res, list):
        raise ValueError(f"{src}: expected a list of detections")
    img_index = {int(x): i for i, x in enumerate(coco_image_ids)}
    cat_index = {int(c): k for k, c in enumerate(category_ids)}
    if len(img_index) != len(coco_image_ids) or len(cat_index) != len(category_ids):
        raise ValueError("coco_image_ids and category_ids must not repeat an id")
    per_img: list[list[tuple[int, list[float], float]]] = [[] for _ in img_index]
    for n, r in enumerate(res):
        try:
            i, k = img_index[int(r["image_id"])], cat_index[int(r["category_id"])]
            x, y, w, h = (float(v) for v in r["bbox"])
            s = float(r["score"])
        except KeyError as e:
            raise ValueError(f"{src}: entry {n}: missing key or unknown id {e}") from None
        except (TypeError, ValueError):
            raise ValueError(f"{src}: entry {n}: malformed detection {r!r}") from None
        if not all(np.isfinite([x, y, w, h, s])):
            raise ValueError(f"{src}: entry {n}: NaN or infinite value")
        per_img[i].append((k, [x, y, x + w, y + h], s))
    boxes = [np.array([d[1] for d in dets], np.float64).reshape(-1, 4) for dets in per_img]
    labels = [np.array([d[0] for d in dets], np.int64) for dets in per_img]
    scores = [np.array([d[2] for d in dets], np.float64) for dets in per_img]
    return boxes, labels, scores
