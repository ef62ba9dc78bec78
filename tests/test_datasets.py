"""VOC and COCO readers and their validation (detector/datasets/voc.py, coco.py, validate.py).

Every dataset here is written by hand in tmp_path with known boxes; expected values are
converted by hand (VOC: x1 = xmin - 1, x2 = xmax) or checked through pycocotools.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector.datasets import Dataset, ImageRecord
from detector.datasets.coco import load_coco, voc_to_coco_dict
from detector.datasets.validate import DatasetError, DatasetWarning, validate_dataset
from detector.datasets.voc import load_voc, read_voc_classes
from detector.images import load_image


# ----------------------------------------------------------------------------- helpers

def _xml(objects, size=None, filename=None) -> str:
    """objects: (name, (xmin, ymin, xmax, ymax), difficult or None)."""
    s = "<annotation>\n"
    if filename:
        s += f"<filename>{filename}</filename>\n"
    if size:
        s += f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n"
    for name, box, diff in objects:
        s += f"<object><name>{name}</name>"
        if diff is not None:
            s += f"<difficult>{diff}</difficult>"
        s += "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        s += "</bndbox></object>\n"
    return s + "</annotation>\n"


def _image(path: Path, w: int, h: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


def _voc(root: Path, items: dict, splits: dict) -> Path:
    """items: id -> (xml text or None, (w, h, image name) or None)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for image_id, (xml, img) in items.items():
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        if img is not None:
            w, h, name = img[:3]
            _image(root / "JPEGImages" / name, w, h, *(img[3:]))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _quiet_load(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these datasets must load without any warning
        return load_voc(*args, **kw)


# ----------------------------------------------------------------------------- VOC

def test_voc_round_trip(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (10, 20, 50, 60), None), ("dog", (1, 1, 100, 80), 1)], (100, 80)), (100, 80, "a.jpg")),
        "b": (_xml([("bird", (5.5, 3, 30.25, 40), 0)], (64, 48)), (64, 48, "b.jpg")),
        "c": (_xml([("zebra", (2, 2, 9, 9), 0)], (32, 32)), (32, 32, "c.jpg")),
    }, {"trainval": ["a", "b"], "test": ["c"]})
    ds = _quiet_load(root, "trainval")
    # Classes come from every split (zebra is only in test), sorted.
    assert ds.class_names == ["bird", "cat", "dog", "zebra"] == read_voc_classes(root)
    assert [r.image_id for r in ds] == ["a", "b"]
    a, b = ds.records
    np.testing.assert_array_equal(a.boxes, np.array([[9, 19, 50, 60], [0, 0, 100, 80]], np.float32))
    np.testing.assert_array_equal(a.labels, [1, 2])
    np.testing.assert_array_equal(a.difficult, [False, True])  # missing <difficult> -> 0
    assert (a.width, a.height, Path(a.path).name) == (100, 80, "a.jpg")
    np.testing.assert_allclose(b.boxes, [[4.5, 2, 30.25, 40]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    s = ds.summary
    assert (s["images"], s["classes"], s["objects"], s["difficult"]) == (2, 4, 3, 1)
    assert s["degenerate_dropped"] == s["clipped"] == s["skipped_images"] == 0
    assert "loaded 2 images, 4 classes, 3 objects" in s["text"]
    assert validate_dataset(ds) == {}

    nd = _quiet_load(root, "trainval", keep_difficult=False)
    np.testing.assert_array_equal(nd.records[0].labels, [1])
    assert nd.summary["difficult_dropped"] == 1
    # Explicit class names set the label order.
    ex = _quiet_load(root, "trainval", class_names=["dog", "cat", "bird"])
    np.testing.assert_array_equal(ex.records[0].labels, [1, 0])


def test_unknown_class_names_file_and_class(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "a.jpg")),
        "b": (_xml([("horse", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "b.jpg")),
    }, {"trainval": ["a", "b"]})
    with pytest.raises(DatasetError, match=r"b\.xml.*'horse'"):
        load_voc(root, "trainval", class_names=["cat", "dog"])
    # No built-in fallback such as VOC's 20 classes.
    assert load_voc(root, "trainval").class_names == ["cat", "horse"]


def test_degenerate_box_dropped_with_warning(tmp_path):
    root = _voc(tmp_path / "voc", {
        "ok": (_xml([("cat", (1, 1, 5, 5), 0)], (20, 20)), (20, 20, "ok.jpg")),
        "deg": (_xml([("cat", (7, 8, 7, 8), 0), ("cat", (3, 9, 12, 4), 0), ("cat", (2, 2, 10, 10), 0)], (20, 20)),
                (20, 20, "deg.jpg")),
    }, {"trainval": ["ok", "deg"]})
    with pytest.warns(DatasetWarning, match=r"deg\.xml.*no extent") as rec:
        ds = load_voc(root, "trainval")
    assert sum("deg.xml" in str(w.message) for w in rec) == 2
    np.testing.assert_array_equal(ds.records[1].boxes, [[1, 1, 10, 10]])
    assert ds.summary["degenerate_dropped"] == 2 and ds.summary["objects"] == 2
    assert "2 degenerate boxes dropped (deg.xml)" in ds.summary["text"]


def test_box_outside_image_clipped(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (0, 5, 120, 30), 0), ("cat", (150, 5, 160, 30), 0), ("cat", (3, 4, 10, 80), 0)], (100, 80)),
              (100, 80, "a.jpg")),
    }, {"trainval": ["a"]})
    with pytest.warns(DatasetWarning) as rec:
        ds = load_voc(root, "trainval")
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 4, 100, 30], [2, 3, 10, 80]])
    assert ds.summary["clipped"] == 1 and ds.summary["outside_dropped"] == 1
    msgs = [str(w.message) for w in rec]
    assert any("a.xml: 'cat' box [-1, 4, 120, 30] extends outside" in m and "clipped" in m for m in msgs)
    assert any("a.xml: 'cat' box [149, 4, 160, 30] lies outside" in m and "dropped" in m for m in msgs)
    assert validate_dataset(ds) == {}


