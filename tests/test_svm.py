"""Per-class SVMs with hard-negative mining (detector/detection/svm.py, R-CNN's rules as SPP-net used them)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

import detector.detection.svm as svm_mod
from detector.config import SVMConfig
from detector.detection.svm import (NEVER_FIRES, SVMImage, sample_feature_rows,
                          train_svms)

D = 64


def _gaussian_images(seed: int, num_images: int, num_classes: int, negs_per_image: int, sep: float = 3.0,
                     pos_per_image: int = 2):
    """Images whose GT rows of class k sit around mu_k and whose proposals (max IoU 0) sit around 0.

    Features are scaled so that the mean norm is about 20, as the pipeline does."""
    rng = np.random.default_rng(seed)
    mus = rng.normal(size=(num_classes, D))
    mus *= sep / np.linalg.norm(mus, axis=1, keepdims=True)
    scale = 20.0 / np.sqrt(D)
    images = []
    for i in range(num_images):
        labels = rng.integers(0, num_classes, size=pos_per_image)
        gt = mus[labels] + rng.normal(size=(pos_per_image, D))
        neg = rng.normal(size=(negs_per_image, D))
        feats = (np.concatenate([gt, neg]) * scale).astype(np.float32)
        gl = np.concatenate([labels, -np.ones(negs_per_image, np.int64)])
        iou = np.zeros((len(feats), num_classes))
        iou[np.arange(pos_per_image), labels] = 1.0
        images.append(SVMImage(feats, gl, iou))
    return images, mus, scale


def _heldout(rng, mus, scale, n=400):
    k = len(mus)
    lab = rng.integers(0, k, size=n)
    pos = (mus[lab] + rng.normal(size=(n, D))) * scale
    neg = rng.normal(size=(n, D)) * scale
    return pos.astype(np.float32), lab, neg.astype(np.float32)


def test_sample_feature_rows_draws_from_images_deterministically():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(n, 5)) for n in (3, 50, 0, 12, 40, 7)]
    a = sample_feature_rows(lambda i: feats[i], len(feats), norm_images=4, norm_boxes=10, seed=3)
    b = sample_feature_rows(lambda i: feats[i], len(feats), norm_images=4, norm_boxes=10, seed=3)
    np.testing.assert_array_equal(a, b)
    every = np.concatenate(feats)
    # each sampled row is a row of some image, with no row drawn twice
    assert all(np.any(np.all(every == r, axis=1)) for r in a)
    assert len(np.unique(a, axis=0)) == len(a)
    full = sample_feature_rows(lambda i: feats[i], len(feats), norm_images=100, norm_boxes=10, seed=0)
    assert len(full) == sum(min(10, len(f)) for f in feats)


def svm_scores(features, W, b):
    """Scores through the detector's one scoring path (WindowPredictor)."""
    import torch

    from detector.detection.predictor import WindowPredictor

    return WindowPredictor(W, b).scores(torch.as_tensor(np.asarray(features, np.float32))).numpy()


def test_trained_svms_classify_heldout_data():
    images, mus, scale = _gaussian_images(0, num_images=30, num_classes=2, negs_per_image=60, sep=8.0)
    W, b, summary = train_svms(images, 2, SVMConfig(), progress=False)
    assert W.shape == (D, 2) and W.dtype == np.float32 and b.shape == (2,) and b.dtype == np.float32
    rng = np.random.default_rng(99)
    pos, lab, neg = _heldout(rng, mus, scale)
    s_pos = svm_scores(pos, W, b)
    s_neg = svm_scores(neg, W, b)
    assert (s_pos[np.arange(len(lab)), lab] > 0).mean() > 0.95
    assert (s_neg < 0).mean() > 0.95
    assert not any(r["skipped"] for r in summary)
    # on overlapping classes (30 positives in 64-d) the ranking is still right: AUC over pairs
    images, mus, scale = _gaussian_images(0, num_images=30, num_classes=2, negs_per_image=60, sep=3.0)
    W0, b0, _ = train_svms(images, 2, SVMConfig(), progress=False)
    pos, lab, neg = _heldout(rng, mus, scale)
    for k in range(2):
        sp = svm_scores(pos[lab == k], W0, b0)[:, k]
        sn = svm_scores(neg, W0, b0)[:, k]
        assert (sp[:, None] > sn[None, :]).mean() > 0.95  # the Bayes AUC here is 0.98
    # the predictor's scores against a plain loop
    ref = np.array([[sum(float(p[d]) * float(W0[d, k]) for d in range(D)) + float(b0[k]) for k in range(2)]
                    for p in pos[:5]])
    np.testing.assert_allclose(svm_scores(pos[:5], W0, b0), ref, rtol=1e-4, atol=1e-4)


