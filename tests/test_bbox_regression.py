"""Bounding-box regression (detector/detection/bbox_regression.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from detector.detection.bbox_regression import (BBOX_XFORM_CLIP, BoxRegressor, decode, encode, ridge_solve,
                                      train_box_regressors)


def _random_boxes(rng, n, lo=0.0, hi=500.0):
    xy = rng.uniform(lo, hi, size=(n, 2))
    wh = rng.uniform(5.0, 200.0, size=(n, 2))  # size ratios stay below the decode clamp (62.5)
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_encode_hand_computed():
    box = np.array([[0, 0, 10, 20]], np.float32)  # w 10, h 20, centre (5, 10)
    gt = np.array([[1, 2, 21, 12]], np.float32)  # w 20, h 10, centre (11, 7)
    t = encode(box, gt)
    np.testing.assert_allclose(t, [[0.6, -0.15, math.log(2.0), math.log(0.5)]], rtol=1e-12)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    boxes, gt = _random_boxes(rng, 1000), _random_boxes(rng, 1000)
    np.testing.assert_allclose(decode(boxes, encode(boxes, gt)), gt, rtol=0, atol=1e-3)
    assert decode(boxes, encode(boxes, gt)).dtype == np.float32
    np.testing.assert_allclose(decode(boxes, np.zeros((1000, 4))), boxes, atol=1e-4)


def test_decode_clamps_the_scale():
    box = np.array([[10, 10, 20, 30]], np.float32)
    out = decode(box, np.array([[0.0, 0.0, 50.0, 50.0]]))  # exp(50) would overflow float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 10 * 1000 / 16, rtol=1e-5)
    np.testing.assert_allclose(out[0, 3] - out[0, 1], 20 * 1000 / 16, rtol=1e-5)
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(62.5))


def test_degenerate_training_boxes_are_rejected():
    good = np.array([[0, 0, 10, 10]], np.float32)
    with pytest.raises(ValueError, match="zero or negative width"):
        encode(np.array([[5, 0, 5, 10]], np.float32), good)
    with pytest.raises(ValueError, match="gt_boxes"):
        encode(good, np.array([[0, 3, 10, 1]], np.float32))
    with pytest.raises(ValueError, match="4"):
        encode(np.zeros((2, 3)), np.zeros((2, 3)))


def test_ridge_matches_lstsq_on_the_augmented_system():
    rng = np.random.default_rng(2)
    lam = 3.7
    for n, d in ((60, 10), (15, 40)):  # primal and dual branches
        A = rng.normal(size=(n, d))
        Y = rng.normal(size=(n, 4))
        # min ||A B - Y||^2 + lam ||B||^2  <=>  least squares on [A; sqrt(lam) I] B = [Y; 0]
        ref = np.linalg.lstsq(np.vstack([A, math.sqrt(lam) * np.eye(d)]), np.vstack([Y, np.zeros((d, 4))]),
                              rcond=None)[0]
        np.testing.assert_allclose(ridge_solve(A, Y, lam), ref, rtol=1e-8, atol=1e-10)
        # the implicit bias column and row subsets, in small chunks, against the explicit system
        rows = np.arange(0, n, 2)
        A1 = np.c_[A[rows], np.ones(len(rows))]
        ref1 = np.linalg.lstsq(np.vstack([A1, math.sqrt(lam) * np.eye(d + 1)]),
                               np.vstack([Y[rows], np.zeros((d + 1, 4))]), rcond=None)[0]
        got = ridge_solve(A.astype(np.float32), Y[rows], lam, bias=True, rows=rows, chunk=7)
        np.testing.assert_allclose(got, ref1, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        ridge_solve(A, Y, 0.0)


def _synthetic(rng, n, d, num_classes, noise=0.0, true_w=None):
    """Windows whose targets are a linear function of [features, 1] per class (plus noise)."""
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, num_classes, n)
    if true_w is None:
        true_w = rng.normal(size=(num_classes, d + 1, 4)) * 0.05
    t = np.einsum("nd,ndq->nq", np.c_[x, np.ones(n)], true_w[labels]) + rng.normal(0, noise, (n, 4))
    boxes = _random_boxes(rng, n)
    gt = decode(boxes, t)
    return x, boxes, gt, labels, true_w


def test_trained_regressor_matches_independent_whitened_ridge():
    rng = np.random.default_rng(3)
    x, boxes, gt, labels, _ = _synthetic(rng, 300, 12, 2, noise=0.05)
    lam = 5.0
    reg = train_box_regressors(x, boxes, gt, labels, 2, lam=lam, whiten=True)
    for k in range(2):
        rows = labels == k
        Y = encode(boxes[rows], gt[rows])
        mu = Y.mean(0)
        S = np.cov(Y.T, bias=True)
        T = np.linalg.inv(np.real(scipy.linalg.sqrtm(S + 0.001 * np.eye(4))))  # the original's whitening
        Yw = (Y - mu) @ T
        A = np.c_[x[rows], np.ones(rows.sum())]
        ref = np.linalg.lstsq(np.vstack([A, math.sqrt(lam) * np.eye(A.shape[1])]),
                              np.vstack([Yw, np.zeros((A.shape[1], 4))]), rcond=None)[0]
        np.testing.assert_allclose(reg.mu[k], mu, rtol=1e-10)
        np.testing.assert_allclose(reg.T[k], T, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(reg.weights[k], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("whiten", [True, False])
def test_whitening_is_inverted_at_prediction(whiten):
    rng = np.random.default_rng(4)
    x, boxes, gt, labels, true_w = _synthetic(rng, 400, 10, 3)
    reg = train_box_regressors(x, boxes, gt, labels, 3, lam=1e-8, whiten=whiten)
    assert reg.trained.all()
    # held-out windows of the same linear law come out on their true boxes
    x2, boxes2, gt2, labels2, _ = _synthetic(rng, 400, 10, 3, true_w=true_w)
    assert not np.allclose(boxes2, gt2, atol=0.5)
    np.testing.assert_allclose(reg.predict(x2, boxes2, labels2), gt2, atol=0.02)
    if whiten:
        np.testing.assert_allclose(reg.T @ reg.T_inv, np.tile(np.eye(4), (3, 1, 1)), atol=1e-10)


def test_classes_without_enough_examples():
    rng = np.random.default_rng(5)
    x, boxes, gt, labels, _ = _synthetic(rng, 50, 6, 1)
    labels = np.zeros(50, np.int64)
    labels[:3] = 1  # class 1: 3 examples, class 2: none
    with pytest.warns(UserWarning) as rec:
        reg = train_box_regressors(x, boxes, gt, labels, 3, lam=1.0, class_names=["a", "b", "c"])
    msgs = " ".join(str(w.message) for w in rec)
    assert "'b'" in msgs and "without target whitening" in msgs and "'c'" in msgs and "no training examples" in msgs
    assert reg.trained.tolist() == [True, True, False]
    np.testing.assert_array_equal(reg.T[1], np.eye(4))
    # class 2 leaves boxes exactly as they were
    out = reg.predict(x[:5], boxes[:5], np.full(5, 2))
    np.testing.assert_array_equal(out, boxes[:5])


def test_arrays_round_trip_and_validation():
    rng = np.random.default_rng(6)
    x, boxes, gt, labels, _ = _synthetic(rng, 100, 8, 2)
    reg = train_box_regressors(x, boxes, gt, labels, 2, lam=10.0)
    arrays = reg.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    reg2 = BoxRegressor.from_arrays(arrays)
    np.testing.assert_array_equal(reg2.predict(x, boxes, labels), reg.predict(x, boxes, labels))
    bad = dict(arrays)
    del bad["bbox_T_inv"]
    with pytest.raises(ValueError, match="bbox_T_inv"):
        BoxRegressor.from_arrays(bad)
    bad = dict(arrays, bbox_mu=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="mu"):
        BoxRegressor.from_arrays(bad)
    with pytest.raises(ValueError, match="features"):
        reg.predict(x[:, :5], boxes, labels)
    with pytest.raises(ValueError, match="labels"):
        reg.predict(x, boxes, np.full(len(x), 9))


def test_deltas_for_every_class_and_for_each_rows_class_agree_with_a_float64_loop():
    """The device path's [N, K, 4] deltas (float32, one pass) and the host path's [N, 4] deltas of
    each row's class (float64) are the same regression, against the plain formula per row."""
    import torch

    rng = np.random.default_rng(7)
    x, boxes, gt, labels, _ = _synthetic(rng, 200, 9, 3)
    labels[labels == 2] = 1  # class 2 untrained: zero deltas
    with pytest.warns(UserWarning, match="no training examples"):
        reg = train_box_regressors(x, boxes, gt, labels, 3, lam=2.0)
    rows = rng.integers(0, 3, 40)
    ref = np.zeros((40, 3, 4))
    for n in range(40):
        for k in range(3):
            if reg.trained[k]:
                w = reg.weights[k].astype(np.float64)
                ref[n, k] = (x[n].astype(np.float64) @ w[:-1] + w[-1]) @ reg.T_inv[k] + reg.mu[k]
    every = reg.deltas(torch.from_numpy(x[:40].astype(np.float32)))
    assert every.dtype == torch.float32 and every.shape == (40, 3, 4)
    np.testing.assert_allclose(every.numpy(), ref, rtol=1e-4, atol=1e-4)
    own = reg.deltas(torch.from_numpy(x[:40].astype(np.float64)), rows)
    assert own.dtype == torch.float64
    np.testing.assert_allclose(own.numpy(), ref[np.arange(40), rows], rtol=1e-10, atol=1e-12)
    moved = reg.apply(boxes[:40], own, rows)
    np.testing.assert_array_equal(moved[rows == 2], boxes[:40][rows == 2])
    np.testing.assert_allclose(moved[rows != 2], decode(boxes[:40], ref[np.arange(40), rows])[rows != 2])
