"""Test-time post-processing (detector/detection/postprocess.py) against a naive reference."""
from __future__ import annotations

import numpy as np
import pytest

from detector.detection.postprocess import finalize_detections, postprocess, select_detections


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _greedy_nms(dets, boxes_of, thr):
    """dets: (score, label, index) already in priority order; plain greedy NMS per class."""
    kept = []
    for d in dets:
        if all(k[1] != d[1] or _iou(boxes_of(k), boxes_of(d)) <= thr for k in kept):
            kept.append(d)
    return kept


def _reference(boxes, scores, size, thresh, nms_iou, max_per_image, refine, second_nms=True):
    """The test procedure with loops; refine(index, label) -> box."""
    key = lambda d: (-d[0], d[1], d[2])  # noqa: E731
    m, k = scores.shape
    thr = np.broadcast_to(np.asarray(thresh, float), (k,))
    dets = [(float(scores[i, c]), c, i) for c in range(k) for i in range(m) if scores[i, c] > thr[c]]
    dets = _greedy_nms(sorted(dets, key=key), lambda d: boxes[d[2]].tolist(), nms_iou)
    dets = sorted(dets, key=key)[:max_per_image]
    w, h = size
    out = {}
    for s, c, i in dets:
        b = [float(v) for v in refine(i, c)]
        out[(c, i)] = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)]
    if second_nms:
        dets = _greedy_nms(dets, lambda d: out[(d[1], d[2])], nms_iou)
    return [(s, c, i, out[(c, i)]) for s, c, i in dets]


def _scene(seed, m=250, k=3, size=(300, 200), quantise=False):
    rng = np.random.default_rng(seed)
    w, h = size
    # clustered boxes so that NMS has work to do; some stick out of the image
    centres = rng.uniform(0, [w, h], size=(12, 2))
    c = centres[rng.integers(0, 12, m)] + rng.normal(0, 8, (m, 2))
    wh = rng.uniform(10, 90, (m, 2))
    boxes = np.c_[c - wh / 2, c + wh / 2].astype(np.float32)
    scores = rng.normal(-1.0, 1.0, (m, k)).astype(np.float32)
    if quantise:  # many exact ties
        scores = np.round(scores * 2) / 2
    shift = rng.normal(0, 6, (m, k, 4)).astype(np.float32)
    return boxes, scores, shift


def _compare(res, ref):
    assert len(res["scores"]) == len(ref)
    assert res["labels"].tolist() == [r[1] for r in ref]
    assert res["indices"].tolist() == [r[2] for r in ref]
    np.testing.assert_array_equal(res["scores"], np.array([r[0] for r in ref], np.float32))
    np.testing.assert_allclose(res["boxes"], np.array([r[3] for r in ref]).reshape(-1, 4), atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_reference(seed):
    boxes, scores, shift = _scene(seed)
    size = (300, 200)

    def regressor(indices, labels):  # moves each kept window by a per-(window, class) offset
        return boxes[indices] + shift[indices, labels]

    res = postprocess(boxes, scores, size, score_thresh=-1.5, nms_iou=0.3, max_per_image=100, regressor=regressor)
    ref = _reference(boxes, scores, size, -1.5, 0.3, 100, lambda i, c: boxes[i] + shift[i, c])
    _compare(res, ref)
    assert res["boxes"].dtype == np.float32 and res["scores"].dtype == np.float32
    assert res["labels"].dtype == np.int64


@pytest.mark.parametrize("seed", range(3))
def test_ties_are_ordered_by_score_then_class_then_index(seed):
    boxes, scores, _ = _scene(seed + 10, m=200, k=4, quantise=True)
    res = postprocess(boxes, scores, (300, 200), score_thresh=-1.0, max_per_image=60)
    ref = _reference(boxes, scores, (300, 200), -1.0, 0.3, 60, lambda i, c: boxes[i])
    _compare(res, ref)
    s, lab, idx = res["scores"], res["labels"], res["indices"]
    assert len(set(s.tolist())) < len(s)  # the scene does have ties
    keys = list(zip(-s.astype(float), lab, idx))
    assert keys == sorted(keys)
    # same input, same output
    res2 = postprocess(boxes, scores, (300, 200), score_thresh=-1.0, max_per_image=60)
    for name in res:
        np.testing.assert_array_equal(res[name], res2[name])


def test_identical_boxes_with_equal_scores_keep_the_lowest_index():
    boxes = np.array([[0, 0, 10, 10]] * 3, np.float32)
    scores = np.array([[1.0], [1.0], [1.0]], np.float32)
    res = postprocess(boxes, scores, (50, 50))
    assert res["indices"].tolist() == [0]


def test_threshold_is_strict_and_per_class():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], np.float32)
    scores = np.array([[-1.5, 0.0], [-1.4, -0.6], [2.0, -0.4]], np.float32)
    res = postprocess(boxes, scores, (100, 100))
    assert sorted(zip(res["indices"].tolist(), res["labels"].tolist())) == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    res = postprocess(boxes, scores, (100, 100), score_thresh=[0.0, -0.5])
    assert sorted(zip(res["indices"].tolist(), res["labels"].tolist())) == [(0, 1), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="score_thresh"):
        postprocess(boxes, scores, (100, 100), score_thresh=[0.0, 0.0, 0.0])