def test_mining_matches_training_on_all_negatives_with_a_smaller_cache():
    images, mus, scale = _gaussian_images(1, num_images=40, num_classes=1, negs_per_image=150, sep=2.5,
                                          pos_per_image=3)
    cfg = SVMConfig(retrain_every=300)
    W, b, summary = train_svms(images, 1, cfg, progress=False)
    # reference: one liblinear fit on every positive and every negative
    X_pos = np.concatenate([im.features[im.gt_labels == 0] for im in images])
    X_neg = np.concatenate([im.features[im.gt_labels < 0] for im in images])
    ref = LinearSVC(loss="hinge", dual=True, C=cfg.C, class_weight={1: cfg.pos_weight, -1: 1.0},
                    intercept_scaling=cfg.intercept_scaling, max_iter=cfg.max_iter, random_state=0)
    ref.fit(np.concatenate([X_pos, X_neg]), np.r_[np.ones(len(X_pos)), -np.ones(len(X_neg))])
    pos, _, neg = _heldout(np.random.default_rng(5), mus, scale)
    test = np.concatenate([pos, neg])
    s_mined = svm_scores(test, W, b)[:, 0]
    s_full = ref.decision_function(test)
    assert np.corrcoef(s_mined, s_full)[0, 1] > 0.99
    assert ((s_mined > 0) == (s_full > 0)).mean() > 0.98
    assert summary[0]["negatives_kept"] < 0.5 * len(X_neg)
    assert summary[0]["retrains"] >= 3


def test_objective_matches_independent_computation():
    images, _, _ = _gaussian_images(2, num_images=10, num_classes=1, negs_per_image=40, sep=2.0)
    # no mining filter and no eviction: the final cache is every negative
    cfg = SVMConfig(hard_thresh=-np.inf, evict_thresh=-np.inf)
    W, b, summary = train_svms(images, 1, cfg, progress=False)
    X_pos = np.concatenate([im.features[im.gt_labels == 0] for im in images]).astype(np.float64)
    X_neg = np.concatenate([im.features[im.gt_labels < 0] for im in images]).astype(np.float64)
    w, bias = W[:, 0].astype(np.float64), float(b[0])
    hinge_pos = sum(max(0.0, 1.0 - (x @ w + bias)) for x in X_pos)
    hinge_neg = sum(max(0.0, 1.0 + (x @ w + bias)) for x in X_neg)
    expected = 0.5 * (w @ w + (bias / cfg.intercept_scaling) ** 2) + cfg.C * (cfg.pos_weight * hinge_pos + hinge_neg)
    assert summary[0]["negatives_kept"] == len(X_neg)
    assert summary[0]["positives"] == len(X_pos)
    assert summary[0]["objective"] == pytest.approx(expected, rel=1e-4)
    # and liblinear did minimise it: nudging (w, b) does not lower it
    rng = np.random.default_rng(0)
    for _ in range(5):
        dw, db = rng.normal(size=D) * 1e-3, rng.normal() * 1e-2
        w2, b2 = w + dw, bias + db
        hp = sum(max(0.0, 1.0 - (x @ w2 + b2)) for x in X_pos)
        hn = sum(max(0.0, 1.0 + (x @ w2 + b2)) for x in X_neg)
        obj2 = 0.5 * (w2 @ w2 + (b2 / cfg.intercept_scaling) ** 2) + cfg.C * (cfg.pos_weight * hp + hn)
        assert obj2 >= expected * (1 - 1e-3)


def test_class_without_positives_is_skipped_with_a_warning():
    images, _, _ = _gaussian_images(3, num_images=8, num_classes=2, negs_per_image=30)
    # a third class that never occurs
    images = [SVMImage(im.features, im.gt_labels, np.concatenate([im.class_iou, np.zeros((len(im.class_iou), 1))], 1))
              for im in images]
    with pytest.warns(UserWarning, match="'horse'"):
        W, b, summary = train_svms(images, 3, SVMConfig(), class_names=["cat", "dog", "horse"], progress=False)
    assert summary[2]["skipped"] and summary[2]["positives"] == 0 and summary[2]["retrains"] == 0
    assert not summary[0]["skipped"] and not summary[1]["skipped"]
    assert np.all(W[:, 2] == 0) and b[2] == np.float32(NEVER_FIRES)
    scores = svm_scores(np.concatenate([im.features for im in images]), W, b)
    assert scores[:, 2].max() < -1.5


