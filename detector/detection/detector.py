"""The trained detector: one self-contained file, `load()`, and `detect()`.

File format (detector.core.model_file): safetensors (tensors only, so loading never
unpickles anything) whose JSON header metadata holds the format name and
version, the resolved config, the class names and the backbone's id and
geometry.  Tensors: the conv trunk (so a model never depends on where its
weights came from), the fc layers, SVM weights and biases, box regressors and
the feature-norm constants.  Loading checks all of it before building anything.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from detector.core.backbones import Backbone, build_backbone
from detector.detection.bbox_regression import BoxRegressor
from detector.config import Config, ConfigError, apply_test_overrides
from detector.core.embedder import WindowEmbedder, distinct_windows, layer_dim
from detector.errors import ModelFormatError
from detector.core.model_file import (check_tensors, expected_state, load_module, load_trunk, model_meta, module_tensors,
                         positive_scalar, read_model, write_model_file)
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.core.heads import FCHead
from detector.images import load_image
from detector.core.pooling import pool_windows
from detector.detection.postprocess import class_thresholds, finalize_detections, select_detections
from detector.core.projection import check_boxes
from detector.timing import NO_TIMER, StageTimer

FORMAT = "sppnet-detector"
FORMAT_VERSION = 1
WINDOW_CHUNK = 8192  # distinct windows pooled and scored at a time: bounds memory for any number of proposals


def empty_result() -> dict:
    """detect()'s result for an image with no detections."""
    return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
            "labels": np.zeros(0, np.int64), "label_names": []}


