"""One typed default config, YAML files on top of it, and `--set key=value` overrides.

Unknown keys are rejected (in YAML files and overrides alike), values are
checked against the field's type, every cross-field rule lives in `validate()`,
and `to_dict()` gives what every run prints and saves.  A YAML file may start
from another with `_base_: other.yaml` (a path relative to the file; bases may
have bases): mappings merge key by key, anything else is replaced.

Defaults are *our* measured choices (docs/design.md says why);
`configs/zf5_paper.yaml` holds the original system's settings.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from detector.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"  # efficientnet_lite0 | zf5 | alexnet | vgg16 | resnet50
    weights: Optional[str] = None  # file path; None: the backbone's offline default, if it has one
    random_init: bool = False  # allow random weights (tests, smoke runs); never silently
    download: bool = False  # torchvision backbones only: fetch missing weights from the internet
    cut: str = "stride16"  # efficientnet_lite0 only: stride16 (after block 5, 112 ch) | stride32


@dataclass
class FeatureConfig:
    scales: list = field(default_factory=lambda: [688])  # shorter side, px; the paper: [688] or 5 scales
    max_size: int = 2000  # cap on the longer side after resizing (the original has none)
    scale_rule: str = "paper"  # paper: window area nearest 224^2 | code: round(208*min(H,W)/sqrt(area))
    cache_dtype: str = "float16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ram_cache_mb: int = 1024  # conv maps kept in memory while training (least recently used go first)
    max_upscale: float = 0.0  # > 0: never enlarge an image more than this (small images), whatever the scale
    channels_last: bool = True  # channels-last trunk input: the same maps up to float rounding, 1.45x faster on a CPU


@dataclass
class ProposalConfig:
    method: str = "selective_search"  # selective_search (the paper's; the settings below) | rpn (learned: `rpn`)
    mode: str = "fast"  # fast | quality | single
    resize: int = 500  # longer side (px) selective search runs at; boxes are mapped back
    min_size: int = 8  # drop boxes thinner than this (original pixels)
    top_k: int = 2000
    base_k: int = 50  # graph-segmentation k (OpenCV: 150); measured on BCCD, see BENCHMARKS.md
    inc_k: int = 50
    sigma: float = 0.8
    seed: int = 0  # fixes the order of boxes (and so which survive top_k)
    workers: int = 0  # processes for selective search; 0: every core this process may use
    max_upscale: float = 0.0  # > 0: selective search never enlarges an image more than this (see `resize`)


@dataclass
class RPNConfig:
    """Learned proposals (proposals.method: rpn): Faster R-CNN's proposal head on the conv map that
    SPP pools, trained on the cached maps before fine-tuning (detector.proposals.rpn)."""
    anchor_sizes: list = field(default_factory=list)  # px of the resized image; []: from the training boxes
    anchor_ratios: list = field(default_factory=list)  # height / width; []: from the training boxes
    iterations: int = 4000  # 4,000 with the fc layers' 6,000: +0.5 / +3.9 VOC07 on BCCD / DeepPCB over 2,000 / 3,000
    images_per_batch: int = 2
    lr: float = 0.01
    lr_steps: list = field(default_factory=lambda: [3000])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    fg_iou: float = 0.7  # anchors at IoU >= this with a box are positive ...
    bg_iou: float = 0.3  # ... below this negative
    anchors_per_image: int = 256
    positive_fraction: float = 0.5
    flip: bool = True
    checkpoint_every: int = 200
    train_top_n: int = 2000  # proposals per training image for fine-tuning, the SVMs and box regression
    # test time (changeable for a trained model, like test.*):
    pre_nms_top_n: int = 6000  # best-scoring anchors per scale decoded
    nms_iou: float = 0.7
    min_size: float = 1.0  # original pixels
    post_nms_top_n: int = 300  # proposals per image at test time


@dataclass
class SPPConfig:
    levels: list = field(default_factory=lambda: [1, 2, 3, 6])
    projection: str = "code"  # window -> cells: code (the authors' release) | paper (the appendix)


@dataclass
class FinetuneConfig:
    enabled: bool = True
    fc_dims: list = field(default_factory=lambda: [1024, 1024])
    dropout: float = 0.5
    iterations: int = 6000  # BENCHMARKS.md, "Regressing from the window, box voting, a longer schedule"
    batch_size: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_lo: float = 0.1
    lr: float = 1e-3
    lr_steps: list = field(default_factory=lambda: [4000])  # iterations at which lr drops 10x
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = True
    checkpoint_every: int = 500
    # 0: frozen trunk, every batch pooled from cached maps (the paper's section 4.1).  k: the
    # trunk's last k blocks train too, on image-centric batches (Fast R-CNN's): images_per_batch
    # images, batch_size / images_per_batch windows each; docs/design.md, "Fine-tuning the trunk"
    trunk_trainable_blocks: int = 0
    trunk_lr_mult: float = 1.0  # the blocks' learning rate relative to lr (Fast R-CNN: the same)
    images_per_batch: int = 2


@dataclass
class SVMConfig:
    layer: str = "fc7"  # fc7 | fc6 (fine-tuned) | pool5
    C: float = 0.001
    pos_weight: float = 2.0
    intercept_scaling: float = 10.0
    neg_iou: float = 0.3
    hard_thresh: float = -1.0001
    evict_thresh: float = -1.2
    retrain_every: int = 2000
    target_norm: float = 20.0
    norm_images: int = 200
    norm_boxes: int = 200
    max_iter: int = 10000
    calibrate: bool = False  # Platt-scale each class's margins on out-of-fold windows (detection.calibration)
    calibration_folds: int = 3


@dataclass
class BBoxConfig:
    enabled: bool = True
    # ridge: R-CNN's per-class ridge regression on pool5, after the SVMs (the paper's) | finetune: Fast
    # R-CNN's class-specific box layer on fc7, trained with the fc layers (smooth L1; no stage of its own)
    method: str = "ridge"
    iou_thresh: float = 0.5  # ridge: windows at least this close to a ground-truth box are its examples
    # ridge: the regularisation.  1,000 (R-CNN's) suits the window reference below (BCCD and DeepPCB, learned
    # proposals: +0.7 and +0.6 COCO AP over the release's 4,000, which configs/zf5_paper.yaml keeps)
    lam: float = 1000.0
    whiten: bool = True  # ridge: whiten the targets
    loss_weight: float = 1.0  # finetune: the box loss's weight beside the softmax's
    # ridge: what the targets are relative to.  window (default): the box its SPP window covers
    # (projection.window_boxes), which is what the pooled features saw: COCO AP +2.0 to +12.0 on BCCD and
    # DeepPCB (BENCHMARKS.md, "Regressing from the window") | proposal: the proposal box (R-CNN's, the paper's)
    reference: str = "window"


@dataclass
class TestConfig:
    # One number for every class, a list with one per class, or a mapping {class name: number}
    # in which "*" sets the classes it does not name (default -2.0; the release: -1.5).  A lower threshold only
    # adds detections below every kept one, so AP cannot fall; -2.0 adds +1.0 VOC07 on BCCD (platelets), and
    # the peer keeps everything above 0.001 probability.  See postprocess.class_thresholds.
    score_thresh: Union[float, list, dict] = -2.0
    nms_iou: float = 0.3
    max_per_image: int = 100
    second_nms: bool = True
    scorer: str = "svm"  # svm: the per-class SVMs (the paper) | softmax: fc8's class probabilities (Fast R-CNN)
    nms_after_regression: bool = True  # regress every candidate first, NMS on the refined boxes (Fast R-CNN's order;
    # the release's, false: NMS on the proposals, then regress the kept ones)
    soft_nms_sigma: float = 0.0  # > 0: Gaussian soft-NMS with this sigma instead of removing overlapping boxes
    # > 0: each kept box the margin-weighted mean of the refined candidates of its class that overlap it by at
    # least this much (box voting); 0.5: COCO AP +1.2 to +1.3 on three models.  It votes with regressed
    # candidates after plain NMS, so it acts only with nms_after_regression and soft_nms_sigma = 0
    box_voting_iou: float = 0.5
    # > 1: pool each kept box again where regression moved it and regress it again.  2 by default: +0.8 to
    # +1.8 points VOC07 on BCCD and DeepPCB, learned and selective-search proposals alike (BENCHMARKS.md,
    # "Learned proposals and the levers"); the paper regresses once (configs/zf5_paper.yaml keeps 1).
    bbox_iterations: int = 2


@dataclass
class ClassifierConfig:
    """Image classification (tools/train_classifier.py, docs/design.md "Classification")."""
    # crop224 (fixed crops: the no-SPP baseline) | full (whole images) | multisize | scales (every view of the
    # multi test scheme at every test_scales scale, and the full image: training sees the scales testing uses)
    input: str = "crop224"
    fc_dims: list = field(default_factory=lambda: [1024, 1024])
    dropout: float = 0.5
    view_size: int = 224  # crops and views: view_size x view_size pixels of the resized image
    view_scale: int = 256  # shorter side the crops and the center / 10 views are cut from (paper: 256)
    crop_positions: str = "corners5"  # training crops: corners5 (10 with flips) | grid9 (18 with flips)
    sizes: list = field(default_factory=lambda: [224, 180])  # multisize: each crop resized to these sizes
    size_schedule: str = "alternate"  # multisize: alternate sizes per epoch | random (integer in [min, max])
    full_scale: int = 256  # shorter side of full-image input, in training and the full-image views
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01
    lr_steps: list = field(default_factory=lambda: [40])  # epochs at which lr drops 10x
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trunk_trainable_blocks: int = 0  # 0: frozen trunk; k: fine-tune its last k blocks too
    trunk_lr_mult: float = 0.1  # the fine-tuned blocks' learning rate, relative to lr
    target_norm: float = 20.0  # pool5 is scaled to this mean L2 norm, as in detection
    checkpoint_every: int = 10  # epochs (a checkpoint holds the head and its momentum: ~130 MB at stride 32)
    test_scales: list = field(default_factory=lambda: [224, 256, 300, 360, 448, 560])  # the multi scheme's
    # test time (changeable for a trained model: tools/test_classifier.py --views / --average):
    test_views: str = "full"  # the view scheme tools/test_classifier.py uses unless --views says otherwise
    average: str = "softmax"  # how a scheme's views combine: softmax (mean probability, the paper) | logits


@dataclass
class Config:
    classes: Optional[list] = None  # None: taken from the dataset's annotations
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    spp: SPPConfig = field(default_factory=SPPConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BBoxConfig = field(default_factory=BBoxConfig)
    test: TestConfig = field(default_factory=TestConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or one of several types: the first that fits
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for a in args[:-1]:
            try:
                return _check_value(value, a, key)
            except ConfigError:
                pass
        return _check_value(value, args[-1], key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for k, v in data.items():
        key = prefix + str(k)
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _check_value(v, hints[k], key))


def set_value(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    data: Any = value
    for p in reversed(parts):
        data = {p: data}
    _apply(cfg, data)


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=VALUE' -> ('a.b', yaml-parsed VALUE)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse value ({e})") from e
    return key.strip(), value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a plain mapping, with its `_base_` chain merged in."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" + (f" (the _base_ of {_seen[-1]})" if _seen else ""))
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: _base_ chain loops back to itself ({' -> '.join(str(s) for s in _seen)})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: _base_ must be one file name (relative to {p.parent}), got {base!r}")
    return _merge(read_config_file(p.parent / base, _seen + (p.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Optional[dict] = None) -> Config:
    """The dataclass defaults, then `base` ({dotted key: value}: a task's own defaults, such as
    detector.classification.defaults.CLASSIFICATION_DEFAULTS), then the file, then the overrides."""
    cfg = Config()
    for k, v in (base or {}).items():
        set_value(cfg, k, v)
    if path is not None:
        data = read_config_file(path)
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    for item in overrides or []:
        k, v = parse_override(item)
        set_value(cfg, k, v)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


# (section, key) of the settings that only change how fast or where work runs, never its
# result: left out of every digest that decides whether a stage, a cache or a checkpoint
# can be reused (detection's stages and the classifier's checkpoint alike).
RESULT_NEUTRAL = (("proposals", "workers"), ("features", "device"), ("features", "ram_cache_mb"),
                  ("finetune", "checkpoint_every"), ("classifier", "checkpoint_every"), ("rpn", "checkpoint_every"),
                  ("backbone", "download"))


def result_settings(cfg: "Config") -> dict:
    """The config as a dict without the RESULT_NEUTRAL settings."""
    d = cfg.to_dict()
    for section, key in RESULT_NEUTRAL:
        d[section].pop(key, None)
    return d


BACKBONE_NAMES = ("efficientnet_lite0", "zf5", "alexnet", "vgg16", "resnet50")  # detector.core.backbones.BACKBONES


def box_layer_trained(cfg: "Config") -> bool:
    """Whether fine-tuning also trains the box layer (bbox.method: finetune, Fast R-CNN's), whose
    regressors then read fc7: what the training stages and a loaded model both ask."""
    return bool(cfg.bbox.enabled and cfg.bbox.method == "finetune" and cfg.finetune.enabled)


def regression_reference(cfg: "Config") -> str:
    """What the box regressors' deltas are relative to: bbox.reference for the ridge regressors;
    always the proposal for the box layer, which learns from the proposals like Fast R-CNN's."""
    return "proposal" if box_layer_trained(cfg) else cfg.bbox.reference


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _ints(values, minimum: int) -> bool:
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values)


