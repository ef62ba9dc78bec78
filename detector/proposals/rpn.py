"""Learned proposals from the shared conv map: Faster R-CNN's region proposal network (Ren, He,
Girshick, Sun, NIPS 2015) on SPP-net's once-per-image map.

    spec = derive_anchors(gt_boxes, image_sizes, scales, max_size, backbone.stride, backbone.offset)
    print(spec.rule)                                   # how the anchors were chosen
    rpn = RPN(backbone.channels, spec, seed=cfg.seed)
    info = train_rpn(rpn, maps, gt_boxes, RPNTrainConfig(), seed=0, checkpoint=run / "rpn_ckpt.pt")
    boxes, scores = rpn.propose(extractor(image))      # original pixels, best first
    arrays, header = rpn.state_arrays(), rpn.header()  # for the model file (no pickles)
    rpn = RPN.from_state(header, arrays)

The pieces are torchvision's (`RPNHead`: 3x3 conv + ReLU, then 1x1 objectness and 1x1 box deltas
per anchor; `Matcher`, `BalancedPositiveNegativeSampler`, `BoxCoder`, and the loss of
`RegionProposalNetwork`).  What differs:

* **Anchors sit on our cells' centres.**  torchvision puts anchor centres at `stride*j`; a
  trunk's cell j is centred on pixel `offset + stride*j`, continuous `offset + 0.5 + stride*j`
  (docs/design.md, "Geometry"), e.g. 7.5 + 16j for EfficientNet-Lite0 at stride 16.
  `CellAnchorGenerator` shifts torchvision's grid by that, and does not round the anchor
  half-sizes to whole pixels (torchvision does; on 20-px anchors that bends the aspect ratio).
* **Anchor sizes come from the training boxes** (`derive_anchors`) unless configured.
* **The trunk is frozen**, so training reads cached conv maps and only the head learns.
* **Deterministic output order**: score descending, ties by scale and anchor index.

Box coding is torchvision's `BoxCoder` with weights (1, 1, 1, 1), which is the formula of
`detector.detection.bbox_regression.encode/decode` (tx = (gcx - cx)/w, ..., tw = log(gw/w),
the same log(1000/16) clip); tests/test_rpn.py checks the two against each other.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import box_iou, nms

from detector.cache import load_checkpoint, params_digest, save_checkpoint
from detector.core.features import ScaleFeatures
from detector.core.resize import resize_factor
from detector.datasets.validate import DatasetWarning
from detector.errors import ConfigError, DatasetError, ModelFormatError
from detector.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of header() / state_arrays(); bump when either changes


# --------------------------------------------------------------------------- anchors

@dataclass(frozen=True)
class AnchorSpec:
    """Anchors per map cell: every size (sqrt of the area, pixels of the *resized* image) at
    every ratio (height / width, torchvision's convention), centred on the cell's centre
    `offset + 0.5 + stride*j`.  Order within a cell: ratio-major, as torchvision's."""

    sizes: tuple
    ratios: tuple
    stride: int
    offset: float
    rule: str = ""  # how the sizes and ratios were chosen, for the trainer to print

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(float(s) for s in self.sizes))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if not self.sizes or not self.ratios:
            raise ConfigError("rpn anchors: need at least one size and one ratio")
        bad = [v for v in self.sizes + self.ratios if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(f"rpn anchors: sizes and ratios must be positive numbers, got {bad[0]!r}")
        if int(self.stride) < 1:
            raise ConfigError(f"rpn anchors: stride must be >= 1, got {self.stride!r}")

    @property
    def num_anchors(self) -> int:
        return len(self.sizes) * len(self.ratios)

    def to_json(self) -> dict:
        return {"sizes": list(self.sizes), "ratios": list(self.ratios), "stride": int(self.stride),
                "offset": float(self.offset), "rule": self.rule}

    @classmethod
    def from_json(cls, d: dict) -> "AnchorSpec":
        return cls(tuple(d["sizes"]), tuple(d["ratios"]), int(d["stride"]), float(d["offset"]), str(d.get("rule", "")))


class CellAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with its grid moved onto the trunk's cell centres and
    unrounded cell anchors.  `anchors(h, w)`: [h*w*A, 4] for one map, ordered (row, column,
    anchor), the order of `concat_box_prediction_layers`; `forward(images, maps)` keeps
    torchvision's interface (one anchor tensor per image) with the known stride."""

    def __init__(self, spec: AnchorSpec):
        super().__init__(sizes=(spec.sizes,), aspect_ratios=(spec.ratios,))
        self.spec = spec
        self._grid: dict = {}

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        # torchvision's, less its .round(): whole-pixel half-sizes distort small anchors' ratios
        scales = torch.as_tensor(scales, dtype=torch.float64)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        h_ratios = torch.sqrt(ratios)
        ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).to(dtype=dtype, device=device)

    def anchors(self, h: int, w: int, device: torch.device = torch.device("cpu")) -> Tensor:
        key = (int(h), int(w), str(device))
        a = self._grid.get(key)
        if a is None:
            s = torch.tensor(int(self.spec.stride))
            grid = self.grid_anchors([[int(h), int(w)]], [[s, s]])[0]  # centres at stride*j
            a = (grid + (self.spec.offset + 0.5)).to(device)  # ... moved onto the cell centres
            if len(self._grid) > 16:  # a few map sizes recur (one per image shape and scale)
                self._grid.clear()
            self._grid[key] = a
        return a

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != 1:
            raise ValueError("CellAnchorGenerator: one feature map level only")
        fm = feature_maps[0]
        return [self.anchors(fm.shape[-2], fm.shape[-1], fm.device)] * len(image_list.image_sizes)


