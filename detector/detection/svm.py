"""Per-class linear SVMs with hard-negative mining (paper section 4.1, R-CNN's `rcnn_train.m`).

Inputs are feature matrices, one `SVMImage` per training image; feature
extraction and the norm-20 rescaling (`detector.core.embedder.norm_scale`) happen before.

Mining follows the original exactly, for all classes in the same pass:

* positives: every ground-truth row of the class in the whole training set
  (difficult objects included), gathered in a first pass before mining, as
  R-CNN's `get_positive_pool5_features` does;
* negatives: rows whose max IoU with the image's GT boxes of the class is
  below `cfg.neg_iou` (0.3) -- GT rows of other classes included;
* a class with no model yet takes *all* its negatives from an image (so the
  first image contributes all of them) and is trained right after it; from
  then on an image adds the negatives scoring above `cfg.hard_thresh` under
  the current model that are not already cached (cache keys are
  (image position, row));
* a class is retrained once more than `cfg.retrain_every` negatives were added
  since its last training, and once more at the end for every class;
* after each retrain during mining, cached negatives scoring below
  `cfg.evict_thresh` are evicted.

Solver: liblinear's L2-regularised L1-loss dual (`LinearSVC(loss='hinge',
dual=True)`) with a bias feature of value `intercept_scaling` (R-CNN's bias
multiplier 10).  liblinear regularises that bias weight like any other, so the
objective it minimises (and the one reported here) is

    0.5 * (||w||^2 + (b / intercept_scaling)^2)
      + C * sum_i c_i * max(0, 1 - y_i * (w . x_i + b)),

c_i = pos_weight for positives and 1 for negatives, over the positives and the
final cache of negatives.  Note: liblinear's own stopping tolerance in R-CNN
was its default 0.1; we use scikit-learn's tighter default (`tol=1e-4`).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from detector.progress import progress_bar

from detector.config import SVMConfig

log = logging.getLogger(__name__)

# Bias given to classes that could not be trained: finite (no inf arithmetic
# downstream) yet far below any score threshold, so they never fire.
NEVER_FIRES = -1.0e6


@dataclass
class SVMImage:
    """One training image's rows (ground-truth boxes and proposals alike).

    features: [M, D] float32, already rescaled to the target mean norm.
    gt_labels: [M] int, the class of ground-truth rows, -1 for proposal rows.
    class_iou: [M, K] float, each row's max IoU with the image's GT boxes of each
        class (0 where the image has none of that class; 1 at k for a GT row of k).
    """

    features: np.ndarray
    gt_labels: np.ndarray
    class_iou: np.ndarray


Images = Union[Sequence[SVMImage], Callable[[], Iterable[SVMImage]]]


# ----------------------------------------------------------------------------
# the norm sample


def sample_feature_rows(
    get_features: Callable[[int], np.ndarray],
    num_images: int,
    norm_images: int = 200,
    norm_boxes: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """R-CNN's `rcnn_feature_stats` sample: up to norm_boxes random rows from each of
    up to norm_images random images (fixed seed).  get_features(i) gives image i's
    [M_i, D] features; images are visited in increasing index order."""
    if num_images <= 0:
        raise ValueError("sample_feature_rows: no images to sample from")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(num_images, size=min(norm_images, num_images), replace=False))
    rows = []
    for i in chosen:
        f = np.asarray(get_features(int(i)))
        if f.ndim != 2:
            raise ValueError(f"sample_feature_rows: image {i}: expected [M, D] features, got shape {f.shape}")
        if len(f) == 0:
            continue
        pick = rng.choice(len(f), size=min(norm_boxes, len(f)), replace=False)
        rows.append(f[np.sort(pick)])
    if not rows:
        raise ValueError("sample_feature_rows: every sampled image has zero rows")
    return np.concatenate(rows, axis=0)


# ----------------------------------------------------------------------------
# objective, solver


def svm_objective(w: np.ndarray, b: float, X_pos: np.ndarray, X_neg: np.ndarray, C: float,
                  pos_weight: float, intercept_scaling: float) -> dict:
    """liblinear's primal objective for (w, b) with the bias weight b / intercept_scaling
    regularised (see the module docstring); float64."""
    w = np.asarray(w, np.float64)
    z_pos = np.asarray(X_pos, np.float64) @ w + b
    z_neg = np.asarray(X_neg, np.float64) @ w + b
    pos_loss = C * pos_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
    neg_loss = C * float(np.maximum(0.0, 1.0 + z_neg).sum())
    reg_loss = 0.5 * float(w @ w) + 0.5 * (float(b) / intercept_scaling) ** 2
    return {"objective": reg_loss + pos_loss + neg_loss, "pos_loss": pos_loss,
            "neg_loss": neg_loss, "reg_loss": reg_loss}


def _fit_linear_svm(X_pos: np.ndarray, X_neg: np.ndarray, C: float, pos_weight: float,
                    intercept_scaling: float, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """One liblinear fit (R-CNN's `update_model`): positives +1, negatives -1."""
    from sklearn.svm import LinearSVC

    X = np.concatenate([X_pos, X_neg], axis=0)
    y = np.concatenate([np.ones(len(X_pos), np.int64), -np.ones(len(X_neg), np.int64)])
    clf = LinearSVC(loss="hinge", dual=True, C=C, class_weight={1: pos_weight, -1: 1.0},
                    intercept_scaling=intercept_scaling, max_iter=max_iter, tol=tol, random_state=0)
    clf.fit(X, y)
    # classes_ is [-1, 1], so coef_ / intercept_ score the positive class.
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


# ----------------------------------------------------------------------------
# mining


class _NegativeCache:
    """Growable per-class store of cached negative rows and their (image, row) keys."""

    def __init__(self, dim: int):
        self.X = np.zeros((0, dim), np.float32)
        self.keys = np.zeros((0, 2), np.int64)
        self.n = 0
        self.keyset: set[tuple[int, int]] = set()
        self.per_image: dict[int, int] = {}  # cached rows per image: skips key look-ups for new images
        self.num_added = 0  # since the last training
        self.total_added = 0
        self.total_evicted = 0

    def contains(self, image: int, rows: np.ndarray) -> np.ndarray:
        if image not in self.per_image:
            return np.zeros(len(rows), bool)
        return np.fromiter(((image, int(r)) in self.keyset for r in rows), bool, count=len(rows))

    def add(self, image: int, rows: np.ndarray, X: np.ndarray) -> None:
        k = len(rows)
        if k == 0:
            return
        if self.n + k > len(self.X):
            cap = max(self.n + k, 2 * len(self.X), 256)
            X_new = np.zeros((cap, self.X.shape[1]), np.float32)
            X_new[: self.n] = self.X[: self.n]
            keys_new = np.zeros((cap, 2), np.int64)
            keys_new[: self.n] = self.keys[: self.n]
            self.X, self.keys = X_new, keys_new
        self.X[self.n: self.n + k] = X
        self.keys[self.n: self.n + k, 0] = image
        self.keys[self.n: self.n + k, 1] = rows
        self.keyset.update((image, int(r)) for r in rows)
        self.per_image[image] = self.per_image.get(image, 0) + k
        self.n += k
        self.num_added += k
        self.total_added += k

    def keep(self, mask: np.ndarray) -> None:
        gone = self.keys[: self.n][~mask]
        self.keyset.difference_update((int(i), int(r)) for i, r in gone)
        for i, c in zip(*np.unique(gone[:, 0], return_counts=True)):
            left = self.per_image[int(i)] - int(c)
            if left:
                self.per_image[int(i)] = left
            else:
                del self.per_image[int(i)]
        self.total_evicted += len(gone)
        m = int(mask.sum())
        self.X[:m] = self.X[: self.n][mask]
        self.keys[:m] = self.keys[: self.n][mask]
        self.n = m

    @property
    def features(self) -> np.ndarray:
        return self.X[: self.n]


def _iterate(images: Images) -> Iterator[SVMImage]:
    if callable(images) and not isinstance(images, Sequence):
        return iter(images())
    if isinstance(images, Iterator):
        raise TypeError("train_svms needs to read the images twice (positives, then mining): pass a "
                        "sequence or a zero-argument callable returning a fresh iterable, not an iterator")
    return iter(images)


def _check_image(img: SVMImage, idx: int, num_classes: int, dim: Optional[int]) -> None:
    if not isinstance(img, SVMImage):
        raise TypeError(f"training image {idx}: expected an SVMImage, got {type(img).__name__}")
    f, g, o = img.features, img.gt_labels, img.class_iou
    if f.ndim != 2:
        raise ValueError(f"training image {idx}: features must be [M, D], got shape {f.shape}")
    m = f.shape[0]
    if dim is not None and f.shape[1] != dim:
        raise ValueError(f"training image {idx}: feature dimension {f.shape[1]} differs from the first image's {dim}")
    if g.shape != (m,):
        raise ValueError(f"training image {idx}: gt_labels has shape {g.shape}, expected ({m},)")
    if o.shape != (m, num_classes):
        raise ValueError(f"training image {idx}: class_iou has shape {o.shape}, expected ({m}, {num_classes})")
    if m and (g.min() < -1 or g.max() >= num_classes):
        raise ValueError(f"training image {idx}: gt_labels must be -1 or in [0, {num_classes}), "
                         f"got values in [{g.min()}, {g.max()}]")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"training image {idx}: features contain NaN or inf")
    if m and not np.all(np.isfinite(o)):
        raise ValueError(f"training image {idx}: class_iou contains NaN or inf")