def validate(cfg: Config) -> None:
    """Every rule that involves a value's range or several keys; raises ConfigError."""
    b, f, p, ft, s, bb, t = cfg.backbone, cfg.features, cfg.proposals, cfg.finetune, cfg.svm, cfg.bbox, cfg.test
    _check(b.name in BACKBONE_NAMES, f"backbone.name must be one of {', '.join(BACKBONE_NAMES)}, got {b.name!r}")
    _check(b.cut in ("stride16", "stride32"), f"backbone.cut must be stride16 or stride32, got {b.cut!r}")
    _check(_ints(f.scales, 32), f"features.scales must be a non-empty list of integers >= 32, got {f.scales}")
    _check(f.scale_rule in ("paper", "code"), f"features.scale_rule must be 'paper' or 'code', "
                                              f"got {f.scale_rule!r}")
    _check(f.max_size >= max(f.scales), f"features.max_size ({f.max_size}) is below the largest scale "
                                        f"({max(f.scales)})")
    _check(f.cache_dtype in ("float16", "float32"), f"features.cache_dtype must be float16 or float32, "
                                                    f"got {f.cache_dtype!r}")
    _check(f.ram_cache_mb >= 0, f"features.ram_cache_mb must be >= 0, got {f.ram_cache_mb}")
    _check(f.max_upscale >= 0 and p.max_upscale >= 0, "features.max_upscale and proposals.max_upscale must be >= 0 "
                                                       "(0: no cap)")
    _check(f.device in ("auto", "cpu", "cuda") or f.device.startswith("cuda:"),
           f"features.device must be auto, cpu, cuda or cuda:N, got {f.device!r}")
    _check(p.method in ("selective_search", "rpn"), f"proposals.method must be selective_search or rpn, "
                                                    f"got {p.method!r}")
    _check(p.mode in ("fast", "quality", "single"), f"proposals.mode must be fast, quality or single, got {p.mode!r}")
    validate_rpn(cfg.rpn)
    _check(p.workers >= 0, f"proposals.workers must be >= 0 (0: every usable core), got {p.workers}")
    _check(p.top_k >= 0 and p.resize >= 0 and p.min_size >= 0 and p.base_k > 0 and p.inc_k >= 0 and p.sigma >= 0,
           "proposals: top_k, resize, min_size, inc_k and sigma must be >= 0 and base_k > 0")
    _check(_ints(cfg.spp.levels, 1), f"spp.levels must be positive integers, got {cfg.spp.levels}")
    _check(cfg.spp.projection in ("code", "paper"), f"spp.projection must be 'code' or 'paper', "
                                                    f"got {cfg.spp.projection!r}")
    _check(len(ft.fc_dims) == 2 and _ints(ft.fc_dims, 1),
           f"finetune.fc_dims must list two sizes (fc6, fc7), got {ft.fc_dims}")
    _check(0 <= ft.dropout < 1, f"finetune.dropout must be in [0, 1), got {ft.dropout}")
    _check(ft.iterations >= 0 and ft.batch_size >= 2 and ft.checkpoint_every >= 1 and ft.lr > 0,
           "finetune: iterations >= 0, batch_size >= 2, checkpoint_every >= 1 and lr > 0 are needed")
    _check(0 < ft.fg_fraction <= 1, f"finetune.fg_fraction must be in (0, 1], got {ft.fg_fraction}")
    _check(0 <= ft.bg_iou_lo < ft.fg_iou <= 1, f"finetune: need 0 <= bg_iou_lo < fg_iou <= 1, got "
                                               f"{ft.bg_iou_lo} and {ft.fg_iou}")
    _check(all(isinstance(v, int) for v in ft.lr_steps), f"finetune.lr_steps must be integers, got {ft.lr_steps}")
    _check(isinstance(ft.trunk_trainable_blocks, int) and ft.trunk_trainable_blocks >= 0 and ft.trunk_lr_mult >= 0,
           f"finetune.trunk_trainable_blocks must be >= 0 (0: frozen trunk) and trunk_lr_mult >= 0, got "
           f"{ft.trunk_trainable_blocks} and {ft.trunk_lr_mult}")
    _check(isinstance(ft.images_per_batch, int) and 1 <= ft.images_per_batch <= ft.batch_size,
           f"finetune.images_per_batch must be in [1, batch_size], got {ft.images_per_batch}")
    _check(ft.trunk_trainable_blocks == 0 or ft.enabled,
           "finetune.trunk_trainable_blocks trains the last blocks with the fc layers: it needs finetune.enabled=true")
    _check(s.layer in ("fc7", "fc6", "pool5"), f"svm.layer must be fc7, fc6 or pool5, got {s.layer!r}")
    _check(ft.enabled or s.layer == "pool5", "finetune.enabled=false needs svm.layer=pool5 "
                                             "(without fine-tuning there are no fc layers to read)")
    _check(s.calibration_folds >= 2, f"svm.calibration_folds must be >= 2, got {s.calibration_folds}")
    _check(s.C > 0 and s.target_norm > 0 and s.norm_images >= 1 and s.norm_boxes >= 1 and s.max_iter >= 1,
           "svm: C, target_norm, norm_images, norm_boxes and max_iter must be positive")
    _check(0 < bb.iou_thresh < 1 and bb.lam > 0, f"bbox: need 0 < iou_thresh < 1 and lam > 0, "
                                                 f"got {bb.iou_thresh} and {bb.lam}")
    _check(bb.method in ("ridge", "finetune"), f"bbox.method must be ridge or finetune, got {bb.method!r}")
    _check(bb.method == "ridge" or not bb.enabled or ft.enabled,
           "bbox.method=finetune trains the box layer with the fc layers: it needs finetune.enabled=true")
    _check(bb.loss_weight > 0, f"bbox.loss_weight must be > 0, got {bb.loss_weight}")
    _check(bb.reference in ("proposal", "window"), f"bbox.reference must be proposal or window, got {bb.reference!r}")
    _check(0 < t.nms_iou <= 1, f"test.nms_iou must be in (0, 1], got {t.nms_iou}")
    thr = t.score_thresh
    values = thr if isinstance(thr, list) else list(thr.values()) if isinstance(thr, dict) else [thr]
    _check(bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
           and (not isinstance(thr, dict) or all(isinstance(k, str) for k in thr)),
           f"test.score_thresh must be a number, a list of numbers (one per class) or a mapping "
           f"{{class name: number}}, got {thr!r}")
    _check(t.max_per_image >= 1, f"test.max_per_image must be >= 1, got {t.max_per_image}")
    _check(t.bbox_iterations >= 1, f"test.bbox_iterations must be >= 1, got {t.bbox_iterations}")
    _check(t.soft_nms_sigma >= 0, f"test.soft_nms_sigma must be >= 0 (0: plain NMS), got {t.soft_nms_sigma}")
    _check(0 <= t.box_voting_iou <= 1, f"test.box_voting_iou must be in [0, 1] (0: off), got {t.box_voting_iou}")
    _check(t.scorer in ("svm", "softmax"), f"test.scorer must be svm or softmax, got {t.scorer!r}")
    _check(t.scorer == "svm" or ft.enabled, "test.scorer=softmax needs the fine-tuned fc8 (finetune.enabled=true)")
    if cfg.classes is not None:
        _check(all(isinstance(c, str) and c for c in cfg.classes) and len(set(cfg.classes)) == len(cfg.classes),
               f"classes must be distinct non-empty names, got {cfg.classes}")
    validate_classifier(cfg.classifier)


