"""tools/make_object_crops.py: a folder-per-class set from a VOC set's objects (issue 22)."""
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from detector.datasets.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("voc") / "synth", num_train=6, num_test=3, image_size=(160, 120),
                          seed=4)


def _objects(root: Path, split: str) -> list:
    """(image id, index, class, box) of every object, read from the XML files by hand (VOC's
    1-based inclusive pixels -> 0-based continuous: xmin - 1 .. xmax)."""
    out = []
    for image_id in (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
        for k, obj in enumerate(ET.parse(root / "Annotations" / f"{image_id}.xml").findall("object")):
            b = obj.find("bndbox")
            box = [float(b.find(t).text) - (t in ("xmin", "ymin")) for t in ("xmin", "ymin", "xmax", "ymax")]
            out.append((image_id, k, obj.find("name").text, box))
    return out


def test_every_object_becomes_a_square_crop_around_its_box(voc, tmp_path):
    from detector.datasets.object_crops import make_object_crops

    counts = make_object_crops(voc, tmp_path / "crops", margin=0.5, progress=False)
    for split, name in (("trainval", "train"), ("test", "test")):
        objs = _objects(voc, split)
        want = {}
        for _, _, cls, _ in objs:
            want[cls] = want.get(cls, 0) + 1
        assert counts[name] == want
        for image_id, k, cls, (x1, y1, x2, y2) in objs:
            crop = np.asarray(Image.open(tmp_path / "crops" / name / cls / f"{image_id}_{k}.png"))
            full = np.asarray(Image.open(voc / "JPEGImages" / f"{image_id}.jpg"))
            side = round(max(x2 - x1, y2 - y1) * 2)  # 0.5 of the longer side on each side
            assert crop.shape[:2] == (min(side, full.shape[0]), min(side, full.shape[1]))
            # the crop is the original pixels somewhere: find its offset, and the box lies inside it
            h, w = crop.shape[:2]
            spots = [(x, y) for y in range(full.shape[0] - h + 1) for x in range(full.shape[1] - w + 1)
                     if np.array_equal(full[y:y + h, x:x + w], crop)]
            assert spots and any(x <= x1 and y <= y1 and x + w >= x2 and y + h >= y2 for x, y in spots), (image_id, k)


def test_the_same_arguments_give_the_same_files_and_others_are_refused(voc, tmp_path):
    from detector.datasets.object_crops import make_object_crops
    from detector.errors import DatasetError

    a = make_object_crops(voc, tmp_path / "a", max_per_class=[1, None], progress=False)
    b = make_object_crops(voc, tmp_path / "b", max_per_class=[1, None], progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert a == b and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert all(n == 1 for n in a["train"].values()) and sum(a["test"].values()) == len(_objects(voc, "test"))
    assert make_object_crops(voc, tmp_path / "a", max_per_class=[1, None], progress=False) == a  # nothing to do
    with pytest.raises(DatasetError, match="other arguments"):
        make_object_crops(voc, tmp_path / "a", margin=0.2, progress=False)


def test_the_tool_writes_an_image_folder_set_and_reports_bad_input(voc, tmp_path, capsys):
    from detector.cli import run_tool
    from detector.datasets.imagefolder import load_image_folder
    from tools import make_object_crops

    rc = run_tool(make_object_crops.main, ["--voc", str(voc), "--out", str(tmp_path / "c"), "--max-per-class", "2",
                                           "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{tmp_path / 'c'}/train: " in out
    split = load_image_folder(tmp_path / "c", "train")
    assert len(split) == sum(int(n) for n in out.splitlines()[0].split(": ")[1].split(" crops")[0].split())
    rc = run_tool(make_object_crops.main, ["--voc", str(tmp_path / "none"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and str(tmp_path / "none") in err and len(err.splitlines()) == 1
