"""The SPP-net classifier: view geometry, views on the map against crops through the trunk,
any size in, the model file, training (modes, resume, determinism) and every bad input."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = ROOT / "configs" / "classifier_smoke.yaml"
COLOURS = ["blue", "green", "red"]


def make_folder(root: Path, n_train: int = 5, n_test: int = 2, seed: int = 0) -> Path:
    """Image-folder data: noise tinted by class, of random sizes and aspects (36..110 px)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(COLOURS):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = rng.integers(36, 110, 2)
                img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
                img[..., 2 - k] += 150
                Image.fromarray(img).save(d / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from detector.classification.training import train_classifier
    from detector.config import load_config

    tmp = tmp_path_factory.mktemp("cls")
    data = make_folder(tmp / "data")
    path = train_classifier(str(data), str(tmp / "run"), load_config(SMOKE), str(tmp / "cache"), progress=False)
    return tmp, data, path


def toy_classifier(num_classes: int = 3, **classifier):
    """A classifier on a one-layer trunk with 8x8 stride-8 cells: receptive fields do not
    overlap, so a crop aligned to the stride has exactly the cells of its window."""
    from detector.core.backbones import Backbone, geometry_from_layers
    from detector.classification.classifier import SPPClassifier, classifier_embedder
    from detector.config import load_config

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU()).eval()
    stride, offset = geometry_from_layers(trunk.modules())
    bb = Backbone("toy", trunk, stride, offset, 4, stride, (127.5,) * 3, (64.0,) * 3, False, "toy")
    cfg = load_config(None, [f"classifier.{k}={v}" for k, v in classifier.items()] + ["classifier.fc_dims=[16, 16]"])
    emb = classifier_embedder(cfg, bb, num_classes, pool5_scale=0.1)
    return SPPClassifier(cfg, [f"c{k}" for k in range(num_classes)], emb, "cpu")


