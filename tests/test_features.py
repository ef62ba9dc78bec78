"""Conv features once per image per scale, their cache, image conversion and box pooling."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detector.core.backbones import efficientnet_lite0
from detector.cli import parse_shard
from detector.core.feature_cache import FeatureCache, extract_all
from detector.core.features import FeatureExtractor
from detector.distributed import shard
from detector.images import list_images
from detector.errors import InputError
from detector.images import ImageError, load_image


@pytest.fixture(scope="module")
def backbone():
    return efficientnet_lite0()


def write_images(folder, n=3, size=(96, 72)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_load_image_converts_gray_rgba_16bit_palette(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 9), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (8, 9, 3) and np.array_equal(g[..., 2], rgb[..., 0])
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    g16 = load_image(tmp_path / "g16.png")
    assert g16.dtype == np.uint8 and np.array_equal(g16[..., 1], rgb[..., 0])
    assert load_image(tmp_path / "pal.png").shape == (8, 9, 3)
    assert np.array_equal(load_image(rgb.astype(np.float32) / 255.0), rgb)


def test_unreadable_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_features_per_scale_shapes_and_cap(backbone):
    img = np.random.default_rng(1).integers(0, 255, (60, 100, 3), dtype=np.uint8)
    fx = FeatureExtractor(backbone, [64, 128], max_size=150, device="cpu")
    out = fx(img)
    assert [o.scale for o in out] == [64, 128]
    assert out[0].factor == pytest.approx(64 / 60)
    assert out[1].factor == pytest.approx(150 / 100)  # capped by max_size
    for o in out:
        h, w = round(60 * o.factor), round(100 * o.factor)
        assert o.features.shape[1:] == (max(-(-h // 16), 4), max(-(-w // 16), 4))
        assert o.features.shape[0] == 112


def test_features_are_the_trunk_on_the_resized_normalised_zero_padded_image(backbone):
    import cv2
    import torch.nn.functional as F

    img = np.random.default_rng(2).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    fx = FeatureExtractor(backbone, [120], device="cpu")
    out = fx(img)[0]
    h, w = 120, 180
    x = backbone.normalize(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
    x = F.pad(x, (0, 192 - w, 0, 128 - h))  # bottom/right to a multiple of 16, zeros = the mean pixel
    with torch.no_grad():
        want = backbone.trunk(x[None])[0]
    assert torch.equal(out.features, want)
    # a size that is already a multiple of 16 gets no padding: exactly size/16 cells
    fx128 = FeatureExtractor(backbone, [128], device="cpu")
    assert fx128(np.zeros((128, 160, 3), np.uint8))[0].features.shape[1:] == (128 // 16, 160 // 16)


def test_tiny_image_is_padded_not_rejected(backbone):
    fx = FeatureExtractor(backbone, [32], device="cpu")
    out = fx(np.zeros((3, 500, 3), np.uint8))  # long thin image: capped, then padded
    # shorter side 3 -> 32 would make the longer 5333 > max_size 2000: factor 2000/500 = 4 -> 12 x 2000,
    # padded to MIN_INPUT (64) rows and a multiple of 16 columns, so 4 x 125 cells at stride 16
    assert out[0].factor == 4.0 and out[0].image_size == (500, 3)
    assert tuple(out[0].features.shape[1:]) == (64 // 16, 2000 // 16)


def test_cache_is_keyed_atomic_and_resumable(tmp_path, backbone):
    paths = write_images(tmp_path / "imgs")
    fx = FeatureExtractor(backbone, [64], device="cpu")
    cache = FeatureCache(tmp_path / "cache", fx)
    first = cache.get(paths[0])
    f = cache.file(paths[0], 64)
    assert f.exists() and np.load(f)["features"].dtype == np.float16
    assert not list(f.parent.glob("*.tmp"))
    again = FeatureCache(tmp_path / "cache", fx).get(paths[0])
    assert torch.equal(first[0].features, again[0].features)  # same values computed or cached
    # another scale set / max size: another key, never the stale file
    other = FeatureCache(tmp_path / "cache", FeatureExtractor(backbone, [64], max_size=70, device="cpu"))
    assert other.dir != cache.dir
    # changed image content: another file
    Image.fromarray(np.zeros((72, 96, 3), np.uint8)).save(paths[0])
    assert FeatureCache(tmp_path / "cache", fx).file(paths[0], 64) != f
    # a truncated cache file is recomputed, not trusted
    c2 = FeatureCache(tmp_path / "cache", fx)
    c2.get(paths[1])
    p1 = c2.file(paths[1], 64)
    p1.write_bytes(p1.read_bytes()[:50])
    with pytest.warns(UserWarning, match="unreadable"):
        assert c2.get(paths[1])[0].features.shape[0] == 112


def test_extract_all_shards_skips_bad_images_and_resumes(tmp_path, backbone):
    paths = write_images(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "zz_bad.png").write_bytes(b"not an image")
    paths = list_images(tmp_path / "imgs")
    assert len(paths) == 5
    cache = FeatureCache(tmp_path / "cache", FeatureExtractor(backbone, [48], device="cpu"))
    costs = [os.path.getsize(p) for p in paths]  # any cost: the shards split the images between them
    halves = [[paths[i] for i in shard(costs, size=2, rank=r)] for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(paths) and not set(halves[0]) & set(halves[1])
    s0 = extract_all(halves[0], cache, progress=False)
    s1 = extract_all(halves[1], cache, progress=False)
    assert s0["images"] + s1["images"] == 5
    assert s0["computed"] + s1["computed"] == 4
    assert len(s0["failed"]) + len(s1["failed"]) == 1 and "zz_bad.png" in (s0["failed"] + s1["failed"])[0][0]
    again = extract_all(paths, cache, progress=False)
    assert again["computed"] == 0 and again["cached"] == 4
    assert parse_shard("1/2") == (1, 2)
    with pytest.raises(InputError, match="i/N"):
        parse_shard("3")
    with pytest.raises(InputError, match="0 <= i < N"):
        parse_shard("2/2")