def validate_rpn(r: RPNConfig) -> None:
    _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for v in r.anchor_sizes + r.anchor_ratios),
           f"rpn.anchor_sizes and rpn.anchor_ratios must be positive numbers ([]: derived), got {r.anchor_sizes} "
           f"and {r.anchor_ratios}")
    _check(r.iterations >= 0 and r.images_per_batch >= 1 and r.anchors_per_image >= 1 and r.lr > 0
           and r.checkpoint_every >= 1, "rpn: iterations >= 0, images_per_batch >= 1, anchors_per_image >= 1, "
                                        "lr > 0 and checkpoint_every >= 1 are needed")
    _check(0 <= r.bg_iou <= r.fg_iou <= 1, f"rpn: need 0 <= bg_iou <= fg_iou <= 1, got {r.bg_iou}, {r.fg_iou}")
    _check(0 < r.positive_fraction <= 1, f"rpn.positive_fraction must be in (0, 1], got {r.positive_fraction}")
    _check(all(isinstance(v, int) for v in r.lr_steps), f"rpn.lr_steps must be integers, got {r.lr_steps}")
    _check(r.train_top_n >= 1 and r.pre_nms_top_n >= 1 and r.post_nms_top_n >= 1 and 0 < r.nms_iou <= 1
           and r.min_size >= 0, "rpn: train_top_n, pre_nms_top_n and post_nms_top_n >= 1, nms_iou in (0, 1] and "
                                "min_size >= 0 are needed")