class SPPDetector:
    """image -> proposals -> conv features -> SPP -> fc -> SVM scores + box regression -> NMS."""

    def __init__(self, cfg: Config, class_names: Sequence[str], embedder: WindowEmbedder, svm_W: np.ndarray,
                 svm_b: np.ndarray, regressor: Optional[BoxRegressor] = None, device: str = "auto"):
        self.cfg = cfg
        self.class_names = list(class_names)
        self.embedder = embedder
        if embedder.head is not None:
            embedder.head.eval()
        self.svm_W = np.asarray(svm_W, np.float32)
        self.svm_b = np.asarray(svm_b, np.float32)
        self.regressor = regressor
        self.extractor = FeatureExtractor(embedder.backbone, cfg.features.scales, cfg.features.max_size, device)
        if self.svm_W.shape != (embedder.feature_dim, len(self.class_names)):
            raise ModelFormatError(f"SVM weights have shape {self.svm_W.shape}, which does not fit the "
                                   f"{embedder.layer} features and {len(self.class_names)} classes")
        self.use_device_path(self.extractor.device.type != "cpu")

    def use_device_path(self, on: bool = True) -> None:
        """Score on the extractor's device: fc, SVMs and box regression there in one pass per
        chunk, one copy back (the default on a GPU).  Off: the host path, which on a CPU keeps
        regression to the few kept windows.  Either runs on any device (tests run both on a CPU)."""
        self.device_path = bool(on)
        dev = self.extractor.device
        if self.embedder.head is not None:
            self.embedder.head.to(dev)
        self._svm_t = (torch.from_numpy(self.svm_W).to(dev), torch.from_numpy(self.svm_b).to(dev))
        if self.regressor is not None:
            self.regressor.to_device(dev)

    def configure_test(self, overrides: Sequence[str]) -> None:
        """Apply `--set test.KEY=VALUE` items (only test settings can change for a trained model)
        and check them against this model's classes, so a bad threshold fails before any work."""
        apply_test_overrides(self.cfg, list(overrides))
        class_thresholds(self.cfg.test.score_thresh, self.class_names)

    @property
    def backbone(self) -> Backbone:
        return self.embedder.backbone

    def proposals(self, image: np.ndarray) -> np.ndarray:
        from detector.proposals import search_options, selective_search

        return selective_search(image, **search_options(self.cfg.proposals))

    def svm_scores(self, feats) -> np.ndarray:
        """[N, K] SVM scores of `embedder.embed()` features (a tensor or an array)."""
        x = feats.numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float32)
        return x @ self.svm_W + self.svm_b[None, :]

    @torch.inference_mode()
    def detect(self, image, proposals: Optional[np.ndarray] = None,
               score_thresh: Union[None, float, Sequence[float], dict] = None, nms_iou: Optional[float] = None,
               max_per_image: Optional[int] = None, box_regression: bool = True,
               features: Optional[Sequence[ScaleFeatures]] = None, timer: StageTimer = NO_TIMER,
               scorer: Optional[str] = None) -> dict:
        """Detect objects in one image.

        image: a path, a PIL image, or an HxWx3 uint8 array in **RGB** order.
        proposals: optional [N, 4] boxes (x1, y1, x2, y2, pixels); selective search otherwise.
        Thresholds default to the config's `test` section.  score_thresh: one number, a list
        with one per class, or {class name: number} with "*" for the classes not named.
        timer: an optional `detector.timing.StageTimer` that records each stage's time.
        scorer: "svm" (the per-class SVMs) or "softmax" (fc8's class probabilities); default
        the config's `test.scorer`.  The post-processing is the same for both.
        Returns dict(boxes float32 [n, 4] x1 y1 x2 y2 in pixels, scores float32 [n],
        labels int64 [n] (indices into label_names), label_names list[str] [n]).
        """
        timer.start()
        img = load_image(image)
        H, W = img.shape[:2]
        if proposals is None:
            proposals = self.proposals(img)
        else:
            proposals = check_boxes(proposals, W, H, "proposals").astype(np.float32)
        timer.lap("proposals")
        if len(proposals) == 0:
            warnings.warn(f"{image if isinstance(image, (str, Path)) else 'image'}: no proposals survived "
                          "filtering; no detections")
            return empty_result()
        feats = self.extractor(img, timer=timer) if features is None else features
        tc = self.cfg.test
        scorer = tc.scorer if scorer is None else scorer
        if scorer not in ("svm", "softmax"):
            raise ConfigError(f"scorer must be 'svm' or 'softmax', got {scorer!r}")
        if scorer == "softmax" and self.embedder.head is None:
            raise ConfigError("scorer 'softmax' needs the fine-tuned fc layers; this model has none")
        regress = box_regression and self.regressor is not None
        scores, deltas, pool5, distinct, row = self._score_windows(feats, proposals, scorer, regress, timer)
        scores = scores[row]
        nms_iou = tc.nms_iou if nms_iou is None else nms_iou
        thr = class_thresholds(tc.score_thresh if score_thresh is None else score_thresh, self.class_names)
        sel = select_detections(proposals, scores, thr, nms_iou, tc.max_per_image if max_per_image is None
                                else max_per_image)
        timer.lap("nms")
        kept = proposals[sel.indices]
        if regress and len(sel):
            if deltas is not None:  # computed with the scores, on the device
                kept = self.regressor.apply(kept, deltas[row[sel.indices], sel.labels], sel.labels)
            else:
                rows = row[sel.indices]
                p5 = pool5[torch.from_numpy(rows)] if pool5 is not None else \
                    pool_windows(feats, distinct[rows], self.embedder.levels).mul_(self.embedder.pool5_scale)
                kept = self.regressor.predict(p5.numpy(), kept, sel.labels)
        timer.lap("bbox")
        out = finalize_detections(kept, sel.scores, sel.labels, (W, H), nms_iou, tc.second_nms, sel.indices)
        timer.lap("nms")
        timer.count("proposals", len(proposals))
        timer.count("windows", len(distinct))
        return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"],
                "label_names": [self.class_names[k] for k in out["labels"]]}

    def _score_windows(self, feats, proposals: np.ndarray, scorer: str, regress: bool, timer: StageTimer):
        """Scores [U, K] (numpy) of the distinct windows among the proposals, and `row` [N]
        mapping each proposal to its window.  Windows go through pooling, fc and scoring
        WINDOW_CHUNK at a time, so any number of proposals fits in memory.

        Host (CPU) path: also pool5 of the distinct windows when they fit in one chunk (box
        regression reads the kept ones), else None and the kept windows are pooled again.
        Device path: box-regression deltas [U, K, 4] of every window and class are computed
        with the scores, and scores and deltas come back to the host in one copy per chunk."""
        emb = self.embedder
        distinct, row = self._distinct(emb.windows(feats, proposals))
        on_device = self.device_path
        scores, deltas, pool5 = [], [], None
        for s in range(0, len(distinct), WINDOW_CHUNK):
            p5 = pool_windows(feats, distinct[s:s + WINDOW_CHUNK], emb.levels).mul_(emb.pool5_scale)
            timer.lap("spp")
            if scorer == "softmax":
                sc = torch.softmax(emb.head(p5), dim=1)[:, 1:]
                timer.lap("fc")
            else:
                x = emb.embed(p5)
                timer.lap("fc")
                sc = x @ self._svm_t[0] + self._svm_t[1] if on_device else self.svm_scores(x)
            if on_device:
                d = self.regressor.deltas_torch(p5) if regress else sc.new_zeros((len(sc), 0))
                both = torch.cat([sc, d.flatten(1)], 1).cpu().numpy()  # the one device -> host copy
                scores.append(both[:, : sc.shape[1]])
                deltas.append(both[:, sc.shape[1]:].reshape(len(sc), -1, 4) if regress else None)
            else:
                scores.append(sc.numpy() if isinstance(sc, torch.Tensor) else sc)
                pool5 = p5 if len(distinct) <= WINDOW_CHUNK else None
            timer.lap("svm" if scorer == "svm" else "fc")
        deltas = np.concatenate(deltas) if on_device and regress else None
        return np.concatenate(scores), deltas, pool5, distinct, row

    # Boxes a few pixels apart often project onto the same cells: pooled and scored once.
    _distinct = staticmethod(distinct_windows)

    # ------------------------------------------------------------------ file
    def save(self, path: Union[str, Path]) -> None:
        emb, bb = self.embedder, self.backbone
        tensors = module_tensors("trunk.", bb.trunk)
        if emb.head is not None:
            tensors.update(module_tensors("head.", emb.head))
        tensors["svm_W"] = torch.from_numpy(np.ascontiguousarray(self.svm_W))
        tensors["svm_b"] = torch.from_numpy(np.ascontiguousarray(self.svm_b))
        tensors["pool5_scale"] = torch.tensor([emb.pool5_scale], dtype=torch.float64)
        tensors["svm_scale"] = torch.tensor([emb.feature_scale], dtype=torch.float64)
        if self.regressor is not None:
            tensors.update({k: torch.from_numpy(np.ascontiguousarray(v))
                            for k, v in self.regressor.to_arrays().items()})
        write_model_file(path, FORMAT, FORMAT_VERSION, model_meta(self.cfg, self.class_names, bb, emb.head), tensors)

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto") -> "SPPDetector":
        path = Path(path)
        _, tensors, cfg, names, bmeta = read_model(path, FORMAT, FORMAT_VERSION)
        K = len(names)
        backbone = build_backbone(cfg.backbone, pretrained=False)
        pool5_dim = WindowEmbedder.from_config(cfg, backbone).pool5_dim
        expected = expected_state("trunk.", backbone.trunk)
        if cfg.finetune.enabled:
            expected.update(FCHead.expected_state(pool5_dim, cfg.finetune.fc_dims, K, "head."))
        D = layer_dim(cfg.svm.layer if cfg.finetune.enabled else "pool5", pool5_dim, cfg.finetune.fc_dims)
        expected.update({"svm_W": ((D, K), torch.float32), "svm_b": ((K,), torch.float32),
                         "pool5_scale": ((1,), torch.float64), "svm_scale": ((1,), torch.float64)})
        if any(k.startswith("bbox_") for k in tensors):
            expected.update({f"bbox_{k}": (shape, dtype) for k, (shape, dtype) in
                             BoxRegressor.expected_arrays(K, pool5_dim).items()})
        check_tensors(path, tensors, expected)
        head = None
        if cfg.finetune.enabled:  # sizes now known to match the file's tensors
            head = FCHead(pool5_dim, cfg.finetune.fc_dims, K, cfg.finetune.dropout)
        embedder = WindowEmbedder.from_config(cfg, backbone, head)
        load_trunk(path, bmeta, backbone, tensors)
        if head is not None:
            load_module("head.", head, tensors)
        embedder.pool5_scale = positive_scalar(path, tensors, "pool5_scale")
        embedder.feature_scale = positive_scalar(path, tensors, "svm_scale")
        regressor = None
        if "bbox_weights" in tensors:
            regressor = BoxRegressor.from_arrays({k: v.numpy() for k, v in tensors.items() if k.startswith("bbox_")})
        return cls(cfg, names, embedder, tensors["svm_W"].numpy(), tensors["svm_b"].numpy(), regressor, device)


def load(path: Union[str, Path], device: str = "auto") -> SPPDetector:
    """Load a trained detector: `model = detector.load("runs/x/model.safetensors")`."""
    return SPPDetector.load(path, device)


def detect(image, model: Union[SPPDetector, str, Path], **kwargs) -> dict:
    """Module-level convenience: `detector.detect(image, model=...)` (a model or a model file)."""
    if not isinstance(model, SPPDetector):
        model = load(model)
    return model.detect(image, **kwargs)