@pytest.mark.parametrize("text, match", [
    ("<annotation><object><name>cat</name>", r"bad\.xml: unreadable XML"),
    ("", r"bad\.xml: empty file"),
    (_xml([("cat", (1, "x", 5, 5), 0)], (10, 10)), r"bad\.xml.*'cat'.*non-numeric <ymin>"),
    ("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>", r"bad\.xml.*no <name>"),
])
def test_unreadable_xml_names_file(tmp_path, text, match):
    root = _voc(tmp_path / "voc", {
        "ok": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "ok.jpg")),
        "bad": (text, (10, 10, "bad.jpg")),
    }, {"trainval": ["ok", "bad"]})
    with pytest.raises(DatasetError, match=match):
        load_voc(root, "trainval", class_names=["cat"])


def test_missing_files_in_split_are_skipped(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "a.jpg")),
        "noimg": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), None),
        "noxml": (None, (10, 10, "noxml.jpg")),
        "c": (_xml([("cat", (2, 2, 6, 6), 0)], (10, 10)), (10, 10, "c.jpg")),
    }, {"trainval": ["a", "noimg", "noxml", "c", "a"]})
    with pytest.warns(DatasetWarning) as rec:
        ds = load_voc(root, "trainval")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "image 'noimg' not found" in msgs and "noxml.xml: annotation" in msgs and "listed again" in msgs
    assert [r.image_id for r in ds] == ["a", "c"]
    assert ds.summary["skipped_images"] == 3


