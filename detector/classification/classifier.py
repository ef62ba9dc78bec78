"""The SPP-net classifier (paper section 3.1): conv maps of the image at its own size and
aspect, SPP of a window (the whole image or a view), fc layers, softmax.

    clf = detector.load_classifier("data/runs/flowers/model.safetensors")
    clf.classify("image.jpg", views="full")   # dict(scores, label, label_name, top5)

A view is a window on the conv map of the image at one scale (detector.classification.views); the
`10crop` scheme instead cuts each view out of the image and runs it through the trunk
on its own (the baseline).  Softmax scores are averaged over a scheme's views.  The
conv maps of a scheme are computed once per (scale, flip) and every view on them is
pooled from them: never once per view.

File format (detector.core.model_file, kind "sppnet-classifier"): the trunk (fine-tuned
blocks included), the fc layers and the pool5 scale, with the config and class names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from detector.core.backbones import Backbone, build_backbone
from detector.config import Config
from detector.classification.crops import crop_maps, cut_crops, resized_image
from detector.core.embedder import WindowEmbedder
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.core.heads import FCHead
from detector.images import load_image
from detector.core.model_file import (check_tensors, expected_state, load_module, load_trunk, model_meta, module_tensors,
                         positive_scalar, read_model, write_model_file)
from detector.timing import NO_TIMER, StageTimer
from detector.classification.views import SCHEMES, ViewGroup, count_views, full_box, plan_views, scheme

FORMAT = "sppnet-classifier"
FORMAT_VERSION = 1


def classifier_embedder(cfg: Config, backbone: Backbone, num_classes: int, pool5_scale: float = 1.0) -> WindowEmbedder:
    """Projection + SPP + pool5 scale + the K-way fc head (no background class)."""
    c = cfg.classifier
    emb = WindowEmbedder(backbone, cfg.spp.levels, cfg.features.scale_rule, cfg.spp.projection, pool5_scale)
    emb.head = FCHead(emb.pool5_dim, c.fc_dims, num_classes, c.dropout, background=False)
    return emb


def classifier_extractor(cfg: Config, backbone: Backbone, scale: Union[int, Sequence[int]],
                         device: str = "auto") -> FeatureExtractor:
    """Conv maps at one scale (or several), channels-last (faster on a CPU; training caches them the same way)."""
    scales = [scale] if isinstance(scale, int) else list(scale)
    return FeatureExtractor(backbone, scales, cfg.features.max_size, device, channels_last=True)


def whole_pool5(embedder: WindowEmbedder, sf: ScaleFeatures) -> torch.Tensor:
    """Scaled pool5 [1, D] of a whole map (a full image, or a crop's own map)."""
    return embedder.pool5([sf], full_box(*sf.image_size), np.zeros(1, np.int64))


AVERAGES = ("softmax", "logits")


def combine_views(logits: torch.Tensor, average: str) -> torch.Tensor:
    """[K] class probabilities of an image from its views' fc8 outputs [V, K]: the mean of
    their softmax (`softmax`, the paper's score averaging) or the softmax of their mean (`logits`)."""
    if average == "softmax":
        return torch.softmax(logits, dim=1).mean(0)
    if average == "logits":
        return torch.softmax(logits.mean(0), dim=0)
    raise ValueError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")


class SPPClassifier:
    def __init__(self, cfg: Config, class_names: Sequence[str], embedder: WindowEmbedder, device: str = "auto"):
        self.cfg = cfg
        self.class_names = list(class_names)
        self.embedder = embedder
        self.head = embedder.head.eval()
        self.device = device
        self._extractors: dict[int, FeatureExtractor] = {}

    @property
    def backbone(self) -> Backbone:
        return self.embedder.backbone

    def extractor(self, scale: int) -> FeatureExtractor:
        if scale not in self._extractors:
            self._extractors[scale] = classifier_extractor(self.cfg, self.backbone, scale, self.device)
        return self._extractors[scale]

    def views(self, width: int, height: int, name: str) -> list[ViewGroup]:
        c = self.cfg.classifier
        s = scheme(name, c.view_scale, c.full_scale, c.test_scales)
        return plan_views(s, width, height, c.view_size, self.cfg.features.max_size)

    @torch.inference_mode()
    def probabilities(self, pool5: torch.Tensor) -> torch.Tensor:
        """[N, K] softmax of scaled pool5 rows."""
        return torch.softmax(self.head(pool5), dim=1)

    @torch.inference_mode()
    def logits(self, pool5: torch.Tensor) -> torch.Tensor:
        """[N, K] fc8 outputs of scaled pool5 rows."""
        return self.head(pool5)

    def _view_pool5(self, img: np.ndarray, groups: list[ViewGroup], timer: StageTimer) -> torch.Tensor:
        """Scaled pool5 of every view, each (scale, flip) map computed once; where a scale
        needs both, the image and its mirror image go through the trunk as one batch."""
        maps: dict = {}
        rows = []
        for g in groups:
            key = (g.scale, g.flip)
            if key not in maps:
                if (g.scale, not g.flip) in {(h.scale, h.flip) for h in groups}:
                    maps[(g.scale, False)], maps[(g.scale, True)] = self.extractor(g.scale).with_mirror(img, timer)
                else:
                    maps[key] = self.extractor(g.scale)(img, flip=g.flip, timer=timer)
            rows.append(self.embedder.pool5(maps[key], g.boxes, np.zeros(len(g.boxes), np.int64)))
            timer.lap("spp")
        return torch.cat(rows)

    def _crop_pool5(self, img: np.ndarray, groups: list[ViewGroup], timer: StageTimer) -> torch.Tensor:
        """Scaled pool5 of every view cut out of the image and run through the trunk on its own."""
        rows = []
        for g in groups:
            ex = self.extractor(g.scale)
            timer.start()
            resized, f = resized_image(img, g.scale, ex.max_size, g.flip)
            crops = cut_crops(resized, f, g.boxes)
            timer.lap("resize")
            maps = crop_maps(ex, crops)
            timer.lap("conv")
            rows += [whole_pool5(self.embedder, sf) for sf in maps]
            timer.lap("spp")
        return torch.cat(rows)

    @torch.inference_mode()
    def classify(self, image, views: str = "full", timer: StageTimer = NO_TIMER,
                 average: Optional[str] = None) -> dict:
        """Classify one image, of any size and aspect ratio.

        image: a path, a PIL image, or an HxWx3 uint8 array in **RGB** order.
        views: center | full | 10 | 10crop | multi (detector.classification.views.scheme).
        average: softmax (the views' probabilities averaged, the paper's) | logits (the softmax
        of the averaged fc8 outputs); default the model's classifier.average.
        Returns dict(scores float32 [K]: the views' combined probabilities, label int,
        label_name str, top5 list of (name, score), best first).
        """
        if views not in SCHEMES:
            raise ValueError(f"unknown view scheme {views!r}; choose one of {', '.join(SCHEMES)}")
        average = average or self.cfg.classifier.average
        timer.start()
        img = load_image(image)
        H, W = img.shape[:2]
        groups = self.views(W, H, views)
        timer.lap("load")
        crop = views == "10crop"
        pool5 = (self._crop_pool5 if crop else self._view_pool5)(img, groups, timer)
        scores = combine_views(self.logits(pool5), average).numpy().astype(np.float32)
        timer.lap("fc")
        timer.count("views", count_views(groups))
        order = np.argsort(-scores, kind="stable")
        return {"scores": scores, "label": int(order[0]), "label_name": self.class_names[order[0]],
                "top5": [(self.class_names[k], float(scores[k])) for k in order[:5]]}

    # ------------------------------------------------------------------ file
    def save(self, path: Union[str, Path]) -> None:
        tensors = {**module_tensors("trunk.", self.backbone.trunk), **module_tensors("head.", self.head),
                   "pool5_scale": torch.tensor([self.embedder.pool5_scale], dtype=torch.float64)}
        meta = model_meta(self.cfg, self.class_names, self.backbone, self.head)
        write_model_file(path, FORMAT, FORMAT_VERSION, meta, tensors)

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto") -> "SPPClassifier":
        path = Path(path)
        _, tensors, cfg, names, bmeta = read_model(path, FORMAT, FORMAT_VERSION)
        backbone = build_backbone(cfg.backbone, pretrained=False)
        emb = classifier_embedder(cfg, backbone, len(names))
        expected = {**expected_state("trunk.", backbone.trunk), **expected_state("head.", emb.head),
                    "pool5_scale": ((1,), torch.float64)}
        check_tensors(path, tensors, expected)
        load_trunk(path, bmeta, backbone, tensors)
        load_module("head.", emb.head, tensors)
        emb.pool5_scale = positive_scalar(path, tensors, "pool5_scale")
        return cls(cfg, names, emb, device)


def load_classifier(path: Union[str, Path], device: str = "auto") -> SPPClassifier:
    """Load a trained classifier: `clf = detector.load_classifier("runs/x/model.safetensors")`."""
    return SPPClassifier.load(path, device)
