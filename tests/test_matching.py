"""Windows matched to the ground truth (detector/detection/matching.py) and fine-tuning's
sampling from them (detector/detection/train/finetune.py), against naive references."""
import numpy as np
import pytest

from detector.config import FinetuneConfig
from detector.detection.matching import match_windows
from detector.detection.train.finetune import TrainImage, draw_batch, sample_pools, window_labels, window_pools


def naive_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def random_boxes(rng, n, hi=200.0):
    xy = rng.uniform(0, hi - 20, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(4, 60, (n, 2))], 1).astype(np.float32)


def test_every_window_gets_its_best_ground_truth_as_a_naive_loop_finds_it():
    rng = np.random.default_rng(0)
    gt = random_boxes(rng, 7)
    gl = rng.integers(0, 3, 7)
    props = np.concatenate([gt + rng.normal(0, 4, gt.shape).astype(np.float32), random_boxes(rng, 150)])
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
    w = match_windows(gt, gl, props, num_classes=4)
    boxes = np.concatenate([gt, props])
    np.testing.assert_array_equal(w.boxes, boxes)
    assert w.is_gt.tolist() == [True] * 7 + [False] * len(props)
    assert w.gt_labels.tolist() == gl.tolist() + [-1] * len(props)
    for m, box in enumerate(boxes):
        ious = [naive_iou(box.astype(float), g.astype(float)) for g in gt]
        j = int(np.argmax(ious))  # the first of equal IoUs
        assert w.matched[m] == j and w.labels[m] == gl[j]
        assert w.max_iou[m] == pytest.approx(ious[j], abs=1e-12)
        for k in range(4):
            want = max([iou for iou, lab in zip(ious, gl) if lab == k], default=0.0)
            assert w.class_iou[m, k] == pytest.approx(want, abs=1e-6)
        np.testing.assert_array_equal(w.matched_boxes(np.array([m]))[0], gt[j])
    assert (w.max_iou[:7] == 1.0).all()


def test_regression_rows_and_targets_on_hand_made_boxes():
    gt = np.array([[0, 0, 10, 10], [100, 100, 120, 140]], np.float32)
    proposals = np.array([
        [0, 0, 10, 20],        # IoU 0.5 with gt 0: not a regression example (strictly above only)
        [0, 0, 10, 15],        # IoU 2/3 with gt 0
        [100, 100, 120, 130],  # IoU 0.75 with gt 1
        [50, 50, 60, 60],      # no overlap
        [2, 0, 12, 10],        # IoU 8/12 with gt 0
    ], np.float32)
    w = match_windows(gt, np.array([3, 7]), proposals, num_classes=8)
    rows = w.regression_rows(0.5)
    assert rows.tolist() == [0, 1, 3, 4, 6]  # GT boxes first, then proposals 1, 2, 4
    assert w.matched[rows].tolist() == [0, 1, 0, 1, 0] and w.labels[rows].tolist() == [3, 7, 3, 7, 3]
    np.testing.assert_array_equal(w.matched_boxes(rows), gt[[0, 1, 0, 1, 0]])
    assert w.regression_rows(0.7).tolist() == [0, 1, 4]  # a stricter threshold keeps the 0.75 only
    # the 0.5 window is foreground for fine-tuning (>= 0.5) but not a regression example (> 0.5)
    assert w.softmax_targets(np.array([2, 3, 5, 6]), 0.5).tolist() == [1 + 3, 1 + 3, 0, 1 + 3]
    assert w.max_iou[5] == 0.0 and w.matched[5] == 0 and w.labels[5] == 3  # no overlap: gt 0 at IoU 0


def test_an_image_without_ground_truth_matches_nothing():
    w = match_windows(np.zeros((0, 4)), np.zeros(0), random_boxes(np.random.default_rng(1), 5), 2)
    assert (w.max_iou == 0).all() and (w.labels == -1).all() and not w.is_gt.any()
    assert w.regression_rows(0.5).size == 0 and w.matched_boxes().shape == (5, 4)
    assert (w.softmax_targets(np.arange(5), 0.5) == 0).all()