def test_convergence_warnings_are_reported_once():
    images, _, _ = _gaussian_images(4, num_images=6, num_classes=2, negs_per_image=50, sep=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_svms(images, 2, SVMConfig(max_iter=1, C=10.0), progress=False)
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    assert "max_iter=1" in str(conv[0].message)


def test_bad_image_is_named():
    images, _, _ = _gaussian_images(5, num_images=3, num_classes=2, negs_per_image=5)
    bad = images[1]
    images[1] = SVMImage(bad.features, bad.gt_labels, bad.class_iou[:, :1])
    with pytest.raises(ValueError, match="training image 1: class_iou"):
        train_svms(images, 2, SVMConfig(), progress=False)
    with pytest.raises(TypeError, match="iterator"):
        train_svms(iter(images), 2, SVMConfig(), progress=False)


# ---------------------------------------------------------------------------
# the mining rules, exactly, with a scripted solver
#
# Features are 2-d: x[0] is the row's "score value", x[1] a unique row id.  The
# fake solver returns scripted models w = (1, 0), b = b_t, so a row scores
# x[0] + b_t under model t, and records what it was trained on.


def _img(score_values, n_pos=1, non_neg=0, uid0=0, num_classes=1, pos_label=0):
    """n_pos GT rows of pos_label, then non_neg proposals with IoU 0.5 (neither positive
    nor negative), then one negative proposal per score value."""
    vals = np.r_[np.full(n_pos, 5.0), np.zeros(non_neg), np.asarray(score_values, float)]
    m = len(vals)
    feats = np.stack([vals, uid0 + np.arange(m)], 1).astype(np.float32)
    gl = np.r_[np.full(n_pos, pos_label), -np.ones(m - n_pos, np.int64)]
    iou = np.zeros((m, num_classes))
    iou[:n_pos, pos_label] = 1.0
    iou[n_pos:n_pos + non_neg, :] = 0.5
    return SVMImage(feats, gl, iou)


class _ScriptedSolver:
    def __init__(self, biases):
        self.biases = list(biases)
        self.calls = []

    def __call__(self, X_pos, X_neg, C, pos_weight, intercept_scaling, max_iter, tol):
        ids = X_neg[:, 1].astype(int)
        assert len(np.unique(ids)) == len(ids), "duplicate negative in the cache"
        self.calls.append({"pos": sorted(X_pos[:, 1].astype(int)), "neg": sorted(ids)})
        return np.array([1.0, 0.0]), self.biases[len(self.calls) - 1]


def _ids(img, rows):
    return [int(img.features[r, 1]) for r in rows]


def test_mining_rules_exactly(monkeypatch):
    solver = _ScriptedSolver([0.0, -0.6, -0.6])
    monkeypatch.setattr(svm_mod, "_fit_linear_svm", solver)
    # image 0: 10 easy (-5), 5 hard (0), 3 non-negative proposals -> all 15 negatives cached
    im0 = _img([-5.0] * 10 + [0.0] * 5, non_neg=3, uid0=0)
    # image 1 (model 0, b=0): 1400 hard (0.5) + 100 hard (-0.9) added; 100 at -1.1 not added
    im1 = _img([0.5] * 1400 + [-0.9] * 100 + [-1.1] * 100, uid0=10_000)
    # image 2: 501 hard -> 2001 added since the last retrain > 2000 -> retrain (model 1, b=-0.6)
    im2 = _img([0.5] * 501, uid0=20_000)
    # image 3 (model 1): 0.5 scores -0.1 (added); -0.5 scores -1.1 (not added)
    im3 = _img([0.5] * 30 + [-0.5] * 40, uid0=30_000)
    images = [im0, im1, im2, im3]
    cfg = SVMConfig()
    W, b, summary = train_svms(images, 1, cfg, progress=False)

    n0 = 1 + 3  # rows before the negatives: 1 GT + 3 non-negatives
    pos_ids = sorted(int(im.features[0, 1]) for im in images)
    assert len(solver.calls) == 3
    # call 1: after image 0, every positive of the training set and all of image 0's negatives
    assert solver.calls[0]["pos"] == pos_ids
    assert solver.calls[0]["neg"] == _ids(im0, range(n0, n0 + 15))
    # eviction after call 1 (b=0): the ten -5 rows go, the five 0 rows stay
    kept0 = _ids(im0, range(n0 + 10, n0 + 15))
    added1 = _ids(im1, range(1, 1 + 1500))
    added2 = _ids(im2, range(1, 1 + 501))
    assert solver.calls[1]["neg"] == sorted(kept0 + added1 + added2)
    # eviction after call 2 (b=-0.6): image 1's -0.9 rows score -1.5 < -1.2 and go;
    # image 0's 0 rows score -0.6 and stay
    kept_after2 = sorted(kept0 + _ids(im1, range(1, 1401)) + added2)
    added3 = _ids(im3, range(1, 31))
    assert solver.calls[2]["neg"] == sorted(kept_after2 + added3)  # the final retrain
    assert summary[0]["retrains"] == 3
    assert summary[0]["negatives_kept"] == len(kept_after2) + 30
    assert summary[0]["negatives_evicted"] == 10 + 100
    assert b[0] == np.float32(-0.6)


def test_retrain_needs_strictly_more_than_retrain_every(monkeypatch):
    solver = _ScriptedSolver([0.0] * 10)
    monkeypatch.setattr(svm_mod, "_fit_linear_svm", solver)
    images = [_img([0.0] * 3, uid0=0), _img([0.5] * 2000, uid0=10_000), _img([0.5] * 1, uid0=20_000),
              _img([0.5] * 5, uid0=30_000)]
    train_svms(images, 1, SVMConfig(), progress=False)
    # first image, then 2000 added (not > 2000: no retrain), then 2001 -> retrain, then the final one
    assert [len(c["neg"]) for c in solver.calls] == [3, 2004, 2009]


def test_all_classes_mined_in_one_pass_and_other_class_gt_rows_are_negatives(monkeypatch):
    solver = _ScriptedSolver([0.0] * 10)
    monkeypatch.setattr(svm_mod, "_fit_linear_svm", solver)
    im0 = _img([0.0, 0.0], n_pos=1, uid0=0, num_classes=2, pos_label=0)
    im1 = _img([0.0], n_pos=1, uid0=100, num_classes=2, pos_label=1)
    train_svms([im0, im1], 2, SVMConfig(), progress=False)
    # calls: class 0 after image 0, class 1 after image 0, then the two final retrains
    by_class = {0: [c for c in solver.calls if c["pos"] == [0]], 1: [c for c in solver.calls if c["pos"] == [100]]}
    assert len(by_class[0]) == 2 and len(by_class[1]) == 2
    # class 0's negatives: image 0's proposals, image 1's GT row (class 1) and proposal; not its own GT
    assert by_class[0][-1]["neg"] == [1, 2, 100, 101]
    assert by_class[1][-1]["neg"] == [0, 1, 2, 101]


def test_no_duplicates_when_images_are_seen_again(monkeypatch):
    solver = _ScriptedSolver([0.0] * 10)
    monkeypatch.setattr(svm_mod, "_fit_linear_svm", solver)
    images = [_img([0.0] * 4, uid0=0), _img([0.5] * 6, uid0=100)]
    # two mining epochs: the second sees the same (image, row) keys again
    _, _, summary = train_svms(lambda: iter(images), 1, SVMConfig(), progress=False, epochs=2)
    assert summary[0]["negatives_kept"] == 10 and summary[0]["negatives_added"] == 10
    assert solver.calls[-1]["neg"] == list(range(1, 5)) + list(range(101, 107))


def test_classes_trained_in_separate_calls_equal_one_call_for_all():
    """What torchrun ranks do with the classes: each call trains its share, and the columns,
    biases and summary rows equal those of one call for every class, bit for bit."""
    images, _, _ = _gaussian_images(3, num_images=20, num_classes=3, negs_per_image=50, sep=4.0)
    cfg = SVMConfig(retrain_every=40)
    W, b, summary = train_svms(images, 3, cfg, progress=False)
    W02, b02, s02 = train_svms(images, 3, cfg, progress=False, classes=[0, 2])
    W1, b1, s1 = train_svms(images, 3, cfg, progress=False, classes=[1])
    assert np.array_equal(W02[:, [0, 2]], W[:, [0, 2]]) and np.array_equal(W1[:, 1], W[:, 1])
    assert np.array_equal(b02[[0, 2]], b[[0, 2]]) and b1[1] == b[1]
    assert np.all(W02[:, 1] == 0) and b02[1] == NEVER_FIRES  # classes not asked for never fire
    assert [r["index"] for r in s02] == [0, 2] and [r["index"] for r in s1] == [1]
    assert [r["retrains"] for r in sorted(s02 + s1, key=lambda r: r["index"])] == [r["retrains"] for r in summary]
    assert all(r["retrains"] > 1 for r in summary)  # mining retrained mid-pass: the split had work to match