def min_anchor_size(stride: int) -> float:
    """The smallest anchor the stride allows: anchors narrower than the cell spacing leave gaps
    between them, and a box lying in a gap overlaps no anchor at all."""
    return float(stride)


def _resized_boxes(gt_boxes: Sequence[np.ndarray], image_sizes: Sequence[tuple], scales: Sequence[int],
                   max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(area) and h/w of every GT box at every training scale (pixels of the resized image)."""
    side, ratio = [], []
    for boxes, (W, H) in zip(gt_boxes, image_sizes):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        ok = (w > 0) & (h > 0)
        w, h = w[ok], h[ok]
        for s in scales:
            f = resize_factor(int(W), int(H), int(s), int(max_size))
            side.append(np.sqrt(w * h) * f)
            ratio.append(h / w)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
    return cat(side), cat(ratio)


def small_box_warning(sides: np.ndarray, stride: int, smallest_anchor: float) -> Optional[str]:
    """The warning for a dataset whose boxes are mostly (half or more) smaller than the
    smallest anchor the stride allows, naming the sizes; None otherwise."""
    if len(sides) == 0:
        return None
    limit = min(min_anchor_size(stride), smallest_anchor)
    small = sides < limit
    if small.mean() < 0.5:
        return None
    count = f"all {len(sides)}" if small.all() else f"{int(small.sum())} of {len(sides)}"
    return (f"rpn anchors: {count} training boxes are smaller than the smallest anchor the stride allows "
            f"({limit:.0f} px at stride {stride}): box sizes (sqrt of area, at the training scales) "
            f"{np.min(sides):.1f}-{np.max(sides):.1f} px, median {np.median(sides):.1f}; learned proposals will "
            f"miss many of them. Use a larger scale (features.scales) or a backbone with a smaller stride")


def derive_anchors(gt_boxes: Sequence[np.ndarray], image_sizes: Sequence[tuple], scales: Sequence[int],
                   max_size: int, stride: int, offset: float, sizes: Optional[Sequence[float]] = None,
                   ratios: Optional[Sequence[float]] = None, size_step: float = math.sqrt(2),
                   size_quantiles: tuple = (0.02, 0.98), ratio_quantiles: tuple = (0.1, 0.5, 0.9),
                   ratio_spread: float = 1.5, max_sizes: int = 8) -> AnchorSpec:
    """Anchor sizes and ratios from the training boxes (original pixels; image_sizes (W, H))
    resized to every training scale, unless given.

    Sizes: from the `size_quantiles[0]` to the `size_quantiles[1]` quantile of sqrt(area),
    spaced by at most `size_step` (half an octave: a box then always has an anchor within
    2^(1/4) of its size), at most `max_sizes` of them, none below the stride
    (`min_anchor_size`).  Ratios (h/w): the `ratio_quantiles` of the boxes' ratios, or only
    the median when the outer two are within a factor `ratio_spread`.  Warns
    (DatasetWarning) when most boxes are smaller than the smallest anchor the stride allows.
    """
    side, ratio = _resized_boxes(gt_boxes, image_sizes, scales, max_size)
    n_boxes = len(side) // max(len(scales), 1)
    at = f"at scale{'s' if len(scales) > 1 else ''} {', '.join(str(int(s)) for s in scales)}"
    floor = min_anchor_size(stride)
    if sizes is not None:
        sizes = tuple(float(s) for s in sizes)
        size_rule = f"sizes {_fmt(sizes, 0)} px (configured)"
    elif len(side) == 0:
        raise DatasetError("rpn anchors: no training boxes to derive anchor sizes from")
    else:
        lo, hi = (float(np.quantile(side, q)) for q in size_quantiles)
        lo, hi = max(lo, floor), max(hi, floor)
        n = min(max_sizes, max(1, int(math.ceil(math.log(hi / lo) / math.log(size_step) - 1e-9)) + 1))
        sizes = tuple(sorted({round(float(v), 1) for v in np.geomspace(lo, hi, n)}))
        spaced = f", spaced x{(hi / lo) ** (1 / (n - 1)):.2f}" if n > 1 else ""
        size_rule = (f"sizes {_fmt(sizes, 0)} px ({_pct(size_quantiles[0])}-{_pct(size_quantiles[1])} percentile "
                     f"of sqrt(area) of {n_boxes} training boxes {at}{spaced}, none below the stride {stride})")
    if ratios is not None:
        ratios = tuple(float(r) for r in ratios)
        ratio_rule = f"ratios h/w {_fmt(ratios, 2)} (configured)"
    elif len(ratio) == 0:
        raise DatasetError("rpn anchors: no training boxes to derive anchor ratios from")
    else:
        q = [float(np.exp(np.quantile(np.log(ratio), p))) for p in ratio_quantiles]
        if max(q) / min(q) < ratio_spread:
            ratios = (round(q[len(q) // 2], 2),)
            ratio_rule = (f"ratio h/w {_fmt(ratios, 2)} (the median; the {_pct(ratio_quantiles[0])}-"
                          f"{_pct(ratio_quantiles[-1])} percentiles are within x{ratio_spread:g})")
        else:
            ratios = tuple(sorted({round(v, 2) for v in q}))
            ratio_rule = (f"ratios h/w {_fmt(ratios, 2)} ({', '.join(_pct(p) for p in ratio_quantiles)} "
                          f"percentiles)")
    spec_rule = f"{size_rule} x {ratio_rule}: {len(sizes) * len(ratios)} anchors per cell, stride {stride}"
    msg = small_box_warning(side, stride, min(sizes))
    if msg is not None:
        warnings.warn(msg, DatasetWarning, stacklevel=2)
    return AnchorSpec(sizes, ratios, stride, offset, spec_rule)


def _fmt(values, decimals: int) -> str:
    return ", ".join(f"{v:.{decimals}f}" for v in values)


def _pct(q: float) -> str:
    p = round(100 * q, 1)
    p = int(p) if p == int(p) else p
    suffix = "th" if 10 <= p % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(int(p) % 10, "th")
    return f"{p}{suffix}"


# --------------------------------------------------------------------------- the network

@dataclass
class ProposalSettings:
    """Test-time (and proposal-stage) settings: keep the `pre_nms_top_n` best-scoring anchors
    per scale, decode, clip, drop boxes thinner than `min_size` (original pixels), NMS at
    `nms_iou`, keep the first `post_nms_top_n`."""

    pre_nms_top_n: int = 6000
    post_nms_top_n: int = 2000
    nms_iou: float = 0.7
    min_size: float = 1.0

    def __post_init__(self):
        if int(self.pre_nms_top_n) < 1 or int(self.post_nms_top_n) < 1:
            raise ConfigError(f"rpn: pre_nms_top_n and post_nms_top_n must be >= 1, got {self.pre_nms_top_n}, "
                              f"{self.post_nms_top_n}")
        if not 0.0 < float(self.nms_iou) <= 1.0:
            raise ConfigError(f"rpn: nms_iou must be in (0, 1], got {self.nms_iou}")
        if float(self.min_size) < 0:
            raise ConfigError(f"rpn: min_size must be >= 0, got {self.min_size}")


def _seeded_init(head: nn.Module, seed: int) -> None:
    """RPNHead's own init (N(0, 0.01), zero bias), from a private generator: the same head for
    the same seed, and the caller's global RNG stream untouched."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.01)
                if m.bias is not None:
                    m.bias.zero_()


class RPN(nn.Module):
    """The proposal head on a trunk's map, with its anchors and test-time settings."""

    def __init__(self, in_channels: int, spec: AnchorSpec, settings: Optional[ProposalSettings] = None,
                 seed: Optional[int] = 0):
        super().__init__()
        self.in_channels = int(in_channels)
        self.spec = spec
        self.settings = settings or ProposalSettings()
        with torch.random.fork_rng(devices=[]):  # RPNHead's init draws from the global RNG
            self.head = RPNHead(self.in_channels, spec.num_anchors)
        if seed is not None:
            _seeded_init(self.head, seed)
        self.anchor_generator = CellAnchorGenerator(spec)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    @property
    def device(self) -> torch.device:
        return self.head.cls_logits.weight.device

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """[B, C, h, w] maps -> objectness logits [B, h*w*A] and deltas [B, h*w*A, 4]."""
        logits, deltas = self.head([maps])
        obj, reg = concat_box_prediction_layers(logits, deltas)  # (row, column, anchor) order
        return obj.view(maps.shape[0], -1), reg.view(maps.shape[0], -1, 4)

    @torch.inference_mode()
    def propose(self, feats: Sequence[ScaleFeatures], settings: Optional[ProposalSettings] = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Proposals of one image from its maps (one `ScaleFeatures` per scale): boxes [N, 4]
        float32 in original pixels, clipped, and their objectness (sigmoid) [N] float32, score
        descending, ties by scale and anchor index."""
        st = settings or self.settings
        if self.training:
            self.eval()
        all_boxes, all_logits = [], []
        W, H = feats[0].image_size
        for sf in feats:
            x = sf.features.to(self.device, torch.float32)
            if x.shape[0] != self.in_channels:
                raise ValueError(f"rpn: the map has {x.shape[0]} channels, the head expects {self.in_channels}")
            logits, deltas = self(x[None])
            logits, deltas = logits[0], deltas[0]
            # stable sort: equal scores keep the anchor order, so the output never depends on ties
            order = torch.sort(logits, descending=True, stable=True)[1][: int(st.pre_nms_top_n)]
            anchors = self.anchor_generator.anchors(x.shape[1], x.shape[2], x.device)[order]
            boxes = self.box_coder.decode_single(deltas[order], anchors) / float(sf.factor)
            all_boxes.append(boxes)
            all_logits.append(logits[order])
        boxes, logits = torch.cat(all_boxes), torch.cat(all_logits)
        if len(feats) > 1:  # merge the scales, again stably
            order = torch.sort(logits, descending=True, stable=True)[1]
            boxes, logits = boxes[order], logits[order]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= st.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= st.min_size)
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, logits = boxes[keep], logits[keep]
        keep = greedy_nms(boxes.float(), float(st.nms_iou), int(st.post_nms_top_n))
        return (boxes[keep].float().cpu().numpy().astype(np.float32),
                torch.sigmoid(logits[keep]).float().cpu().numpy().astype(np.float32))

    # ----------------------------------------------------------------------- serialisation

    def state_arrays(self) -> dict[str, Tensor]:
        """The head's tensors (float32, CPU, contiguous), named as in `expected_state`."""
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.head.state_dict().items()}

    def header(self) -> dict:
        """Everything else, as JSON: format version, channels, anchors, test-time settings."""
        return {"format": FORMAT_VERSION, "in_channels": self.in_channels, "anchors": self.spec.to_json(),
                "settings": asdict(self.settings)}

    @classmethod
    def from_state(cls, header: dict, arrays: dict, settings: Optional[ProposalSettings] = None) -> "RPN":
        """Rebuild from `header()` and `state_arrays()`, checking both (ModelFormatError naming
        the problem); `settings` overrides the stored test-time settings."""
        try:
            if int(header["format"]) != FORMAT_VERSION:
                raise ModelFormatError(f"rpn head: format {header['format']}, this version reads {FORMAT_VERSION}")
            spec = AnchorSpec.from_json(header["anchors"])
            in_channels = int(header["in_channels"])
            stored = ProposalSettings(**{f.name: header["settings"][f.name] for f in fields(ProposalSettings)})
        except ModelFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"rpn head: damaged header ({type(e).__name__}: {e})") from e
        check_state(arrays, in_channels, spec.num_anchors)
        rpn = cls(in_channels, spec, settings or stored, seed=None)
        rpn.head.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()})
        rpn.eval()
        return rpn


