"""Scores comparable across classes: Platt scaling of each class's SVM margins on out-of-fold
windows (detector/detection/calibration.py), and the rare-class case it is there for."""
import numpy as np
import pytest
import torch

from detector.config import SVMConfig
from detector.detection.calibration import MIN_SLOPE, fit_calibration, held_out_margins, platt_fit
from detector.detection.postprocess import select_detections
from detector.detection.predictor import WindowPredictor
from detector.detection.svm import SVMImage, train_svms


def test_platt_fit_is_the_smoothed_maximum_likelihood():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    m = np.where(y, rng.normal(1.0, 1.0, 400), rng.normal(-1.0, 1.2, 400)) * 3 + 5
    a, b = platt_fit(m, y)
    t = np.where(y, (y.sum() + 1) / (y.sum() + 2), 1 / ((~y).sum() + 2))

    def nll(p):  # the plain formula, optimised by another method from another start
        f = p[0] * m + p[1]
        return float(np.sum(np.log1p(np.exp(-np.abs(f))) + np.maximum(f, 0) - t * f))

    ref = minimize(nll, [0.1, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12,
                                                                     "maxiter": 20000}).x
    assert a == pytest.approx(ref[0], rel=1e-3) and b == pytest.approx(ref[1], rel=1e-3, abs=1e-3)
    assert a > 0
    # margins that cannot rank anything: the smoothed base rate, slope at its floor
    a0, b0 = platt_fit(np.full(50, -1.0), np.arange(50) < 5)
    assert a0 == MIN_SLOPE and 1 / (1 + np.exp(-(a0 * -1.0 + b0))) == pytest.approx(6 / 52)
    # a class without any positive still keeps its order (slope >= MIN_SLOPE) but ranks low
    a1, b1 = platt_fit(rng.normal(size=100), np.zeros(100, bool))
    assert a1 >= MIN_SLOPE and a1 * 3 + b1 < -3


def _image(rng, rare: bool, d=32):
    """4 objects of the frequent class 0 (each with 3 overlapping proposals), maybe one of the
    rare class 1, and 40 background windows; margins of the two classes overlap."""
    mu0, mu1 = np.zeros(d), np.zeros(d)
    mu0[0], mu1[1] = 1.6, 3.0
    rows, gl, iou = [], [], []
    for _ in range(4):
        c = mu0 + rng.normal(0, 1, d)
        rows.append(c), gl.append(0), iou.append([1.0, 0.0])
        for _ in range(3):
            rows.append(c + rng.normal(0, 0.5, d)), gl.append(-1), iou.append([0.7, 0.0])
    if rare:
        rows.append(mu1 + rng.normal(0, 1, d)), gl.append(1), iou.append([0.0, 1.0])
    for _ in range(40):
        rows.append(rng.normal(0, 1.3, d)), gl.append(-1), iou.append([0.0, 0.0])
    return SVMImage(np.array(rows, np.float32), np.array(gl), np.array(iou))


def test_a_rare_class_with_three_training_objects_no_longer_crowds_the_top_detections():
    rng = np.random.default_rng(0)
    train = [_image(rng, rare=i < 3) for i in range(30)]  # class 1: 3 training objects in all
    cfg = SVMConfig()
    W, b, summary = train_svms(train, 2, cfg, progress=False)
    assert [r["positives"] for r in summary] == [120, 3]
    held = held_out_margins(lambda idx: (lambda: [train[i] for i in idx]), len(train), 2, cfg, [0, 1], folds=3)
    assert len(held[1][0]) == sum(len(im.features) for im in train) and held[1][1].sum() == 3
    raw, calibrated = WindowPredictor(W, b), WindowPredictor(W, b, calibration=fit_calibration(held, 2))
    test = [_image(rng, rare=False) for _ in range(20)]
    boxes = np.c_[np.arange(60) * 100.0, np.zeros(60), np.arange(60) * 100.0 + 50, np.full(60, 50.0)]

    def top10(pred):
        true, rare = 0, 0
        for im in test:
            margins = pred.scores(torch.from_numpy(im.features)).numpy()
            scores, thr = pred.calibrate(margins, np.full(2, -1.5))
            sel = select_detections(boxes[:len(scores)], scores, thr, 0.3, max_per_image=10)
            true += int(((sel.labels == 0) & (im.class_iou[sel.indices, 0] >= 0.5)).sum())
            rare += int((sel.labels == 1).sum())
        return true, rare

    raw_true, raw_rare = top10(raw)
    cal_true, cal_rare = top10(calibrated)
    assert raw_rare > 50  # the problem: the rare class's windows take many of the 10 places per image
    assert cal_rare < raw_rare / 5 and cal_true > 1.5 * raw_true
    # within each class the order (so each class's AP) is unchanged
    m = raw.scores(torch.from_numpy(test[0].features)).numpy()
    c, _ = calibrated.calibrate(m, np.full(2, -1.5))
    for k in range(2):
        assert (np.argsort(m[:, k], kind="stable") == np.argsort(c[:, k], kind="stable")).all()
