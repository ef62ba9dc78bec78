"""The model file: safetensors whose header carries the kind, version, config and class names.

Both trained models (the detector and the classifier) are stored this way.  Loading only
parses JSON and copies tensor bytes (safetensors): nothing is unpickled or executed.  A file
is checked completely before anything is built from it: the header and its schema, the
embedded config (through the config validator), and every tensor's presence, dtype and
shape against what the config and the class count imply.  Any failure is one
`ModelFormatError` naming the file and the first problem.

Writing is byte-reproducible: safetensors' writer emits its metadata in hash-map order, so
the header is re-serialised with sorted keys (same tensors, same data offsets) and padded
to 8 bytes; the same training twice gives the same file, byte for byte.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from detector.cache import atomic_write_bytes
from detector.config import Config, ConfigError, config_from_dict
from detector.errors import ModelFormatError

KINDS = {"sppnet-detector": "a detector (tools/test_voc.py, tools/detect.py, detector.load)",
         "sppnet-classifier": "a classifier (tools/test_classifier.py, detector.load_classifier)"}
# Config keys that older toolkit versions wrote and that no longer exist (dropped on load).
REMOVED_KEYS = (("features", "batch_images"),)
_MAX_HEADER = 100 * 1024 * 1024


def write_model_file(path: Union[str, Path], kind: str, version: int, meta: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors and metadata (values are JSON-encoded here) atomically, byte-reproducibly."""
    from safetensors.torch import save as st_save

    strings = {"format": kind, "version": str(version), **{k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=strings)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + blob[8 + n:])


def _fail(path: Path, what: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {what}")


def read_model_file(path: Union[str, Path], kind: str, version: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with its JSON values decoded, tensors) of a model file of `kind`, or ModelFormatError."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ModelFormatError(f"{path} is a folder, not a model file (a run folder holds model.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or struct.unpack("<Q", head)[0] > min(_MAX_HEADER, path.stat().st_size):
            raise ValueError("the header size is not plausible")
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports damage with several exception types
        raise _fail(path, f"not a readable model file ({type(e).__name__}: {e})") from None
    found = raw.get("format")
    if found != kind:
        if found in KINDS:
            raise _fail(path, f"this is {KINDS[found]}, not {KINDS[kind]}; give it to the matching tool")
        raise _fail(path, f"not a model file of this toolkit (format {found!r}, expected {kind!r})")
    if raw.get("version") != str(version):
        raise _fail(path, f"model format version {raw.get('version')}, this toolkit reads version {version}; "
                          "retrain or use a matching toolkit version")
    meta = {}
    for k, v in raw.items():
        if k in ("format", "version"):
            continue
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError) as e:
            raise _fail(path, f"header entry {k!r} is damaged (not JSON: {e})") from None
    return meta, tensors


def require(path: Path, meta: Mapping, key: str, types, what: str = "") -> Any:
    """meta[key], checked to be of `types`; else a ModelFormatError naming the key."""
    if key not in meta:
        raise _fail(path, f"header entry {key!r} is missing")
    value = meta[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise _fail(path, f"header entry {key!r} should be {what or types.__name__}, got {type(value).__name__}")
    return value


def read_config(path: Path, meta: Mapping) -> Config:
    """The embedded config, validated; its errors name the model file."""
    data = require(path, meta, "config", dict, "a mapping of config sections")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, key in REMOVED_KEYS:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise _fail(path, f"its embedded config is invalid ({e})") from None


def read_class_names(path: Path, meta: Mapping) -> list[str]:
    names = require(path, meta, "class_names", list, "a list of class names")
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise _fail(path, "header entry 'class_names' must be distinct non-empty names")
    return names


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> None:
    """Every expected tensor present with its (shape, dtype), and nothing else."""
    for name, (shape, dtype) in expected.items():
        t = tensors.get(name)
        if t is None:
            raise _fail(path, f"tensor {name!r} is missing")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise _fail(path, f"tensor {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}, expected "
                              f"{tuple(shape)} and {dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _fail(path, f"unexpected tensor {extra[0]!r}{more}")


def expected_state(prefix: str, module: torch.nn.Module) -> dict[str, tuple]:
    """(shape, dtype) of every tensor of a module's state dict, under `prefix`."""
    return {prefix + k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def positive_scalar(path: Path, tensors: Mapping[str, torch.Tensor], name: str) -> float:
    v = float(tensors[name].reshape(-1)[0])
    if not (v > 0 and v < float("inf")):
        raise _fail(path, f"tensor {name!r} must be a positive finite number, got {v}")
    return v


def model_meta(cfg: Config, class_names, backbone, head) -> dict:
    """The header entries both model kinds write: config, class names, the trunk and its
    geometry, the fc head's sizes."""
    return {"config": cfg.to_dict(), "class_names": list(class_names),
            "backbone": {"name": backbone.name, "weights_id": backbone.weights_id, **backbone.geometry()},
            "head": None if head is None else {"in_dim": head.in_dim, "fc_dims": head.fc_dims}}


def read_model(path: Union[str, Path], kind: str, version: int) -> tuple[dict, dict, Config, list[str], dict]:
    """(metadata, tensors, config, class names, the 'backbone' entry) of a model file of `kind`,
    each checked; the caller then checks the tensors against what the config implies."""
    path = Path(path)
    meta, tensors = read_model_file(path, kind, version)
    return (meta, tensors, read_config(path, meta), read_class_names(path, meta),
            require(path, meta, "backbone", dict, "a mapping"))


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load the (already checked) tensors under `prefix` into a module."""
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def load_trunk(path: Path, bmeta: Mapping, backbone, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the header's backbone geometry against the built trunk, then load the `trunk.*`
    tensors (already checked by `check_tensors`) into it."""
    if bmeta.get("weights_id") is not None and not isinstance(bmeta.get("weights_id"), str):
        raise _fail(path, "header entry 'backbone' has a weights_id that is not a string")
    geometry = {k: bmeta.get(k) for k in ("stride", "offset", "channels")}
    if geometry != {"stride": backbone.stride, "offset": backbone.offset, "channels": backbone.channels}:
        raise _fail(path, f"backbone geometry {geometry} differs from the {backbone.name} trunk's "
                          f"({backbone.stride}, {backbone.offset}, {backbone.channels})")
    load_module("trunk.", backbone.trunk, tensors)
    backbone.weights_id = bmeta.get("weights_id") or "saved"