def greedy_nms(boxes: Tensor, iou: float, limit: int, chunk: int = 512) -> Tensor:
    """Greedy NMS of boxes already in priority order, stopping once `limit` are kept: the
    indices (ascending) of the first `limit` that torchvision's `nms` would keep.

    torchvision's CPU kernel compares every kept box with every later one, so 6,000 boxes
    from a head that has not learned much cost ~80 ms.  Here boxes go in chunks: a chunk's
    boxes that overlap a box kept before (IoU > iou, torchvision's test) are dropped, the
    rest go through `nms` among themselves -- exactly greedy NMS, since a dropped box never
    suppresses -- and the loop ends when `limit` are kept."""
    kept: list[Tensor] = []
    n_kept = 0
    for lo in range(0, len(boxes), chunk):
        idx = torch.arange(lo, min(lo + chunk, len(boxes)), device=boxes.device)
        b = boxes[idx]
        if kept:
            prev = boxes[torch.cat(kept)]
            alive = ~(box_iou(b, prev) > iou).any(1)
            idx, b = idx[alive], b[alive]
        # the rank as the score: nms's own sort then cannot reorder ties
        keep = nms(b, -idx.to(torch.float32), iou)
        kept.append(idx[keep.sort()[0]])
        n_kept += len(keep)
        if n_kept >= limit:
            break
    if not kept:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    return torch.cat(kept)[:limit]