def make_images(seed=0, n=6, K=3):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        gt = random_boxes(rng, rng.integers(1, 5))
        props = np.concatenate([gt + rng.normal(0, 6, gt.shape).astype(np.float32), random_boxes(rng, 60)])
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
        images.append(TrainImage(f"im{i}", 200, 200, match_windows(gt, rng.integers(0, K, len(gt)), props, K)))
    return images


def test_foreground_and_background_pools_and_labels_against_a_naive_loop():
    images = make_images()
    fg, bg = sample_pools(images, 0.5, 0.1)
    want_fg, want_bg, want_lab = [], [], []
    for i, im in enumerate(images):
        w = im.windows
        for r in range(len(w)):
            iou = max(naive_iou(w.boxes[r].astype(float), g.astype(float)) for g in w.gt_boxes)
            if iou >= 0.5 - 1e-12:
                want_fg.append((i, r))
                best = int(np.argmax([naive_iou(w.boxes[r].astype(float), g.astype(float)) for g in w.gt_boxes]))
                want_lab.append(1 + int(w.gt_labels[best]))  # GT rows come first: row `best` is that GT
            elif 0.1 <= iou and not w.is_gt[r]:
                want_bg.append((i, r))
    assert [tuple(p) for p in fg] == want_fg and [tuple(p) for p in bg] == want_bg
    assert window_labels(images, fg, 0.5).tolist() == want_lab
    assert (window_labels(images, bg, 0.5) == 0).all()


def test_batches_have_the_foreground_fraction_and_repeat_with_the_seed():
    images = make_images(1)
    fc = FinetuneConfig(batch_size=128, fg_fraction=0.25)
    pools = window_pools(images, fc)
    fg_set, bg_set = {tuple(p) for p in pools.fg}, {tuple(p) for p in pools.bg}
    flips = []
    for it in range(50):
        b = draw_batch(np.random.default_rng([7, it]), pools, fc, n_scales=3)
        assert len(b.pairs) == 128 and (b.labels[:32] > 0).all() and (b.labels[32:] == 0).all()
        assert all(tuple(p) in fg_set for p in b.pairs[:32]) and all(tuple(p) in bg_set for p in b.pairs[32:])
        assert set(np.unique(b.scales)) <= {0, 1, 2}
        flips.append(b.flips.mean())
        again = draw_batch(np.random.default_rng([7, it]), pools, fc, n_scales=3)
        for a, c in zip((b.pairs, b.labels, b.flips, b.scales), (again.pairs, again.labels, again.flips, again.scales)):
            np.testing.assert_array_equal(a, c)
    assert abs(np.mean(flips) - 0.5) < 0.05
    other = draw_batch(np.random.default_rng([8, 0]), pools, fc, n_scales=1)
    assert other.scales is None and not np.array_equal(other.pairs, draw_batch(np.random.default_rng([7, 0]), pools,
                                                                               fc, 1).pairs)
    # every window is drawn, uniformly: over many batches each foreground window shows up near its share
    counts = np.zeros(len(pools.fg))
    index = {tuple(p): k for k, p in enumerate(pools.fg)}
    rng = np.random.default_rng(3)
    for _ in range(400):
        for p in draw_batch(rng, pools, fc, 1).pairs[:32]:
            counts[index[tuple(p)]] += 1
    expected = 400 * 32 / len(pools.fg)
    assert counts.min() > 0.5 * expected and counts.max() < 1.6 * expected
    no_flip = draw_batch(np.random.default_rng(0), pools, FinetuneConfig(flip=False, fg_fraction=1.0), 1)
    assert not no_flip.flips.any() and (no_flip.labels > 0).all()


def test_without_windows_in_the_background_range_every_proposal_below_fg_is_background(caplog):
    gt = np.array([[0, 0, 50, 50]], np.float32)
    props = np.array([[0, 0, 50, 49], [100, 100, 150, 150], [120, 0, 150, 30]], np.float32)  # IoU 0.98, 0, 0
    images = [TrainImage("a", 200, 200, match_windows(gt, np.array([0]), props, 1))]
    with caplog.at_level("WARNING"):
        pools = window_pools(images, FinetuneConfig())
    assert "no windows with IoU in [0.10, 0.50)" in caplog.text
    assert [tuple(p) for p in pools.fg] == [(0, 0), (0, 1)] and [tuple(p) for p in pools.bg] == [(0, 2), (0, 3)]