def _as_image(img: SVMImage) -> SVMImage:
    return SVMImage(np.asarray(img.features, np.float32), np.asarray(img.gt_labels).astype(np.int64, copy=False),
                    np.asarray(img.class_iou, np.float64))


def _positives(images: Images, num_classes: int, progress: bool) -> tuple[list[np.ndarray], int, int]:
    """Pass 1: every positive of every class, as R-CNN gathers them before mining.
    Returns the per-class positive rows, the feature dimension and the image count."""
    pos_chunks: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    dim: Optional[int] = None
    num_images = 0
    images_once = progress_bar(_iterate(images), desc="SVM positives", unit="img", disable=not progress)
    for idx, img in enumerate(images_once):
        _check_image(img, idx, num_classes, dim)
        img = _as_image(img)
        dim = img.features.shape[1]
        for k in np.unique(img.gt_labels[img.gt_labels >= 0]):
            pos_chunks[k].append(img.features[img.gt_labels == k])
        num_images += 1
    if dim is None:
        raise ValueError("train_svms: no training images")
    return [np.concatenate(c) if c else np.zeros((0, dim), np.float32) for c in pos_chunks], dim, num_images


class _Miner:
    """The per-class models, negative caches and counters of one hard-negative mining run."""

    def __init__(self, X_pos: list[np.ndarray], dim: int, cfg: SVMConfig, names: list[str], tol: float,
                 mine: np.ndarray):
        K = len(X_pos)
        self.X_pos, self.cfg, self.names, self.tol = X_pos, cfg, names, tol
        self.W = np.zeros((dim, K), np.float32)
        self.b = np.full(K, NEVER_FIRES, np.float32)
        self.trained = np.zeros(K, bool)
        self.active = np.array([len(p) > 0 for p in X_pos]) & mine  # mine: the classes this call trains
        self.caches = [_NegativeCache(dim) for _ in range(K)]
        self.retrains = np.zeros(K, np.int64)
        self.unconverged: dict[int, int] = {}

    def retrain(self, k: int, evict: bool) -> None:
        from sklearn.exceptions import ConvergenceWarning

        cfg, cache = self.cfg, self.caches[k]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            w, bias = _fit_linear_svm(self.X_pos[k], cache.features, cfg.C, cfg.pos_weight,
                                      cfg.intercept_scaling, cfg.max_iter, self.tol)
        for c in caught:  # reported once at the end, not per fit
            if issubclass(c.category, ConvergenceWarning):
                self.unconverged[k] = self.unconverged.get(k, 0) + 1
            else:
                warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
        self.W[:, k] = w
        self.b[k] = bias
        self.trained[k] = True
        self.retrains[k] += 1
        cache.num_added = 0
        if evict:
            z = cache.features @ self.W[:, k] + self.b[k]
            cache.keep(z >= cfg.evict_thresh)
        log.info("SVM %s: retrain %d on %d pos / %d neg", self.names[k], self.retrains[k], len(self.X_pos[k]),
                 cache.n)

    def mine(self, idx: int, img: SVMImage) -> None:
        """One image of the mining pass, for every class being trained."""
        cfg = self.cfg
        for k in np.flatnonzero(self.active):
            # scores under the current model, before this image's retrains; one class at a time so
            # that a class's numbers do not depend on which other classes this call trains
            z = img.features @ self.W[:, k] + self.b[k]
            neg = (img.class_iou[:, k] < cfg.neg_iou) & (img.gt_labels != k)
            if self.trained[k]:
                neg &= z > cfg.hard_thresh
            rows = np.flatnonzero(neg)
            cache = self.caches[k]
            rows = rows[~cache.contains(idx, rows)]
            cache.add(idx, rows, img.features[rows])
            if cache.n and (not self.trained[k] or cache.num_added > cfg.retrain_every):
                self.retrain(k, evict=True)

    def finish(self, k: int) -> dict:
        """The final retrain of class k on its final cache, and its summary row."""
        k = int(k)
        cfg, cache, name = self.cfg, self.caches[k], self.names[k]
        row = {"class": name, "index": k, "positives": len(self.X_pos[k]), "negatives_kept": cache.n,
               "negatives_added": cache.total_added, "negatives_evicted": cache.total_evicted,
               "objective": float("nan"), "pos_loss": float("nan"), "neg_loss": float("nan"),
               "reg_loss": float("nan"), "retrains": 0, "skipped": True, "converged": True}
        if self.active[k] and cache.n == 0:
            warnings.warn(f"SVM for class '{name}' (index {k}) skipped: no negative examples "
                          f"(IoU < {cfg.neg_iou}); it will never fire", UserWarning, stacklevel=3)
        if self.active[k] and cache.n > 0:
            self.retrain(k, evict=False)
            row.update(svm_objective(self.W[:, k], float(self.b[k]), self.X_pos[k], cache.features, cfg.C,
                                     cfg.pos_weight, cfg.intercept_scaling))
            row.update(retrains=int(self.retrains[k]), skipped=False, converged=k not in self.unconverged)
        else:
            self.W[:, k] = 0.0
            self.b[k] = NEVER_FIRES
        return row