def test_size_mismatch_real_size_wins(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (1, 1, 150, 60), 0)], (200, 100)), (100, 80, "a.jpg")),
    }, {"trainval": ["a"]})
    with pytest.warns(DatasetWarning) as rec:
        ds = load_voc(root, "trainval")
    assert any("a.xml: <size> says 200x100 but a.jpg is 100x80" in str(w.message) for w in rec)
    r = ds.records[0]
    assert (r.width, r.height) == (100, 80)
    np.testing.assert_array_equal(r.boxes, [[0, 0, 100, 60]])  # clipped to the real size
    assert ds.summary["size_mismatch"] == 1 and ds.summary["clipped"] == 1


def test_missing_size_read_from_image(tmp_path):
    root = _voc(tmp_path / "voc", {"a": (_xml([("cat", (1, 1, 5, 5), 0)]), (37, 23, "a.jpg"))}, {"trainval": ["a"]})
    ds = _quiet_load(root, "trainval")
    assert (ds.records[0].width, ds.records[0].height) == (37, 23)
    assert ds.summary["size_from_image"] == 1


def test_empty_or_missing_split_is_an_error(tmp_path):
    root = _voc(tmp_path / "voc", {"a": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "a.jpg"))},
                {"trainval": ["a"], "test": [], "gone": ["x", "y"]})
    with pytest.raises(DatasetError, match=r"ImageSets/Main/test\.txt: split 'test' lists no images"):
        load_voc(root, "test")
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        load_voc(root, "val")
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match=r"gone\.txt: none of the 2 images"):
        load_voc(root, "gone")
    with pytest.raises(DatasetError, match="dataset directory not found"):
        load_voc(tmp_path / "nowhere")


def test_grayscale_png_and_xml_filename(tmp_path):
    root = _voc(tmp_path / "voc", {
        "g": (_xml([("cat", (1, 1, 5, 5), 0)], (30, 20), filename="g.png"), (30, 20, "g.png", "L")),
        "h": (_xml([("cat", (1, 1, 5, 5), 0)], (16, 12), filename="photo_h.jpeg"), (16, 12, "photo_h.jpeg")),
        "k": (_xml([("cat", (1, 1, 5, 5), 0)], (8, 8)), (8, 8, "k.PNG")),
    }, {"trainval": ["g", "h", "k"]})
    ds = _quiet_load(root, "trainval")
    assert [Path(r.path).name for r in ds] == ["g.png", "photo_h.jpeg", "k.PNG"]
    assert load_image(ds.records[0].path).shape == (20, 30, 3)


def test_annotation_without_objects_is_kept(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (1, 1, 5, 5), 0)], (10, 10)), (10, 10, "a.jpg")),
        "bg": (_xml([], (10, 10)), (10, 10, "bg.jpg")),
    }, {"trainval": ["a", "bg"]})
    ds = _quiet_load(root, "trainval")
    assert len(ds) == 2 and ds.records[1].boxes.shape == (0, 4)
    assert ds.summary["images_without_objects"] == 1
    assert "1 images without objects" in ds.summary["text"]


def test_validate_dataset_finds_problems(tmp_path):
    f = tmp_path / "x.jpg"
    _image(f, 10, 10)
    ds = Dataset("hand", ["a"], [
        ImageRecord("1", str(f), 10, 10, [[0, 0, 5, 5], [3, 3, 3, 8], [2, 2, 12, 5]], [0, 1, 0], [0, 0, 0]),
        ImageRecord("1", str(tmp_path / "gone.jpg"), 10, 10),
    ])
    p = validate_dataset(ds)
    assert sorted(p) == ["bad_box", "bad_label", "duplicate_id", "missing_file", "outside"]
    assert "box 1" in p["bad_box"][0] and "box 2" in p["outside"][0] and "label 1" in p["bad_label"][0]


# ----------------------------------------------------------------------------- COCO

