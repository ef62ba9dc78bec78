"""The trained detector: one self-contained file, `load()`, and `detect()`.

File format: safetensors (tensors only, so loading never unpickles anything)
whose JSON header metadata holds the format name and version, the resolved
config, the class names and the backbone's id and geometry.  Tensors: the conv
trunk (so a model never depends on where its weights came from), the fc
layers, SVM weights and biases, box regressors and the feature-norm constants.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .backbones import Backbone, build_backbone
from .bbox_regression import BoxRegressor
from .config import Config, config_from_dict
from .errors import InputError
from .features import FeatureExtractor, ScaleFeatures
from .heads import FCHead
from .images import load_image
from .pooling import pool_boxes, pool_unique_boxes
from .postprocess import finalize_detections, select_detections
from .projection import check_boxes

FORMAT = "sppnet-detector"
FORMAT_VERSION = 1


class ModelFormatError(InputError, ValueError):
    pass


class SPPDetector:
    """image -> proposals -> conv features -> SPP -> fc -> SVM scores + box regression -> NMS."""

    def __init__(self, cfg: Config, class_names: Sequence[str], backbone: Backbone, head: Optional[FCHead],
                 pool5_scale: float, svm_scale: float, svm_W: np.ndarray, svm_b: np.ndarray,
                 regressor: Optional[BoxRegressor] = None, device: str = "auto"):
        self.cfg = cfg
        self.class_names = list(class_names)
        self.backbone = backbone
        self.head = head.eval() if head is not None else None
        self.pool5_scale = float(pool5_scale)
        self.svm_scale = float(svm_scale)
        self.svm_W = np.asarray(svm_W, np.float32)
        self.svm_b = np.asarray(svm_b, np.float32)
        self.regressor = regressor
        self.extractor = FeatureExtractor(backbone, cfg.features.scales, cfg.features.max_size, device)
        self.last_timings: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}  # proposals, and distinct windows pooled and scored
        if self.svm_W.shape[1] != len(self.class_names):
            raise ModelFormatError(f"SVM weights cover {self.svm_W.shape[1]} classes, class list has "
                                   f"{len(self.class_names)}")

    # ------------------------------------------------------------------ scoring
    def pool5(self, scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray) -> torch.Tensor:
        """Scaled SPP vectors of boxes (original-image pixels)."""
        return pool_boxes(scale_feats, boxes, self.backbone, self.cfg.spp.levels, self.cfg.features.scale_rule,
                          projection=self.cfg.spp.projection) * self.pool5_scale

    def pool5_unique(self, scale_feats: Sequence[ScaleFeatures], boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """pool5 of the distinct windows among `boxes`, and each box's row in it."""
        pooled, inverse = pool_unique_boxes(scale_feats, boxes, self.backbone, self.cfg.spp.levels,
                                            self.cfg.features.scale_rule, projection=self.cfg.spp.projection)
        return pooled.mul_(self.pool5_scale), inverse  # in place: a fresh [N, D] costs page faults

    def svm_features(self, pool5: torch.Tensor) -> np.ndarray:
        layer = self.cfg.svm.layer
        if layer == "pool5" or self.head is None:
            x = pool5
        else:
            x = self.head.embed(pool5, layer)
        return x.numpy() * self.svm_scale

    def svm_scores(self, feats: np.ndarray) -> np.ndarray:
        return feats @ self.svm_W + self.svm_b[None, :]

    # ------------------------------------------------------------------ detection
    def proposals(self, image: np.ndarray) -> np.ndarray:
        from .proposals import search_options, selective_search

        return selective_search(image, **search_options(self.cfg))

    @torch.inference_mode()
    def detect(self, image, proposals: Optional[np.ndarray] = None,
               score_thresh: Union[None, float, Sequence[float]] = None, nms_iou: Optional[float] = None,
               max_per_image: Optional[int] = None, box_regression: bool = True,
               features: Optional[Sequence[ScaleFeatures]] = None) -> dict:
        """Detect objects in one image.

        image: a path, a PIL image, or an HxWx3 uint8 array in **RGB** order.
        proposals: optional [N, 4] boxes (x1, y1, x2, y2, pixels); selective search otherwise.
        Thresholds default to the config's `test` section (SPEC §7); score_thresh may be per class.
        Returns dict(boxes float32 [n, 4] x1 y1 x2 y2 in pixels, scores float32 [n],
        labels int64 [n] (indices into label_names), label_names list[str] [n]).
        """
        t = self.last_timings = {}
        t0 = time.perf_counter()
        img = load_image(image)
        H, W = img.shape[:2]
        if proposals is None:
            proposals = self.proposals(img)
        else:
            proposals = check_boxes(proposals, W, H, "proposals").astype(np.float32)
        t["proposals"] = time.perf_counter() - t0
        if len(proposals) == 0:
            warnings.warn(f"{image if isinstance(image, (str, Path)) else 'image'}: no proposals survived "
                          "filtering; no detections")
            return self._empty()
        t1 = time.perf_counter()
        feats = self.extractor(img) if features is None else features
        t["features"] = time.perf_counter() - t1
        t.update({f"features.{k}": v for k, v in self.extractor.last_timings.items()} if features is None else {})
        t2 = time.perf_counter()
        pool5, row = self.pool5_unique(feats, proposals)
        t3 = time.perf_counter()
        t["spp"] = t3 - t2
        x = self.svm_features(pool5)
        t4 = time.perf_counter()
        t["fc"] = t4 - t3
        scores = self.svm_scores(x)[row]
        t5 = time.perf_counter()
        t["svm"] = t5 - t4
        tc = self.cfg.test
        sel = select_detections(proposals, scores, tc.score_thresh if score_thresh is None else score_thresh,
                                tc.nms_iou if nms_iou is None else nms_iou,
                                tc.max_per_image if max_per_image is None else max_per_image)
        t6 = time.perf_counter()
        kept = proposals[sel.indices]
        if box_regression and self.regressor is not None and len(sel):
            kept = self.regressor.predict(pool5[torch.from_numpy(row[sel.indices])].numpy(), kept, sel.labels)
        t7 = time.perf_counter()
        out = finalize_detections(kept, sel.scores, sel.labels, (W, H), tc.nms_iou if nms_iou is None else nms_iou,
                                  tc.second_nms, sel.indices)
        t8 = time.perf_counter()
        t["bbox"] = t7 - t6
        t["nms"] = (t6 - t5) + (t8 - t7)
        t["total"] = t8 - t0
        self.last_counts = {"proposals": len(proposals), "windows": len(pool5)}
        return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"],
                "label_names": [self.class_names[k] for k in out["labels"]]}

    def _empty(self) -> dict:
        return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "labels": np.zeros(0, np.int64), "label_names": []}

    # ------------------------------------------------------------------ file
    def save(self, path: Union[str, Path]) -> None:
        from safetensors.torch import save as st_save

        from .cache import atomic_write_bytes

        tensors = {f"trunk.{k}": v.detach().cpu().contiguous() for k, v in self.backbone.trunk.state_dict().items()}
        if self.head is not None:
            tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()})
        tensors["svm_W"] = torch.from_numpy(np.ascontiguousarray(self.svm_W))
        tensors["svm_b"] = torch.from_numpy(np.ascontiguousarray(self.svm_b))
        tensors["pool5_scale"] = torch.tensor([self.pool5_scale], dtype=torch.float64)
        tensors["svm_scale"] = torch.tensor([self.svm_scale], dtype=torch.float64)
        if self.regressor is not None:
            tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.regressor.to_arrays().items()})
        bb = self.backbone
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(self.cfg.to_dict()),
                "class_names": json.dumps(self.class_names),
                "backbone": json.dumps({"name": bb.name, "weights_id": bb.weights_id, **bb.geometry()}),
                "head": json.dumps(None if self.head is None else
                                   {"in_dim": self.head.in_dim, "fc_dims": self.head.fc_dims})}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto") -> "SPPDetector":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ModelFormatError(f"{path}: not a readable model file ({e})") from e
        if meta.get("format") != FORMAT:
            raise ModelFormatError(f"{path}: not an {FORMAT} model file")
        if meta.get("version") != str(FORMAT_VERSION):
            raise ModelFormatError(f"{path}: model format version {meta.get('version')}, this toolkit reads "
                                   f"version {FORMAT_VERSION}; retrain or use a matching toolkit version")
        cfg = config_from_dict(json.loads(meta["config"]))
        class_names = json.loads(meta["class_names"])
        bmeta = json.loads(meta["backbone"])
        trunk_state = {k[len("trunk."):]: v for k, v in tensors.items() if k.startswith("trunk.")}
        backbone = build_backbone(cfg.backbone, trunk_state=trunk_state, weights_id=bmeta["weights_id"])
        if (backbone.stride, backbone.offset, backbone.channels) != (bmeta["stride"], bmeta["offset"],
                                                                     bmeta["channels"]):
            raise ModelFormatError(f"{path}: backbone geometry differs from the one it was trained with")
        head = None
        hmeta = json.loads(meta.get("head", "null"))
        if hmeta is not None:
            head = FCHead(hmeta["in_dim"], hmeta["fc_dims"], len(class_names), cfg.finetune.dropout)
            head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
        regressor = None
        if any(k.startswith("bbox_") for k in tensors):
            regressor = BoxRegressor.from_arrays({k: v.numpy() for k, v in tensors.items() if k.startswith("bbox_")})
        return cls(cfg, class_names, backbone, head, float(tensors["pool5_scale"][0]), float(tensors["svm_scale"][0]),
                   tensors["svm_W"].numpy(), tensors["svm_b"].numpy(), regressor, device)


def load(path: Union[str, Path], device: str = "auto") -> SPPDetector:
    """Load a trained detector: `model = detector.load("runs/x/model.safetensors")`."""
    return SPPDetector.load(path, device)


def detect(image, model: Union[SPPDetector, str, Path], **kwargs) -> dict:
    """Module-level convenience: `detector.detect(image, model=...)` (a model or a model file)."""
    if not isinstance(model, SPPDetector):
        model = load(model)
    return model.detect(image, **kwargs)
