"""The trained detector: one self-contained file, `load()`, and `detect()`.

`SPPDetector` is built from three objects, as torchvision's detectors are: a feature
extractor (the conv trunk at the model's scales), a `WindowEmbedder` (projection, SPP, the
pool5 constant and the fc head) and a `WindowPredictor` (SVMs and box regressors).
`detect()` reads top to bottom as the paper's test pipeline: image -> proposals -> conv
maps -> windows -> embedded windows -> scores and deltas -> NMS.

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

from detector.config import Config, ConfigError, apply_test_overrides, box_layer_trained, regression_reference
from detector.core.backbones import Backbone, build_backbone
from detector.core.boxes import check_boxes
from detector.core.embedder import WindowEmbedder, distinct_windows, layer_dim
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.core.heads import FCHead
from detector.core.model_file import (check_tensors, expected_state, load_module, load_trunk, model_meta,
                                      module_tensors, positive_scalar, read_model, require, write_model_file)
from detector.detection.postprocess import class_thresholds, finalize_detections, select_detections
from detector.detection.predictor import WindowPredictor
from detector.errors import ModelFormatError
from detector.images import load_image
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

    def __init__(self, cfg: Config, class_names: Sequence[str], embedder: WindowEmbedder, predictor: WindowPredictor,
                 rpn=None, device: str = "auto"):
        """rpn: the learned proposals' head (detector.proposals.rpn.RPN) when proposals.method is rpn."""
        self.cfg = cfg
        self.class_names = list(class_names)
        self.embedder = embedder
        if embedder.head is not None:
            embedder.head.eval()
        self.predictor = predictor
        self.extractor = FeatureExtractor(embedder.backbone, cfg.features.scales, cfg.features.max_size, device,
                                          channels_last=cfg.features.channels_last,
                                          max_upscale=cfg.features.max_upscale)
        if (predictor.feature_dim, predictor.num_classes) != (embedder.feature_dim, len(self.class_names)):
            raise ModelFormatError(f"SVM weights have shape {(predictor.feature_dim, predictor.num_classes)}, which "
                                   f"does not fit the {embedder.layer} features and {len(self.class_names)} classes")
        if embedder.head is not None:
            embedder.head.to(self.extractor.device)
        if (rpn is None) != (cfg.proposals.method != "rpn"):
            raise ModelFormatError(f"proposals.method is {cfg.proposals.method} but the model "
                                   f"{'has no' if rpn is None else 'has a'} learned proposal head")
        self.rpn = None if rpn is None else rpn.to(self.extractor.device)
        # what the box regressors read: pool5 (ridge, the paper's) or fc7 (the fine-tuned box layer)
        self.regression_layer = regression_layer(cfg)
        reg = predictor.regressor
        if reg is not None:
            if self.regression_layer == "fc7" and embedder.head is None:
                raise ModelFormatError("bbox.method is finetune but the model has no fine-tuned fc layers")
            want = layer_dim(self.regression_layer, embedder.pool5_dim, cfg.finetune.fc_dims)
            if reg.feature_dim != want:
                raise ModelFormatError(f"box regressors read {reg.feature_dim} features; the model's "
                                       f"{self.regression_layer} has {want}")
        self.use_device_path(self.extractor.device.type != "cpu")

    def use_device_path(self, on: bool = True) -> None:
        """Deltas of every window and class with the scores, one copy back per chunk: the default
        on a GPU.  Off (the host path): only the kept windows are regressed, which on a CPU is
        cheaper.  Either runs on any device (tests run both on a CPU)."""
        self.device_path = bool(on)

    def configure_test(self, overrides: Sequence[str]) -> None:
        """Apply `--set KEY=VALUE` items (only test-time settings can change for a trained model:
        config.test_time_keys) and check them against this model's classes, so a bad threshold
        fails before any work."""
        apply_test_overrides(self.cfg, list(overrides))
        class_thresholds(self.cfg.test.score_thresh, self.class_names)

    @property
    def backbone(self) -> Backbone:
        return self.embedder.backbone

    @property
    def learned_proposals(self) -> bool:
        return self.rpn is not None

    def proposals(self, image, maps: Optional[Sequence[ScaleFeatures]] = None) -> np.ndarray:
        """The model's own proposals of an image: selective search on the image, or the learned
        head on its conv maps (computed here unless given)."""
        if self.rpn is None:
            from detector.proposals import search_options, selective_search

            return selective_search(image, **search_options(self.cfg.proposals))
        from detector.proposals.rpn import proposal_settings

        maps = self.extractor(load_image(image)) if maps is None else maps
        return self.rpn.propose(maps, proposal_settings(self.cfg.rpn))[0]

    @torch.inference_mode()
    def detect(self, image, proposals: Optional[np.ndarray] = None,
               score_thresh: Union[None, float, Sequence[float], dict] = None, nms_iou: Optional[float] = None,
               max_per_image: Optional[int] = None, box_regression: bool = True,
               features: Optional[Sequence[ScaleFeatures]] = None, timer: StageTimer = NO_TIMER,
               scorer: Optional[str] = None) -> dict:
        """Detect objects in one image.

        image: a path, a PIL image, or an HxWx3 uint8 array in **RGB** order.
        proposals: optional [N, 4] boxes (x1, y1, x2, y2, pixels); else the model's own
        (selective search, or the learned proposals from the same conv maps as the windows).
        Thresholds default to the config's `test` section.  score_thresh: one number, a list
        with one per class, or {class name: number} with "*" for the classes not named.
        timer: an optional `detector.timing.StageTimer` that records each stage's time.
        scorer: "svm" (the per-class SVMs) or "softmax" (fc8's class probabilities); default
        the config's `test.scorer`.  The post-processing is the same for both.
        Returns dict(boxes float32 [n, 4] x1 y1 x2 y2 in pixels, scores float32 [n],
        labels int64 [n] (indices into label_names), label_names list[str] [n]).
        """
        tc = self.cfg.test
        scorer = self._scorer(scorer)
        regress = box_regression and self.predictor.regressor is not None
        timer.start()
        img = load_image(image)
        H, W = img.shape[:2]
        boxes = None
        if proposals is not None:
            boxes = check_boxes(proposals, W, H, "proposals").astype(np.float32)
        elif self.rpn is None:
            boxes = self.proposals(img)
        if boxes is not None:
            timer.lap("proposals")
            if len(boxes) == 0:
                return self._no_proposals(image)
        maps = self.extractor(img, timer=timer) if features is None else features
        if boxes is None:  # learned proposals, from the conv maps the windows are pooled from
            timer.start()
            boxes = self.proposals(img, maps)
            timer.lap("proposals")
            if len(boxes) == 0:
                return self._no_proposals(image)
        windows, row = distinct_windows(self.embedder.windows(maps, boxes))  # each distinct window once
        ref = self._regression_starts(maps, windows[row], boxes) if regress else boxes
        regress_first = regress and tc.nms_after_regression
        scores, deltas, pool5 = self._predict(maps, windows, scorer, regress and (self.device_path or regress_first),
                                              timer)
        nms_iou = tc.nms_iou if nms_iou is None else nms_iou
        thr = class_thresholds(tc.score_thresh if score_thresh is None else score_thresh, self.class_names)
        if scorer == "svm":  # comparable across classes when the model is calibrated; thresholds stay margins
            scores, thr = self.predictor.calibrate(scores, thr)
        refine = None
        if regress_first:  # each candidate moved for its class before NMS
            refine = lambda idx, lab: self.predictor.refine(ref[idx], deltas[row[idx], lab], lab)  # noqa: E731
        sel = select_detections(boxes, scores[row], thr, nms_iou, tc.max_per_image if max_per_image is None
                                else max_per_image, refine=refine, soft_sigma=tc.soft_nms_sigma,
                                vote_iou=tc.box_voting_iou if regress_first else 0.0)
        timer.lap("nms")
        kept = sel.boxes
        if regress and not regress_first and len(sel):
            rows = row[sel.indices]
            if deltas is None:  # the host path: only the kept windows, in float64
                p5 = pool5[torch.from_numpy(rows)] if pool5 is not None else \
                    self.embedder.pool5_windows(maps, windows[rows])
                deltas = self.predictor.deltas(self._regression_input(p5).double(), sel.labels)
            else:
                deltas = deltas[rows, sel.labels]
            kept = self.predictor.refine(ref[sel.indices], deltas, sel.labels)
        if regress and len(sel):
            kept = self._regress_again(maps, kept, sel.labels, tc.bbox_iterations - 1, W, H)
        timer.lap("bbox")
        # a second NMS removes the duplicates that regression after NMS made; not needed when NMS saw
        # the regressed boxes, and not wanted after soft-NMS kept overlapping boxes on purpose
        second = tc.second_nms and not regress_first and tc.soft_nms_sigma == 0
        out = finalize_detections(kept, sel.scores, sel.labels, (W, H), nms_iou, second, sel.indices)
        timer.lap("nms")
        timer.count("proposals", len(boxes))
        timer.count("windows", len(windows))
        return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"],
                "label_names": [self.class_names[k] for k in out["labels"]]}

    def _regress_again(self, maps, boxes: np.ndarray, labels: np.ndarray, times: int, W: int, H: int) -> np.ndarray:
        """Iterative box regression: each box pooled again where the regression moved it (clipped
        to the image) and moved by its class's regressor once more, `times` times."""
        for _ in range(times):
            boxes = np.clip(boxes, 0, [W, H, W, H]).astype(np.float32)
            ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if not ok.any():
                break
            win = self.embedder.windows(maps, boxes[ok], name="regressed boxes")
            d = self.predictor.deltas(self._regression_input(self.embedder.pool5_windows(maps, win)).double(),
                                      labels[ok])
            boxes[ok] = self.predictor.refine(self._regression_starts(maps, win, boxes[ok]), d, labels[ok])
        return boxes

    @property
    def window_reference(self) -> bool:
        """Whether the regressors' deltas apply to the boxes the windows cover (bbox.reference:
        window) rather than to the proposals."""
        return regression_reference(self.cfg) == "window"

    def _regression_starts(self, maps, windows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """The boxes the regressors' deltas move, one per `windows()` row: the boxes those windows
        cover (float32) with the window reference, else `boxes` themselves."""
        return self.embedder.window_boxes(maps, windows).astype(np.float32) if self.window_reference else boxes

    def _regression_input(self, pool5: torch.Tensor, embedded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the box regressors read of these windows: pool5 itself, or fc7 after ReLU (taken
        back from the SVMs' `embedded` features when those are fc7, else computed)."""
        if self.regression_layer == "pool5":
            return pool5
        emb = self.embedder
        if embedded is not None and emb.layer == "fc7":
            return embedded / emb.feature_scale
        return emb.head.embed(pool5, "fc7")

    @staticmethod
    def _no_proposals(image) -> dict:
        warnings.warn(f"{image if isinstance(image, (str, Path)) else 'image'}: no proposals survived "
                      "filtering; no detections")
        return empty_result()

    def _scorer(self, scorer: Optional[str]) -> str:
        scorer = self.cfg.test.scorer if scorer is None else scorer
        if scorer not in ("svm", "softmax"):
            raise ConfigError(f"scorer must be 'svm' or 'softmax', got {scorer!r}")
        if scorer == "softmax" and self.embedder.head is None:
            raise ConfigError("scorer 'softmax' needs the fine-tuned fc layers; this model has none")
        return scorer

    def _predict(self, maps, windows: np.ndarray, scorer: str, all_deltas: bool, timer: StageTimer):
        """(scores [U, K], deltas [U, K, 4] or None, pool5 [U, D] or None) of the distinct windows,
        WINDOW_CHUNK at a time so that any number of proposals fits in memory.  With
        `all_deltas` (the device path) every window's deltas for every class come back with the
        scores in one copy per chunk; else pool5 is kept (when it fits in one chunk) for the
        kept windows' regression."""
        emb = self.embedder
        scores, deltas, pool5 = [], [], None
        for s in range(0, len(windows), WINDOW_CHUNK):
            p5 = emb.pool5_windows(maps, windows[s:s + WINDOW_CHUNK])
            timer.lap("spp")
            x = None
            if scorer == "softmax":
                sc = emb.class_probabilities(p5)[:, 1:]
            else:
                x = emb.embed(p5)
                timer.lap("fc")
                sc = self.predictor.scores(x)
            if all_deltas:
                d = self.predictor.deltas(self._regression_input(p5, x)).flatten(1) \
                    if self.predictor.regressor is not None else sc[:, :0]
                both = torch.cat([sc, d], 1).cpu().numpy()  # the one device -> host copy
                scores.append(both[:, : sc.shape[1]])
                deltas.append(both[:, sc.shape[1]:].reshape(len(sc), -1, 4))
            else:
                scores.append(sc.cpu().numpy())
                pool5 = p5 if len(windows) <= WINDOW_CHUNK else None
            timer.lap("svm" if scorer == "svm" else "fc")
        return np.concatenate(scores), (np.concatenate(deltas) if all_deltas else None), pool5

    # ------------------------------------------------------------------ file
    def save(self, path: Union[str, Path]) -> None:
        emb, bb = self.embedder, self.backbone
        tensors = module_tensors("trunk.", bb.trunk)
        if emb.head is not None:
            tensors.update(module_tensors("head.", emb.head))
        tensors.update(self.predictor.tensors())
        tensors["pool5_scale"] = torch.tensor([emb.pool5_scale], dtype=torch.float64)
        tensors["svm_scale"] = torch.tensor([emb.feature_scale], dtype=torch.float64)
        meta = model_meta(self.cfg, self.class_names, bb, emb.head)
        if self.rpn is not None:
            tensors.update({f"rpn.{k}": v for k, v in self.rpn.state_arrays().items()})
            meta["rpn"] = self.rpn.header()
        write_model_file(path, FORMAT, FORMAT_VERSION, meta, tensors)

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto") -> "SPPDetector":
        path = Path(path)
        meta, tensors, cfg, names, bmeta = read_model(path, FORMAT, FORMAT_VERSION)
        K = len(names)
        backbone = build_backbone(cfg.backbone, pretrained=False)
        pool5_dim = WindowEmbedder.from_config(cfg, backbone).pool5_dim
        expected = expected_state("trunk.", backbone.trunk)
        if cfg.finetune.enabled:
            expected.update(FCHead.expected_state(pool5_dim, cfg.finetune.fc_dims, K, "head."))
        D = layer_dim(cfg.svm.layer if cfg.finetune.enabled else "pool5", pool5_dim, cfg.finetune.fc_dims)
        reg_dim = layer_dim(regression_layer(cfg), pool5_dim, cfg.finetune.fc_dims)
        expected.update(WindowPredictor.expected_tensors(D, K, reg_dim, any(k.startswith("bbox_") for k in tensors),
                                                         "svm_calibration" in tensors))
        expected.update({"pool5_scale": ((1,), torch.float64), "svm_scale": ((1,), torch.float64)})
        rpn_header = None
        if cfg.proposals.method == "rpn":
            from detector.proposals import rpn as R

            rpn_header = require(path, meta, "rpn", dict, "the learned proposals' header (a mapping)")
            try:
                anchors = R.AnchorSpec.from_json(rpn_header["anchors"])
                if int(rpn_header["in_channels"]) != backbone.channels:
                    raise ValueError(f"in_channels {rpn_header['in_channels']}, the trunk has {backbone.channels}")
            except (KeyError, TypeError, ValueError, ConfigError) as e:
                raise ModelFormatError(f"{path}: header entry 'rpn' is damaged ({e})") from None
            expected.update({f"rpn.{k}": v for k, v in R.expected_state(backbone.channels,
                                                                          anchors.num_anchors).items()})
        check_tensors(path, tensors, expected)
        head = None
        if cfg.finetune.enabled:  # sizes now known to match the file's tensors
            head = FCHead(pool5_dim, cfg.finetune.fc_dims, K, cfg.finetune.dropout)
        load_trunk(path, bmeta, backbone, tensors)
        if head is not None:
            load_module("head.", head, tensors)
        embedder = WindowEmbedder.from_config(cfg, backbone, head, positive_scalar(path, tensors, "pool5_scale"),
                                              positive_scalar(path, tensors, "svm_scale"))
        rpn = None
        try:
            predictor = WindowPredictor.from_tensors(tensors)
            if rpn_header is not None:
                rpn = R.RPN.from_state(rpn_header, {k[4:]: v for k, v in tensors.items() if k.startswith("rpn.")},
                                       R.proposal_settings(cfg.rpn))
        except ModelFormatError as e:
            raise ModelFormatError(f"{path}: {e}") from None
        return cls(cfg, names, embedder, predictor, rpn, device)


def regression_layer(cfg: Config) -> str:
    """The features a model's box regressors read: fc7 for the fine-tuned box layer
    (bbox.method: finetune), else pool5."""
    return "fc7" if box_layer_trained(cfg) else "pool5"


def load(path: Union[str, Path], device: str = "auto") -> SPPDetector:
    """Load a trained detector: `model = detector.load("runs/x/model.safetensors")`."""
    return SPPDetector.load(path, device)


def detect(image, model: Union[SPPDetector, str, Path], **kwargs) -> dict:
    """Module-level convenience: `detector.detect(image, model=...)` (a model or a model file)."""
    if not isinstance(model, SPPDetector):
        model = load(model)
    return model.detect(image, **kwargs)
