"""Fast R-CNN's box layer (bbox.method: finetune): targets, loss, training beside fc8, and its
form as a BoxRegressor, each against a naive reference."""
import numpy as np
import pytest
import torch

from detector.config import FinetuneConfig, load_config, ConfigError
from detector.core.boxes import mirror_boxes
from detector.core.heads import FCHead
from detector.detection.bbox_regression import (BOX_LAYER_STDS, BoxRegressor, box_layer, box_layer_targets, decode,
                                                encode)
from detector.detection.matching import match_windows
from detector.detection.train.finetune import TrainImage, box_loss, draw_batch, finetune, window_pools


def make_images(n, seed=0, size=200.0):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        xy = rng.uniform(0, size - 60, (4, 2))
        gt = np.concatenate([xy, xy + rng.uniform(20, 55, (4, 2))], 1).astype(np.float32)
        jitter = np.repeat(gt, 12, 0) + rng.normal(0, 5, (48, 4)).astype(np.float32)
        far = np.concatenate([xy := rng.uniform(0, size - 40, (30, 2)), xy + rng.uniform(8, 40, (30, 2))], 1)
        props = np.concatenate([jitter, far.astype(np.float32)])
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        images.append(TrainImage(f"img{len(images)}", int(size), int(size),
                                 match_windows(gt, rng.integers(0, 3, 4), props, 3)))
    return images


def test_targets_are_encode_over_the_stds_and_a_mirrored_window_negates_tx():
    images = make_images(3)
    fc = FinetuneConfig(batch_size=64, fg_fraction=0.5)
    pools = window_pools(images, fc, box_targets=True)
    for (i, r), t in zip(pools.fg, pools.fg_targets):
        w = images[i].windows
        want = encode(w.boxes[r:r + 1], w.gt_boxes[w.matched[r]][None]) / np.array(BOX_LAYER_STDS)
        np.testing.assert_allclose(t, want[0], rtol=1e-5, atol=1e-6)
    assert window_pools(images, fc).fg_targets is None  # no box layer: no targets
    seen_flip = False
    for it in range(5):
        b = draw_batch(np.random.default_rng(it), pools, fc, 1)
        n_fg = 32
        for k in range(n_fg):
            i, r = b.pairs[k]
            w, width = images[i].windows, images[i].width
            box, gt = w.boxes[r:r + 1], w.gt_boxes[w.matched[r]][None]
            if b.flips[k]:  # the target of the mirrored window onto the mirrored box, computed afresh
                box, gt = mirror_boxes(box, width), mirror_boxes(gt, width)
                seen_flip = True
            np.testing.assert_allclose(b.targets[k], box_layer_targets(box, gt)[0], rtol=1e-4, atol=1e-5)
    assert seen_flip


def test_box_loss_is_the_summed_smooth_l1_of_each_foreground_rows_own_class():
    g = torch.Generator().manual_seed(0)
    K = 3
    deltas = torch.randn(10, 4 * K, generator=g) * 2
    labels = torch.tensor([0, 1, 2, 3, 0, 3, 1, 0, 2, 2])
    targets = torch.randn(10, 4, generator=g) * 2
    want = 0.0
    for n in range(10):
        if labels[n] == 0:
            continue
        for j in range(4):
            d = abs(float(deltas[n, 4 * (labels[n] - 1) + j]) - float(targets[n, j]))
            want += 0.5 * d * d if d < 1 else d - 0.5
    assert float(box_loss(deltas, labels, targets)) == pytest.approx(want, rel=1e-5)
    assert float(box_loss(deltas, torch.zeros(10, dtype=torch.long), targets)) == 0.0


