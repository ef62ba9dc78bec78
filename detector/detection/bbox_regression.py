"""Bounding-box regression (paper section 4.1, following R-CNN's `rcnn_train_bbox_regressor.m`),
and Fast R-CNN's box layer as an option (`bbox.method: finetune`, see `box_layer`).

Targets use our continuous box convention (w = x2 - x1, cx = x1 + w/2):
tx = (gcx - cx)/w, ty = (gcy - cy)/h, tw = log(gw/w), th = log(gh/h).

Per class, as the original:
* features are pool5 rescaled to mean norm 20 *by the caller*; a constant-1
  column (the bias) is appended here, implicitly (see ridge_solve);
* targets are whitened: centred on their mean mu and multiplied by
  T = V diag(1/sqrt(d + 0.001)) V^T (the eigen-decomposition of their biased
  covariance; the 0.001 is the original's, keeps T finite for degenerate
  classes); prediction undoes it with T_inv = V diag(sqrt(d + 0.001)) V^T, + mu;
* ridge regression, min ||A B - Y||^2 + lam ||B||^2 with A = [X, 1], so the
  bias is regularised too (the original's `(A'A + lam I) \\ A'y`).  We solve
  whichever of the primal ((D+1)x(D+1)) and dual (NxN) systems is smaller;
  both give the same B.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import scipy.linalg
import torch
from detector.progress import progress_bar

# torchvision's bbox_xform_clip: never scale a box up by more than 1000/16 in decode.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
# Fast R-CNN's BBOX_NORMALIZE_STDS: the box layer learns targets divided by these, so the four
# outputs have comparable ranges and one smooth-L1 loss suits them all.
BOX_LAYER_STDS = (0.1, 0.1, 0.2, 0.2)
WHITEN_EPS = 0.001  # added to the covariance eigenvalues, as in R-CNN


def _boxes(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name}: expected [N, 4] boxes, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: boxes contain NaN or inf")
    return a


def _check_positive_size(a: np.ndarray, name: str) -> None:
    bad = np.flatnonzero((a[:, 2] <= a[:, 0]) | (a[:, 3] <= a[:, 1]))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}: {len(bad)} box(es) with zero or negative width/height, "
                         f"first at row {i}: {a[i].tolist()}")


def encode(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Regression targets [N, 4] (tx, ty, tw, th), float64, taking boxes onto gt_boxes."""
    boxes, gt = _boxes(boxes, "encode: boxes"), _boxes(gt_boxes, "encode: gt_boxes")
    if len(boxes) != len(gt):
        raise ValueError(f"encode: {len(boxes)} boxes but {len(gt)} gt_boxes")
    _check_positive_size(boxes, "encode: boxes")
    _check_positive_size(gt, "encode: gt_boxes")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    gcx, gcy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([(gcx - cx) / w, (gcy - cy) / h, np.log(gw / w), np.log(gh / h)], axis=1)


