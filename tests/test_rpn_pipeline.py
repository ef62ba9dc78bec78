"""Learned proposals (proposals.method: rpn) through training, the model file, detect() and the
tools, on generated data.  The head itself is tested in test_rpn.py."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def test_training_runs_the_rpn_stage_before_the_proposals_and_records_it(rpn_run):
    tmp, _, model_path = rpn_run
    stages = json.loads((tmp / "run" / "stages.json").read_text())
    assert {"features", "rpn", "proposals", "finetune", "svm", "bbox", "model"} <= set(stages)
    assert stages["rpn"]["iterations"] == 30 and "anchors per cell" in stages["rpn"]["anchors"]
    assert stages["proposals"]["computed"] == 16  # the head's proposals of every training image
    assert (tmp / "run" / "rpn.npz").is_file()


def test_detect_uses_the_learned_proposals_from_the_same_conv_maps(rpn_run, monkeypatch):
    import detector
    import detector.proposals.search as search
    from detector.images import load_image
    from detector.timing import StageTimer

    _, data, model_path = rpn_run
    model = detector.load(model_path)
    assert model.learned_proposals and model.cfg.proposals.method == "rpn"
    monkeypatch.setattr(search, "selective_search", lambda *a, **k: pytest.fail("selective search was called"))
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[0])
    calls = []
    real = model.extractor.__call__
    monkeypatch.setattr(type(model.extractor), "__call__", lambda self, *a, **k: calls.append(1) or real(*a, **k))
    timer = StageTimer()
    res = model.detect(img, timer=timer)
    assert len(calls) == 1  # one conv pass feeds the proposals and the windows
    assert 0 < timer.counts["proposals"] <= model.cfg.rpn.post_nms_top_n
    assert len(res["scores"]) > 0
    again = model.detect(img)
    for k in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(res[k], again[k])
    # given proposals still win: the head is not even run
    given = np.array([[10, 10, 60, 60], [20, 30, 90, 100]], np.float32)
    monkeypatch.setattr(model.rpn, "propose", lambda *a, **k: pytest.fail("the head ran"))
    timer = StageTimer()
    model.detect(img, proposals=given, timer=timer)
    assert timer.counts["proposals"] == 2
    monkeypatch.undo()
    # the test-time proposal settings can change for a trained model, the head's training ones cannot
    model.configure_test(["rpn.post_nms_top_n=5"])
    timer = StageTimer()
    model.detect(img, timer=timer)
    assert timer.counts["proposals"] <= 5
    with pytest.raises(Exception, match="only test-time keys"):
        model.configure_test(["rpn.lr=0.1"])


def test_a_proposals_file_overrides_the_learned_ones_and_says_so_once(rpn_run, tmp_path, capsys):
    from detector.datasets.voc import load_voc
    from detector.proposals import write_proposals_npz
    from tools import test_voc

    tmp, data, model_path = rpn_run
    ds = load_voc(data, "test")
    rng = np.random.default_rng(0)
    props = {}
    for r in ds:
        xy = rng.uniform(0, [r.width - 30, r.height - 30], (40, 2))
        props[r.image_id] = np.concatenate([xy, xy + 25], 1).astype(np.float32)
    write_proposals_npz(tmp_path / "p.npz", props)
    from detector.cli import run_tool

    with pytest.warns(UserWarning, match="proposals are learned") as caught:
        assert run_tool(test_voc.main, ["--model", str(model_path), "--dataset", str(data), "--split", "test",
                                        "--proposals", str(tmp_path / "p.npz"), "--out", str(tmp_path / "eval"),
                                        "--quiet"]) == 0
    said = [w for w in caught if "proposals are learned" in str(w.message)]
    assert len(said) == 1 and "are used instead" in str(said[0].message)


def test_rerun_reuses_the_head_and_a_changed_head_setting_redoes_it_and_what_follows(rpn_run, capsys):
    from detector.config import load_config
    from detector.detection.train.pipeline import train

    tmp, data, _ = rpn_run
    overrides = ["proposals.method=rpn", "rpn.iterations=30", "rpn.checkpoint_every=10"]
    train(str(data), str(tmp / "run"), load_config(SMOKE, overrides), cache_root=str(tmp / "cache"), progress=False)
    assert "reused: rpn, finetune, svm, bbox, model" in capsys.readouterr().out
    run2 = tmp / "run_post_nms"  # a test-time setting: only the model file changes
    import shutil

    shutil.copytree(tmp / "run", run2)
    train(str(data), str(run2), load_config(SMOKE, overrides + ["rpn.post_nms_top_n=50"]),
          cache_root=str(tmp / "cache"), progress=False)
    assert "reused: rpn, finetune, svm, bbox" in capsys.readouterr().out


def test_training_with_learned_proposals_on_images_without_objects_is_one_error_line(tmp_path, capsys):
    from detector.cli import run_tool
    from detector.datasets.synthetic import make_synthetic
    from tools import train

    data = make_synthetic(tmp_path / "data", num_train=3, num_test=0, image_size=(96, 80), seed=1)
    for xml in (data / "Annotations").glob("*.xml"):  # every object removed
        text = xml.read_text()
        start, end = text.find("<object>"), text.rfind("</object>") + len("</object>")
        xml.write_text(text[:start] + text[end:] if start >= 0 else text)
    rc = run_tool(train.main, ["--dataset", str(data), "--out", str(tmp_path / "run"), "--cache",
                               str(tmp_path / "cache"), "--config", SMOKE, "--set", "proposals.method=rpn",
                               "classes=[circle,cross,square,triangle]", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "no objects" in err


def test_eval_proposals_reports_the_recall_of_a_models_learned_proposals(rpn_run, tmp_path, capsys):
    import detector
    from detector.datasets.voc import load_voc
    from detector.images import load_image
    from detector.proposals import proposal_recall
    from tools import eval_proposals

    tmp, data, model_path = rpn_run
    assert eval_proposals.main(["--dataset", str(data), "--split", "test", "--model", str(model_path),
                                "--top-ns", "10", "50", "--json", str(tmp_path / "r.json")]) == 0
    assert "learned proposals of" in capsys.readouterr().out
    got = json.loads((tmp_path / "r.json").read_text())
    model, ds = detector.load(model_path), load_voc(data, "test")
    boxes = [model.rpn.propose(model.extractor(load_image(r.path)))[0][:300] for r in ds]
    want = proposal_recall(boxes, [r.boxes for r in ds], [r.labels for r in ds], top_ns=[10, 50],
                           difficult_list=[r.difficult for r in ds])
    np.testing.assert_allclose(np.asarray(got["recall"], float), want["recall"], atol=1e-9)


def test_analyze_errors_reports_the_recall_of_a_models_learned_proposals(rpn_run, tmp_path):
    import detector
    from detector.datasets.voc import load_voc
    from detector.images import load_image
    from detector.metrics.result_files import write_voc_results
    from detector.proposals import proposal_recall
    from tools import analyze_errors

    tmp, data, model_path = rpn_run
    model, ds = detector.load(model_path), load_voc(data, "test")
    # the ground truth as detections: the recall table is about the proposals, not these
    write_voc_results(tmp_path / "dets", "test", ds.class_names, [r.image_id for r in ds],
                      [r.boxes for r in ds], [r.labels for r in ds], [np.ones(len(r.boxes)) for r in ds])
    assert analyze_errors.main(["--dataset", str(data), "--split", "test", "--detections", str(tmp_path / "dets"),
                                "--model", str(model_path), "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "errors_test.json").read_text())
    assert got["proposals"].startswith("learned proposals of")
    boxes = [model.rpn.propose(model.extractor(load_image(r.path)))[0][:300] for r in ds]
    want = proposal_recall(boxes, [r.boxes for r in ds], [r.labels for r in ds], iou_thresholds=[0.5, 0.7],
                           top_ns=[300], difficult_list=[r.difficult for r in ds])
    np.testing.assert_allclose(got["recall"]["all"]["proposal_recall"], np.asarray(want["recall"], float).ravel(),
                               atol=1e-9)
