"""COCO json reader (through pycocotools) and a Dataset -> COCO ground-truth converter.

`load_coco` returns a `COCODataset`, a `Dataset` that also keeps the COCO ids:

- `coco_category_ids[k]` is the COCO category id of our label k (class_names[k]);
- `coco_image_ids[i]` is the COCO image id of `records[i]`, whose `image_id` is
  `str(coco_image_ids[i])`;
- `summary` holds the validation counts (see validate.py).

Boxes: COCO `[x, y, w, h]` is already continuous, so it becomes `[x, y, x + w, y + h]`.
`iscrowd=1` annotations become difficult objects, which evaluation ignores
(neither true nor false positives), as for VOC's difficult flag.

`voc_to_coco_dict` goes the other way so that any Dataset (VOC ones included) can be
scored with pycocotools.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from detector.images import ImageError, image_size
from detector.datasets.records import Dataset, ImageRecord
from detector.datasets.validate import DatasetError, LoadReport


@dataclass
class COCODataset(Dataset):
    """A `Dataset` read by `load_coco`, with the COCO ids of its labels and images (module docstring)."""

    coco_category_ids: list[int] = field(default_factory=list)
    coco_image_ids: list[int] = field(default_factory=list)
    annotation_json: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


def _open_coco(annotation_json: Path):
    from pycocotools.coco import COCO

    if not annotation_json.is_file():
        raise DatasetError(f"{annotation_json}: annotation file not found")
    try:
        with open(annotation_json) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{annotation_json}: unreadable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{annotation_json}: not a COCO annotation file (needs 'images' and 'categories' lists)")
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{annotation_json}: malformed COCO entry (missing field {e})") from e
    return coco


def load_coco(annotation_json: str | os.PathLike, image_dir: str | os.PathLike,
              class_names: Optional[Sequence[str]] = None) -> COCODataset:
    """Load a COCO-format annotation file; images are `image_dir/<file_name>`.

    class_names: None takes every category, ordered by COCO category id.  When given,
    labels follow its order, every name must be a category of the file, and an
    annotated category that is not in it raises `DatasetError` naming the file and
    the category.  Images are ordered by COCO image id.  Missing or unreadable images
    are skipped with a warning; a width/height that disagrees with the file is replaced
    by the file's size; degenerate boxes (w <= 0 or h <= 0) are dropped and boxes
    outside the image clipped, as for VOC.
    """
    annotation_json, image_dir = Path(annotation_json), Path(image_dir)
    coco = _open_coco(annotation_json)
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    by_name: dict[str, int] = {}
    for c in cats:
        if c.get("name") in by_name:
            raise DatasetError(f"{annotation_json}: category name '{c.get('name')}' is used by two ids")
        by_name[str(c.get("name"))] = int(c["id"])
    if class_names is None:
        names = [str(c["name"]) for c in cats]
    else:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise DatasetError(f"class_names has duplicates: {names}")
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DatasetError(f"{annotation_json}: class_names {missing} are not categories of this file "
                               f"(it has {sorted(by_name)})")
    cat_ids = [by_name[n] for n in names]
    label_of = {cid: k for k, cid in enumerate(cat_ids)}
    if not names:
        raise DatasetError(f"{annotation_json}: no categories")
    if not coco.imgs:
        raise DatasetError(f"{annotation_json}: no images")

    report = LoadReport(annotation_json.name)
    records, img_ids = [], []
    for iid in sorted(coco.imgs):
        rec = _load_one(coco, iid, image_dir, annotation_json, label_of, report)
        if rec is not None:
            records.append(rec)
            img_ids.append(int(iid))
    if not records:
        raise DatasetError(f"{annotation_json}: none of its {len(coco.imgs)} images could be loaded from {image_dir}")
    ds = COCODataset(name=annotation_json.stem, class_names=names, records=records, root=str(image_dir),
                     coco_category_ids=cat_ids, coco_image_ids=img_ids, annotation_json=str(annotation_json))
    ds.summary = report.finish(ds)
    return ds


def _load_one(coco, iid: int, image_dir: Path, src: Path, label_of: dict[int, int],
              report: LoadReport) -> Optional[ImageRecord]:
    info = coco.imgs[iid]
    fname = info.get("file_name")
    if not fname:
        raise DatasetError(f"{src}: image {iid} has no file_name")
    path = image_dir / fname
    if not path.is_file():
        report.issue("skipped_images", str(path), f"{src}: image {iid} file {path} not found; skipped")
        return None
    try:
        width, height = image_size(path)
    except ImageError as e:
        report.issue("skipped_images", str(path), f"{e}; skipped")
        return None
    stated = (info.get("width"), info.get("height"))
    if stated == (None, None):
        report.size_from_image += 1
    elif stated != (width, height):
        report.issue("size_mismatch", str(path), f"{src}: image {iid} says {stated[0]}x{stated[1]} but {path.name} "
                     f"is {width}x{height}; using the image's size")
    boxes, labels, crowd, obj_names = [], [], [], []
    for ann in coco.imgToAnns.get(iid, []):
        cid = ann.get("category_id")
        if cid not in label_of:
            cname = coco.cats.get(cid, {}).get("name", "?")
            where = "is not in class_names" if cid in coco.cats else "is not in 'categories'"
            raise DatasetError(f"{src}: annotation {ann.get('id')} (image {iid}) has category {cid} '{cname}', "
                               f"which {where}")
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{src}: annotation {ann.get('id')} (image {iid}) has no valid bbox ({bbox!r})") from e
        if not np.isfinite([x, y, w, h]).all():
            raise DatasetError(f"{src}: annotation {ann.get('id')} (image {iid}) has a non-finite bbox {bbox}")
        name = coco.cats[cid]["name"]
        if w <= 0 or h <= 0:
            report.issue("degenerate_dropped", str(path), f"{src}: annotation {ann.get('id')} ('{name}', image {iid}, "
                         f"{fname}) has bbox {bbox} with no extent; dropped")
            continue
        boxes.append((x, y, x + w, y + h))
        labels.append(label_of[cid])
        crowd.append(bool(ann.get("iscrowd", 0)))
        obj_names.append(name)
    b, keep = report.clean_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), obj_names, fname, width, height)
    return ImageRecord(image_id=str(iid), path=str(path), width=width, height=height, boxes=b[keep],
                       labels=np.asarray(labels, np.int64)[keep], difficult=np.asarray(crowd, bool)[keep])


def voc_to_coco_dict(dataset: Dataset) -> dict:
    """A COCO ground-truth dict built from any Dataset, to score it with pycocotools.

    Image ids are `dataset.coco_image_ids` when the dataset has them (a COCODataset),
    else 1..N in record order; category ids likewise `coco_category_ids` or label + 1;
    annotation ids run from 1 (pycocotools reads id 0 as "unmatched").  bbox is
    `[x1, y1, x2 - x1, y2 - y1]`, area = w * h, and difficult objects get iscrowd=1,
    which pycocotools ignores (but note its crowd matching differs from the VOC
    devkit's: a detection may match a crowd box by intersection over its own area).
    Load it with `COCO()`, `coco.dataset = d`, `coco.createIndex()`.
    """
    n = len(dataset.records)
    img_ids = [int(i) for i in getattr(dataset, "coco_image_ids", None) or range(1, n + 1)]
    cat_ids = [int(c) for c in getattr(dataset, "coco_category_ids", None) or range(1, len(dataset.class_names) + 1)]
    if len(img_ids) != n or len(cat_ids) != len(dataset.class_names):
        raise DatasetError(f"{dataset.name}: coco_image_ids/coco_category_ids do not match the records/classes")
    images, anns = [], []
    for rec, iid in zip(dataset.records, img_ids):
        images.append({"id": iid, "file_name": os.path.basename(rec.path), "width": int(rec.width),
                       "height": int(rec.height)})
        for b, lab, d in zip(rec.boxes.astype(np.float64), rec.labels, rec.difficult):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat_ids[int(lab)],
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": int(bool(d))})
    cats = [{"id": c, "name": name} for c, name in zip(cat_ids, dataset.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}