def _coco_json(tmp_path: Path) -> Path:
    img_dir = tmp_path / "images"
    _image(img_dir / "a.jpg", 100, 80)
    _image(img_dir / "b.png", 50, 40)
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 3, "file_name": "b.png", "width": 50, "height": 40}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 9, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 10.5, 5], "area": 52.5, "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 9, "bbox": [40, 30, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 9, "bbox": [5, 5, 0, 7], "area": 0, "iscrowd": 0},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_load_coco(tmp_path):
    path = _coco_json(tmp_path)
    with pytest.warns(DatasetWarning) as rec:
        ds = load_coco(path, tmp_path / "images")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "annotation 4" in msgs and "no extent" in msgs and "clipped" in msgs
    assert ds.class_names == ["dog", "cat", "bird"] and ds.coco_category_ids == [2, 5, 9]
    assert ds.coco_image_ids == [3, 7] and [r.image_id for r in ds] == ["3", "7"]
    b, a = ds.records
    np.testing.assert_array_equal(b.boxes, [[40, 30, 50, 40]])  # clipped to 50x40
    np.testing.assert_array_equal(b.labels, [2])
    np.testing.assert_allclose(a.boxes, [[10, 20, 40, 60], [0, 0, 10.5, 5]])
    np.testing.assert_array_equal(a.labels, [1, 0])
    np.testing.assert_array_equal(a.difficult, [False, True])  # iscrowd -> difficult
    assert ds.summary["degenerate_dropped"] == 1 and ds.summary["clipped"] == 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        ex = load_coco(path, tmp_path / "images", class_names=["cat", "dog", "bird"])
        assert ex.coco_category_ids == [5, 2, 9]
        np.testing.assert_array_equal(ex.records[1].labels, [0, 1])
        with pytest.raises(DatasetError, match=r"ann\.json.*category 9 'bird'.*not in class_names"):
            load_coco(path, tmp_path / "images", class_names=["cat", "dog"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"broken\.json: unreadable JSON"):
        load_coco(tmp_path / "broken.json", tmp_path / "images")


def _pycoco(d: dict) -> COCO:
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _ap_of_gt_as_detections(gt: COCO) -> float:
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0])


def test_voc_to_coco_dict_round_trip(tmp_path):
    root = _voc(tmp_path / "voc", {
        "a": (_xml([("cat", (10, 20, 50, 60), 0), ("dog", (1, 1, 100, 80), 1)], (100, 80)), (100, 80, "a.jpg")),
        "b": (_xml([("dog", (5, 3, 30, 40), 0)], (64, 48)), (64, 48, "b.jpg")),
    }, {"trainval": ["a", "b"]})
    ds = _quiet_load(root, "trainval")
    d = voc_to_coco_dict(ds)
    gt = _pycoco(d)
    assert sorted(gt.getImgIds()) == [1, 2] and sorted(gt.getCatIds()) == [1, 2]
    assert [c["name"] for c in gt.loadCats([1, 2])] == ["cat", "dog"]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    assert [a["bbox"] for a in anns] == [[9, 19, 41, 41], [0, 0, 100, 80]]  # VOC (10,20,50,60) -> xywh by hand
    assert [a["area"] for a in anns] == [41 * 41, 100 * 80] and [a["iscrowd"] for a in anns] == [0, 1]
    assert gt.imgs[2]["width"] == 64 and gt.imgs[2]["height"] == 48
    assert _ap_of_gt_as_detections(gt) == pytest.approx(1.0)

    # Through a json file and load_coco, the records come back as they were.
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(d))
    back = load_coco(path, root / "JPEGImages")
    assert back.class_names == ds.class_names
    for r0, r1 in zip(ds, back):
        np.testing.assert_allclose(r1.boxes, r0.boxes)
        np.testing.assert_array_equal(r1.labels, r0.labels)
        np.testing.assert_array_equal(r1.difficult, r0.difficult)
    # A COCO dataset keeps its own ids.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        cds = load_coco(_coco_json(tmp_path), tmp_path / "images")
    cgt = _pycoco(voc_to_coco_dict(cds))
    assert sorted(cgt.getImgIds()) == [3, 7] and sorted(cgt.getCatIds()) == [2, 5, 9]
    assert cgt.loadAnns(cgt.getAnnIds(imgIds=[7], catIds=[5]))[0]["bbox"] == [10, 20, 30, 40]
