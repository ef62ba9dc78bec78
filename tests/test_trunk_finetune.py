"""Fine-tuning the trunk's last blocks for detection (finetune.trunk_trainable_blocks): the
image-centric batch, pooling through the blocks against the whole trunk's maps, resuming, and
a training whose later stages and model file use the fine-tuned blocks."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from detector.cache import load_npz
from detector.config import Config, ConfigError, FinetuneConfig
from detector.core.backbones import Backbone, build_backbone, split_trunk
from detector.core.embedder import WindowEmbedder
from detector.core.feature_cache import FeatureCache, TailExtractor
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.core.heads import FCHead
from detector.detection.matching import match_windows
from detector.detection.train.finetune import (TrainImage, draw_image_batch, finetune, image_pool_rows, tail_pooler,
                                               window_labels, window_pools)


def make_images(n, seed=0, size=200, empty=()):
    """n images of `size` px with 4 GT boxes each, jittered copies of them and far windows;
    the images in `empty` have no foreground window at all."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(n):
        xy = rng.uniform(0, size - 60, (4, 2))
        gt = np.concatenate([xy, xy + rng.uniform(20, 55, (4, 2))], 1).astype(np.float32)
        jitter = np.repeat(gt, 6, 0) + rng.normal(0, 4, (24, 4)).astype(np.float32)
        xy2 = rng.uniform(0, size - 40, (30, 2))
        far = np.concatenate([xy2, xy2 + rng.uniform(8, 40, (30, 2))], 1).astype(np.float32)
        props = far if k in empty else np.concatenate([jitter, far])
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        props = np.clip(props, 0, size - 1)
        if k in empty:  # no GT: every window is background
            w = match_windows(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), props, 3)
        else:
            w = match_windows(gt, rng.integers(0, 3, 4), props, 3)
        images.append(TrainImage(f"img{k}", size, size, w))
    return images


def test_the_image_centric_batch_follows_fast_rcnns_hierarchical_rule():
    images = make_images(6, empty=(2,))
    fc = FinetuneConfig(batch_size=64, fg_fraction=0.25, images_per_batch=2)
    pools = window_pools(images, fc, box_targets=True)
    by_image = image_pool_rows(pools, len(images))
    for i, (f, b) in enumerate(by_image):  # the rows of each image are exactly its pairs
        assert set(pools.fg[f, 0]) <= {i} and set(pools.bg[b, 0]) <= {i}
    assert sum(len(f) for f, _ in by_image) == len(pools.fg)
    seen_images, seen_flip = set(), False
    for it in range(30):
        b = draw_image_batch(np.random.default_rng(it), pools, by_image, fc, n_scales=3)
        assert len(b.pairs) == 64 and b.targets.shape == (64, 4)
        imgs = np.unique(b.pairs[:, 0])
        assert len(imgs) == 2  # two distinct images, 32 windows each
        seen_images |= set(imgs.tolist())
        for i in imgs:
            rows = np.flatnonzero(b.pairs[:, 0] == i)
            assert len(rows) == 32
            assert len(set(b.flips[rows])) == 1 and len(set(b.scales[rows])) == 1  # one map per image
            fg = rows[b.labels[rows] > 0]
            n_fg_avail = len(by_image[i][0])
            assert len(fg) == min(8, n_fg_avail)  # round(32 x 0.25), fewer only when the image has fewer
            assert len(np.unique(b.pairs[fg, 1])) == len(fg)  # foreground without replacement
            # labels are the windows' own softmax targets (background rows: IoU in [0.1, 0.5))
            np.testing.assert_array_equal(b.labels[rows], window_labels(images, b.pairs[rows], fc.fg_iou))
            w = images[i].windows
            bg = rows[b.labels[rows] == 0]
            assert (w.max_iou[b.pairs[bg, 1]] < fc.fg_iou).all() and (w.max_iou[b.pairs[bg, 1]] >= 0.1).all()
            for k in fg:  # a mirrored window's target has tx negated
                want = pools.fg_targets[np.flatnonzero((pools.fg == b.pairs[k]).all(1))[0]].copy()
                if b.flips[k]:
                    want[0] = -want[0]
                    seen_flip = True
                np.testing.assert_allclose(b.targets[k], want)
    assert seen_flip and len(seen_images) >= 5


def test_fewer_images_than_images_per_batch_draws_one_twice():
    images = make_images(1)
    fc = FinetuneConfig(batch_size=16, images_per_batch=2)
    pools = window_pools(images, fc)
    b = draw_image_batch(np.random.default_rng(0), pools, image_pool_rows(pools, 1), fc, n_scales=1)
    assert len(b.pairs) == 16 and set(b.pairs[:, 0]) == {0} and b.scales is None


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(Config().backbone)