def test_at_most_max_per_image_highest_scores_over_all_classes():
    rng = np.random.default_rng(7)
    m, k = 400, 3
    xy = rng.uniform(0, 5000, (m, 2))  # far apart: NMS removes nothing
    boxes = np.c_[xy, xy + 5].astype(np.float32)
    scores = rng.normal(size=(m, k)).astype(np.float32)
    res = postprocess(boxes, scores, (6000, 6000), score_thresh=-10, max_per_image=100, second_nms=False)
    assert len(res["scores"]) == 100
    top = np.sort(scores.ravel())[::-1][:100]
    np.testing.assert_array_equal(res["scores"], top)
    assert len(postprocess(boxes, scores, (6000, 6000), score_thresh=-10, max_per_image=None)["scores"]) == m * k


def test_boxes_are_clipped_to_the_image():
    boxes = np.array([[-5, -3, 20, 15], [90, 40, 130, 70]], np.float32)
    scores = np.array([[1.0], [0.5]], np.float32)
    res = postprocess(boxes, scores, (100, 60))
    np.testing.assert_array_equal(res["boxes"], [[0, 0, 20, 15], [90, 40, 100, 60]])
    # clipping happens after regression
    res = postprocess(boxes, scores, (100, 60), regressor=lambda i, c: boxes[i] + 50)
    np.testing.assert_array_equal(res["boxes"], [[45, 47, 70, 60], [100, 60, 100, 60]])


def test_second_nms_runs_on_the_refined_boxes():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[2.0], [1.0]], np.float32)
    onto_first = lambda i, c: np.repeat(boxes[:1], len(i), 0)  # noqa: E731  regression moves both onto one box
    assert len(postprocess(boxes, scores, (100, 100), regressor=onto_first)["scores"]) == 1
    res = postprocess(boxes, scores, (100, 100), regressor=onto_first, second_nms=False)
    assert res["indices"].tolist() == [0, 1]


def test_precomputed_deltas_and_the_split_api_agree():
    from detector.detection.bbox_regression import decode

    boxes, scores, shift = _scene(3)
    deltas = shift * 0.02
    res = postprocess(boxes, scores, (300, 200), regressor=deltas)
    sel = select_detections(boxes, scores)
    refined = decode(boxes[sel.indices], deltas[sel.indices, sel.labels])
    res2 = finalize_detections(refined, sel.scores, sel.labels, (300, 200), indices=sel.indices)
    for name in res:
        np.testing.assert_array_equal(res[name], res2[name])
    ref = _reference(boxes, scores, (300, 200), -1.5, 0.3, 100,
                     lambda i, c: decode(boxes[i:i + 1], deltas[i:i + 1, c])[0])
    _compare(res, ref)


