"""End to end on a tiny generated dataset: train (few iterations), resume, load, detect, test_voc."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def trained(smoke_run):
    return smoke_run


def test_train_writes_model_and_stage_records(trained):
    tmp, data, model_path = trained
    assert model_path.is_file()
    stages = json.loads((tmp / "run" / "stages.json").read_text())
    assert {"proposals", "features", "finetune", "svm", "bbox"} <= set(stages)
    assert (tmp / "run" / "config.yaml").read_text().startswith("classes:")
    assert not list((tmp / "run").glob("*_rows_*")), "per-image rows are removed once the SVMs and regressors exist"


def test_rerun_resumes_finished_stages(trained, capsys):
    from detector.config import load_config
    from detector.detection.train.pipeline import train

    tmp, data, _ = trained
    before = json.loads((tmp / "run" / "stages.json").read_text())
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    out = capsys.readouterr().out
    for stage in ("finetune", "svm", "bbox", "model"):
        assert f"{stage}: done before with the same inputs, reused" in out
    after = json.loads((tmp / "run" / "stages.json").read_text())
    assert after["finetune"] == before["finetune"] and after["svm"] == before["svm"]
    # a changed SVM setting redoes the SVMs but not the fine-tuning
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["svm.C=0.01"])
    train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    again = json.loads((tmp / "run" / "stages.json").read_text())
    assert again["finetune"] == before["finetune"] and again["svm"]["digest"] != before["svm"]["digest"]


def test_rerun_with_irrelevant_settings_redoes_nothing_and_bbox_lam_only_box_regression(trained, capsys):
    from detector.config import load_config
    from detector.detection.train.pipeline import train

    tmp, data, _ = trained
    smoke = ROOT / "configs" / "smoke.yaml"
    train(str(data), str(tmp / "run"), load_config(smoke), cache_root=str(tmp / "cache"), progress=False)
    capsys.readouterr()
    before = json.loads((tmp / "run" / "stages.json").read_text())
    cfg = load_config(smoke, ["proposals.workers=2", "finetune.checkpoint_every=7", "features.device=cpu"])
    train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    out = capsys.readouterr().out
    assert "reused: finetune, svm, bbox, model" in out
    assert json.loads((tmp / "run" / "stages.json").read_text())["finetune"] == before["finetune"]
    train(str(data), str(tmp / "run"), load_config(smoke, ["bbox.lam=2000.0"]), cache_root=str(tmp / "cache"),
          progress=False)
    out = capsys.readouterr().out
    after = json.loads((tmp / "run" / "stages.json").read_text())
    ran = out.split("stages run: ")[1].split(";")[0]
    assert "bbox" in ran and "model" in ran and "finetune" not in ran and "svm" not in ran
    assert "reused: finetune, svm" in out
    assert after["svm"] == before["svm"] and after["bbox"]["digest"] != before["bbox"]["digest"]
    assert cfg.classes is None, "train() works on a copy of the config"


def test_interrupted_svm_feature_pass_resumes_per_image(trained, monkeypatch):
    import shutil

    import detector.detection.train.pipeline as pipeline
    import detector.detection.train.rows as svm_rows
    from detector.config import load_config

    tmp, data, _ = trained
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    runs = {}
    for name in ("reference", "resumed"):
        runs[name] = tmp / f"run_{name}"
        shutil.copytree(tmp / "run", runs[name])
        for f in ("svm.npz", "bbox.npz", "model.safetensors"):
            (runs[name] / f).unlink()
    real, calls, stop_at = svm_rows._regression_rows, [], [None]

    def counted(*args, **kwargs):  # called once per image in the SVM feature pass
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(svm_rows, "_regression_rows", counted)
    pipeline.train(str(data), str(runs["reference"]), cfg, cache_root=str(tmp / "cache"), progress=False)
    n_images = len(calls)
    calls.clear()
    stop_at[0] = 4
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(str(data), str(runs["resumed"]), cfg, cache_root=str(tmp / "cache"), progress=False)
    # image 3 had its regression rows written but not its SVM rows when it stopped
    (svm_dir,) = runs["resumed"].glob("svm_rows_*")
    (bbox_dir,) = runs["resumed"].glob("bbox_rows_*")
    assert sorted(p.name for p in svm_dir.iterdir()) == [f"{i:06d}.npz" for i in range(3)]
    assert sorted(p.name for p in bbox_dir.iterdir()) == [f"{i:06d}.npz" for i in range(3)]
    calls.clear()
    stop_at[0] = None
    pipeline.train(str(data), str(runs["resumed"]), cfg, cache_root=str(tmp / "cache"), progress=False)
    assert n_images > 4 and len(calls) == n_images - 3  # images 0-2 were read back, not recomputed
    assert not svm_dir.exists() and not bbox_dir.exists()
    for f in ("svm.npz", "bbox.npz"):
        with np.load(runs["reference"] / f) as a, np.load(runs["resumed"] / f) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])


def test_load_and_detect_contract(trained):
    import detector
    from detector.images import load_image

    tmp, data, model_path = trained
    model = detector.load(model_path)
    img_path = sorted((data / "JPEGImages").glob("*.jpg"))[0]
    res = model.detect(str(img_path))
    assert set(res) == {"boxes", "scores", "labels", "label_names"}
    assert res["boxes"].dtype == np.float32 and res["boxes"].shape[1] == 4
    assert res["labels"].dtype == np.int64 and len(res["label_names"]) == len(res["scores"])
    assert np.all(np.diff(res["scores"]) <= 0) and len(res["scores"]) <= 100
    W, H = 160, 120
    assert (res["boxes"][:, [0, 2]] <= W).all() and (res["boxes"][:, [1, 3]] <= H).all()
    # same answer from a path, an array and module-level detect with given proposals
    props = model.proposals(load_image(img_path))
    a = model.detect(load_image(img_path), proposals=props)
    b = detector.detect(str(img_path), model=model, proposals=props)
    assert np.array_equal(a["boxes"], b["boxes"]) and np.array_equal(a["scores"], b["scores"])
    assert np.array_equal(a["boxes"], res["boxes"])  # selective search is deterministic


def test_detect_command_prints_draws_and_takes_test_settings(trained, capsys):
    import detector
    from detector.cli import detect_main

    tmp, data, model_path = trained
    images = [str(p) for p in sorted((data / "JPEGImages").glob("*.jpg"))[:2]]
    full = detector.load(model_path).detect(images[0])
    assert len(full["scores"]) > 2  # so the cap below has something to cut
    rc = detect_main(images + ["--model", str(model_path), "--out", str(tmp / "drawn"), "--thresh=-1e9",
                               "--set", "test.max_per_image=2"])
    assert rc == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.endswith("detections (score >= -1000000000.0)")]
    assert len(heads) == 2 and all(": 2 detections" in h for h in heads)
    assert sorted(p.name for p in (tmp / "drawn").glob("*.png")) == sorted(Path(p).stem + ".png" for p in images)


def test_detect_scoring_distinct_windows_once_changes_nothing(trained, monkeypatch):
    import detector
    from detector.images import load_image

    tmp, data, model_path = trained
    model = detector.load(model_path)
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[1])
    props = model.proposals(img)
    fast = model.detect(img, proposals=props, score_thresh=-10.0)
    from detector.timing import StageTimer

    timer = StageTimer()
    model.detect(img, proposals=props, score_thresh=-10.0, timer=timer)
    assert timer.counts["windows"] < timer.counts["proposals"] == len(props)
    assert {"proposals", "resize", "conv", "spp", "fc", "svm", "nms", "bbox"} <= set(timer.times)
    # every box pooled and scored on its own, as before the shortcut
    import detector.detection.detector as detector_mod

    monkeypatch.setattr(detector_mod, "distinct_windows", lambda windows: (windows, np.arange(len(windows))))
    naive = model.detect(img, proposals=props, score_thresh=-10.0)
    assert len(fast["scores"]) > 10
    np.testing.assert_array_equal(fast["labels"], naive["labels"])
    np.testing.assert_allclose(fast["scores"], naive["scores"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast["boxes"], naive["boxes"], rtol=1e-5, atol=1e-3)


def test_test_voc_prints_map_and_writes_files(trained, capsys):
    from tools import test_voc

    tmp, data, model_path = trained
    rc = test_voc.main(["--model", str(model_path), "--dataset", str(data), "--split", "test",
                        "--cache", str(tmp / "cache"), "--out", str(tmp / "eval"), "--vis", "2", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"mAP = \d\.\d{4}", out[-1])
    assert len(list((tmp / "eval").glob("comp4_det_test_*.txt"))) == 4
    # the printed APs are the devkit's on the result files it wrote (scored here by the test suite's
    # own port of VOCevaldet.m), and the model is far better than the same boxes with random scores
    from detector.datasets.voc import load_voc
    from detector.metrics.result_files import read_voc_results
    from detector.metrics.voc import to_devkit_boxes
    from test_evaluation import reference_voc_ap

    ds = load_voc(data, "test")
    names = ds.class_names
    boxes, labels, scores = read_voc_results(tmp / "eval", "test", names, [r.image_id for r in ds])
    boxes = [to_devkit_boxes(b) for b in boxes]
    gt = ([to_devkit_boxes(r.boxes) for r in ds], [r.labels for r in ds], [r.difficult for r in ds])
    ap = reference_voc_ap(boxes, labels, scores, *gt, use_07_metric=True)
    printed = {ln.split()[0]: float(ln.split()[1]) for ln in out if ln.split() and ln.split()[0] in names}
    assert printed == pytest.approx({n: round(float(a), 4) for n, a in zip(names, ap)}, abs=1e-4)
    assert float(out[-1].split("=")[1]) == pytest.approx(float(np.nanmean(ap)), abs=1e-4)
    rng = np.random.default_rng(0)
    shuffled = reference_voc_ap(boxes, labels, [rng.random(len(s)) for s in scores], *gt, use_07_metric=True)
    print(f"smoke mAP {np.nanmean(ap):.4f}, with random scores {np.nanmean(shuffled):.4f}")
    assert np.nanmean(ap) > np.nanmean(shuffled) + 0.1
    assert (tmp / "eval" / "coco_results_test.json").is_file()
    assert len(list((tmp / "eval" / "vis").glob("*.png"))) == 2


def test_model_file_errors(trained, tmp_path):
    import detector
    from detector.detection.detector import ModelFormatError
    from safetensors.torch import load_file, save_file

    _, _, model_path = trained
    with pytest.raises(FileNotFoundError, match="nope"):
        detector.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelFormatError, match="junk"):
        detector.load(tmp_path / "junk.safetensors")
    from safetensors import safe_open

    with safe_open(str(model_path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["version"] = "999"
    save_file(load_file(str(model_path)), str(tmp_path / "v999.safetensors"), metadata=meta)
    with pytest.raises(ModelFormatError, match="version 999"):
        detector.load(tmp_path / "v999.safetensors")


def test_train_tool_imports_the_stage_list_without_torch():
    import subprocess

    from detector.detection.train.pipeline import PIPELINE
    from detector.detection.train.stages import STAGE_NAMES
    from tools import train as train_tool

    assert train_tool.STAGE_NAMES is STAGE_NAMES and [spec.name for spec, _ in PIPELINE] == list(STAGE_NAMES)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tools.train; print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False", "spawned selective-search workers re-import tools/train.py"


MISSING = "/nonexistent/dataset"
TOOL_CASES = [  # (tool, argv after the model/data placeholders are filled in, what the error names)
    ("compute_proposals", ["--dataset", MISSING, "--split", "test"], "nonexistent"),
    ("eval_proposals", ["--dataset", MISSING], "nonexistent"),
    ("extract_features", ["--dataset", MISSING], "nonexistent"),
    ("train", ["--dataset", MISSING, "--out", "{tmp}/r"], "nonexistent"),
    ("train_svms", ["--dataset", MISSING, "--out", "{tmp}/r"], "nonexistent"),
    ("test_voc", ["--model", "{model}", "--dataset", MISSING], "nonexistent"),
    ("compute_proposals", ["--dataset", "{data}", "--set", "proposals.nope=1"], "proposals.nope"),
    ("eval_proposals", ["--dataset", "{data}", "--set", "proposals.mode=slow"], "proposals.mode"),
    ("extract_features", ["--dataset", "{data}", "--set", "features.scales=[8]"], "features.scales"),
    ("train", ["--dataset", "{data}", "--out", "{tmp}/r", "--set", "svm.C=abc"], "svm.C"),
    ("train_svms", ["--dataset", "{data}", "--out", "{tmp}/r", "--set", "finetune.enabled=false"], "svm.layer"),
    ("test_voc", ["--model", "{model}", "--dataset", "{data}", "--set", "features.scales=[480]"], "only test"),
    ("detect", ["{image}", "--model", "{model}", "--set", "test.nms_iou=2"], "nms_iou"),
    ("test_voc", ["--model", "{junk}", "--dataset", "{data}"], "junk.safetensors"),
    ("detect", ["{image}", "--model", "{junk}"], "junk.safetensors"),
    ("test_voc", ["--model", "{tmp}", "--dataset", "{data}"], "is a folder"),
    ("detect", ["{image}", "--model", "{tmp}/none.safetensors"], "model file not found"),
    ("train_classifier", ["--dataset", MISSING, "--out", "{tmp}/r"], "nonexistent"),
    ("train_classifier", ["--dataset", "{data}", "--out", "{tmp}/r", "--set", "classifier.input=warp"],
     "classifier.input"),
    ("test_classifier", ["--model", "{model}", "--dataset", MISSING], "this is a detector"),
    ("test_classifier", ["--model", "{junk}", "--dataset", "{data}"], "junk.safetensors"),
    ("test_classifier", ["--model", "{tmp}/none.safetensors", "--dataset", "{data}"], "model file not found"),
]


@pytest.mark.parametrize("tool,argv,names", TOOL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TOOL_CASES)])
def test_every_tool_reports_bad_input_as_one_error_line(trained, tmp_path, capsys, tool, argv, names):
    import importlib

    from detector.cli import detect_main, run_tool

    _, data, model_path = trained
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    image = sorted((data / "JPEGImages").glob("*.jpg"))[0]
    fill = {"tmp": str(tmp_path), "model": str(model_path), "data": str(data), "junk": str(tmp_path / "junk.safetensors"),
            "image": str(image)}
    main = detect_main if tool == "detect" else importlib.import_module(f"tools.{tool}").main
    rc = run_tool(main, [a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and names in errors[0], err
    assert "Traceback" not in err


def test_every_tool_script_goes_through_the_error_boundary():
    import configparser

    for script in sorted((ROOT / "tools").glob("*.py")):
        text = script.read_text()
        if "__main__" in text:
            tail = text.split("__main__")[-1]
            assert "run_tool(main)" in tail or "detect_cli()" in tail, script.name
    entry = configparser.ConfigParser()
    entry.read(ROOT / "setup.cfg")
    for line in entry["options.entry_points"]["console_scripts"].strip().splitlines():
        module, func = line.split("=")[1].strip().split(":")
        assert func.endswith("_cli")  # the *_cli functions wrap their main in run_tool


def test_a_script_prints_one_error_line_for_real():
    import subprocess

    p = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", MISSING, "--out", "/tmp/x"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr


def test_softmax_scorer_uses_the_same_post_processing_and_round_trips(trained, tmp_path, monkeypatch):
    import torch

    import detector
    from detector.images import load_image

    _, data, model_path = trained
    model = detector.load(model_path)
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[2])
    props = model.proposals(img)
    soft = model.detect(img, proposals=props, scorer="softmax")
    assert len(soft["scores"]) > 0 and (soft["scores"] >= 0).all() and (soft["scores"] <= 1).all()
    # the SVM path, with its scores made equal to fc8's probabilities, gives the same detections
    head = model.embedder.head
    captured = {}
    real_embed = model.embedder.embed

    def embed(pool5):
        captured["pool5"] = pool5.clone()
        return real_embed(pool5)

    monkeypatch.setattr(model.embedder, "embed", embed)
    monkeypatch.setattr(model.predictor, "scores", lambda x: torch.softmax(head(captured["pool5"]), 1)[:, 1:])
    as_svm = model.detect(img, proposals=props, scorer="svm")
    for k in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(as_svm[k], soft[k])
    # selectable in the model file, and per call over it
    monkeypatch.undo()
    model.configure_test(["test.scorer=softmax"])
    model.save(tmp_path / "soft.safetensors")
    again = detector.load(tmp_path / "soft.safetensors")
    assert again.cfg.test.scorer == "softmax"
    np.testing.assert_array_equal(again.detect(img, proposals=props)["scores"], soft["scores"])
    svm = again.detect(img, proposals=props, scorer="svm")
    assert not np.array_equal(svm["scores"], soft["scores"])
    with pytest.raises(ValueError, match="scorer must be"):
        again.detect(img, proposals=props, scorer="vote")


def test_iterative_box_regression_regresses_the_regressed_boxes_again(trained):
    import detector
    from detector.images import load_image

    _, data, model_path = trained
    model = detector.load(model_path)
    model.cfg.test.second_nms = False  # so both runs keep the same detections
    model.cfg.test.nms_after_regression = False  # NMS on the proposals, then the kept ones regressed
    model.cfg.test.bbox_iterations = 1
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[1])
    props = model.proposals(img)
    once = model.detect(img, proposals=props, score_thresh=-10.0)
    model.cfg.test.bbox_iterations = 2
    twice = model.detect(img, proposals=props, score_thresh=-10.0)
    assert len(once["scores"]) > 5
    np.testing.assert_array_equal(once["labels"], twice["labels"])
    np.testing.assert_array_equal(once["scores"], twice["scores"])
    # by hand: the first pass's (clipped) boxes pooled again and moved by their class's regressor
    maps = model.extractor(img)
    win = model.embedder.windows(maps, once["boxes"])
    p5 = model.embedder.pool5_windows(maps, win)
    assert model.window_reference  # the default: the deltas move the boxes the windows cover
    start = model.embedder.window_boxes(maps, win).astype(np.float32)
    want = model.predictor.refine(start, model.predictor.deltas(p5.double(), once["labels"]), once["labels"])
    want = np.clip(want, 0, [img.shape[1], img.shape[0]] * 2)
    np.testing.assert_allclose(twice["boxes"], want, atol=1e-3)
    assert not np.allclose(twice["boxes"], once["boxes"], atol=1e-3)
