"""bbox.reference: window — box regression relative to the box an SPP window covers: the
inverse projection against project_boxes, the setting's validation and digests, and detect()
against the regression done by hand."""
import numpy as np
import pytest

from detector.config import ConfigError, load_config
from detector.core.projection import project_boxes, window_boxes


@pytest.mark.parametrize("rule", ["code", "paper"])
@pytest.mark.parametrize("stride,offset,factor", [(16, 0.0, 1.0), (16, 21.0, 1.43), (32, -3.5, 0.7), (8, 4.0, 2.5)])
def test_window_boxes_project_back_onto_their_windows(rule, stride, offset, factor):
    rng = np.random.default_rng(stride)
    lo = rng.integers(1, 30, (200, 2))
    windows = np.concatenate([lo, lo + rng.integers(1, 20, (200, 2))], 1)  # non-collapsed, inside a 60x60 map
    boxes = window_boxes(windows, factor, stride, offset, rule)
    np.testing.assert_array_equal(project_boxes(boxes, factor, stride, offset, (60, 60), rule), windows)


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_a_box_lies_within_half_a_stride_of_what_its_window_covers(rule):
    # the snapping interval of each edge is one stride wide, and window_boxes is its middle
    rng = np.random.default_rng(1)
    stride, offset, factor = 16, 7.0, 1.5
    xy = rng.uniform(40, 300, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(60, 200, (500, 2))], 1)
    windows = project_boxes(boxes, factor, stride, offset, (80, 80), rule)
    back = window_boxes(windows, factor, stride, offset, rule)
    err = np.abs(back - boxes) * factor
    assert err.max() <= stride / 2 + 1e-9
    assert err.mean() > stride / 8  # it is the snapping, not a copy of the boxes
    # per window, the mean offset over many boxes of one interval is ~0: the middle, not an edge
    assert abs(np.mean((back - boxes) * factor)) < 1.0


def test_window_boxes_take_a_factor_per_row():
    w = np.array([[2, 3, 9, 12], [2, 3, 9, 12]])
    both = window_boxes(w, np.array([1.0, 2.0]), 16, 0.0)
    np.testing.assert_allclose(both[1], window_boxes(w[1:], 2.0, 16, 0.0)[0])
    np.testing.assert_allclose(both[0], 2 * both[1])


def test_the_setting_is_validated_and_the_box_layer_regresses_from_proposals():
    from detector.config import regression_reference

    with pytest.raises(ConfigError, match="bbox.reference must be"):
        load_config(None, ["bbox.reference=windows"])
    assert regression_reference(load_config(None, ["bbox.reference=window"])) == "window"
    assert regression_reference(load_config(None, ["bbox.reference=window", "bbox.method=finetune"])) == "proposal"


def test_only_the_box_regression_stages_and_the_model_depend_on_it():
    from detector.detection.train.stages import stage_digests

    a = stage_digests(load_config(None, ["bbox.reference=proposal"]), "data", "features")
    b = stage_digests(load_config(None, ["bbox.reference=window"]), "data", "features")
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {"bbox_rows", "bbox", "model"}


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    from conftest import smoke_training
    return smoke_training(tmp_path_factory.mktemp("window_ref"), ["bbox.reference=window"])


def test_detect_moves_the_boxes_its_windows_cover(window_run):
    import detector
    from detector.images import load_image

    _, data, model_path = window_run
    model = detector.load(model_path)
    assert model.cfg.bbox.reference == "window"
    model.cfg.test.second_nms = False  # so the runs below keep the same detections
    model.cfg.test.nms_after_regression = False  # NMS on the proposals, then the kept ones regressed
    model.cfg.test.bbox_iterations = 1
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[1])
    props = model.proposals(img)
    raw = model.detect(img, proposals=props, score_thresh=-10.0, box_regression=False)
    got = model.detect(img, proposals=props, score_thresh=-10.0)
    assert len(raw["scores"]) > 5
    np.testing.assert_array_equal(raw["labels"], got["labels"])
    np.testing.assert_array_equal(raw["scores"], got["scores"])
    # by hand, one box at a time: its window, the box that window covers, moved by the deltas
    maps = model.extractor(img)
    size = [img.shape[1], img.shape[0]] * 2
    want, from_proposal = [], []
    for box, label in zip(raw["boxes"], raw["labels"]):
        window = model.embedder.windows(maps, box[None])
        covered = model.embedder.window_boxes(maps, window)
        d = model.predictor.deltas(model.embedder.pool5_windows(maps, window).double(), np.array([label]))
        want.append(model.predictor.refine(covered.astype(np.float32), d, np.array([label]))[0])
        from_proposal.append(model.predictor.refine(box[None], d, np.array([label]))[0])
    np.testing.assert_allclose(got["boxes"], np.clip(want, 0, size), atol=1e-3)
    assert not np.allclose(got["boxes"], np.clip(from_proposal, 0, size), atol=1e-2)

    model.cfg.test.bbox_iterations = 2  # the second pass starts from the window of the moved box
    twice = model.detect(img, proposals=props, score_thresh=-10.0)
    window = model.embedder.windows(maps, got["boxes"])
    d = model.predictor.deltas(model.embedder.pool5_windows(maps, window).double(), got["labels"])
    again = model.predictor.refine(model.embedder.window_boxes(maps, window).astype(np.float32), d, got["labels"])
    np.testing.assert_allclose(twice["boxes"], np.clip(again, 0, size), atol=1e-3)