def decode(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Apply deltas [N, 4] to boxes [N, 4]; float32 boxes.  tw, th are clipped at
    log(1000/16) before exp (torchvision's guard against overflow)."""
    boxes = _boxes(boxes, "decode: boxes")
    d = np.asarray(deltas, np.float64)
    if d.shape != boxes.shape:
        raise ValueError(f"decode: deltas shape {d.shape} differs from boxes shape {boxes.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("decode: deltas contain NaN or inf")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    pcx, pcy = d[:, 0] * w + cx, d[:, 1] * h + cy
    pw = np.exp(np.minimum(d[:, 2], BBOX_XFORM_CLIP)) * w
    ph = np.exp(np.minimum(d[:, 3], BBOX_XFORM_CLIP)) * h
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------
# model


@dataclass
class BoxRegressor:
    """Per-class linear box regressors; all fields plain numpy arrays.

    weights: [K, D+1, 4] (last row: the bias, applied to the constant-1 feature)
    mu: [K, 4] target means; T, T_inv: [K, 4, 4] whitening and its inverse;
    trained: [K] bool (untrained classes leave boxes unchanged).
    """

    weights: np.ndarray
    mu: np.ndarray
    T: np.ndarray
    T_inv: np.ndarray
    trained: np.ndarray

    def __post_init__(self):
        self.weights = np.asarray(self.weights, np.float32)
        self.mu = np.asarray(self.mu, np.float64)
        self.T = np.asarray(self.T, np.float64)
        self.T_inv = np.asarray(self.T_inv, np.float64)
        self.trained = np.asarray(self.trained, bool)
        if self.weights.ndim != 3 or self.weights.shape[2] != 4:
            raise ValueError(f"BoxRegressor: weights must be [K, D+1, 4], got shape {self.weights.shape}")
        k = self.weights.shape[0]
        for name, shape in (("mu", (k, 4)), ("T", (k, 4, 4)), ("T_inv", (k, 4, 4)), ("trained", (k,))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"BoxRegressor: {name} must have shape {shape}, got {getattr(self, name).shape}")

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.weights.shape[1] - 1

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """Torch copies of the weights and whitening, made once per device and dtype."""
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_t", {})
        if key not in cache:
            w = torch.from_numpy(self.weights).to(device, dtype)
            cache[key] = (w[:, :-1], w[:, -1], torch.from_numpy(self.T_inv).to(device, dtype),
                          torch.from_numpy(self.mu).to(device, dtype), torch.from_numpy(self.trained).to(device))
        return cache[key]

    def deltas(self, features: torch.Tensor, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        """Deltas (tx, ty, tw, th) of feature rows [N, D] (pool5 scaled as in training), in the
        features' dtype and on their device: [N, K, 4] for every class in one pass (the device
        path), or [N, 4] for each row's class in `labels` (the host path regresses only the kept
        windows, in float64).  Untrained classes give 0."""
        x = torch.as_tensor(features)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"BoxRegressor: expected [N, {self.feature_dim}] features, got shape {tuple(x.shape)}")
        W, b, T_inv, mu, trained = self._tensors(x.device, x.dtype)
        if labels is None:
            y = torch.einsum("nd,kdf->nkf", x, W) + b
            return (torch.einsum("nkf,kfg->nkg", y, T_inv) + mu) * trained[None, :, None]
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(labels) != len(x):
            raise ValueError(f"BoxRegressor: {len(x)} feature rows but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"BoxRegressor: labels must be in [0, {self.num_classes}), "
                             f"got values in [{labels.min()}, {labels.max()}]")
        out = x.new_zeros((len(x), 4))
        for k in np.unique(labels):
            if self.trained[k]:
                rows = torch.from_numpy(np.flatnonzero(labels == k)).to(x.device)
                out[rows] = (x[rows] @ W[k] + b[k]) @ T_inv[k] + mu[k]
        return out

    def apply(self, boxes: np.ndarray, deltas, labels: np.ndarray) -> np.ndarray:
        """Boxes [N, 4] moved by their deltas [N, 4] (each box's own class, from `deltas`);
        untrained classes leave their boxes unchanged.  float32 boxes."""
        boxes = _boxes(boxes, "BoxRegressor.apply: boxes")
        d = deltas.detach().cpu().numpy() if isinstance(deltas, torch.Tensor) else np.asarray(deltas)
        if len(d) != len(boxes):
            raise ValueError(f"BoxRegressor.apply: {len(boxes)} boxes but {len(d)} deltas")
        out = decode(boxes, d)
        untouched = ~self.trained[np.asarray(labels, np.int64).reshape(-1)] if len(boxes) else np.zeros(0, bool)
        out[untouched] = boxes[untouched]
        return out

    def predict(self, features, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Refined boxes [N, 4] float32: each box moved by its class's regressor (in float64)."""
        x = torch.as_tensor(np.asarray(features, np.float64)) if not isinstance(features, torch.Tensor) \
            else features.double()
        return self.apply(boxes, self.deltas(x, labels), labels)

    def to_arrays(self, prefix: str = "bbox_") -> dict[str, np.ndarray]:
        """Plain arrays for a model file (no pickles)."""
        return {f"{prefix}weights": self.weights, f"{prefix}mu": self.mu, f"{prefix}T": self.T,
                f"{prefix}T_inv": self.T_inv, f"{prefix}trained": self.trained}

    @staticmethod
    def expected_arrays(num_classes: int, feature_dim: int) -> dict[str, tuple]:
        """(shape, torch dtype) of each array `to_arrays` writes, without the prefix."""
        K, f64 = num_classes, torch.float64
        return {"weights": ((K, feature_dim + 1, 4), torch.float32), "mu": ((K, 4), f64), "T": ((K, 4, 4), f64),
                "T_inv": ((K, 4, 4), f64), "trained": ((K,), torch.bool)}

    @classmethod
    def from_box_layer(cls, weight: np.ndarray, bias: np.ndarray,
                       stds: Sequence[float] = BOX_LAYER_STDS) -> "BoxRegressor":
        """The regressors of a fine-tuned box layer (`box_layer`: weight [4K, D], bias [4K], rows
        4k..4k+3 class k's tx, ty, tw, th in units of `stds`): the same linear map, written as
        [K, D+1, 4] weights with T_inv = diag(stds) undoing the normalisation, mu = 0."""
        weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        if weight.ndim != 2 or weight.shape[0] % 4 or bias.shape != (weight.shape[0],):
            raise ValueError(f"BoxRegressor.from_box_layer: expected weight [4K, D] and bias [4K], got "
                             f"{weight.shape} and {bias.shape}")
        k, d = weight.shape[0] // 4, weight.shape[1]
        w = np.concatenate([weight.reshape(k, 4, d).transpose(0, 2, 1), bias.reshape(k, 1, 4)], axis=1)
        std = np.asarray(stds, np.float64)
        return cls(w, np.zeros((k, 4)), np.tile(np.diag(1.0 / std), (k, 1, 1)), np.tile(np.diag(std), (k, 1, 1)),
                   np.ones(k, bool))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "bbox_") -> "BoxRegressor":
        missing = [n for n in ("weights", "mu", "T", "T_inv", "trained") if f"{prefix}{n}" not in arrays]
        if missing:
            raise ValueError(f"BoxRegressor.from_arrays: missing array(s) {', '.join(prefix + m for m in missing)}")
        return cls(*(np.asarray(arrays[f"{prefix}{n}"]) for n in ("weights", "mu", "T", "T_inv", "trained")))


def ridge_solve(A: np.ndarray, Y: np.ndarray, lam: float, bias: bool = False,
                rows: Optional[np.ndarray] = None, chunk: int = 4096,
                on_rows: Callable[[int], object] = lambda n: None) -> np.ndarray:
    """argmin_B ||[A, 1] B - Y||^2 + lam ||B||^2 (the 1 column only if bias), float64.

    A [N, P] (may be float32; only the selected `rows` are used), Y [len(rows), Q].
    Primal (A^T A + lam I)^-1 A^T Y when P <= N, accumulated over row chunks so
    neither a float64 copy of A nor the ones column is materialised (pool5 sets
    are large); else the equal dual form A^T (A A^T + lam I)^-1 Y, which is
    cheaper for 12,800-dim pool5 with few examples.  The bias is regularised
    like every other weight, as in the original.  `on_rows(n)` is told of each
    chunk of rows done (a progress bar)."""
    if not lam > 0:
        raise ValueError(f"ridge_solve: lambda must be > 0, got {lam}")
    Y = np.asarray(Y, np.float64)
    rows = np.arange(len(A)) if rows is None else np.asarray(rows)
    n, p = len(rows), A.shape[1] + int(bias)
    if len(Y) != n:
        raise ValueError(f"ridge_solve: {n} rows but {len(Y)} targets")

    def block(i: int, j: int) -> np.ndarray:
        c = np.asarray(A[rows[i:j]], np.float64)
        return np.concatenate([c, np.ones((len(c), 1))], axis=1) if bias else c

    if p <= n:
        G = np.zeros((p, p))
        AtY = np.zeros((p, Y.shape[1]))
        for i in range(0, n, chunk):
            c = block(i, i + chunk)
            G += c.T @ c
            AtY += c.T @ Y[i:i + chunk]
            on_rows(len(c))
        G[np.diag_indices(p)] += lam
        return scipy.linalg.solve(G, AtY, assume_a="pos")
    Af = block(0, n)
    on_rows(n)
    G = Af @ Af.T
    G[np.diag_indices(n)] += lam
    return Af.T @ scipy.linalg.solve(G, Y, assume_a="pos")


def _whitening(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = Y.mean(axis=0)
    Yc = Y - mu
    S = Yc.T @ Yc / len(Y)
    d, V = np.linalg.eigh(S)
    d = np.maximum(d, 0.0) + WHITEN_EPS  # eigh may return tiny negatives for a PSD matrix
    return mu, (V / np.sqrt(d)) @ V.T, (V * np.sqrt(d)) @ V.T


def train_box_regressors(
    features: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    lam: float = 4000.0,
    whiten: bool = True,
    min_examples: int = 5,
    class_names: Optional[Sequence[str]] = None,
    progress: bool = False,
) -> BoxRegressor:
    """One ridge regressor per class (see the module docstring).

    features: [N, D] pool5, already rescaled to mean norm 20 (the constant 1 is
    appended here), an array or an array-like read in row chunks; boxes, gt_boxes: [N, 4]
    examples and their assigned GTs;
    labels: [N] class of the assigned GT.  A class with no examples is left
    untrained (boxes unchanged); one with fewer than min_examples (a 4-d
    covariance needs 5 points) is trained without whitening.  Both warn.
    """
    # float16/32 stay as they are (ridge_solve upcasts chunk by chunk), and an array-like with a
    # shape that reads rows on demand (detector.detection.train.rows.StoredRows) is never materialised
    x = features if hasattr(features, "shape") and hasattr(features, "__getitem__") else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"train_box_regressors: features must be [N, D], got shape {x.shape}")
    labels = np.asarray(labels, np.int64).reshape(-1)
    n, dim = x.shape
    if len(labels) != n or len(np.asarray(boxes)) != n or len(np.asarray(gt_boxes)) != n:
        raise ValueError(f"train_box_regressors: {n} feature rows but {len(np.asarray(boxes))} boxes, "
                         f"{len(np.asarray(gt_boxes))} gt_boxes and {len(labels)} labels")
    for i in range(0, n, 4096):  # chunked: a full-size boolean mask of pool5 would be large
        if not np.all(np.isfinite(x[i:i + 4096])):
            raise ValueError("train_box_regressors: features contain NaN or inf")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"train_box_regressors: labels must be in [0, {num_classes}), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    targets = encode(boxes, gt_boxes) if n else np.zeros((0, 4))

    weights = np.zeros((num_classes, dim + 1, 4), np.float32)
    mu = np.zeros((num_classes, 4))
    T = np.tile(np.eye(4), (num_classes, 1, 1))
    T_inv = T.copy()
    trained = np.zeros(num_classes, bool)
    bar = progress_bar(total=n, desc="box regression", unit="row", disable=not progress)
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        nk = len(rows)
        if nk == 0:
            warnings.warn(f"box regression: class '{names[k]}' (index {k}) has no training examples; "
                          f"its boxes are left unrefined", UserWarning, stacklevel=2)
            continue
        Y = targets[rows]
        if whiten and nk >= min_examples:
            mu[k], T[k], T_inv[k] = _whitening(Y)
            Y = (Y - mu[k]) @ T[k]
        elif whiten:
            warnings.warn(f"box regression: class '{names[k]}' (index {k}) has only {nk} example(s) "
                          f"(< {min_examples}); trained without target whitening", UserWarning, stacklevel=2)
        weights[k] = ridge_solve(x, Y, lam, bias=True, rows=rows, on_rows=bar.update)
        trained[k] = True
    bar.close()
    return BoxRegressor(weights, mu, T, T_inv, trained)


def box_layer(in_dim: int, num_classes: int) -> torch.nn.Linear:
    """Fast R-CNN's class-specific box layer: fc7 -> 4 deltas per class (in units of
    BOX_LAYER_STDS), initialised N(0, 0.001) as in Fast R-CNN's bbox_pred; trained with the fc
    layers (detection.train.finetune) and stored as a `BoxRegressor` (`from_box_layer`)."""
    layer = torch.nn.Linear(int(in_dim), 4 * int(num_classes))
    torch.nn.init.normal_(layer.weight, 0.0, 0.001)
    torch.nn.init.zeros_(layer.bias)
    return layer


def box_layer_targets(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """The box layer's targets [N, 4] float32: `encode` divided by BOX_LAYER_STDS."""
    return (encode(boxes, gt_boxes) / np.asarray(BOX_LAYER_STDS)).astype(np.float32)
