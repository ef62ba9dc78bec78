"""Scores comparable across classes: per-class Platt scaling of the SVM margins, fit on
held-out windows.

Each class's SVM has its own margin scale: a class with few examples, or one whose
appearance is texture that fires on background, puts many windows far above the test
threshold, and with the cap of `test.max_per_image` detections per image those windows
crowd out the true detections of other classes.  Per-class AP only depends on the order
within the class, so a monotone map per class changes nothing there; what it changes is
the order *across* classes, i.e. which detections survive the per-image cap.

The map is Platt's (1999): the log-odds `a * margin + b` that a window is a correct
detection of the class (IoU >= 0.5 with one of its ground-truth boxes), fit by maximum
likelihood with Platt's smoothed targets on *out-of-fold* margins: the training images are
split into folds, and each fold's windows are scored by SVMs trained on the other folds
(the same mining), so the fit sees how the SVMs behave on images they did not train on.
The slope is kept at least `MIN_SLOPE`, so the map stays strictly increasing (a class with
no held-out positive then ranks below every class that has some).  Scores are reported as
log-odds, not probabilities, so that no two margins collapse onto one float32 value.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from detector.config import SVMConfig
from detector.detection.svm import SVMImage, train_svms

MIN_SLOPE = 1e-2

ImagesOf = Callable[[Sequence[int]], Callable[[], Iterable[SVMImage]]]  # image indices -> fresh passes


def platt_fit(margins: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(a, b) maximising the likelihood of `positive` under sigmoid(a * margin + b), with Platt's
    targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2); a >= MIN_SLOPE."""
    from scipy.optimize import minimize

    s = np.asarray(margins, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    scale = float(np.std(s))
    if scale < 1e-6:  # the margins cannot rank these windows (an SVM that learnt nothing): the base rate
        rate = (n_pos + 1.0) / (n_pos + n_neg + 2.0)
        return MIN_SLOPE, float(np.log(rate / (1.0 - rate)) - MIN_SLOPE * s.mean())
    z = (s - s.mean()) / scale  # optimise on standardised margins: one step size fits every class

    def nll(p):
        f = p[0] * z + p[1]
        # log(1 + exp(f)) - t * f, computed stably
        loss = np.logaddexp(0.0, f) - t * f
        sig = 0.5 * (1.0 + np.tanh(0.5 * f))
        return float(loss.sum()), np.array([float(((sig - t) * z).sum()), float((sig - t).sum())])

    res = minimize(nll, np.array([1.0, np.log((n_pos + 1.0) / (n_neg + 1.0))]), jac=True, method="L-BFGS-B",
                   bounds=[(MIN_SLOPE * scale, None), (None, None)])
    a_z, b_z = res.x
    a = a_z / scale
    return float(a), float(b_z - a * s.mean())


def held_out_margins(images_of: ImagesOf, n: int, num_classes: int, cfg: SVMConfig, classes: Sequence[int],
                     folds: int = 3, iou: float = 0.5) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each class of `classes`: (margins, is_positive) of every training window, each margin
    from SVMs trained (with the usual mining) on the images of the other folds (image i is in
    fold i % folds).  A window is positive for class k when its IoU with a ground-truth box of
    k is at least `iou`."""
    classes = list(classes)
    out: dict[int, tuple[list, list]] = {k: ([], []) for k in classes}
    for f in range(folds):
        held = [i for i in range(n) if i % folds == f]
        rest = [i for i in range(n) if i % folds != f]
        if not held or not rest:
            continue
        W, b, _ = train_svms(images_of(rest), num_classes, cfg, progress=False, classes=classes)
        for img in images_of(held)():
            z = img.features @ W[:, classes] + b[classes]
            for j, k in enumerate(classes):
                out[k][0].append(z[:, j])
                out[k][1].append(np.asarray(img.class_iou)[:, k] >= iou)
    return {k: (np.concatenate(m) if m else np.zeros(0), np.concatenate(p) if p else np.zeros(0, bool))
            for k, (m, p) in out.items()}


def fit_calibration(held_out: dict[int, tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """[K, 2] (a, b) per class from `held_out_margins`; classes with no held-out window keep
    (1, 0)."""
    ab = np.tile([1.0, 0.0], (num_classes, 1))
    for k, (m, p) in held_out.items():
        if len(m):
            ab[k] = platt_fit(m, p)
    return ab