def rgb(h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- views

def naive_views(W, H, scale, size, grid):
    """Reference: corners of the paper's views on the resized image, written out by hand."""
    f = scale / min(W, H)
    Ws, Hs = int(round(W * f)), int(round(H * f))
    xs = [0, (Ws - size) // 2, Ws - size]
    ys = [0, (Hs - size) // 2, Hs - size]
    if grid:
        pts = [(x, y) for y in ys for x in xs]
    else:
        pts = [(xs[1], ys[1]), (xs[0], ys[0]), (xs[2], ys[0]), (xs[0], ys[2]), (xs[2], ys[2])]
    out = []
    for p in pts:
        if p not in out:
            out.append(p)
    return f, out


def assert_views(boxes, f, corners, W, H):
    """Boxes in original pixels are the views' resized-pixel corners / f, clipped to the image
    (the last pixel of a resized row may stand for a little more than the image holds)."""
    ref = np.array([[x, y, x + 224, y + 224] for x, y in corners], float) / f
    np.testing.assert_allclose(boxes, np.minimum(ref, [W, H, W, H]), atol=1e-9)


def test_multi_has_96_plus_2_views_at_the_papers_positions():
    from detector.classification.views import count_views, plan_views, scheme

    W, H = 400, 300
    s = scheme("multi", 256, 256, [224, 256, 300, 360, 448, 560])
    groups = plan_views(s, W, H, 224, 2000)
    windows = [g for g in groups if not g.whole]
    whole = [g for g in groups if g.whole]
    assert count_views(windows) == 96 and count_views(whole) == 2
    assert sorted({(g.scale, g.flip) for g in windows}) == sorted((s, f) for s in s.scales for f in (False, True))
    assert [(g.scale, g.flip) for g in whole] == [(256, False), (256, True)]
    for g in windows:
        f, pts = naive_views(W, H, g.scale, 224, grid=True)
        assert len(pts) == (3 if g.scale == 224 else 9)  # at 224 the image is 224 high: 3 distinct views
        assert_views(g.boxes, f, pts, W, H)
    np.testing.assert_array_equal(whole[0].boxes, [[0, 0, W, H]])


@pytest.mark.parametrize("W,H", [(400, 300), (300, 500), (256, 256)])
def test_ten_views_are_the_centre_and_corners_with_flips(W, H):
    from detector.classification.views import plan_views, scheme

    groups = plan_views(scheme("10", 256, 256, [224]), W, H, 224, 2000)
    f, pts = naive_views(W, H, 256, 224, grid=False)
    assert [g.flip for g in groups] == [False, True]
    for g in groups:
        assert_views(g.boxes, f, pts, W, H)
    assert sum(len(g.boxes) for g in groups) == 10


def test_views_clip_to_an_image_the_size_cap_kept_small():
    from detector.classification.views import view_boxes

    # 1200x30 at scale 256 would be 10240 long; max_size 2000 caps it at 2000x50
    b = view_boxes(1200, 30, 256, 224, "grid9", 2000)
    assert len(b) == 3 and (b[:, 1] == 0).all() and np.allclose(b[:, 3], 30)
    assert (b >= 0).all() and (b[:, 2] <= 1200).all()


# --------------------------------------------------------------- views on maps vs crops

def test_views_on_the_map_equal_crops_through_the_trunk_when_aligned():
    from detector.timing import StageTimer

    clf = toy_classifier()
    img = rgb(256, 320)  # scale 256: factor 1; view corners at x 0/48/96, y 0/16/32: multiples of 8
    groups = clf.views(320, 256, "10")
    on_map = clf._view_pool5(img, groups, StageTimer())
    cropped = clf._crop_pool5(img, groups, StageTimer())
    assert on_map.shape == (10, 4 * 50)
    assert torch.equal(on_map, cropped)
    a, b = clf.classify(img, views="10"), clf.classify(img, views="10crop")
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6, atol=1e-7)
    # and the same views on an image whose views are not aligned to the cells do differ
    img2 = rgb(256, 330)
    g2 = clf.views(330, 256, "10")
    assert not torch.equal(clf._view_pool5(img2, g2, StageTimer()), clf._crop_pool5(img2, g2, StageTimer()))


@pytest.mark.parametrize("scheme,scales,images", [
    ("center", "[224]", 1), ("full", "[224]", 1), ("10", "[224]", 2), ("10crop", "[224]", 10),
    ("multi", "[224,256,300,360,448,560]", 12),  # 6 scales x 2; the full-image views reuse the 256 maps
    ("multi", "[96,128,160]", 8),  # 3 scales x 2, and the full-image views' own 256 maps
])
def test_maps_are_computed_once_per_scale_and_flip_never_per_view(scheme, scales, images):
    clf = toy_classifier(test_scales=scales)
    seen = []
    hook = clf.backbone.trunk.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        clf.classify(rgb(300, 400), views=scheme)
    finally:
        hook.remove()
    assert sum(seen) == images
    if scheme == "10crop":
        assert len(seen) == 2  # the five crops of each flip go through in one batch


def test_any_size_in_fixed_length_out():
    clf = toy_classifier()
    for h, w in [(10, 10), (3, 700), (500, 37), (1200, 30), (257, 311)]:
        img = rgb(h, w)
        for scheme in ("full", "center", "10", "multi"):
            r = clf.classify(img, views=scheme)
            assert r["scores"].shape == (3,) and r["scores"].dtype == np.float32
            assert abs(float(r["scores"].sum()) - 1) < 1e-5
    from detector.core.features import FeatureExtractor

    for h, w in [(10, 10), (40, 900)]:
        sf = FeatureExtractor(clf.backbone, [256], 2000, "cpu")(rgb(h, w))
        from detector.classification.classifier import whole_pool5

        assert whole_pool5(clf.embedder, sf[0]).shape == (1, 4 * 50)


def test_classify_takes_a_path_an_array_or_a_pil_image(tmp_path):
    clf = toy_classifier(num_classes=7)
    img = rgb(90, 120)
    Image.fromarray(img).save(tmp_path / "a.png")
    a = clf.classify(str(tmp_path / "a.png"), views="10")
    b = clf.classify(img, views="10")
    c = clf.classify(Image.fromarray(img), views="10")
    assert np.array_equal(a["scores"], b["scores"]) and np.array_equal(b["scores"], c["scores"])
    assert a["label"] == int(np.argmax(a["scores"])) and a["label_name"] == clf.class_names[a["label"]]
    assert len(a["top5"]) == 5 and a["top5"][0] == (a["label_name"], float(a["scores"][a["label"]]))
    assert [s for _, s in a["top5"]] == sorted((float(s) for s in a["scores"]), reverse=True)[:5]
    with pytest.raises(ValueError, match="unknown view scheme"):
        clf.classify(img, views="12")


# ----------------------------------------------------------------------------- training

def test_training_writes_a_model_that_classifies_and_reproduces(trained, tmp_path):
    import json

    import detector
    from detector.classification.training import train_classifier
    from detector.config import load_config

    tmp, data, path = trained
    summary = json.loads((tmp / "run" / "train_summary.json").read_text())
    assert [e["size"] for e in summary["epochs"]] == [64, 48, 64, 48]  # alternating sizes per epoch
    assert summary["images"] == 15 and summary["skipped"] == []
    clf = detector.load_classifier(path)
    assert clf.class_names == COLOURS
    r = clf.classify(str(data / "test" / "red" / "0.jpg"), views="multi")
    assert r["scores"].shape == (3,)
    # same seed, same data: the same bytes (a fresh run folder, the same conv-map cache)
    again = train_classifier(str(data), str(tmp_path / "again"), load_config(SMOKE), str(tmp / "cache"),
                             progress=False)
    assert again.read_bytes() == path.read_bytes()


def test_an_interrupted_training_resumes_to_the_same_model(trained, tmp_path, monkeypatch):
    import detector.classification.training as ct
    from detector.config import load_config

    tmp, data, path = trained
    real, calls = ct.Trainer.epoch, []

    def stop_in_epoch_3(self, epoch, progress):
        calls.append(epoch)
        if epoch == 2 and len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, epoch, progress)

    monkeypatch.setattr(ct.Trainer, "epoch", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        ct.train_classifier(str(data), str(tmp_path / "r"), load_config(SMOKE), str(tmp / "cache"), progress=False)
    assert not (tmp_path / "r" / "model.safetensors").exists()
    out = ct.train_classifier(str(data), str(tmp_path / "r"), load_config(SMOKE), str(tmp / "cache"),
                              progress=False)
    assert calls == [0, 1, 2, 2, 3]  # epochs 0 and 1 came from the checkpoint
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("items,per_image", [
    (["classifier.input=full"], 2),  # the image and its mirror image
    (["classifier.input=crop224", "classifier.crop_positions=grid9"], 18),
])
def test_other_input_modes_train(trained, tmp_path, items, per_image):
    import json

    import detector.classification.training as ct
    from detector.config import load_config

    tmp, data, _ = trained
    cfg = load_config(SMOKE, items + ["classifier.epochs=2"])
    seen = []
    real = ct.collect
    ct.collect = lambda samples, size, emb, progress: (real(samples, size, emb, progress),
                                                      seen.append(samples.tables[size].shape))[0]
    try:
        ct.train_classifier(str(data), str(tmp_path / "r"), cfg, str(tmp / "cache"), progress=False)
    finally:
        ct.collect = real
    assert seen[0][:2] == (15, per_image)
    sizes = [e["size"] for e in json.loads((tmp_path / "r" / "train_summary.json").read_text())["epochs"]]
    assert sizes == ([80, 80] if "full" in items[0] else [64, 64])


def test_random_multisize_draws_each_epochs_size_in_the_range():
    from detector.classification.training import epoch_size
    from detector.config import load_config

    cfg = load_config(SMOKE, ["classifier.size_schedule=random", "classifier.sizes=[48, 64]"])
    sizes = [epoch_size(cfg, e) for e in range(40)]
    assert all(48 <= s <= 64 for s in sizes) and len(set(sizes)) > 5
    assert sizes == [epoch_size(cfg, e) for e in range(40)]  # seeded by (seed, epoch): resumable


def test_fine_tuning_the_last_block_changes_only_that_block(trained, tmp_path):
    import detector
    from detector.core.backbones import build_backbone
    from detector.classification.training import train_classifier
    from detector.config import load_config

    tmp, data, _ = trained
    cfg = load_config(SMOKE, ["classifier.trunk_trainable_blocks=1", "classifier.epochs=1", "classifier.lr=0.1"])
    clf = detector.load_classifier(train_classifier(str(data), str(tmp_path / "r"), cfg, str(tmp / "cache"),
                                                    progress=False))
    before = build_backbone(cfg.backbone).trunk.state_dict()
    after = clf.backbone.trunk.state_dict()
    last = str(len(clf.backbone.trunk) - 1) + "."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(last) for k in changed)


# ----------------------------------------------------------------------------- model file

def test_model_file_round_trip_and_damage(trained, tmp_path):
    import detector
    from detector.errors import ModelFormatError
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    tmp, data, path = trained
    clf = detector.load_classifier(path)
    clf.save(tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes()
    img = str(data / "test" / "green" / "1.jpg")
    np.testing.assert_array_equal(detector.load_classifier(tmp_path / "copy.safetensors").classify(img)["scores"],
                                  clf.classify(img)["scores"])
    blob = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFormatError, match="cut.safetensors"):
        detector.load_classifier(tmp_path / "cut.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors["head.fc8.weight"] = tensors["head.fc8.weight"][:2]  # two classes' rows for three names
    save_file(tensors, str(tmp_path / "rows.safetensors"), metadata=meta)
    with pytest.raises(ModelFormatError, match="head.fc8.weight"):
        detector.load_classifier(tmp_path / "rows.safetensors")
    tensors = load_file(str(path))
    tensors["pool5_scale"] = torch.tensor([-1.0], dtype=torch.float64)
    save_file(tensors, str(tmp_path / "neg.safetensors"), metadata=meta)
    with pytest.raises(ModelFormatError, match="pool5_scale"):
        detector.load_classifier(tmp_path / "neg.safetensors")
    with pytest.raises(ModelFormatError, match="a classifier .*not a detector"):
        detector.load(path)


# ----------------------------------------------------------------------------- bad input

def run(tool, argv, capsys):
    """(exit status, stdout, the `error:` lines) of a tool run through its error boundary."""
    import importlib

    from detector.cli import run_tool

    rc = run_tool(importlib.import_module(f"tools.{tool}").main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, [line for line in err.splitlines() if line.startswith("error:")]


def test_test_tool_prints_the_table_and_ends_with_the_two_error_lines(trained, tmp_path, capsys):
    import json
    import re

    tmp, data, path = trained
    rc, out, errors = run("test_classifier", ["--model", path, "--dataset", data, "--views", "all", "--quiet",
                                              "--out", tmp_path / "res"], capsys)
    assert rc == 0 and not errors
    lines = out.strip().splitlines()
    assert re.fullmatch(r"top1_err = \d\.\d{4}", lines[-2]) and re.fullmatch(r"top5_err = \d\.\d{4}", lines[-1])
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert [r["scheme"] for r in res] == ["center", "full", "10", "10crop", "multi"]
    assert lines[-2] == f"top1_err = {res[-1]['top1_err']:.4f}"  # with `all`, the last scheme's
    for r in res:
        row = next(line for line in lines if line.startswith(r["scheme"] + " "))
        assert row.split()[1:4] == ["6", f"{r['top1_err']:.4f}", f"{r['top5_err']:.4f}"]
    assert all(name in out for name in COLOURS)  # the per-class table
    # top-1 error against the predictions file, counted by hand
    import csv

    rows = list(csv.DictReader(open(tmp_path / "res" / "predictions_multi.csv")))
    assert abs(sum(r["label"] != r["predicted"] for r in rows) / len(rows) - res[-1]["top1_err"]) < 1e-12


def test_unreadable_and_zero_byte_images_are_skipped_and_counted(trained, tmp_path, capsys):
    import shutil

    tmp, data, path = trained
    shutil.copytree(data, tmp_path / "d")
    (tmp_path / "d" / "test" / "red" / "empty.jpg").write_bytes(b"")
    (tmp_path / "d" / "test" / "blue" / "broken.jpg").write_bytes(b"not a jpeg at all")
    rc, out, errors = run("test_classifier", ["--model", path, "--dataset", tmp_path / "d", "--quiet"], capsys)
    assert rc == 0 and not errors
    head = out.splitlines()[0]
    assert "6 images" in head and "skipped 2 unreadable" in head and "empty.jpg" in head and "broken.jpg" in head
    # in training too: skipped, counted in the summary, the rest trained on
    import json

    (tmp_path / "d" / "train" / "green" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    rc, out, errors = run("train_classifier", ["--dataset", tmp_path / "d", "--out", tmp_path / "r", "--quiet",
                                               "--cache", tmp / "cache", "--config", SMOKE,
                                               "--set", "classifier.epochs=1"], capsys)
    assert rc == 0 and not errors
    summary = json.loads((tmp_path / "r" / "train_summary.json").read_text())
    assert summary["images"] == 15 and [Path(p).name for p, _ in summary["skipped"]] == ["broken.jpg"]


def test_a_tiny_image_classifies_with_full_and_every_other_scheme(trained, tmp_path):
    import detector

    _, _, path = trained
    clf = detector.load_classifier(path)
    for scheme in ("full", "center", "10", "10crop", "multi"):
        assert clf.classify(rgb(10, 10), views=scheme)["scores"].shape == (3,)


@pytest.mark.parametrize("case", ["empty class", "no split", "unknown class", "detector model", "classifier to voc",
                                  "no class folders"])
def test_bad_input_is_one_error_line_naming_it(trained, tmp_path, capsys, case):
    import shutil

    from detector.core.model_file import write_model_file

    tmp, data, path = trained
    d = tmp_path / "d"
    shutil.copytree(data, d)
    if case == "empty class":
        (d / "train" / "violet").mkdir()
        argv, tool, names = ["--dataset", d, "--out", tmp_path / "r", "--config", SMOKE], "train_classifier", \
            "violet holds no images"
    elif case == "no split":
        argv, tool, names = ["--model", path, "--dataset", d, "--split", "val"], "test_classifier", \
            "split folder " + str(d / "val") + " does not exist"
    elif case == "unknown class":
        shutil.copytree(d / "test" / "red", d / "test" / "violet")
        argv, tool, names = ["--model", path, "--dataset", d], "test_classifier", \
            "class folder " + str(d / "test" / "violet") + " is not a class the model knows"
    elif case == "detector model":
        write_model_file(tmp_path / "det.safetensors", "sppnet-detector", 1, {}, {"x": torch.zeros(1)})
        argv, tool, names = ["--model", tmp_path / "det.safetensors", "--dataset", d], "test_classifier", \
            "this is a detector"
    elif case == "classifier to voc":
        argv, tool, names = ["--model", path, "--dataset", d], "test_voc", "this is a classifier"
    else:
        shutil.rmtree(d / "test")
        (d / "test").mkdir()
        argv, tool, names = ["--model", path, "--dataset", d], "test_classifier", "has no class folders"
    rc, _, errors = run(tool, argv, capsys)
    assert rc == 2 and len(errors) == 1 and names in errors[0], errors


def test_image_folder_reader_sorts_classes_and_labels_by_folder(tmp_path):
    from detector.datasets.imagefolder import load_image_folder

    d = make_folder(tmp_path / "d", n_train=2, n_test=1)
    (d / "train" / ".hidden").mkdir()
    (d / "train" / "red" / "notes.txt").write_text("not an image")
    s = load_image_folder(d, "train")
    assert s.class_names == COLOURS and len(s) == 6
    assert [Path(p).parent.name for p in s.paths] == [COLOURS[k] for k in s.labels]
    t = load_image_folder(d, "test", ["red", "green", "blue", "violet"])  # the model's order, extra classes allowed
    assert [Path(p).parent.name for p in t.paths] == [["red", "green", "blue", "violet"][k] for k in t.labels]


# ------------------------------------------------------------- classification defaults (issue 22)
def test_train_tool_starts_from_the_classification_defaults(tmp_path, monkeypatch, capsys):
    """No --config: the classification defaults (stride-32 cut, `scales` training, `multi` testing),
    and a line that says so; a --config file goes on top of them; detection's defaults unchanged."""
    import detector.classification.training as ct
    from detector.config import load_config
    from tools import train_classifier

    seen = []
    monkeypatch.setattr(ct, "train_classifier", lambda dataset, out, cfg, cache, progress: seen.append(cfg))
    data = make_folder(tmp_path / "d", n_train=1, n_test=1)
    assert train_classifier.main(["--dataset", str(data), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    cfg = seen[-1]
    assert (cfg.backbone.cut, cfg.classifier.input, cfg.classifier.test_views) == ("stride32", "scales", "center")
    assert "config: the classification defaults, detector/classification/defaults.py" in out.splitlines()[0]
    assert train_classifier.main(["--dataset", str(data), "--out", str(tmp_path / "r"), "--config", str(SMOKE),
                                  "--set", "classifier.epochs=2"]) == 0
    out = capsys.readouterr().out
    cfg = seen[-1]
    assert (cfg.backbone.cut, cfg.classifier.input, cfg.classifier.epochs) == ("stride32", "multisize", 2)
    assert out.splitlines()[0].startswith(f"config: {SMOKE} over the classification defaults")
    assert load_config(None).backbone.cut == "stride16"


def _scales_model(tmp_path_factory):
    from detector.classification.training import train_classifier
    from detector.classification.defaults import load_classification_config

    tmp = tmp_path_factory.mktemp("scales")
    data = make_folder(tmp / "data", n_train=3, n_test=2, seed=3)
    cfg, _ = load_classification_config(str(SMOKE), ["classifier.input=scales", "classifier.epochs=2"])
    path = train_classifier(str(data), str(tmp / "run"), cfg, str(tmp / "cache"), progress=False)
    return tmp, data, path


@pytest.fixture(scope="module")
def scales_trained(tmp_path_factory):
    return _scales_model(tmp_path_factory)


def test_scales_training_draws_views_of_every_test_scale_and_the_full_image(scales_trained):
    """The pool5 table holds, per image, grid9 x 2 views of each test scale and the two full-image
    views (counted by hand from view_boxes), and draw_views picks every group over the epochs."""
    import json

    from detector.classification.training import draw_views
    from detector.classification.views import view_boxes
    from detector.images import image_size

    tmp, data, path = scales_trained
    import detector

    clf = detector.load_classifier(path)
    c = clf.cfg.classifier
    assert c.input == "scales" and clf.cfg.backbone.cut == "stride32" and c.test_views == "center"
    summary = json.loads((tmp / "run" / "train_summary.json").read_text())
    assert [e["size"] for e in summary["epochs"]] == ["scales", "scales"]
    counts = []
    for p in sorted((data / "train").glob("*/*.jpg")):
        W, H = image_size(p)
        counts.append([2 * len(view_boxes(W, H, s, c.view_size, "grid9", clf.cfg.features.max_size))
                       for s in sorted(c.test_scales)] + [2])
    first, groups = 0, []
    for n in counts:
        groups.append([(first + sum(n[:k]), n[k]) for k in range(len(n))])
        first += sum(n)
    hits = np.zeros((len(groups), len(c.test_scales) + 1), int)
    rng = np.random.default_rng(0)
    for _ in range(200):
        for i, row in enumerate(draw_views(groups, rng)):
            k = next(k for k, (a, n) in enumerate(groups[i]) if a <= row < a + n)
            hits[i, k] += 1
    assert (hits > 0).all()


def _naive_scores(clf, path, scales, flips, full, average):
    """The views of a set pooled one map at a time, written out plainly: grid9 (or one scheme's
    positions) at each scale, on the image and its mirror image, and the full-image views."""
    from detector.classification.views import full_box, view_boxes
    from detector.images import load_image

    c = clf.cfg.classifier
    img = load_image(path)
    H, W = img.shape[:2]
    rows = []
    for scale, positions in scales:
        boxes = view_boxes(W, H, scale, c.view_size, positions, clf.cfg.features.max_size)
        for flip in flips:
            maps = clf.extractor(scale)(img, flip=flip)
            rows.append(clf.logits(clf.embedder.pool5(maps, boxes, np.zeros(len(boxes), np.int64))))
    for flip in full:
        maps = clf.extractor(c.full_scale)(img, flip=flip)
        rows.append(clf.logits(clf.embedder.pool5(maps, full_box(W, H), np.zeros(1, np.int64))))
    logits = torch.cat(rows).double()
    if average == "softmax":
        return torch.softmax(logits, 1).mean(0).numpy()
    return torch.softmax(logits.mean(0), 0).numpy()


def test_breakdown_matches_each_view_set_computed_alone(scales_trained):
    """Every row of the breakdown (one pass, each map once) against its views pooled map by map
    (_naive_scores), for both averagings; the errors against the labels counted by hand."""
    from detector.classification.evaluate import run_breakdown
    from detector.datasets.imagefolder import load_image_folder

    tmp, data, path = scales_trained
    import detector

    clf = detector.load_classifier(path)
    c = clf.cfg.classifier
    split = load_image_folder(data, "test", clf.class_names)
    table = {(r["scheme"], r["average"]): r for r in run_breakdown(clf, split, progress=False)}
    ordered = sorted(c.test_scales)
    sets = {"center": ([(c.view_scale, "center")], (False,), ()), "full": ([], (), (False,)),
            "10": ([(c.view_scale, "corners5")], (False, True), ())}
    sets.update({f"scale {s}": ([(s, "grid9")], (False, True), ()) for s in ordered})
    sets.update({f"up to {s}": ([(t, "grid9") for t in ordered[:k + 1]], (False, True), (False, True))
                 for k, s in enumerate(ordered[:-1])})
    sets["multi"] = ([(t, "grid9") for t in ordered], (False, True), (False, True))
    assert sorted({k[0] for k in table}) == sorted(sets)
    for name, (scales, flips, full) in sets.items():
        for average in ("softmax", "logits"):
            r = table[(name, average)]
            ref = np.stack([_naive_scores(clf, p, scales, flips, full, average) for p in split.paths])
            np.testing.assert_allclose(r["scores"], ref, atol=1e-5, err_msg=f"{name} {average}")
            wrong = [int(np.argmax(s)) != y for s, y in zip(ref, split.labels)]
            assert r["top1_err"] == pytest.approx(sum(wrong) / len(wrong)), (name, average)


def test_classify_averages_softmax_or_logits_as_asked(scales_trained):
    """classify(average=...) against the breakdown's `multi` row (the schemes' own path)."""
    import detector
    from detector.classification.evaluate import run_breakdown
    from detector.datasets.imagefolder import load_image_folder

    _, data, path = scales_trained
    clf = detector.load_classifier(path)
    split = load_image_folder(data, "test", clf.class_names)
    table = {(r["scheme"], r["average"]): r for r in run_breakdown(clf, split, progress=False)}
    for average in ("softmax", "logits"):
        for scheme in ("center", "full", "10", "multi"):
            got = np.stack([clf.classify(p, views=scheme, average=average)["scores"] for p in split.paths])
            np.testing.assert_allclose(got, table[(scheme, average)]["scores"], atol=1e-5)
    assert clf.classify(split.paths[0], views="multi")["scores"] == pytest.approx(
        table[("multi", "softmax")]["scores"][0], abs=1e-5)  # the model's own averaging: softmax


def test_test_tool_breakdown_and_the_models_own_scheme(scales_trained, tmp_path, capsys):
    import json

    _, data, path = scales_trained
    rc, out, errors = run("test_classifier", ["--model", path, "--dataset", data, "--views", "breakdown",
                                              "--quiet", "--out", tmp_path / "res"], capsys)
    assert rc == 0 and not errors
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    center = next(r for r in res if r["scheme"] == "center" and r["average"] == "softmax")
    assert out.strip().splitlines()[-2] == f"top1_err = {center['top1_err']:.4f}"  # the model's own: center
    for r in res:
        if r["average"] == "logits":
            row = next(line for line in out.splitlines() if line.startswith(r["scheme"] + " "))
            assert row.split()[-3] == f"{r['top1_err']:.4f}"
    rc, out, errors = run("test_classifier", ["--model", path, "--dataset", data, "--quiet", "--average", "logits"],
                          capsys)
    assert rc == 0 and "views: center (the model's classifier.test_views); averaging the views' logits" in out
    from detector.classification.defaults import CENTER_NOTE
    assert out.count(CENTER_NOTE) == 1  # the default scheme is a single view, and the tool says why
    logits = next(r for r in res if r["scheme"] == "center" and r["average"] == "logits")
    assert out.strip().splitlines()[-2] == f"top1_err = {logits['top1_err']:.4f}"
    rc, out, errors = run("test_classifier", ["--model", path, "--dataset", data, "--quiet", "--views", "multi"],
                          capsys)
    assert rc == 0 and CENTER_NOTE not in out
    multi = next(r for r in res if r["scheme"] == "multi" and r["average"] == "softmax")
    assert out.strip().splitlines()[-2] == f"top1_err = {multi['top1_err']:.4f}"


@pytest.mark.parametrize("case", ["one class", "no readable image"])
def test_training_folder_errors_name_the_folder(tmp_path, capsys, case):
    import shutil

    d = make_folder(tmp_path / "d", n_train=2, n_test=1)
    if case == "one class":
        for name in COLOURS[1:]:
            shutil.rmtree(d / "train" / name)
        names = f"{d / 'train'} has one class folder (blue)"
    else:
        for p in (d / "train" / "green").iterdir():
            p.write_bytes(b"not an image")
        names = f"class folder {d / 'train' / 'green'} has no readable image"
    rc, _, errors = run("train_classifier", ["--dataset", d, "--out", tmp_path / "r", "--quiet", "--cache",
                                             tmp_path / "c", "--config", SMOKE, "--set", "classifier.epochs=1"],
                        capsys)
    assert rc == 2 and len(errors) == 1 and names in errors[0], errors


def test_grayscale_and_16_bit_images_classify_like_their_rgb(trained, tmp_path):
    """An 8-bit grayscale PNG, the same as 16-bit, and the grey replicated to RGB: one score."""
    import detector
    from detector.datasets.imagefolder import load_image_folder

    _, _, path = trained
    clf = detector.load_classifier(path)
    grey = np.random.default_rng(5).integers(0, 256, (70, 90), dtype=np.uint8)
    d = tmp_path / "test" / "red"
    d.mkdir(parents=True)
    Image.fromarray(grey, mode="L").save(d / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "grey16.png")
    assert Image.open(d / "grey16.png").mode.startswith("I")
    split = load_image_folder(tmp_path, "test", clf.class_names)
    assert len(split) == 2 and not split.skipped
    want = clf.classify(np.repeat(grey[:, :, None], 3, 2), views="10")["scores"]
    for p in split.paths:
        np.testing.assert_allclose(clf.classify(p, views="10")["scores"], want, atol=1e-6)


def test_concat_releasing_equals_torch_cat_and_empties_the_list():
    from detector.classification.training import concat_releasing

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 5, generator=g).half() for n in (3, 1, 7, 2)]
    expected = torch.cat(rows)
    got = concat_releasing(list_ := list(rows))
    assert torch.equal(got, expected) and got.dtype == torch.float16
    assert list_ == []  # each image's rows are released as they are copied
    assert concat_releasing([]).numel() == 0