def expected_state(in_channels: int, num_anchors: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """(shape, dtype) of every tensor `RPN.state_arrays` gives, without building the layers."""
    C, A, f = int(in_channels), int(num_anchors), torch.float32
    return {"conv.0.0.weight": ((C, C, 3, 3), f), "conv.0.0.bias": ((C,), f),
            "cls_logits.weight": ((A, C, 1, 1), f), "cls_logits.bias": ((A,), f),
            "bbox_pred.weight": ((4 * A, C, 1, 1), f), "bbox_pred.bias": ((4 * A,), f)}


def check_state(arrays: dict, in_channels: int, num_anchors: int) -> None:
    """ModelFormatError unless `arrays` holds exactly the expected tensors, shapes, dtypes and
    finite values."""
    want = expected_state(in_channels, num_anchors)
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + ([f"unexpected: {', '.join(extra)}"]
                                                                          if extra else [])
        raise ModelFormatError(f"rpn head: tensors {'; '.join(parts)}")
    for k, (shape, dtype) in want.items():
        v = torch.as_tensor(arrays[k])
        if tuple(v.shape) != shape or v.dtype != dtype:
            raise ModelFormatError(f"rpn head: tensor {k} is {v.dtype} {tuple(v.shape)}, expected {dtype} {shape}")
        if not torch.isfinite(v).all():
            raise ModelFormatError(f"rpn head: tensor {k} holds NaN or inf")


# --------------------------------------------------------------------------- training

@dataclass
class RPNTrainConfig:
    """Training on cached conv maps.  Faster R-CNN's sampling (torchvision's defaults): anchors
    with IoU >= fg_iou with a GT box (and each GT box's best anchors) are positive, < bg_iou
    negative; `anchors_per_image` sampled per image, at most `positive_fraction` positive."""

    iterations: int = 2000
    images_per_batch: int = 2
    lr: float = 0.01
    lr_steps: tuple = (1500,)  # iterations at which lr drops 10x
    momentum: float = 0.9
    weight_decay: float = 1e-4
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    anchors_per_image: int = 256
    positive_fraction: float = 0.5
    flip: bool = True  # half the draws read the mirror image's map (its boxes mirrored)
    checkpoint_every: int = 200

    def __post_init__(self):
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        if int(self.iterations) < 0 or int(self.images_per_batch) < 1 or int(self.anchors_per_image) < 1:
            raise ConfigError("rpn training: iterations >= 0, images_per_batch >= 1, anchors_per_image >= 1")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ConfigError(f"rpn training: need 0 <= bg_iou <= fg_iou <= 1, got {self.bg_iou}, {self.fg_iou}")
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ConfigError(f"rpn training: positive_fraction must be in (0, 1], got {self.positive_fraction}")


MapGetter = Callable[[int, bool], Sequence[ScaleFeatures]]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (a private stream per (seed, iteration))."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _draws(seed: int, it: int, n_images: int, cfg: RPNTrainConfig, n_scales: int):
    """The images, flips and scales of iteration `it`: a function of (seed, it) only, so a
    resumed run draws what an uninterrupted one would.  Images go through a fresh seeded
    permutation per epoch."""
    out = []
    for k in range(cfg.images_per_batch):
        t = it * cfg.images_per_batch + k
        epoch, pos = divmod(t, n_images)
        image = int(np.random.default_rng([seed, 1, epoch]).permutation(n_images)[pos])
        out.append(image)
    rng = np.random.default_rng([seed, 2, it])
    flips = rng.random(cfg.images_per_batch) < 0.5 if cfg.flip else np.zeros(cfg.images_per_batch, bool)
    scales = rng.integers(0, n_scales, cfg.images_per_batch)
    return out, flips, scales


def _fingerprint(rpn: RPN, cfg: RPNTrainConfig, seed: int, gt_boxes: Sequence[np.ndarray]) -> str:
    boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in gt_boxes]) if gt_boxes else np.zeros(0)
    return params_digest({"anchors": rpn.spec.to_json(), "in": rpn.in_channels, "cfg": asdict(cfg), "seed": seed,
                          "images": len(gt_boxes), "boxes": params_digest({"b": boxes.round(3).tolist()})})


