"""Conv features, computed once per image per scale (paper section 4.1).

The image is resized (bilinear) so its shorter side equals each scale `s`,
capped so the longer side stays within `max_size`, normalised the backbone's
way, padded bottom/right to the backbone's size divisor (zeros, i.e. the mean
pixel: that keeps TF 'same' padding and so the cell geometry fixed), and run
through the trunk in inference mode, on the GPU when there is one.
`detector.core.feature_cache` keeps the maps on disk and in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from detector.core.backbones import Backbone
from detector.errors import DeviceError
from detector.images import load_image
from detector.core.resize import resize_factor, resized_size
from detector.timing import NO_TIMER, StageTimer

PREPROCESS_VERSION = 1  # bump when resizing / normalisation / padding change
MIN_INPUT = 64  # every trunk here accepts a 64x64 input; smaller resized images are padded up to it


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for, but CUDA is not available here (torch "
                          f"{torch.__version__}, cuda={torch.version.cuda}); use --set features.device=cpu or auto")
    return torch.device(name)


@dataclass
class ScaleFeatures:
    scale: int  # the requested shorter side
    factor: float  # resize factor actually used (smaller than scale/min(H,W) when max_size capped it)
    features: torch.Tensor  # [C, h, w] (float32 on the compute device, or float16 from the cache)
    image_size: tuple[int, int]  # original (W, H)

    @property
    def map_size(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])


class FeatureExtractor:
    """Backbone + scales: `extractor(image)` gives one `ScaleFeatures` per scale."""

    def __init__(self, backbone: Backbone, scales: Sequence[int], max_size: int = 2000, device: str = "auto",
                 resize_on_device: Optional[bool] = None, channels_last: bool = False, max_upscale: float = 0.0):
        if not scales:
            raise ValueError("at least one scale is needed")
        self.backbone = backbone
        self.scales = sorted(int(s) for s in scales)
        self.max_size = int(max_size)
        self.max_upscale = float(max_upscale)
        self.device = resolve_device(device)
        # channels-last inputs: the same maps up to float rounding, 1.4-1.7x faster for Lite0 on a
        # CPU in most runs (BENCHMARKS.md, "Classification"); the classifier uses it, detection when
        # features.channels_last is set
        self.channels_last = bool(channels_last)
        self.backbone.trunk.to(self.device).eval()
        # On a GPU the uint8 image is uploaded once and resized there (torch bilinear); on the
        # CPU OpenCV resizes faster.  The two differ by rounding (OpenCV rounds to uint8), so the
        # cache key says which one made a map.
        self.resize_on_device = self.device.type != "cpu" if resize_on_device is None else resize_on_device

    def factors(self, width: int, height: int) -> list[float]:
        return [resize_factor(width, height, s, self.max_size, self.max_upscale) for s in self.scales]

    def prepare(self, image: np.ndarray, factor: float) -> torch.Tensor:
        """Resize (OpenCV), normalise and pad one image: [3, h', w'] float32 on the CPU."""
        H, W = image.shape[:2]
        w, h = resized_size(W, H, factor)
        resized = image if (w, h) == (W, H) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return self._pad(self.backbone.normalize(resized), h, w)

    def prepare_on_device(self, image: torch.Tensor, factor: float) -> torch.Tensor:
        """The same from an uploaded HxWx3 uint8 tensor, on its device: bilinear resize with
        half-pixel centres (what OpenCV's INTER_LINEAR computes, without its uint8 rounding)."""
        H, W = image.shape[:2]
        w, h = resized_size(W, H, factor)
        x = image.permute(2, 0, 1)[None].float()
        if (w, h) != (W, H):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        bb = self.backbone
        x = x[0].flip(0) if bb.bgr else x[0]
        mean = torch.tensor(bb.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(bb.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return self._pad((x - mean) / std, h, w)

    def _pad(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        d = max(self.backbone.size_divisor, 1)
        ph = max(-(-h // d) * d, MIN_INPUT) - h
        pw = max(-(-w // d) * d, MIN_INPUT) - w
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    def run_trunk(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] prepared inputs -> [B, C, h, w] maps, on the compute device."""
        x = batch.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.trunk(x)

    @torch.inference_mode()
    def with_mirror(self, image, timer: StageTimer = NO_TIMER) -> tuple[list[ScaleFeatures], list[ScaleFeatures]]:
        """Features of the image and of its mirror image: each still its own map, the two
        computed in one batch per scale (same size), which is cheaper than two calls."""
        img = load_image(image)
        mirror = np.ascontiguousarray(img[:, ::-1])
        H, W = img.shape[:2]
        out: tuple[list, list] = ([], [])
        both = torch.from_numpy(np.stack([img, mirror])).to(self.device) if self.resize_on_device else None
        for scale, f in zip(self.scales, self.factors(W, H)):
            timer.start()
            if both is not None:
                x = torch.stack([self.prepare_on_device(both[0], f), self.prepare_on_device(both[1], f)])
            else:
                x = torch.stack([self.prepare(img, f), self.prepare(mirror, f)])
            timer.lap("resize")
            fmaps = self.run_trunk(x)
            if fmaps.is_cuda and timer is not NO_TIMER:
                torch.cuda.synchronize()  # only to time it
            timer.lap("conv")
            for k in (0, 1):
                out[k].append(ScaleFeatures(scale, f, fmaps[k], (W, H)))
        return out

    @torch.inference_mode()
    def __call__(self, image, flip: bool = False, timer: StageTimer = NO_TIMER) -> list[ScaleFeatures]:
        """Features of the image (or of its mirror image, for flip augmentation) at every scale.
        `timer` (optional) gets the "resize" and "conv" laps."""
        img = load_image(image)
        if flip:
            img = np.ascontiguousarray(img[:, ::-1])
        H, W = img.shape[:2]
        out = []
        uploaded = torch.from_numpy(img).to(self.device, non_blocking=True) if self.resize_on_device else None
        for scale, f in zip(self.scales, self.factors(W, H)):
            timer.start()
            x = self.prepare_on_device(uploaded, f) if uploaded is not None else self.prepare(img, f)
            timer.lap("resize")
            fmap = self.run_trunk(x[None])[0]
            if fmap.is_cuda and timer is not NO_TIMER:
                torch.cuda.synchronize()  # only to time it
            timer.lap("conv")
            out.append(ScaleFeatures(scale, f, fmap, (W, H)))
        return out

    def cache_params(self) -> dict:
        bb = self.backbone
        return {"backbone": bb.name, "weights": bb.weights_id, "geometry": bb.geometry(),
                "mean": bb.mean, "std": bb.std, "bgr": bb.bgr, "max_size": self.max_size,
                "preprocess": PREPROCESS_VERSION, "min_input": MIN_INPUT,
                **({"resize": "torch-bilinear"} if self.resize_on_device else {}),
                **({"channels_last": True} if self.channels_last else {}),  # detection's keys unchanged
                **({"max_upscale": self.max_upscale} if self.max_upscale > 0 else {})}
