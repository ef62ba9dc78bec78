"""bench/peer_fasterrcnn.py end to end on a tiny generated dataset: a 2-iteration training and
test print the four result lines (ours skipped: nan), and a dataset without objects is one
`error:` line with exit code 2."""
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "peer_fasterrcnn.py")
RESULT_NAMES = ["peer_map", "ours_map", "peer_s_per_image", "ours_s_per_image"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from detector.datasets.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("peer") / "data", num_train=6, num_test=3,
                          image_size=(160, 120), seed=1)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--no-progress", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT))


def test_tiny_run_prints_the_four_results(data, tmp_path):
    out = tmp_path / "out"
    p = run("--dataset", data, "--iterations", 2, "--min-size", 160, "--skip-ours", "--out", out)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    values = {}
    for line, name in zip(lines[-4:], RESULT_NAMES):
        m = re.fullmatch(rf"{name} = (\S+)", line)
        assert m, f"expected '{name} = X', got {line!r}"
        values[name] = float(m.group(1))
    assert math.isfinite(values["peer_map"]) and 0 <= values["peer_map"] <= 1
    assert math.isfinite(values["peer_s_per_image"]) and values["peer_s_per_image"] > 0
    assert math.isnan(values["ours_map"]) and math.isnan(values["ours_s_per_image"])
    assert (out / "model.pt").is_file() and not (out / "checkpoint.pt").exists()
    # the peer's detections, readable by tools/analyze_errors.py (one devkit file per class, COCO json)
    res = out / "results_test" / "peer"
    n_classes = len((data / "classes.txt").read_text().split())
    assert len(list(res.glob("comp4_det_test_*.txt"))) == n_classes and (res / "coco_results_test.json").is_file()
    assert not (out / "results_test" / "ours").exists()


def _without_objects(data: Path, dst: Path, ids=None) -> Path:
    """A copy of `data` whose annotations (those of `ids`, or all) have no <object>."""
    import shutil

    shutil.copytree(data, dst)
    for xml in (dst / "Annotations").glob("*.xml"):
        if ids is None or xml.stem in ids:
            tree = ET.parse(xml)
            for obj in tree.getroot().findall("object"):
                tree.getroot().remove(obj)
            tree.write(xml)
    return dst


@pytest.mark.parametrize("which", ["all", "trainval"])
def test_no_objects_is_one_error_line(data, tmp_path, which):
    ids = None
    if which == "trainval":
        ids = set((data / "ImageSets" / "Main" / "trainval.txt").read_text().split())
    bad = _without_objects(data, tmp_path / "bad", ids)
    p = run("--dataset", bad, "--iterations", 2, "--min-size", 160, "--skip-ours", "--out", tmp_path / "out")
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no objects" in errors[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out" / "model.pt").exists()


def test_our_models_get_a_row_each_in_the_same_run(smoke_run, rpn_run, tmp_path):
    """A selective-search model and a learned-proposals model beside the peer: both scored, both
    detections written, both result lines."""
    _, data, ss_model = smoke_run
    _, _, rpn_model = rpn_run
    out = tmp_path / "out"
    p = run("--dataset", data, "--iterations", 2, "--min-size", 160, "--out", out, "--model", ss_model, rpn_model,
            "--ours-set", "test.max_per_image=2")
    assert p.returncode == 0, p.stderr
    assert "ours: SPP-net, selective search" in p.stdout and "ours: SPP-net, learned proposals" in p.stdout
    values = dict(re.fullmatch(r"(\w+) = (\S+)", ln).groups() for ln in p.stdout.strip().splitlines()[-6:])
    assert set(values) == {"peer_map", "ours_map", "peer_s_per_image", "ours_s_per_image", "ours_rpn_map",
                           "ours_rpn_s_per_image"}
    assert all(math.isfinite(float(v)) for v in values.values())
    for name in ("ours_ss", "ours_rpn"):
        dets = json.loads((out / "results_test" / name / "coco_results_test.json").read_text())
        # --ours-set reached both models: at most 2 detections per image
        assert dets and max(Counter(d["image_id"] for d in dets).values()) <= 2
