"""The model file: complete validation, a seeded fuzz over damaged files, byte-reproducible
writes, and files that follow the umask."""
import hashlib
import json
import os
import shutil
import stat
import struct

from pathlib import Path

import numpy as np
import pytest

from detector.errors import InputError, ModelFormatError

ROOT = Path(__file__).resolve().parents[1]


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _edit_meta(blob: bytes, fn) -> bytes:
    header, data = _split(blob)
    fn(header["__metadata__"])
    return _join(header, data)


def _edit_config(blob: bytes, fn) -> bytes:
    def edit(meta):
        cfg = json.loads(meta["config"])
        fn(cfg)
        meta["config"] = json.dumps(cfg)
    return _edit_meta(blob, edit)


def _tensor_names(header: dict) -> list:
    return sorted(k for k in header if k != "__metadata__")


def mutations(blob: bytes, seed: int = 0):
    """(name, damaged bytes) pairs: at least 200, seeded."""
    rng = np.random.default_rng(seed)
    header, data = _split(blob)
    hlen = 8 + struct.unpack("<Q", blob[:8])[0]
    names = _tensor_names(header)

    def flip(pos):
        b = bytearray(blob)
        b[pos] ^= 1 << int(rng.integers(8))
        return bytes(b)

    for i in range(60):
        yield f"header bit flip {i}", flip(int(rng.integers(hlen)))
    for i in range(30):
        yield f"data bit flip {i}", flip(int(rng.integers(hlen, len(blob))))
    for i in range(30):
        yield f"truncation {i}", blob[: int(rng.integers(len(blob)))]
    for key in ("config", "class_names", "backbone", "format", "version"):
        yield f"missing {key}", _edit_meta(blob, lambda m, k=key: m.pop(k))
        yield f"{key} of the wrong type", _edit_meta(blob, lambda m, k=key: m.__setitem__(k, "42"))
        yield f"{key} not JSON", _edit_meta(blob, lambda m, k=key: m.__setitem__(k, m[k][:-1] if m[k] else "{"))
    for i in range(20):
        cut = int(rng.integers(1, 400))
        yield f"config cut short {i}", _edit_meta(blob, lambda m, c=cut: m.__setitem__("config", m["config"][:c]))
    config_edits = [
        ("unknown key", lambda c: c["proposals"].__setitem__("methoe", "x")),
        ("bad levels", lambda c: c["spp"].__setitem__("levels", "x")),
        ("empty scales", lambda c: c["features"].__setitem__("scales", [])),
        ("huge fc dims", lambda c: c["finetune"].__setitem__("fc_dims", [10 ** 9, 10 ** 9])),
        ("other levels", lambda c: c["spp"].__setitem__("levels", [1, 2])),
        ("other backbone", lambda c: c["backbone"].__setitem__("name", "zf5")),
        ("unknown backbone", lambda c: c["backbone"].__setitem__("name", "zf6")),
        ("section not a mapping", lambda c: c.__setitem__("svm", 3)),
        ("no fine-tuning", lambda c: c["finetune"].__setitem__("enabled", False)),
        ("pool5 svm", lambda c: c["svm"].__setitem__("layer", "pool5")),
        ("device cuda", lambda c: c["features"].__setitem__("device", "cuda")),
        ("thresholds for unknown classes", lambda c: c["test"].__setitem__("score_thresh", {"zebra": 1.0})),
    ]
    for what, fn in config_edits:
        yield f"config: {what}", _edit_config(blob, fn)
    yield "one class more", _edit_meta(blob, lambda m: m.__setitem__("class_names", json.dumps(
        json.loads(m["class_names"]) + ["extra"])))
    yield "one class less", _edit_meta(blob, lambda m: m.__setitem__("class_names", json.dumps(
        json.loads(m["class_names"])[:-1])))
    yield "duplicate class", _edit_meta(blob, lambda m: m.__setitem__("class_names", json.dumps(["a", "a", "b", "c"])))
    yield "other kind", _edit_meta(blob, lambda m: m.__setitem__("format", "sppnet-classifier"))
    yield "geometry", _edit_meta(blob, lambda m: m.__setitem__("backbone", json.dumps({"stride": 8})))
    for i in range(25):
        name = names[int(rng.integers(len(names)))]
        h = json.loads(json.dumps(header))
        shape = h[name]["shape"]
        if len(shape) >= 2:
            h[name]["shape"] = shape[::-1]
        else:
            h[name]["shape"] = shape + [1]
        yield f"shape swap {name}", _join(h, data)
    for i in range(25):
        name = names[int(rng.integers(len(names)))]
        h = json.loads(json.dumps(header))
        h[name + "_renamed" if i % 2 else name.replace(".", "_", 1)] = h.pop(name)
        yield f"renamed {name}", _join(h, data)
    for i in range(6):
        name = names[int(rng.integers(len(names)))]
        h = json.loads(json.dumps(header))
        h[name]["dtype"] = "F16" if h[name]["dtype"] != "F16" else "F32"
        yield f"dtype {name}", _join(h, data)