CLASSIFIER_INPUTS = ("crop224", "full", "multisize", "scales")
CLASSIFIER_VIEWS = ("center", "full", "10", "10crop", "multi")  # detector.classification.views.SCHEMES


def validate_classifier(c: ClassifierConfig) -> None:
    # No rule against features.max_size: a scale it caps gives a smaller image, and views clip to it.
    _check(c.input in CLASSIFIER_INPUTS, f"classifier.input must be one of {', '.join(CLASSIFIER_INPUTS)}, "
                                         f"got {c.input!r}")
    _check(c.input != "scales" or c.trunk_trainable_blocks == 0,
           "classifier.input=scales trains on the cached pool5 of every test view: it needs a frozen trunk "
           "(classifier.trunk_trainable_blocks=0)")
    _check(len(c.fc_dims) == 2 and _ints(c.fc_dims, 1), f"classifier.fc_dims must list two sizes (fc6, fc7), "
                                                         f"got {c.fc_dims}")
    _check(0 <= c.dropout < 1, f"classifier.dropout must be in [0, 1), got {c.dropout}")
    _check(_ints([c.view_size, c.view_scale, c.full_scale], 32),
           "classifier: view_size, view_scale and full_scale must be integers >= 32")
    _check(c.view_size <= c.view_scale, f"classifier.view_size ({c.view_size}) must fit in view_scale "
                                        f"({c.view_scale}): views are cut from the image resized to it")
    _check(c.crop_positions in ("corners5", "grid9"), f"classifier.crop_positions must be corners5 or grid9, "
                                                      f"got {c.crop_positions!r}")
    _check(_ints(c.sizes, 32) and len(set(c.sizes)) == len(c.sizes) >= 2,
           f"classifier.sizes must list two or more distinct integers >= 32, got {c.sizes}")
    _check(c.size_schedule in ("alternate", "random"), f"classifier.size_schedule must be alternate or random, "
                                                       f"got {c.size_schedule!r}")
    _check(c.epochs >= 1 and c.batch_size >= 2 and c.checkpoint_every >= 1 and c.lr > 0 and c.trunk_lr_mult >= 0,
           "classifier: epochs >= 1, batch_size >= 2, checkpoint_every >= 1, lr > 0 and trunk_lr_mult >= 0 "
           "are needed")
    _check(all(isinstance(v, int) and not isinstance(v, bool) for v in c.lr_steps),
           f"classifier.lr_steps must be integers (epochs), got {c.lr_steps}")
    _check(c.momentum >= 0 and c.weight_decay >= 0 and c.target_norm > 0,
           "classifier: momentum and weight_decay must be >= 0 and target_norm > 0")
    _check(isinstance(c.trunk_trainable_blocks, int) and c.trunk_trainable_blocks >= 0,
           f"classifier.trunk_trainable_blocks must be >= 0 (0: frozen trunk), got {c.trunk_trainable_blocks}")
    _check(_ints(c.test_scales, 32), f"classifier.test_scales must be a non-empty list of integers >= 32, "
                                     f"got {c.test_scales}")
    _check(c.test_views in CLASSIFIER_VIEWS, f"classifier.test_views must be one of {', '.join(CLASSIFIER_VIEWS)}, "
                                             f"got {c.test_views!r}")
    _check(c.average in ("softmax", "logits"), f"classifier.average must be softmax or logits, got {c.average!r}")


# Settings a trained model may change (--set in test_voc.py, detect.py): test.* and the learned
# proposals' test-time settings; everything else (scales, backbone, SVM layer...) is fixed by training.
TEST_TIME_RPN_KEYS = ("pre_nms_top_n", "nms_iou", "min_size", "post_nms_top_n")


def test_time_keys() -> list[str]:
    return ["test." + f.name for f in dataclasses.fields(TestConfig)] + ["rpn." + k for k in TEST_TIME_RPN_KEYS]


def apply_test_overrides(cfg: Config, items: list[str] | None) -> None:
    """--set for tools that run a trained model: only test-time keys (`test_time_keys`)."""
    for item in items or []:
        k, v = parse_override(item)
        if k not in test_time_keys():
            raise ConfigError(f"override '{item}': only test-time keys can change for a trained model "
                              f"(valid: {', '.join(test_time_keys())})")
        set_value(cfg, k, v)
    validate(cfg)


def add_config_args(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set features.scales=[480,688] svm.C=0.01")