def test_the_regressor_form_of_a_box_layer_gives_its_deltas_times_the_stds():
    torch.manual_seed(1)
    layer = box_layer(16, 3)
    torch.nn.init.normal_(layer.weight, 0, 0.3)
    torch.nn.init.normal_(layer.bias, 0, 0.3)
    reg = BoxRegressor.from_box_layer(layer.weight.detach().numpy(), layer.bias.detach().numpy())
    x = torch.rand(7, 16, dtype=torch.float64)
    out = (layer.double()(x)).detach().numpy()
    every = reg.deltas(x).numpy()
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    own = reg.deltas(x, labels).numpy()
    for n in range(7):
        for k in range(3):
            for j in range(4):
                assert every[n, k, j] == pytest.approx(out[n, 4 * k + j] * BOX_LAYER_STDS[j], rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(own[n], every[n, labels[n]], rtol=1e-6)
    # round trip through the model file's arrays
    again = BoxRegressor.from_arrays(reg.to_arrays())
    np.testing.assert_allclose(again.deltas(x).numpy(), every, rtol=1e-6)
    with pytest.raises(ValueError, match="expected weight"):
        BoxRegressor.from_box_layer(np.zeros((5, 16)), np.zeros(5))


def test_fine_tuning_with_a_box_layer_learns_the_windows_boxes():
    """Features that carry each window's true offset (plus noise): after fine-tuning, the box
    layer's refined windows are closer to their boxes than the windows were."""
    images = make_images(6)
    K = 3

    def pool(pairs, flips, scales):
        out = torch.zeros(len(pairs), 40)
        gen = np.random.default_rng(len(pairs) + int(pairs.sum()))
        for n, (i, r) in enumerate(pairs):
            w = images[i].windows
            box, gt = w.boxes[r:r + 1], w.matched_boxes(np.array([r]))
            if flips[n]:
                box, gt = mirror_boxes(box, images[i].width), mirror_boxes(gt, images[i].width)
            t = encode(box, gt)[0] if w.max_iou[r] >= 0.5 else np.zeros(4)
            out[n, :4] = torch.from_numpy(t * 4)
            out[n, 4 + (w.labels[r] if w.max_iou[r] >= 0.5 else K)] = 1.0
            out[n, 8:] = torch.from_numpy(gen.normal(0, 0.1, 32))
        return out

    torch.manual_seed(0)
    head = FCHead(40, [64, 64], K, dropout=0.0)
    box = box_layer(64, K)
    fc = FinetuneConfig(fc_dims=[64, 64], iterations=400, lr=0.01, lr_steps=[300], batch_size=64, fg_fraction=0.5,
                        dropout=0.0)
    info = finetune(head, images, pool, fc, 1, seed=0, progress=False, box=box)
    assert info["final_box_loss"] is not None
    reg = BoxRegressor.from_box_layer(box.weight.detach().numpy(), box.bias.detach().numpy())
    pools = window_pools(images, fc)
    pairs = pools.fg
    x = pool(pairs, np.zeros(len(pairs), bool), None)
    fc7 = head.embed(x, "fc7")
    labels = pools.fg_labels - 1
    before, after = [], []
    for n, (i, r) in enumerate(pairs):
        w = images[i].windows
        if w.is_gt[r]:
            continue
        gt = w.matched_boxes(np.array([r]))
        moved = decode(w.boxes[r:r + 1], reg.deltas(fc7[n:n + 1].double(), labels[n:n + 1]).numpy())
        before.append(np.abs(w.boxes[r] - gt[0]).mean())
        after.append(np.abs(moved[0] - gt[0]).mean())
    assert np.mean(after) < 0.5 * np.mean(before), (np.mean(before), np.mean(after))


def test_the_box_layer_needs_fine_tuning_and_a_known_method():
    with pytest.raises(ConfigError, match="bbox.method must be ridge or finetune"):
        load_config(None, ["bbox.method=fc"])
    with pytest.raises(ConfigError, match="needs finetune.enabled=true"):
        load_config(None, ["bbox.method=finetune", "finetune.enabled=false", "svm.layer=pool5"])
    load_config(None, ["bbox.method=finetune", "finetune.enabled=false", "svm.layer=pool5", "bbox.enabled=false"])


def test_a_box_layer_model_trains_without_regression_rows_and_regresses_from_fc7(box_run, monkeypatch):
    import json

    import detector
    from detector.images import load_image

    tmp, data, model_path = box_run
    cfg = load_config(tmp / "run" / "config.yaml")
    stages = json.loads((tmp / "run" / "stages.json").read_text())
    assert stages["bbox"]["method"] == "finetune" and stages["finetune"]["final_box_loss"] > 0
    model = detector.load(model_path, device="cpu")
    assert model.regression_layer == "fc7" and model.predictor.regressor.feature_dim == cfg.finetune.fc_dims[1]
    img = load_image(sorted((data / "JPEGImages").glob("*.jpg"))[2])
    props = model.proposals(img)
    host = model.detect(img, proposals=props, score_thresh=-10.0)
    # the host path's deltas are the fine-tuned box layer's on fc7, computed here without the model's code
    box = model.embedder.head
    seen = []
    real = model.predictor.deltas
    monkeypatch.setattr(model.predictor, "deltas", lambda x, labels=None: seen.append(x.shape[1]) or real(x, labels))
    model.detect(img, proposals=props, score_thresh=-10.0)
    assert seen and set(seen) == {box.fc_dims[1]}
    monkeypatch.undo()
    model.use_device_path(True)
    dev = model.detect(img, proposals=props, score_thresh=-10.0)
    model.use_device_path(False)
    np.testing.assert_array_equal(host["labels"], dev["labels"])
    np.testing.assert_allclose(host["boxes"], dev["boxes"], atol=1e-2)
    plain = model.detect(img, proposals=props, score_thresh=-10.0, box_regression=False)
    assert not np.allclose(np.sort(plain["boxes"], 0), np.sort(host["boxes"], 0))


def test_the_box_method_reaches_fine_tuning_and_a_rerun_reuses_it(box_run, capsys):
    from detector.detection.train.pipeline import train
    from detector.detection.train.stages import stage_digests

    a = stage_digests(load_config(None), "data", "features")
    b = stage_digests(load_config(None, ["bbox.method=finetune"]), "data", "features")
    assert {k for k in a if a[k] != b[k]} == {"finetune", "svm_rows", "svm", "bbox", "model"}
    c = stage_digests(load_config(None, ["bbox.loss_weight=2.0"]), "data", "features")
    assert {k for k in a if a[k] != c[k]} == {"model"}  # the ridge regressors do not read it
    d = stage_digests(load_config(None, ["bbox.method=finetune", "bbox.lam=10.0"]), "data", "features")
    assert {k for k in b if b[k] != d[k]} == {"model"}  # nor does the box layer read the ridge's
    tmp, data, _ = box_run
    cfg = load_config(tmp / "run" / "config.yaml")
    capsys.readouterr()
    train(str(data), str(tmp / "run"), cfg, cache_root=str(tmp / "cache"), progress=False)
    out = capsys.readouterr().out
    for stage in ("finetune", "bbox", "model"):  # the box layer is restored from finetune.npz
        assert f"{stage}: done before with the same inputs, reused" in out


def test_a_box_layer_model_file_with_pool5_sized_regressors_is_refused(box_run, tmp_path):
    import detector
    from detector.errors import ModelFormatError
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, _, model_path = box_run
    tensors = load_file(str(model_path))
    with safe_open(str(model_path), "pt") as f:
        meta = f.metadata()
    K = tensors["bbox_weights"].shape[0]
    tensors["bbox_weights"] = torch.zeros((K, 12 + 1, 4))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFormatError, match="bad.safetensors"):
        detector.load(bad)
