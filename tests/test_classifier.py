"""The SPP-net classifier: view geometry, views on the map against crops through the trunk,
any size in, the model file, training (modes, resume, determinism) and every bad input."""
import sys
import warnings
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
    from detector.classifier_training import train_classifier
    from detector.config import load_config

    tmp = tmp_path_factory.mktemp("cls")
    data = make_folder(tmp / "data")
    path = train_classifier(str(data), str(tmp / "run"), load_config(SMOKE), str(tmp / "cache"), progress=False)
    return tmp, data, path


def toy_classifier(num_classes: int = 3, **classifier):
    """A classifier on a one-layer trunk with 8x8 stride-8 cells: receptive fields do not
    overlap, so a crop aligned to the stride has exactly the cells of its window."""
    from detector.backbones import Backbone, geometry_from_layers
    from detector.classifier import SPPClassifier, classifier_embedder
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
    from detector.views import count_views, plan_views, scheme

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
    from detector.views import plan_views, scheme

    groups = plan_views(scheme("10", 256, 256, [224]), W, H, 224, 2000)
    f, pts = naive_views(W, H, 256, 224, grid=False)
    assert [g.flip for g in groups] == [False, True]
    for g in groups:
        assert_views(g.boxes, f, pts, W, H)
    assert sum(len(g.boxes) for g in groups) == 10


def test_views_clip_to_an_image_the_size_cap_kept_small():
    from detector.views import view_boxes

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
    from detector.features import FeatureExtractor

    for h, w in [(10, 10), (40, 900)]:
        sf = FeatureExtractor(clf.backbone, [256], 2000, "cpu")(rgb(h, w))
        from detector.classifier import whole_pool5

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