def train_svms(
    images: Images,
    num_classes: int,
    cfg: Optional[SVMConfig] = None,
    class_names: Optional[Sequence[str]] = None,
    progress: bool = True,
    epochs: int = 1,
    tol: float = 1e-4,
    classes: Optional[Sequence[int]] = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train one linear SVM per class with hard-negative mining (see the module docstring).

    images: a sequence of SVMImage (it may load lazily in __getitem__) or a
        zero-argument callable returning a fresh iterable of them; it is read
        once for positives and `epochs` times for mining (the original: 1).
    Returns W [D, K] float32, b [K] float32 and one summary dict per class
    (class, positives, negatives_kept, objective and its parts, retrains,
    skipped).  A class without positives (or negatives) is skipped with a
    warning; its column of W is 0 and its bias NEVER_FIRES. `format_summary(summary)` makes
    the table the training prints.
    classes: train only these (the classes are independent, so torchrun ranks can share them
        out and get the same columns as one call for all); the others' columns stay 0 and
        NEVER_FIRES, and the summary has rows for these only.
    """
    cfg = cfg or SVMConfig()
    if num_classes < 1:
        raise ValueError("train_svms: num_classes must be >= 1")
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"train_svms: {len(names)} class names for {num_classes} classes")
    from sklearn.exceptions import ConvergenceWarning

    mine = np.zeros(num_classes, bool)
    mine[list(range(num_classes)) if classes is None else list(classes)] = True
    X_pos, dim, num_images = _positives(images, num_classes, progress)
    m = _Miner(X_pos, dim, cfg, names, tol, mine)
    for k in np.flatnonzero(mine & ~m.active):
        warnings.warn(f"SVM for class '{names[k]}' (index {k}) skipped: no positive (ground-truth) "
                      f"examples; it will never fire", UserWarning, stacklevel=2)
    # Pass 2: one mining pass (per epoch) over the images.
    for epoch in range(epochs):
        bar = progress_bar(_iterate(images), total=num_images, desc=f"SVM mining (epoch {epoch + 1}/{epochs})",
                           unit="img", disable=not progress)
        seen = 0
        for idx, img in enumerate(bar):
            seen += 1
            _check_image(img, idx, num_classes, dim)
            m.mine(idx, _as_image(img))
            bar.set_postfix(retrains=int(m.retrains.sum()), refresh=False)
        if seen != num_images:
            raise ValueError(f"train_svms: the images gave {num_images} items for positives but {seen} for mining")
    # Once more at the end, every class, on its final cache.
    summary = [m.finish(k) for k in progress_bar(np.flatnonzero(mine), desc="SVM final retrain", unit="class",
                                                disable=not progress)]
    if m.unconverged:
        total = sum(m.unconverged.values())
        which = ", ".join(f"{names[k]} ({n})" for k, n in sorted(m.unconverged.items()))
        warnings.warn(f"liblinear did not converge within max_iter={cfg.max_iter} in {total} fit(s) "
                      f"for class(es): {which}; consider raising svm.max_iter",
                      ConvergenceWarning, stacklevel=2)
    return m.W, m.b, summary


def format_summary(summary: list[dict]) -> str:
    """A plain-text table of train_svms' per-class summary."""
    width = max([5] + [len(r["class"]) for r in summary])
    lines = [f"{'class':<{width}}  {'positives':>9}  {'neg kept':>9}  {'objective':>12}  {'retrains':>8}  note",
             "-" * (width + 56)]
    for r in summary:
        note = "SKIPPED" if r["skipped"] else ("" if r["converged"] else "not converged")
        lines.append(f"{r['class']:<{width}}  {r['positives']:>9d}  {r['negatives_kept']:>9d}  "
                     f"{r['objective']:>12.4f}  {r['retrains']:>8d}  {note}")
    return "\n".join(lines)
