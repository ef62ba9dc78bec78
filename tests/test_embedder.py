"""WindowEmbedder: boxes -> scaled pool5 -> classifier features, and the one norm estimate."""
import warnings

import numpy as np
import pytest
import torch

from detector.core.backbones import zf5
from detector.core.embedder import WindowEmbedder, norm_scale
from detector.core.features import FeatureExtractor
from detector.core.heads import FCHead
from detector.core.projection import project_boxes
from detector.core.spp import spatial_pyramid_pool


@pytest.fixture(scope="module")
def scene():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = zf5(random_init=True)
    img = np.random.default_rng(3).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    return bb, FeatureExtractor(bb, [160, 320], device="cpu")(img)


def test_pool5_projects_pools_at_the_chosen_scale_and_scales(scene):
    bb, sfs = scene
    emb = WindowEmbedder(bb, pool5_scale=2.5)
    boxes = np.array([[0, 0, 240, 200], [10, 20, 40, 60], [100, 50, 230, 190]], float)
    forced = np.array([1, 0, 1])
    got = emb.pool5(sfs, boxes, scale_index=forced)
    for k, (b, s) in enumerate(zip(boxes, forced)):
        sf = sfs[s]
        cell = project_boxes(b[None], sf.factor, bb.stride, bb.offset, sf.map_size)
        assert torch.equal(got[k], spatial_pyramid_pool(sf.features, torch.from_numpy(cell))[0] * 2.5)
    with pytest.raises(ValueError, match="outside"):
        emb.pool5(sfs, np.array([[0, 0, 300, 10]], float))


def test_pool5_unique_pools_each_distinct_window_once(scene):
    bb, sfs = scene
    emb = WindowEmbedder(bb, pool5_scale=0.5)
    rng = np.random.default_rng(5)
    xy = rng.uniform(2, 150, (60, 2))
    base = np.concatenate([xy, xy + rng.uniform(8, 45, (60, 2))], axis=1)
    # boxes a pixel or two apart mostly share their cells at stride 16
    boxes = np.concatenate([base, base + rng.uniform(-2, 2, base.shape)])
    full = emb.pool5(sfs, boxes)
    distinct, row = emb.pool5_unique(sfs, boxes)
    assert len(distinct) < len(boxes) and row.shape == (len(boxes),)
    assert torch.equal(distinct[torch.from_numpy(row)], full)
    assert len(torch.unique(distinct, dim=0)) == len(distinct)


@pytest.mark.parametrize("layer", ["fc6", "fc7", "pool5"])
def test_embed_reads_the_chosen_layer_after_relu_and_scales_it(scene, layer):
    bb, _ = scene
    torch.manual_seed(0)
    d = WindowEmbedder(bb).pool5_dim
    head = FCHead(d, [32, 16], 3).eval()
    emb = WindowEmbedder(bb, head=head, layer=layer, feature_scale=3.0)
    x = torch.randn(7, d)
    keep = x.clone()
    h6 = torch.relu(x @ head.fc6.weight.T + head.fc6.bias)
    ref = {"fc6": h6, "fc7": torch.relu(h6 @ head.fc7.weight.T + head.fc7.bias), "pool5": x}[layer] * 3.0
    got = emb.embed(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got.shape[1] == emb.feature_dim
    assert torch.equal(x, keep)  # pool5 is left as it was (detect() regresses boxes from it)


def test_without_a_head_the_embedder_reads_pool5(scene):
    bb, _ = scene
    emb = WindowEmbedder(bb, head=None, layer="fc7")
    assert emb.layer == "pool5" and emb.feature_dim == 256 * 50


def test_norm_scale_gives_the_target_mean_norm_and_refuses_bad_samples():
    x = np.random.default_rng(0).normal(size=(500, 37)) * 7.3
    s = norm_scale(x, 20.0)
    norms = [np.sqrt(sum(float(v) ** 2 for v in row)) for row in s * x]  # naive norms
    assert abs(np.mean(norms) - 20.0) < 1e-9
    t = torch.from_numpy(x.astype(np.float32))
    assert abs(norm_scale(t, 20.0) - s) < 1e-5 * s
    for bad, why in ((np.zeros((4, 3)), "zero"), (np.zeros((0, 3)), "non-empty"), (np.full((2, 2), np.nan), "NaN"),
                     (np.ones(3), "non-empty")):
        with pytest.raises(ValueError, match=why):
            norm_scale(bad, what="pool5")