def _save_checkpoint(path: Path, rpn: RPN, opt: torch.optim.Optimizer, it: int, fingerprint: str) -> None:
    save_checkpoint(path, {"iteration": it, "head": rpn.head.state_dict(), "optimizer": opt.state_dict(),
                           "fingerprint": fingerprint})


def _resume(path: Optional[Path], rpn: RPN, opt: torch.optim.Optimizer, fingerprint: str) -> int:
    if path is None:
        return 0
    try:
        state = load_checkpoint(path)
        if state is None:
            return 0
        if state.get("fingerprint") != fingerprint:
            log.warning("rpn: checkpoint %s is from other settings or data; starting afresh", path)
            return 0
        rpn.head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
    except Exception as e:  # a damaged checkpoint costs the work it held, nothing else
        log.warning("rpn: checkpoint %s is unreadable (%s); starting afresh", path, e)
        return 0
    log.info("rpn: resuming from iteration %d (%s)", int(state["iteration"]), path)
    return int(state["iteration"])


def _image_boxes(boxes: np.ndarray, sf: ScaleFeatures, flip: bool) -> Tensor:
    """GT boxes (original pixels) on the map's resized image, mirrored for the mirror map."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    if flip:
        W = sf.image_size[0]
        b[:, [0, 2]] = W - b[:, [2, 0]]
    return torch.from_numpy(b * float(sf.factor)).float()


def check_training_boxes(gt_boxes: Sequence[np.ndarray]) -> None:
    """DatasetError unless some training image has an object: the head learns from boxes."""
    if len(gt_boxes) == 0:
        raise DatasetError("rpn training: no training images")
    if sum(len(np.asarray(b).reshape(-1, 4)) for b in gt_boxes) == 0:
        raise DatasetError(f"rpn training: none of the {len(gt_boxes)} training images has an object; "
                           "learned proposals need annotated boxes (or use proposals.method: selective_search)")


def train_rpn(rpn: RPN, maps: MapGetter, gt_boxes: Sequence[np.ndarray], cfg: Optional[RPNTrainConfig] = None,
              seed: int = 0, checkpoint: Optional[Path] = None, progress: bool = True) -> dict:
    """Train `rpn`'s head in place on cached conv maps.

    maps(i, flip): image i's maps, one ScaleFeatures per scale (of the mirror image if flip);
    gt_boxes[i]: its boxes in original pixels (images without boxes give negatives only).
    Each iteration draws `images_per_batch` images (a seeded permutation per epoch), a flip
    and a scale each; anchors are labelled and sampled per image by torchvision's Matcher and
    BalancedPositiveNegativeSampler, and the loss is RegionProposalNetwork's (binary
    cross-entropy on the sampled anchors + smooth L1 on the positives' deltas).  SGD with
    momentum.  Every draw comes from generators seeded by (seed, iteration), so a run resumed
    from `checkpoint` (written atomically every `checkpoint_every` iterations) ends with the
    same head as one that was not interrupted.  Returns a summary."""
    cfg = cfg or RPNTrainConfig()
    check_training_boxes(gt_boxes)
    n = len(gt_boxes)
    # torchvision's RPN object for its target assignment and loss; its head is ours
    tv = RegionProposalNetwork(rpn.anchor_generator, rpn.head, cfg.fg_iou, cfg.bg_iou, cfg.anchors_per_image,
                               cfg.positive_fraction, {"training": 1, "testing": 1}, {"training": 1, "testing": 1},
                               rpn.settings.nms_iou)
    opt = torch.optim.SGD(rpn.head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fingerprint = _fingerprint(rpn, cfg, seed, gt_boxes)
    start = _resume(checkpoint, rpn, opt, fingerprint)
    n_scales = len(maps(0, False))
    devices = [rpn.device.index or 0] if rpn.device.type == "cuda" else []  # its randperm may run there
    rpn.train()
    t0 = time.perf_counter()
    hist = {"obj": [], "box": [], "pos": []}
    bar = progress_bar(range(start, cfg.iterations), desc="rpn", unit="it", disable=not progress, initial=start,
                       total=cfg.iterations)
    for it in bar:
        lr = cfg.lr * (0.1 ** sum(it >= s for s in cfg.lr_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        images, flips, scales = _draws(seed, it, n, cfg, n_scales)
        objs, regs, anchors, targets = [], [], [], []
        for i, flip, si in zip(images, flips, scales):
            sf = maps(i, bool(flip))[int(si)]
            x = sf.features.to(rpn.device, torch.float32)[None]
            if x.is_inference():  # maps made under inference_mode (FeatureExtractor's) cannot enter autograd
                x = x.clone()
            obj, reg = rpn(x)
            objs.append(obj[0])
            regs.append(reg[0])
            anchors.append(rpn.anchor_generator.anchors(x.shape[2], x.shape[3], x.device))
            targets.append({"boxes": _image_boxes(gt_boxes[i], sf, bool(flip)).to(x.device)})
        labels, matched = tv.assign_targets_to_anchors(anchors, targets)
        reg_targets = tv.box_coder.encode(matched, anchors)
        with torch.random.fork_rng(devices=devices):  # the sampler draws from the global RNG(s)
            torch.manual_seed(_mix(seed, 3, it))
            loss_obj, loss_box = tv.compute_loss(torch.cat(objs), torch.cat(regs), labels, reg_targets)
        opt.zero_grad()
        (loss_obj + loss_box).backward()
        opt.step()
        hist["obj"].append(loss_obj.item())
        hist["box"].append(loss_box.item())
        hist["pos"].append(float(np.mean([float((lab == 1).sum()) for lab in labels])))
        if progress and (it % 20 == 0 or it == cfg.iterations - 1):
            bar.set_postfix(obj=f"{np.mean(hist['obj'][-50:]):.3f}", box=f"{np.mean(hist['box'][-50:]):.3f}",
                            lr=f"{lr:g}")
        if checkpoint is not None and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            _save_checkpoint(Path(checkpoint), rpn, opt, it + 1, fingerprint)
    if checkpoint is not None:
        _save_checkpoint(Path(checkpoint), rpn, opt, cfg.iterations, fingerprint)
    rpn.eval()
    last = (lambda k: round(float(np.mean(hist[k][-50:])), 4) if hist[k] else None)
    return {"iterations": cfg.iterations, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 1),
            "loss_objectness": last("obj"), "loss_box": last("box"), "positive_anchors_per_image": last("pos"),
            "anchors": rpn.spec.rule}


def anchor_recall(spec: AnchorSpec, gt_boxes: Sequence[np.ndarray], maps_hw: Sequence[tuple], factors: Sequence[float],
                  iou: float = 0.7) -> float:
    """Fraction of GT boxes with some anchor at IoU >= iou (before any learning): a check of
    the anchor choice.  maps_hw[i]: image i's map size (h, w); factors[i]: its resize factor."""
    gen = CellAnchorGenerator(spec)
    hit = total = 0
    for boxes, (h, w), f in zip(gt_boxes, maps_hw, factors):
        b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4) * float(f))
        if len(b) == 0:
            continue
        best = box_iou(b, gen.anchors(h, w)).max(1)[0]
        hit += int((best >= iou).sum())
        total += len(b)
    return hit / max(total, 1)