def test_damaged_model_files_load_or_raise_an_input_error(pristine_model, tmp_path):
    import detector

    blob = pristine_model.read_bytes()
    cases = list(mutations(blob))
    assert len(cases) >= 200
    outcomes = {"loaded": 0, "refused": 0}
    for i, (what, damaged) in enumerate(cases):
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(damaged)
        try:
            detector.load(p)
            outcomes["loaded"] += 1
        except InputError as e:
            assert str(p) in str(e), (what, str(e))  # the message names the file
            outcomes["refused"] += 1
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        p.unlink()
    assert outcomes["refused"] > 150 and outcomes["loaded"] >= 1, outcomes


def rpn_mutations(blob: bytes, seed: int = 1):
    """The damage that only a model with learned proposals can have: its 'rpn' header entry and
    its rpn.* tensors (the generic mutations above cover them too, by chance)."""
    rng = np.random.default_rng(seed)
    header, data = _split(blob)
    names = [n for n in _tensor_names(header) if n.startswith("rpn.")]
    assert len(names) == 6

    def rpn_edit(fn):
        def edit(m):
            h = json.loads(m["rpn"])
            fn(h)
            m["rpn"] = json.dumps(h)
        return _edit_meta(blob, edit)

    yield "rpn header missing", _edit_meta(blob, lambda m: m.pop("rpn"))
    yield "rpn header not JSON", _edit_meta(blob, lambda m: m.__setitem__("rpn", m["rpn"][:-2]))
    yield "rpn header a list", _edit_meta(blob, lambda m: m.__setitem__("rpn", "[1, 2]"))
    for key in ("format", "in_channels", "anchors", "settings"):
        yield f"rpn header without {key}", rpn_edit(lambda h, k=key: h.pop(k))
        yield f"rpn header {key} a string", rpn_edit(lambda h, k=key: h.__setitem__(k, "x"))
    yield "rpn anchors: one size more", rpn_edit(lambda h: h["anchors"]["sizes"].append(999.0))
    yield "rpn anchors: no ratios", rpn_edit(lambda h: h["anchors"].__setitem__("ratios", []))
    yield "rpn anchors: negative size", rpn_edit(lambda h: h["anchors"]["sizes"].__setitem__(0, -4.0))
    yield "rpn in_channels", rpn_edit(lambda h: h.__setitem__("in_channels", 7))
    yield "rpn settings: nms 3", rpn_edit(lambda h: h["settings"].__setitem__("nms_iou", 3.0))
    yield "method selective_search", _edit_config(blob, lambda c: c["proposals"].__setitem__("method",
                                                                                                "selective_search"))
    for name in names:
        h = json.loads(json.dumps(header))
        h.pop(name)
        yield f"without {name}", _join(h, data)
        h = json.loads(json.dumps(header))
        h[name]["shape"] = h[name]["shape"][::-1] if len(h[name]["shape"]) > 1 else h[name]["shape"] + [1]
        yield f"shape swap {name}", _join(h, data)
    for i in range(20):
        name = names[int(rng.integers(len(names)))]
        start, end = header[name]["data_offsets"]
        hlen = 8 + struct.unpack("<Q", blob[:8])[0]
        b = bytearray(blob)
        b[hlen + int(rng.integers(start, end))] = 0xFF  # NaN or a wild value in the head's weights
        yield f"rpn data {name} {i}", bytes(b)


