"""What a detector predicts for each window: class scores from the per-class linear SVMs
(paper section 4.1) and box-regression deltas, together, on any device.

`WindowPredictor` holds the SVM weights [D, K] and biases [K] and the `BoxRegressor`; it
scores embedded windows (`WindowEmbedder.embed`: fc7 after ReLU, norm-scaled) and gives
deltas of the rows its regressors read (pool5 for the paper's ridge regressors, fc7 for
a fine-tuned box layer: `SPPDetector.regression_layer`), on whatever device the rows are
(torch throughout, so the host and the device path compute the same thing).  Its tensors go
into the model file under `svm_*` and `bbox_*`.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from detector.detection.bbox_regression import BoxRegressor
from detector.errors import ModelFormatError


class WindowPredictor:
    def __init__(self, svm_W: np.ndarray, svm_b: np.ndarray, regressor: Optional[BoxRegressor] = None,
                 calibration: Optional[np.ndarray] = None):
        self.svm_W = np.ascontiguousarray(svm_W, np.float32)
        self.svm_b = np.ascontiguousarray(svm_b, np.float32)
        if self.svm_W.ndim != 2 or self.svm_b.shape != (self.svm_W.shape[1],):
            raise ModelFormatError(f"SVM weights {self.svm_W.shape} and biases {self.svm_b.shape} do not fit")
        self.regressor = regressor
        # [K, 2] (a, b): a class's scores become the log-odds a * margin + b (detection.calibration)
        self.calibration = None if calibration is None else np.asarray(calibration, np.float64)
        if self.calibration is not None and (self.calibration.shape != (self.num_classes, 2)
                                             or not np.isfinite(self.calibration).all()
                                             or not (self.calibration[:, 0] > 0).all()):
            raise ModelFormatError(f"SVM calibration must be [{self.num_classes}, 2] with positive slopes")
        self._svm: dict = {}

    @property
    def num_classes(self) -> int:
        return self.svm_W.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.svm_W.shape[0]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """SVM scores [N, K] of embedded windows [N, D], on their device."""
        key = str(features.device)
        if key not in self._svm:
            self._svm[key] = (torch.from_numpy(self.svm_W).to(features.device),
                              torch.from_numpy(self.svm_b).to(features.device))
        W, b = self._svm[key]
        return features @ W + b

    def calibrate(self, margins: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Margins [N, K] and per-class thresholds [K] mapped to comparable log-odds (the identity
        for an uncalibrated model): strictly increasing per class, so each class keeps the same
        windows above its threshold and the same order."""
        if self.calibration is None:
            return margins, thresholds
        a, b = self.calibration[:, 0], self.calibration[:, 1]
        return (margins * a + b).astype(np.float32), np.asarray(thresholds, np.float64) * a + b

    def deltas(self, features: torch.Tensor, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        """Box-regression deltas of feature rows (pool5 or fc7, whichever the regressors read):
        [N, K, 4] for every class, or [N, 4] for each row's class in `labels` (see BoxRegressor.deltas)."""
        return self.regressor.deltas(features, labels)

    def refine(self, boxes: np.ndarray, deltas, labels: np.ndarray) -> np.ndarray:
        """Boxes moved by their own class's deltas (untrained classes leave boxes as they are)."""
        return self.regressor.apply(boxes, deltas, labels)

    # ------------------------------------------------------------------ file
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"svm_W": torch.from_numpy(self.svm_W), "svm_b": torch.from_numpy(self.svm_b)}
        if self.regressor is not None:
            out.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.regressor.to_arrays().items()})
        if self.calibration is not None:
            out["svm_calibration"] = torch.from_numpy(np.ascontiguousarray(self.calibration))
        return out

    @staticmethod
    def expected_tensors(feature_dim: int, num_classes: int, regression_dim: int, regression: bool,
                         calibration: bool = False) -> dict:
        """(shape, dtype) of each tensor `tensors()` writes, without building anything."""
        out = {"svm_W": ((feature_dim, num_classes), torch.float32), "svm_b": ((num_classes,), torch.float32)}
        if calibration:
            out["svm_calibration"] = ((num_classes, 2), torch.float64)
        if regression:
            out.update({f"bbox_{k}": v for k, v in BoxRegressor.expected_arrays(num_classes, regression_dim).items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "WindowPredictor":
        regressor = None
        if "bbox_weights" in tensors:
            regressor = BoxRegressor.from_arrays({k: v.numpy() for k, v in tensors.items() if k.startswith("bbox_")})
        cal = tensors.get("svm_calibration")
        return cls(tensors["svm_W"].numpy(), tensors["svm_b"].numpy(), regressor, None if cal is None else cal.numpy())