# --------------------------------------------------------------------------- from the config

def proposal_settings(rpn_cfg, training: bool = False) -> ProposalSettings:
    """The proposal step's settings from the config's `rpn` section: `train_top_n` boxes per
    training image for the later stages, `post_nms_top_n` at test time."""
    top = rpn_cfg.train_top_n if training else rpn_cfg.post_nms_top_n
    return ProposalSettings(rpn_cfg.pre_nms_top_n, top, rpn_cfg.nms_iou, rpn_cfg.min_size)


def train_config(rpn_cfg) -> RPNTrainConfig:
    """RPNTrainConfig from the config's `rpn` section."""
    return RPNTrainConfig(**{f.name: getattr(rpn_cfg, f.name) for f in fields(RPNTrainConfig)})


def to_npz_arrays(rpn: RPN) -> dict[str, np.ndarray]:
    """The head and its header as plain arrays (a run folder's rpn.npz; no pickles)."""
    import json

    return {"header": np.array(json.dumps(rpn.header(), sort_keys=True)),
            **{f"head.{k}": v.numpy() for k, v in rpn.state_arrays().items()}}


def from_npz_arrays(z: dict, settings: Optional[ProposalSettings] = None) -> RPN:
    import json

    arrays = {k[5:]: torch.from_numpy(v) for k, v in z.items() if k.startswith("head.")}
    return RPN.from_state(json.loads(str(z["header"])), arrays, settings)