def test_nms_after_regression_moves_the_same_covered_boxes(window_run):
    import detector
    from detector.images import load_image

    _, data, model_path = window_run
    model = detector.load(model_path)
    model.cfg.test.bbox_iterations = 1
    model.cfg.test.box_voting_iou = 0.0
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[2])
    props = model.proposals(img)
    model.cfg.test.nms_after_regression = True
    first = model.detect(img, proposals=props, score_thresh=-10.0, nms_iou=1.0, max_per_image=10**6)  # keeps all
    model.cfg.test.nms_after_regression = False
    model.cfg.test.second_nms = False
    after = model.detect(img, proposals=props, score_thresh=-10.0, nms_iou=1.0, max_per_image=10**6)
    order = lambda r: np.lexsort(np.c_[r["boxes"], r["labels"]].T)  # noqa: E731
    np.testing.assert_allclose(first["boxes"][order(first)], after["boxes"][order(after)], atol=1e-3)


def test_regression_rows_hold_the_boxes_the_windows_cover_at_each_boxs_scale(tmp_path):
    """write_rows with reference=window: the same pool5 rows as with proposals, and as boxes
    the inverse projection of each window at the scale it was pooled at (two scales here)."""
    import warnings

    from detector.core.backbones import zf5
    from detector.core.embedder import WindowEmbedder
    from detector.core.features import FeatureExtractor
    from detector.detection.matching import match_windows
    from detector.detection.train.finetune import TrainImage
    from detector.detection.train.rows import RowStore, write_rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = zf5(random_init=True)
    img = np.random.default_rng(5).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    feats = FeatureExtractor(bb, [160, 320], device="cpu")(img)
    rng = np.random.default_rng(6)
    # the large box's windows go to the smaller scale, the others' to the larger (area nearest 224^2)
    gt = np.array([[20, 30, 120, 150], [130, 40, 230, 120], [60, 100, 90, 130], [10, 8, 232, 194]], np.float32)
    props = np.repeat(gt, 15, 0) + rng.normal(0, 6, (60, 4)).astype(np.float32)
    props = np.clip(props, 0, [240, 200, 240, 200])
    image = TrainImage("img", 240, 200, match_windows(gt, np.array([0, 1, 0, 1]), props, 2))
    stores = {ref: RowStore(tmp_path / ref) for ref in ("proposal", "window")}
    for ref, store in stores.items():
        write_rows(WindowEmbedder(bb), [image], lambda i, flip: feats, None, store, 0.5, progress=False, reference=ref)
    by_box, by_window = stores["proposal"].read(0), stores["window"].read(0)
    rows = image.windows.regression_rows(0.5)
    assert len(rows) > 20
    np.testing.assert_array_equal(by_box["x"], by_window["x"])
    np.testing.assert_array_equal(by_box["gt"], by_window["gt"])
    np.testing.assert_array_equal(by_box["boxes"], image.windows.boxes[rows])
    emb = WindowEmbedder(bb)
    windows = emb.windows(feats, image.windows.boxes[rows])
    assert len(np.unique(windows[:, 0])) == 2  # both scales in use
    for k, w in enumerate(windows):  # one window at a time, at its own scale's factor
        sf = feats[int(w[0])]
        want = window_boxes(w[None, 1:], sf.factor, bb.stride, bb.offset)[0]
        np.testing.assert_allclose(by_window["boxes"][k], want, rtol=1e-6, atol=1e-3)
    assert np.abs(by_window["boxes"] - by_box["boxes"]).max() > 1.0