def test_pooling_through_the_blocks_equals_pooling_the_whole_trunks_map_and_backpropagates(lite0, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    first, tail = split_trunk(lite0, 1, "finetune.trunk_trainable_blocks")
    assert first.channels == 80 and lite0.channels == 112
    full = FeatureExtractor(lite0, [160], 320, "cpu")(image)
    first_maps = FeatureExtractor(first, [160], 320, "cpu")(image)
    boxes = np.array([[0, 0, 159, 119], [10, 20, 90, 100], [40, 5, 150, 60], [70, 70, 120, 115]], np.float32)
    windows = match_windows(boxes[:1], np.zeros(1, np.int64), boxes, 1)
    im = TrainImage("image", 160, 120, windows)
    emb = WindowEmbedder(lite0, pool5_scale=0.5)
    pairs = np.stack([np.zeros(len(windows.boxes), np.int64), np.arange(len(windows.boxes))], 1)
    pool = tail_pooler(emb, [im], lambda i, flip: first_maps)
    got = pool(pairs, np.zeros(len(pairs), bool), None, tail)
    want = emb.pool5(full, windows.boxes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.square().sum().backward()
    grads = [p.grad for p in tail.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # the same maps through the cache: TailExtractor behind a FeatureCache of the first blocks' maps
    path = tmp_path / "image.png"
    import cv2
    cv2.imwrite(str(path), image[:, :, ::-1])
    first_cache = FeatureCache(tmp_path / "cache", FeatureExtractor(first, [160], 320, "cpu"), "float32")
    tuned = FeatureCache(tmp_path / "cache", TailExtractor(first_cache, tail, "id-a"), "float32")
    other = FeatureCache(tmp_path / "cache", TailExtractor(first_cache, tail, "id-b"), "float32")
    assert len({first_cache.key, tuned.key, other.key}) == 3  # keyed by the blocks' weights id
    maps = tuned.get(str(path))
    torch.testing.assert_close(maps[0].features, FeatureExtractor(lite0, [160], 320, "cpu")(str(path))[0].features,
                               rtol=1e-4, atol=1e-4)


def _tiny_setup(seed=0):
    """Generated maps of the 'first blocks' (8 channels) and a 1x1-conv 'tail' (8 -> 6)."""
    images = make_images(5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    maps = {(i, f): [ScaleFeatures(200, 200 / 200, torch.randn(8, 13, 13, generator=g), (200, 200))]
            for i in range(5) for f in (False, True)}
    bb = Backbone("toy", nn.Identity(), 16, 0.0, 6, 16, (0, 0, 0), (1, 1, 1), False, "toy")
    emb = WindowEmbedder(bb, levels=(1, 2))
    torch.manual_seed(seed)
    tail = nn.Conv2d(8, 6, 1)
    head = FCHead(emb.pool5_dim, [16, 16], 3, 0.5)
    return images, maps, emb, tail, head


def test_the_blocks_train_and_an_interrupted_run_resumes_to_the_same_weights(tmp_path, caplog):
    fc = FinetuneConfig(batch_size=16, iterations=6, lr_steps=[4], checkpoint_every=3, images_per_batch=2,
                        lr=0.01, trunk_lr_mult=0.5)

    def run(iterations, ckpt):
        images, maps, emb, tail, head = _tiny_setup()
        before = tail.weight.detach().clone()
        pool = tail_pooler(emb, images, lambda i, f: maps[(i, f)])
        cfg = FinetuneConfig(**{**fc.__dict__, "iterations": iterations})
        finetune(head, images, pool, cfg, 1, seed=1, checkpoint=ckpt, progress=False, tail=tail)
        return before, tail, head

    before, tail, head = run(6, None)
    assert not torch.equal(before, tail.weight)  # the blocks moved
    ckpt = tmp_path / "ckpt.pt"
    run(3, ckpt)  # stops after 3 iterations (a checkpoint at 3)
    _, tail2, head2 = run(6, ckpt)  # resumes from it
    torch.testing.assert_close(tail2.weight, tail.weight)
    torch.testing.assert_close(head2.fc8.weight, head.fc8.weight)
    # a checkpoint written without trainable blocks is not resumed into a run with them
    images, maps, emb, tail3, head3 = _tiny_setup()
    frozen_ckpt = tmp_path / "frozen.pt"
    from detector.detection.train.finetune import pool_pairs
    finetune(head3, images, lambda p, f, s: pool_pairs(emb, images, p, f, s, lambda i, fl: [
        ScaleFeatures(200, 1.0, maps[(i, fl)][0].features[:6], (200, 200))]),
        FinetuneConfig(batch_size=16, iterations=2, checkpoint_every=1), 1, checkpoint=frozen_ckpt, progress=False)
    with caplog.at_level(logging.WARNING):
        run(1, frozen_ckpt)
    assert "without trainable trunk blocks; starting again" in caplog.text


@pytest.fixture(scope="module")
def trunk_run(tmp_path_factory):
    from tests.conftest import smoke_training

    return smoke_training(tmp_path_factory.mktemp("trunk"), ["finetune.trunk_trainable_blocks=1"])


def test_training_puts_the_fine_tuned_blocks_in_the_model_and_reads_their_maps(trunk_run, lite0):
    import json

    import detector
    from detector.cache import arrays_digest

    tmp, data, model_path = trunk_run
    model = detector.load(model_path)
    z = load_npz(tmp / "run" / "finetune.npz")
    tail = {k[5:]: v for k, v in z.items() if k.startswith("tail.")}
    assert tail
    last = len(list(lite0.trunk.children())) - 1
    pretrained = lite0.trunk.state_dict()
    moved = 0
    for k, v in model.backbone.trunk.state_dict().items():
        block, rest = k.split(".", 1)
        if int(block) == last:  # the fine-tuned block: the model holds what fine-tuning wrote
            np.testing.assert_array_equal(v.numpy(), tail["0." + rest])  # the tail is Sequential(block)
            moved += int(not torch.equal(v, pretrained[k]))
        else:  # the blocks before it are the pretrained ones
            assert torch.equal(v, pretrained[k]), k
    assert moved > 0
    assert model.backbone.weights_id.endswith("+finetuned:" + arrays_digest(tail))
    # the maps the SVM and regression rows were read from: the fine-tuned trunk's, as at test time
    params = [json.loads(p.read_text()) for p in (tmp / "cache" / "features").glob("*/params.json")]
    tuned = [p for p in params if p.get("tail") == model.backbone.weights_id]
    assert len(tuned) == 1
    folder = next(p.parent for p in (tmp / "cache" / "features").glob("*/params.json")
                  if json.loads(p.read_text()) == tuned[0])
    image = sorted((data / "JPEGImages").iterdir())[0]
    cached = sorted(folder.glob("*_s160.npz"))
    assert cached
    test_time = model.extractor(str(image))[0].features
    from detector.cache import file_digest
    mine = load_npz(folder / f"{file_digest(str(image))}_s160.npz")
    assert mine is not None
    torch.testing.assert_close(torch.from_numpy(mine["features"]).float(), test_time, rtol=2e-2, atol=2e-2)
    out = model.detect(str(image))
    assert set(out) >= {"boxes", "scores", "labels"}


def test_a_rerun_reuses_every_stage_and_writes_the_same_model(trunk_run, capsys):
    from detector.config import load_config
    from detector.detection.train.pipeline import train
    from tests.conftest import ROOT

    tmp, data, model_path = trunk_run
    before = model_path.read_bytes()
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["finetune.trunk_trainable_blocks=1"])
    train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    out = capsys.readouterr().out
    assert "reused: finetune, svm, bbox, model" in out
    assert model_path.read_bytes() == before


def test_too_many_trainable_blocks_names_the_setting(lite0):
    n = len(list(lite0.trunk.children()))
    with pytest.raises(ConfigError, match=f"finetune.trunk_trainable_blocks is {n}"):
        split_trunk(lite0, n, "finetune.trunk_trainable_blocks")


def test_learned_proposals_are_trained_again_on_the_fine_tuned_trunk(tmp_path_factory, capsys):
    """Faster R-CNN's alternating steps 3-4: the model's proposal head is the one refit on the
    fine-tuned trunk's maps (started from the first one), and the later stages read its proposals."""
    import json

    import detector
    from tests.conftest import smoke_training

    tmp, data, model_path = smoke_training(tmp_path_factory.mktemp("trunk_rpn"), [
        "finetune.trunk_trainable_blocks=1", "proposals.method=rpn", "rpn.iterations=20", "rpn.checkpoint_every=10"])
    stages = json.loads((tmp / "run" / "stages.json").read_text())
    assert {"rpn", "finetune", "rpn_refit", "svm"} <= set(stages)
    first, refit = load_npz(tmp / "run" / "rpn.npz"), load_npz(tmp / "run" / "rpn_refit.npz")
    model = detector.load(model_path)
    state = {k: v.numpy() for k, v in model.rpn.state_dict().items()}
    moved = 0
    for k, v in refit.items():
        if k.startswith("head."):
            np.testing.assert_array_equal(state[k], v)  # the model holds the refit head
            moved += int(not np.array_equal(v, first[k]))
    assert moved > 0
    image = sorted((data / "JPEGImages").iterdir())[0]
    assert len(model.detect(str(image))["boxes"]) > 0


def test_extract_features_fills_the_cache_that_training_reads(tmp_path):
    from detector.config import load_config
    from detector.datasets.synthetic import make_synthetic
    from detector.detection.train.pipeline import prepare
    from tests.conftest import ROOT
    from tools import extract_features

    data = make_synthetic(tmp_path / "data", num_train=3, num_test=1, image_size=(160, 120), seed=3)
    over = ["finetune.trunk_trainable_blocks=1"]
    argv = ["--dataset", str(data), "--split", "trainval", "--cache", str(tmp_path / "cache" / "features"),
            "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", *over]
    assert extract_features.main(argv) == 0
    r = prepare(str(data), str(tmp_path / "run"), load_config(ROOT / "configs" / "smoke.yaml", over),
                cache_root=str(tmp_path / "cache"), progress=False)
    assert r.first_cache.extractor.backbone.name.endswith("_first6")  # the blocks before the trainable one
    assert all(r.first_cache.complete(rec.path) for rec in r.ds)
