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
    import detector.model as model_mod

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
    import detector.model as model_mod

    model, img, _ = model_and_image
    H, W = img.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [W - 10, H - 10], (20000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (20000, 2))], 1).clip(0, [W, H, W, H]).astype(np.float32)
    sizes = []
    real = model_mod.pool_windows
    monkeypatch.setattr(model_mod, "pool_windows", lambda f, w, levels: sizes.append(len(w)) or real(f, w, levels))
    monkeypatch.setattr(model_mod, "WINDOW_CHUNK", 1000)
    res = model.detect(img, proposals=boxes)
    assert len(sizes) > 2 and max(sizes) <= 1000 and len(res["scores"]) <= 100


def test_resize_on_the_device_matches_opencv_within_a_grey_level(smoke_run):
    from detector.backbones import efficientnet_lite0
    from detector.features import FeatureExtractor

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
