"""The device path (what runs on a GPU) exercised on the CPU: resize on the device, scores and
box-regression deltas in one pass, chunked windows; it must agree with the host path."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def model_and_image(smoke_run):
    import detector
    from detector.images import load_image

    _, data, model_path = smoke_run
    model = detector.load(model_path, device="cpu")
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[3])
    return model, img, model.proposals(img)


def _same(a, b, box_tol=1e-2):
    assert len(a["scores"]) == len(b["scores"]) > 0
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=box_tol)


def test_device_path_agrees_with_the_host_path(model_and_image):
    model, img, props = model_and_image
    host = model.detect(img, proposals=props, score_thresh=-10.0)
    model.use_device_path(True)
    try:
        dev = model.detect(img, proposals=props, score_thresh=-10.0)
        soft_dev = model.detect(img, proposals=props, scorer="softmax")
    finally:
        model.use_device_path(False)
    _same(host, dev)
    _same(model.detect(img, proposals=props, scorer="softmax"), soft_dev)


@pytest.mark.parametrize("device_path", [False, True])
def test_windows_in_chunks_give_the_same_detections(model_and_image, monkeypatch, device_path):
    import detector.detection.detector as model_mod

    model, img, props = model_and_image
    model.use_device_path(device_path)
    try:
        whole = model.detect(img, proposals=props, score_thresh=-10.0)
        monkeypatch.setattr(model_mod, "WINDOW_CHUNK", 37)
        chunked = model.detect(img, proposals=props, score_thresh=-10.0)
    finally:
        model.use_device_path(False)
    _same(whole, chunked, box_tol=1e-4)


def test_many_proposals_are_scored_in_bounded_chunks(model_and_image, monkeypatch):
    import detector.detection.detector as model_mod

    model, img, _ = model_and_image
    H, W = img.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [W - 10, H - 10], (20000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (20000, 2))], 1).clip(0, [W, H, W, H]).astype(np.float32)
    sizes = []
    real = model.embedder.pool5_windows
    monkeypatch.setattr(model.embedder, "pool5_windows", lambda f, w: sizes.append(len(w)) or real(f, w))
    monkeypatch.setattr(model_mod, "WINDOW_CHUNK", 1000)
    res = model.detect(img, proposals=boxes)
    assert len(sizes) > 2 and max(sizes) <= 1000 and len(res["scores"]) <= 100


def test_resize_on_the_device_matches_opencv_within_a_grey_level(smoke_run):
    from detector.core.backbones import efficientnet_lite0
    from detector.core.features import FeatureExtractor

    bb = efficientnet_lite0()
    img = np.random.default_rng(1).integers(0, 256, (120, 170, 3), dtype=np.uint8)
    host = FeatureExtractor(bb, [200], device="cpu")
    dev = FeatureExtractor(bb, [200], device="cpu", resize_on_device=True)
    for f in (200 / 120, 0.6, 1.0):
        a = host.prepare(img, f)
        b = dev.prepare_on_device(torch.from_numpy(img), f)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1.01 / 127.5  # OpenCV rounds to uint8, torch does not
    assert host.cache_params() != dev.cache_params()  # the two never share cache files


def test_stacked_maps_pool_a_batch_exactly_like_image_by_image():
    """The GPU fine-tuning path's batched pooling (one roi_pool per level over padded maps of
    several images, both orientations, two scales) equals pooling each image's own maps."""
    import warnings

    from detector.core.backbones import zf5
    from detector.core.embedder import WindowEmbedder
    from detector.core.features import FeatureExtractor
    from detector.core.embedder import StackedMaps
    from detector.detection.matching import match_windows
    from detector.detection.train.finetune import TrainImage, pool_pairs, stacked_pooler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = zf5(random_init=True)
    fx = FeatureExtractor(bb, [120, 200], device="cpu")
    rng = np.random.default_rng(3)
    images, maps = [], []
    for i, (h, w) in enumerate(((150, 210), (180, 130), (160, 160))):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        xy = rng.uniform(0, [w - 30, h - 30], (40, 2))
        props = np.concatenate([xy, xy + rng.uniform(8, 30, (40, 2))], 1)
        images.append(TrainImage(f"img{i}", w, h, match_windows(np.zeros((0, 4)), np.zeros(0), props, 2)))
        maps += [fx(img), fx(img, flip=True)]
    emb = WindowEmbedder(bb, pool5_scale=0.5)
    pairs = np.stack([rng.integers(0, 3, 64), rng.integers(0, 40, 64)], 1)
    flips = rng.random(64) < 0.5
    scales = rng.integers(0, 2, 64)
    want = pool_pairs(emb, images, pairs, flips, scales, lambda i, f: maps[2 * i + int(f)])
    got = stacked_pooler(emb, images, StackedMaps(maps, "cpu"))(pairs, flips, scales)
    assert torch.equal(got, want)


def test_roi_align_crops_match_opencv_warps_inside_the_image():
    """The R-CNN arm's device crops (bench/spp_vs_rcnn.py) sample the same points as its
    OpenCV warps: equal wherever the window stays half a pixel inside the image."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import spp_vs_rcnn as bench

    rng = np.random.default_rng(2)
    img = rng.normal(size=(90, 120, 3)).astype(np.float32)
    xy = rng.uniform(1, 60, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 28, (12, 2))], 1)
    got = bench.warp_windows_on_device(torch.from_numpy(img).permute(2, 0, 1), boxes, crop=32)
    for b, g in zip(boxes, got):
        want = bench.warp_window(img, b, (0.0, 0.0, 0.0), crop=32)
        np.testing.assert_allclose(g.permute(1, 2, 0).numpy(), want, atol=1e-4)