def test_empty_and_bad_inputs():
    res = postprocess(np.zeros((0, 4), np.float32), np.zeros((0, 5), np.float32), (10, 10))
    assert res["boxes"].shape == (0, 4) and res["boxes"].dtype == np.float32
    assert res["scores"].shape == (0,) and res["labels"].dtype == np.int64
    res = postprocess(np.array([[0, 0, 1, 1]], np.float32), np.array([[-3.0]], np.float32), (10, 10),
                      regressor=lambda i, c: np.zeros((len(i), 4)))
    assert res["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="NaN"):
        postprocess(np.zeros((1, 4)), np.array([[np.nan]]), (10, 10))
    with pytest.raises(ValueError, match="scores"):
        postprocess(np.zeros((2, 4)), np.zeros((3, 1)), (10, 10))
    with pytest.raises(ValueError, match="regressor"):
        postprocess(np.array([[0, 0, 1, 1]], np.float32), np.array([[1.0]]), (10, 10),
                    regressor=lambda i, c: np.zeros((5, 4)))


@pytest.mark.parametrize("seed", range(3))
def test_nms_on_regressed_boxes_matches_a_naive_loop(seed):
    """Fast R-CNN's order: every candidate moved for its class first, greedy NMS on those boxes."""
    boxes, scores, shift = _scene(seed + 20)
    key = lambda d: (-d[0], d[1], d[2])  # noqa: E731
    moved = lambda i, c: (boxes[i] + shift[i, c]).tolist()  # noqa: E731
    dets = [(float(scores[i, c]), c, i) for c in range(3) for i in range(len(boxes)) if scores[i, c] > -1.5]
    ref = _greedy_nms(sorted(dets, key=key), lambda d: moved(d[2], d[1]), 0.3)[:100]
    sel = select_detections(boxes, scores, -1.5, 0.3, 100, refine=lambda i, c: boxes[i] + shift[i, c])
    assert list(zip(sel.scores.tolist(), sel.labels.tolist(), sel.indices.tolist())) == \
        [(np.float32(s).item(), c, i) for s, c, i in ref]
    np.testing.assert_allclose(sel.boxes, [moved(i, c) for _, c, i in ref], atol=1e-5)
    plain = select_detections(boxes, scores, -1.5, 0.3, 100)
    assert not np.array_equal(plain.indices, sel.indices)  # the scene is one where the order matters


def _soft_reference(boxes, scores, thresh, sigma, min_frac):
    """Gaussian soft-NMS per class with loops, on the margins above the threshold."""
    out = []
    for c in range(scores.shape[1]):
        cand = [[float(scores[i, c]) - thresh, i] for i in range(len(boxes)) if scores[i, c] > thresh]
        floors = {i: m * min_frac for m, i in cand}
        while cand:
            best = max(cand, key=lambda d: (d[0], -d[1]))
            cand.remove(best)
            out.append((best[0] + thresh, c, best[1]))
            for d in cand:
                d[0] *= np.exp(-_iou(boxes[best[1]], boxes[d[1]]) ** 2 / sigma)
            cand = [d for d in cand if d[0] >= floors[d[1]]]
    return sorted(out, key=lambda d: (-d[0], d[1], d[2]))


@pytest.mark.parametrize("seed", range(3))
def test_soft_nms_matches_a_naive_loop_and_keeps_overlapping_neighbours(seed):
    boxes, scores, _ = _scene(seed + 30, m=120)
    sel = select_detections(boxes, scores, -1.0, 0.3, None, soft_sigma=0.5, soft_min=0.05)
    ref = _soft_reference(boxes.astype(float), scores, -1.0, 0.5, 0.05)
    assert sel.labels.tolist() == [c for _, c, _ in ref] and sel.indices.tolist() == [i for _, _, i in ref]
    np.testing.assert_allclose(sel.scores, [s for s, _, _ in ref], rtol=1e-5, atol=1e-5)
    hard = select_detections(boxes, scores, -1.0, 0.3, None)
    assert len(sel) > len(hard)
    # two heavily overlapping boxes: hard NMS drops the second, soft-NMS keeps it with a lower score
    two = np.array([[0, 0, 10, 10], [0, 0, 10, 12]], np.float32)
    sc = np.array([[1.0], [0.8]], np.float32)
    assert len(select_detections(two, sc, 0.0, 0.3)) == 1
    soft = select_detections(two, sc, 0.0, 0.3, soft_sigma=0.5)
    assert soft.indices.tolist() == [0, 1] and 0 < soft.scores[1] < 0.8


@pytest.mark.parametrize("seed", range(3))
def test_box_voting_matches_a_naive_loop(seed):
    """After NMS on the regressed candidates, each kept box is the margin-weighted mean of its
    class's regressed candidates overlapping it by at least vote_iou."""
    boxes, scores, shift = _scene(seed + 40)
    thr = np.array([-1.5, -1.0, -1.2])
    key = lambda d: (-d[0], d[1], d[2])  # noqa: E731
    moved = lambda i, c: (boxes[i] + shift[i, c]).tolist()  # noqa: E731
    dets = [(float(scores[i, c]), c, i) for c in range(3) for i in range(len(boxes)) if scores[i, c] > thr[c]]
    kept = _greedy_nms(sorted(dets, key=key), lambda d: moved(d[2], d[1]), 0.3)[:100]
    want = []
    for s, c, i in kept:
        num, den = np.zeros(4), 0.0
        for s2, c2, i2 in dets:
            if c2 == c and (i2 == i or _iou(moved(i2, c2), moved(i, c)) >= 0.5):
                w = s2 - thr[c]
                num, den = num + w * np.array(moved(i2, c2)), den + w
        want.append(num / den)
    refine = lambda i, c: boxes[i] + shift[i, c]  # noqa: E731
    sel = select_detections(boxes, scores, thr, 0.3, 100, refine=refine, vote_iou=0.5)
    plain = select_detections(boxes, scores, thr, 0.3, 100, refine=refine)
    assert sel.indices.tolist() == [i for _, _, i in kept] == plain.indices.tolist()  # voting moves, never drops
    np.testing.assert_allclose(sel.boxes, want, atol=1e-3)
    assert np.abs(sel.boxes - plain.boxes).max() > 1.0  # some kept box had neighbours to vote with


def test_box_voting_iou_is_validated():
    from detector.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="box_voting_iou"):
        load_config(None, ["test.box_voting_iou=1.5"])
    assert load_config(None, ["test.box_voting_iou=0"]).test.box_voting_iou == 0
