"""The per-stage command-line tools, run through their main() on a tiny generated dataset:
each writes what it says, a rerun reuses its cache, and bad input is one `error:` line.
(train.py, test_voc.py and detect are exercised on a trained model in test_smoke.py.)"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from detector.datasets.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("tools") / "data", num_train=3, num_test=3,
                          image_size=(160, 120), seed=5)


def test_extract_features_skips_unreadable_and_finished_images(data, tmp_path, capsys):
    from tools import extract_features

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((data / "JPEGImages").glob("*.jpg"))[:2]:
        shutil.copy(p, imgs / p.name)
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["--images", str(imgs), "--cache", str(tmp_path / "feat"), "--config", SMOKE]
    assert extract_features.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 computed, 0 already cached, 1 skipped" in out and "broken.jpg" in out
    assert len(list((tmp_path / "feat").rglob("*_s160.npz"))) == 2  # smoke.yaml: one scale, 160
    assert extract_features.main(argv) == 0
    assert "0 computed, 2 already cached, 1 skipped" in capsys.readouterr().out


def test_compute_then_eval_proposals(data, tmp_path, capsys):
    from detector.datasets.voc import load_voc
    from detector.proposals import load_proposals
    from detector.proposals import proposal_recall
    from tools import compute_proposals, eval_proposals

    export = tmp_path / "props.npz"
    argv = ["--dataset", str(data), "--split", "test", "--cache", str(tmp_path / "cache"), "--workers", "1",
            "--no-progress", "--export", str(export), "--config", SMOKE]
    assert compute_proposals.main(argv) == 0
    ds = load_voc(data, "test")
    props = load_proposals(export, [r.image_id for r in ds.records])
    for r in ds.records:
        b = props[r.image_id]
        assert b.ndim == 2 and b.shape[1] == 4 and 0 < len(b) <= 300  # smoke.yaml: top_k 300
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert b.min() >= 0 and (b[:, [0, 2]] <= r.width).all() and (b[:, [1, 3]] <= r.height).all()

    out_json = tmp_path / "recall.json"
    assert eval_proposals.main(["--dataset", str(data), "--split", "test", "--proposals", str(export),
                                "--top-ns", "5", "300", "--json", str(out_json)]) == 0
    assert "recall" in capsys.readouterr().out.lower()
    res = json.loads(out_json.read_text())
    # the tool's wiring (split, exported boxes, GT, difficult, top-n) against the library function,
    # which tests/test_proposals.py checks against a naive loop
    ref = proposal_recall([props[r.image_id] for r in ds.records], [r.boxes for r in ds.records],
                          [r.labels for r in ds.records], top_ns=[5, 300],
                          difficult_list=[r.difficult for r in ds.records], class_names=ds.class_names)
    assert res["top_ns"] == [5, 300] and res["num_gt"] == int(ref["num_gt"]) > 0
    np.testing.assert_array_equal(np.asarray(res["recall"]), ref["recall"])
    np.testing.assert_array_equal(np.asarray(res["ar"]), ref["ar"])
    assert 0 < ref["recall"][-1, 0] <= 1  # some GT is found at IoU 0.5 by 300 boxes


def test_train_svms_script_stops_before_the_model_file(data, tmp_path, capsys, monkeypatch):
    import runpy

    run = tmp_path / "run"
    argv = ["--dataset", str(data), "--out", str(run), "--cache", str(tmp_path / "cache"), "--config", SMOKE,
            "--set", "finetune.iterations=4", "finetune.checkpoint_every=2", "finetune.lr_steps=[2]"]
    monkeypatch.setattr(sys, "argv", ["train_svms.py"] + argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "tools" / "train_svms.py"), run_name="__main__")
    assert done.value.code == 0
    assert (run / "svm.npz").is_file() and (run / "bbox.npz").is_file()
    assert not (run / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "config:" in out  # the resolved config is printed
    header = next(line for line in out.splitlines() if "positives" in line and "neg kept" in line)
    assert out.count(header) == 1  # the per-class SVM summary, once


def test_tool_scripts_print_one_error_line_for_bad_input(data, tmp_path):
    missing = tmp_path / "missing.safetensors"
    image = next((data / "JPEGImages").glob("*.jpg"))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "detect.py"), "--model", str(missing), str(image)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
