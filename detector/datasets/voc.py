"""PASCAL VOC layout reader: root/Annotations/*.xml, root/ImageSets/Main/<split>.txt, root/JPEGImages/.

Boxes are converted to the library's convention (see records.py): VOC `xmin..xmax`
(1-based, inclusive) becomes `x1 = xmin - 1, x2 = xmax`.

Problems in the data are repaired or skipped with a `DatasetWarning` naming the file
and summarised in one logged line; the counts are on `dataset.summary` (see
validate.py).  What happens to what:

- unreadable or empty XML, an object without name or box, non-numeric coordinates,
  a class not in an explicit `class_names`, a missing or empty split -> `DatasetError`;
- a degenerate box (xmax <= xmin or ymax <= ymin as written in the file) -> dropped;
- a box reaching outside the image -> clipped (dropped if nothing is left);
- a split id whose xml or image is missing or unreadable -> skipped, the rest loads;
- a `<size>` that disagrees with the image file -> the file's real size wins;
  no `<size>` -> read from the image header;
- an annotation without objects -> kept as an image without objects (negatives only).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from detector.images import ImageError, image_size
from detector.datasets.records import Dataset, ImageRecord
from detector.datasets.validate import DatasetError, LoadReport

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".BMP")


@dataclass
class VOCDataset(Dataset):
    """A `Dataset` read by `load_voc`; `summary` holds the validation counts (see validate.py)."""

    split: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based, inclusive)
    difficult: bool


@dataclass
class _VocAnnotation:
    path: Path
    filename: Optional[str]
    size: Optional[tuple[int, int]]  # (width, height) from <size>, None when missing or zero
    objects: list[_VocObject]


def _text(node: Optional[ET.Element], tag: str) -> Optional[str]:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def parse_voc_xml(path: str | os.PathLike) -> _VocAnnotation:
    """Parse one VOC annotation file; raises `DatasetError` naming the file when it cannot be read."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        what = "empty file" if path.stat().st_size == 0 else f"unreadable XML ({e})"
        raise DatasetError(f"{path}: {what}") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation ({e})") from e
    size = None
    size_node = root.find("size")
    w, h = _text(size_node, "width"), _text(size_node, "height")
    if w is not None and h is not None:
        try:
            wi, hi = int(float(w)), int(float(h))
        except ValueError as e:
            raise DatasetError(f"{path}: <size> is not numeric (width={w!r}, height={h!r})") from e
        if wi > 0 and hi > 0:
            size = (wi, hi)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if name is None:
            raise DatasetError(f"{path}: object {k} has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{path}: object {k} ('{name}') has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            t = _text(bb, tag)
            try:
                v = float(t) if t is not None else float("nan")
            except ValueError:
                v = float("nan")
            if not np.isfinite(v):
                raise DatasetError(f"{path}: object {k} ('{name}') has a missing or non-numeric <{tag}> ({t!r})")
            coords.append(v)
        d = _text(obj, "difficult")
        try:
            difficult = bool(int(float(d))) if d is not None else False
        except ValueError as e:
            raise DatasetError(f"{path}: object {k} ('{name}') has a non-numeric <difficult> ({d!r})") from e
        objects.append(_VocObject(name, tuple(coords), difficult))
    return _VocAnnotation(path, _text(root, "filename"), size, objects)


def _read_split(path: Path) -> list[str]:
    """Image ids of a split file (first token of each line, so class files `id  1` work too), in order."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read split file ({e})") from e
    return [line.split()[0] for line in lines if line.strip()]


def _split_files(root: Path) -> list[Path]:
    d = root / "ImageSets" / "Main"
    return sorted(d.glob("*.txt")) if d.is_dir() else []


class _Parser:
    """Memoises parsed annotations so class discovery and loading read each file once."""

    def __init__(self, root: Path):
        self.ann_dir = root / "Annotations"
        self.cache: dict[str, _VocAnnotation] = {}

    def xml_path(self, image_id: str) -> Path:
        return self.ann_dir / f"{image_id}.xml"

    def get(self, image_id: str) -> _VocAnnotation:
        if image_id not in self.cache:
            self.cache[image_id] = parse_voc_xml(self.xml_path(image_id))
        return self.cache[image_id]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    if not (root / "Annotations").is_dir():
        raise DatasetError(f"{root}: no Annotations/ folder (expected the VOC layout "
                           "Annotations/, ImageSets/Main/, JPEGImages/)")


def _all_ids(root: Path) -> list[str]:
    """Ids of the whole dataset: the union of every split file, or every xml when there are none."""
    files = _split_files(root)
    if files:
        ids: dict[str, None] = {}
        for f in files:
            ids.update(dict.fromkeys(_read_split(f)))
        return list(ids)
    return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))


def _discover_classes(parser: _Parser, ids: Iterable[str]) -> list[str]:
    names: set[str] = set()
    for i in ids:
        if parser.xml_path(i).is_file():  # missing ones are reported when their split is loaded
            names.update(o.name for o in parser.get(i).objects)
    return sorted(names)


def read_voc_classes(root: str | os.PathLike) -> list[str]:
    """The sorted set of class names in the annotations of the whole dataset.

    "Whole dataset" is every id listed in any ImageSets/Main/*.txt file, or every
    Annotations/*.xml when there are no split files.  This is what `load_voc` uses
    when `class_names` is None, so all splits of one dataset get the same labels.
    """
    root = Path(root)
    _check_root(root)
    names = _discover_classes(_Parser(root), _all_ids(root))
    if not names:
        raise DatasetError(f"{root}: no objects in any annotation, so no class names; pass class_names")
    return names


def _find_image(root: Path, image_id: str, filename: Optional[str]) -> Optional[Path]:
    img_dir = root / "JPEGImages"
    cands = [img_dir / f"{image_id}.jpg"]
    if filename:
        cands.append(img_dir / os.path.basename(filename))
    cands += [img_dir / f"{image_id}{ext}" for ext in _IMAGE_EXTS]
    for c in cands:
        if c.is_file():
            return c
    return None


def load_voc(root: str | os.PathLike, split: str = "trainval", class_names: Optional[Sequence[str]] = None,
             keep_difficult: bool = True) -> VOCDataset:
    """Load one split of a VOC-layout dataset.

    class_names: the label order.  None takes the sorted set of class names found in
    the annotations of the *whole* dataset (every split file, see `read_voc_classes`),
    never a built-in list such as VOC's 20 classes.  When given, an object whose class
    is not in it raises `DatasetError` naming the xml file and the class.
    keep_difficult: False leaves out objects marked <difficult>1</difficult>.

    Records follow the split file's order; duplicate ids are loaded once.  Returns a
    `VOCDataset` (a `Dataset`) whose `summary` holds the validation counts; the summary
    line is logged at INFO level and each issue is a `DatasetWarning` (module docstring).
    """
    root = Path(root)
    _check_root(root)
    split_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_path.is_file():
        have = sorted(p.stem for p in _split_files(root))
        raise DatasetError(f"{split_path}: split file not found (splits present: {have or 'none'})")
    ids = _read_split(split_path)
    if not ids:
        raise DatasetError(f"{split_path}: split '{split}' lists no images")
    parser = _Parser(root)
    if class_names is None:
        names = _discover_classes(parser, _all_ids(root))
        if not names:
            raise DatasetError(f"{root}: no objects in any annotation, so no class names; pass class_names")
    else:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names):
            raise DatasetError(f"class_names has duplicates: {names}")
    index = {n: k for k, n in enumerate(names)}

    report = LoadReport(f"{root.name}/{split}")
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            report.issue("skipped_images", str(split_path), f"{split_path}: id '{image_id}' is listed again; loaded once")
            continue
        seen.add(image_id)
        rec = _load_one(root, image_id, parser, index, keep_difficult, report)
        if rec is not None:
            records.append(rec)
    if not records:
        raise DatasetError(f"{split_path}: none of the {len(ids)} images of split '{split}' could be loaded "
                           "(see the warnings)")
    ds = VOCDataset(name=f"{root.name}/{split}", class_names=names, records=records, root=str(root), split=split)
    ds.summary = report.finish(ds)
    return ds


def _load_one(root: Path, image_id: str, parser: _Parser, index: dict[str, int], keep_difficult: bool,
              report: LoadReport) -> Optional[ImageRecord]:
    xml = parser.xml_path(image_id)
    if not xml.is_file():
        report.issue("skipped_images", str(xml), f"{xml}: annotation of split image '{image_id}' not found; skipped")
        return None
    ann = parser.get(image_id)
    img = _find_image(root, image_id, ann.filename)
    if img is None:
        report.issue("skipped_images", str(xml), f"{xml}: image '{image_id}' not found in {root / 'JPEGImages'} "
                     f"(tried {image_id}.jpg{', ' + ann.filename if ann.filename else ''} and other extensions); skipped")
        return None
    try:
        width, height = image_size(img)
    except ImageError as e:
        report.issue("skipped_images", str(img), f"{e}; skipped")
        return None
    if ann.size is None:
        report.size_from_image += 1
    elif ann.size != (width, height):
        report.issue("size_mismatch", str(xml), f"{xml}: <size> says {ann.size[0]}x{ann.size[1]} but {img.name} is "
                     f"{width}x{height}; using the image's size")

    boxes, labels, diff, obj_names = [], [], [], []
    for obj in ann.objects:
        if obj.name not in index:
            raise DatasetError(f"{xml}: class '{obj.name}' is not in class_names {list(index)}")
        xmin, ymin, xmax, ymax = obj.box
        # Zero extent as written (xmax == xmin) is a click, not a 1-px object: BCCD has two such boxes.
        if xmax <= xmin or ymax <= ymin:
            report.issue("degenerate_dropped", str(xml), f"{xml}: '{obj.name}' box (xmin, ymin, xmax, ymax) = "
                         f"({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) has no extent; dropped")
            continue
        if obj.difficult and not keep_difficult:
            report.difficult_dropped += 1
            continue
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))
        labels.append(index[obj.name])
        diff.append(obj.difficult)
        obj_names.append(obj.name)
    b, keep = report.clean_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), obj_names, str(xml), width, height)
    return ImageRecord(image_id=image_id, path=str(img), width=width, height=height, boxes=b[keep],
                       labels=np.asarray(labels, np.int64)[keep], difficult=np.asarray(diff, bool)[keep])