def test_damaged_rpn_model_files_load_or_raise_an_input_error(rpn_run, tmp_path):
    import detector

    _, _, model_path = rpn_run
    blob = model_path.read_bytes()
    assert detector.load(model_path).learned_proposals
    cases = list(mutations(blob, seed=3)) + list(rpn_mutations(blob))
    outcomes = {"loaded": 0, "refused": 0}
    for i, (what, damaged) in enumerate(cases):
        p = tmp_path / f"r{i}.safetensors"
        p.write_bytes(damaged)
        try:
            model = detector.load(p)
            outcomes["loaded"] += 1
            assert model.learned_proposals == (model.cfg.proposals.method == "rpn")
        except InputError as e:
            assert str(p) in str(e) and "\n" not in str(e), (what, str(e))  # one line, naming the file
            outcomes["refused"] += 1
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        p.unlink()
    assert outcomes["refused"] > 200, outcomes


@pytest.mark.parametrize("what,edit,message", [
    ("header flip", lambda b: b[:8] + b"[" + b[9:], "not a readable model file"),
    ("config unknown key", lambda b: _edit_config(b, lambda c: c["proposals"].__setitem__("methoe", 1)),
     "embedded config is invalid.*proposals.methoe"),
    ("class names", lambda b: _edit_meta(b, lambda m: m.__setitem__("class_names", json.dumps(["a", "b"]))),
     "tensor 'head.fc8.weight' has shape"),
    ("no config", lambda b: _edit_meta(b, lambda m: m.pop("config")), "header entry 'config' is missing"),
    ("config cut", lambda b: _edit_meta(b, lambda m: m.__setitem__("config", m["config"][:30])),
     "header entry 'config' is damaged"),
    ("classifier", lambda b: _edit_meta(b, lambda m: m.__setitem__("format", "sppnet-classifier")),
     "this is a classifier"),
])
def test_each_kind_of_damage_names_the_file_and_the_problem(pristine_model, tmp_path, what, edit, message):
    import detector

    p = tmp_path / "damaged.safetensors"
    p.write_bytes(edit(pristine_model.read_bytes()))
    with pytest.raises(ModelFormatError, match=message) as e:
        detector.load(p)
    assert str(e.value).startswith(str(p))


def test_same_training_twice_gives_the_same_file_bytes(smoke_run, tmp_path):
    from detector.config import load_config
    from detector.detection.train.pipeline import train

    tmp, data, _ = smoke_run
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    digests = []
    for name in ("a", "b"):
        path = train(str(data), str(tmp_path / name), cfg, cache_root=str(tmp / "cache"), progress=False)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    header, _ = _split((tmp_path / "a" / "model.safetensors").read_bytes())
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert "time" not in json.dumps(header["__metadata__"]).lower()


def test_written_files_follow_the_umask(smoke_run, tmp_path):
    """Models, caches, result files and pictures: 0644 under umask 022 (mkstemp alone gives 0600)."""
    import detector
    from detector.cache import atomic_save_npz, atomic_write_json
    from detector.metrics.result_files import write_voc_results
    from detector.detection.visualize import save_detections

    tmp, data, model_path = smoke_run
    old = os.umask(0o022)
    try:
        model = detector.load(model_path)
        model.save(tmp_path / "m.safetensors")
        atomic_save_npz(tmp_path / "c.npz", x=np.zeros(3))
        atomic_write_json(tmp_path / "s.json", {"a": 1})
        write_voc_results(tmp_path / "res", "test", model.class_names, ["x"], [np.zeros((0, 4))],
                          [np.zeros(0, np.int64)], [np.zeros(0)])
        image = sorted((data / "JPEGImages").glob("*.jpg"))[0]
        save_detections(image, model.detect(image), tmp_path / "vis" / "x.png")
        files = [tmp_path / "m.safetensors", tmp_path / "c.npz", tmp_path / "s.json", tmp_path / "vis" / "x.png",
                 *sorted((tmp_path / "res").iterdir())]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    # caches written by training follow it too
    for f in list((tmp / "cache").rglob("*.npz"))[:20]:
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f


def test_a_folder_or_a_copy_of_a_run_folder_is_refused_clearly(smoke_run, tmp_path):
    import detector

    with pytest.raises(ModelFormatError, match="is a folder"):
        detector.load(tmp_path)
    shutil.copy(smoke_run[2], tmp_path / "copy.safetensors")
    assert detector.load(tmp_path / "copy.safetensors").class_names
