#!/usr/bin/env python
"""SPP-net against an R-CNN-style baseline on the same backbone (the paper's Table 10 comparison).

Both methods share the backbone, the proposals and the training recipe; only the way a
window becomes a pool5 vector differs:

* SPP-net: conv features of the whole image once (per scale), each window projected onto
  the map and pooled with the spatial pyramid (`WindowEmbedder.pool5`).
* R-CNN-style: each window cropped from the image the R-CNN way (context padding 16: the
  box is enlarged by 224/(224-2*16) about its centre so that, warped to 224x224, 16 px of
  context surround it; pixels outside the image are the backbone's mean pixel, i.e. 0 after
  normalisation), warped bilinearly to 224x224 (from the normalised image), run through the
  conv trunk in batches, and each whole map (14x14 at stride 16) pooled with the same
  pyramid, so the vector has the same length as SPP's pool5.

Fair training (for `map_delta`): each arm gets its *own* fc layers, fine-tuned with the
model's recipe (`detector.detection.train.finetune.finetune`: same iterations, learning rates, batch, 25%
foreground, flips) on its own vectors of the same windows, then its own SVMs (the library's
`train_svms`, norm-20 scales recomputed per arm) on fc7 of those windows.  The windows: the
first --train-images of --train-split sorted by id, each with its GT boxes and top
--train-proposals cached proposals, and the same windows of the mirror images for the flip
augmentation; R-CNN's crops cost ~30 ms each on 2 cores, which is what limits the subset.
Test: the first --test-images of --split sorted by id, the model's proposals (top_k), the test
post-processing without box regression, each arm with its own head and SVMs.  The full
model (fine-tuned and trained on the whole training split) is scored on the same images for
reference.

Timing: per test image, from the decoded image to SVM-ready features, proposals excluded
(SPP: resize + conv + projection + SPP + fc; R-CNN: crop + warp + conv + pool + fc), median
over the timed images, after a warm-up.  SPP at the model's scales and at 5 scales
(480,576,688,864,1200; timing only, its mAP is not measured).  Ends with

  speedup_1scale = X   speedup_5scale = Y   map_delta = Z (SPP mAP - R-CNN-style mAP)

  python bench/spp_vs_rcnn.py [--model data/runs/bccd/model.safetensors] [--train-images 30]
                              [--test-images 10] [--timing-only --rcnn-time-images 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import roi_pool  # noqa: E402

CROP = 224  # R-CNN's warped window size
PAD = 16  # R-CNN's context padding, in pixels of the warped window
TARGET_1SCALE = 100.0
TARGET_5SCALE = 40.0
TARGET_MAP_DELTA = 0.01


# --------------------------------------------------------------------------- the R-CNN-style baseline
# Hand-written because it is the baseline being compared against (no library crops windows the
# R-CNN way); everything after the crop reuses the library.

def context_boxes(boxes: np.ndarray, crop: int = CROP, pad: int = PAD) -> np.ndarray:
    """Enlarge boxes about their centres so that, warped to crop x crop, `pad` px of context surround them."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = crop / (crop - 2.0 * pad)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    hw, hh = (b[:, 2] - b[:, 0]) * s / 2, (b[:, 3] - b[:, 1]) * s / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], 1)


def warp_window(image: np.ndarray, box: np.ndarray, fill: tuple, crop: int = CROP) -> np.ndarray:
    """Bilinear warp of the continuous-coordinate window `box` of a float32 HxWx3 image to crop x crop;
    samples outside the image take `fill`.  Output pixel u (centre u + 0.5) samples the window at
    x1 + (u + 0.5) * w / crop, i.e. OpenCV pixel index x1 + (u + 0.5) * w / crop - 0.5."""
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = (x2 - x1) / crop, (y2 - y1) / crop
    M = np.array([[sx, 0.0, x1 + 0.5 * sx - 0.5], [0.0, sy, y1 + 0.5 * sy - 0.5]])
    return cv2.warpAffine(image, M, (crop, crop), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def warp_windows_on_device(image: torch.Tensor, boxes: np.ndarray, crop: int = CROP) -> torch.Tensor:
    """`warp_window` for many windows at once on the image's device: roi_align with one
    bilinear sample per output pixel at x1 + (u + 0.5) * w / crop - 0.5 (aligned=True), the
    same points OpenCV samples.  image: [3, H, W] normalised (the mean pixel is 0).  Within
    half a pixel outside the image roi_align repeats the edge pixel where OpenCV blends it
    with the fill; elsewhere the two agree (tests/test_device_path.py)."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.zeros(len(boxes), 1), torch.as_tensor(boxes, dtype=torch.float32)], 1)
    return roi_align(image[None], rois.to(image.device), (crop, crop), spatial_scale=1.0, sampling_ratio=1,
                     aligned=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def whole_map_spp(fmap: torch.Tensor, levels) -> torch.Tensor:
    """SPP of each whole map of a batch [B, C, h, w] -> [B, C * sum(n*n)], in one roi_pool call per
    level for the whole batch: the op `detector.core.spp` uses, with the paper's bins and layout
    (`check_whole_map_spp` compares it with `spatial_pyramid_pool`)."""
    B, _, h, w = fmap.shape
    rois = torch.tensor([[b, 0, 0, w - 1, h - 1] for b in range(B)], dtype=fmap.dtype, device=fmap.device)
    return torch.cat([roi_pool(fmap, rois, (n, n), 1.0).reshape(B, -1) for n in levels], 1)


def check_whole_map_spp(fmap: torch.Tensor, levels) -> None:
    from detector.core.spp import spatial_pyramid_pool

    h, w = fmap.shape[2:]
    ref = torch.cat([spatial_pyramid_pool(f, torch.tensor([[0, 0, w - 1, h - 1]]), levels) for f in fmap])
    if not torch.equal(whole_map_spp(fmap, levels), ref):
        raise AssertionError("batched whole-map SPP differs from detector.core.spp.spatial_pyramid_pool")


@torch.inference_mode()
def rcnn_pool5(model, image: np.ndarray, boxes: np.ndarray, batch: int = 16,
               check: bool = False) -> tuple[torch.Tensor, dict]:
    """Unscaled pool5 [N, D] of boxes, R-CNN style, and the seconds spent per step.

    The image is normalised once, before warping: normalisation is a per-channel affine map,
    so it commutes with bilinear interpolation, and the mean pixel becomes 0, the fill value."""
    bb = model.backbone
    device = model.extractor.device
    levels = model.cfg.spp.levels
    t = {"crop": 0.0, "conv": 0.0, "pool": 0.0}
    t0 = time.perf_counter()
    on_device = device.type != "cpu"  # a GPU crops with roi_align in large batches; the CPU with OpenCV
    if on_device:
        img_t = bb.normalize(image).to(device)
    else:
        img = np.ascontiguousarray(bb.normalize(image).permute(1, 2, 0).numpy())  # HxWx3 float32, trunk's space
        crops = np.empty((min(batch, len(boxes)), CROP, CROP, 3), np.float32)
    ctx = context_boxes(boxes)
    t["crop"] += time.perf_counter() - t0
    pooled = []
    for s in range(0, len(ctx), batch):
        t0 = time.perf_counter()
        chunk = ctx[s:s + batch]
        if on_device:
            x = warp_windows_on_device(img_t, chunk)
        else:
            for j, b in enumerate(chunk):
                crops[j] = warp_window(img, b, (0.0, 0.0, 0.0))
            x = torch.from_numpy(crops[: len(chunk)]).permute(0, 3, 1, 2).contiguous().to(device)
        _sync(device)
        t1 = time.perf_counter()
        fmap = bb.trunk(x)
        _sync(device)
        t2 = time.perf_counter()
        pooled.append(whole_map_spp(fmap, levels).float().cpu())
        _sync(device)
        t3 = time.perf_counter()
        t["crop"] += t1 - t0
        t["conv"] += t2 - t1
        t["pool"] += t3 - t2
        if check and s == 0:
            check_whole_map_spp(fmap, levels)
    if not pooled:  # no windows
        from detector.core.spp import spp_length

        pooled = [torch.zeros((0, spp_length(bb.channels, levels)))]
    return torch.cat(pooled), t


@torch.inference_mode()
def rcnn_features(model, image: np.ndarray, boxes: np.ndarray, embedder, batch: int = 16,
                  check: bool = False) -> tuple[np.ndarray, dict]:
    """SVM-ready features [N, D] of boxes, R-CNN style (the arm's pool5 scale and fc layers)."""
    pool5, t = rcnn_pool5(model, image, boxes, batch, check)
    t0 = time.perf_counter()
    x = embedder.embed(pool5.mul_(embedder.pool5_scale)).numpy()
    t["fc"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return np.asarray(x, np.float32), t


# --------------------------------------------------------------------------- SPP-net, the library's path

@torch.inference_mode()
def spp_features(extractor, image: np.ndarray, boxes: np.ndarray, embedder) -> tuple[np.ndarray, dict]:
    from detector.timing import StageTimer

    timer = StageTimer()
    t0 = time.perf_counter()
    feats = extractor(image, timer=timer)
    t1 = time.perf_counter()
    pool5 = embedder.pool5(feats, boxes)
    t2 = time.perf_counter()
    x = embedder.embed(pool5).numpy()
    t3 = time.perf_counter()
    t = {"resize": timer.times["resize"], "conv": timer.times["conv"]}
    t["features_other"] = (t1 - t0) - t["resize"] - t["conv"]
    t.update(spp=t2 - t1, fc=t3 - t2, total=t3 - t0)
    return np.asarray(x, np.float32), t


# --------------------------------------------------------------------------- fair training of both arms

@torch.inference_mode()
def training_vectors(model, recs, props: dict, n_props: int, batch: int) -> tuple[list, dict]:
    """The training windows of each image (GT + top n_props proposals) and their unscaled pool5,
    float16, per arm and orientation: {"spp"|"rcnn": {False|True: [[M_i, D] per image]}}."""
    from detector.core.embedder import WindowEmbedder
    from detector.core.boxes import mirror_boxes
    from detector.detection.train.finetune import TrainImage
    from detector.images import load_image
    from detector.detection.matching import match_windows

    K = len(model.class_names)
    e = model.embedder
    unscaled = WindowEmbedder(e.backbone, e.levels, e.scale_rule, e.projection)
    images, vecs = [], {"spp": {False: [], True: []}, "rcnn": {False: [], True: []}}
    t0 = time.perf_counter()
    for n, r in enumerate(recs):
        img = load_image(r.path)
        w = match_windows(r.boxes, r.labels, props[r.image_id][:n_props], K)
        images.append(TrainImage(r.path, r.width, r.height, w))
        for flip in (False, True):
            boxes = mirror_boxes(w.boxes, r.width) if flip else w.boxes
            vecs["spp"][flip].append(unscaled.pool5(model.extractor(img, flip=flip), boxes).half())
            im = np.ascontiguousarray(img[:, ::-1]) if flip else img
            vecs["rcnn"][flip].append(rcnn_pool5(model, im, boxes, batch)[0].half())
        print(f"  training windows {n + 1}/{len(recs)}: {r.image_id}, {len(w.boxes)} windows x 2 orientations "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return images, vecs


def train_arm(model, images: list, vecs: dict, name: str):
    """This arm's own fc layers, fine-tuned with the model's recipe on its own vectors; returns a
    WindowEmbedder holding them and the arm's pool5 scale."""
    from detector.core.embedder import WindowEmbedder, norm_scale
    from detector.detection.train.finetune import finetune
    from detector.core.heads import FCHead

    cfg, e = model.cfg, model.embedder
    sample = torch.cat(vecs[False]).float()
    sample = sample[np.random.default_rng(cfg.seed).choice(len(sample), min(2000, len(sample)), replace=False)]
    scale = norm_scale(sample, cfg.svm.target_norm, f"{name} pool5")
    flat = {f: torch.cat(vecs[f]) for f in (False, True)}
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in vecs[False]])])

    def pool(pairs, flips, scales):
        rows = torch.from_numpy(offsets[pairs[:, 0]] + pairs[:, 1])
        out = torch.empty((len(pairs), flat[False].shape[1]))
        for f in (False, True):
            sel = torch.from_numpy(np.flatnonzero(flips == f))
            out[sel] = flat[f][rows[sel]].float()
        return out.mul_(scale)

    torch.manual_seed(cfg.seed)
    head = FCHead(flat[False].shape[1], cfg.finetune.fc_dims, len(model.class_names), cfg.finetune.dropout)
    t0 = time.perf_counter()
    info = finetune(head, images, pool, cfg.finetune, 1, cfg.seed, None, progress=True)
    print(f"fine-tuning, {name}: pool5 scale {scale:.4g}, {time.perf_counter() - t0:.0f} s, {info}")
    return WindowEmbedder(e.backbone, e.levels, e.scale_rule, e.projection, scale, head.eval(), cfg.svm.layer)


def svm_rows(embedder, images: list, vecs: list) -> list:
    """(fc features, gt_labels, class_iou) per training image, from the arm's vectors."""
    with torch.inference_mode():
        return [(embedder.embed(v.float().mul_(embedder.pool5_scale)).numpy(), im.windows.gt_labels,
                 im.windows.class_iou) for v, im in zip(vecs, images)]


# --------------------------------------------------------------------------- SVMs and scoring

def train_method_svms(model, rows: list, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """rows: per image (features, gt_labels, class_iou).  The library's SVM training with the model's
    config; the norm-20 scale is recomputed for these features."""
    from detector.core.embedder import norm_scale
    from detector.detection.svm import SVMImage, format_summary, sample_feature_rows, train_svms

    cfg = model.cfg.svm
    sample = sample_feature_rows(lambda i: rows[i][0], len(rows), cfg.norm_images, cfg.norm_boxes, seed=model.cfg.seed)
    scale = norm_scale(sample, cfg.target_norm, "SVM features")
    images = [SVMImage(x * scale, gl, ci) for x, gl, ci in rows]
    W, b, summary = train_svms(images, len(model.class_names), cfg, model.class_names, progress=False)
    print(f"SVMs, {name}: feature scale {scale:.4g}")
    print(format_summary(summary))
    return W, b, scale


def detections(model, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[int, int]) -> dict:
    """The test-time post-processing with the model's settings, without box regression."""
    from detector.detection.postprocess import finalize_detections, select_detections

    tc = model.cfg.test
    sel = select_detections(boxes, scores, tc.score_thresh, tc.nms_iou, tc.max_per_image)
    return finalize_detections(boxes[sel.indices], sel.scores, sel.labels, image_size, tc.nms_iou,
                               tc.second_nms, sel.indices)


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--dataset", default=common.DEFAULT_DATASET, help="a VOC-layout dataset")
    ap.add_argument("--cache", default=common.DEFAULT_CACHE, help="proposal cache root")
    ap.add_argument("--proposals", default=None, metavar="FILE",
                    help="boxes from a proposals file (.npz or R-CNN .mat) instead of the selective-search cache")
    ap.add_argument("--split", default="test", help="test split")
    ap.add_argument("--train-split", default="trainval", help="split the training subset is drawn from")
    ap.add_argument("--train-images", type=int, default=30, help="training subset of both arms: first N by id")
    ap.add_argument("--train-proposals", type=int, default=500, help="top proposals per training image (plus GT)")
    ap.add_argument("--test-images", type=int, default=10, help="test subset: first N by id")
    ap.add_argument("--test-proposals", type=int, default=0,
                    help="proposals per test image (default 0: the model's top_k, as detect() uses)")
    ap.add_argument("--scales5", default=",".join(map(str, common.FIVE_SCALES)), help="the multi-scale timing run")
    # 16: on the 2-core dev machine EfficientNet-Lite0 (stride 16) took 0.055 s of CPU per 224x224 crop in
    # batches of 8 or 16 and 0.080-0.086 s in batches of 32 or 64 (1 thread), so the baseline is not slowed down.
    ap.add_argument("--rcnn-batch", type=int, default=None,
                    help="R-CNN crops per conv batch (default 16 on the CPU, 256 on a GPU)")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip SVM training and mAP; R-CNN is then timed on --rcnn-time-images images only")
    ap.add_argument("--rcnn-time-images", type=int, default=3,
                    help="with --timing-only: test images R-CNN is timed on (without it, R-CNN must run on "
                         "every test image for the mAP, and all of them are timed)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.test_images < 1 or args.train_images < 1 or args.train_proposals < 0 or args.rcnn_time_images < 1:
        ap.error("--test-images, --train-images and --rcnn-time-images must be >= 1, --train-proposals >= 0")

    import detector
    from detector.datasets.records import Dataset
    from detector.core.features import FeatureExtractor
    from detector.images import load_image
    from detector.datasets import load_dataset
    from detector.detection.evaluate import score_detections
    from detector.detection.detector import empty_result
    from detector.proposals import compute_proposals, dataset_proposals

    if args.threads:
        torch.set_num_threads(args.threads)
    common.print_header("SPP-net vs R-CNN-style features, same backbone, proposals, fc and SVM recipe")
    model = detector.load(args.model)
    if args.rcnn_batch is None:
        args.rcnn_batch = 16 if model.extractor.device.type == "cpu" else 256
    pcfg = model.cfg.proposals
    cache = Path(args.cache) / "proposals"
    ext1 = model.extractor
    scales5 = common.parse_int_list(args.scales5, "--scales5")
    ext5 = FeatureExtractor(model.backbone, scales5, max(model.cfg.features.max_size, max(scales5)),
                            str(ext1.device))

    def get_proposals(records):
        if args.proposals:
            return dataset_proposals(args.proposals, records)
        return compute_proposals(records, cache, pcfg, progress=False)

    test_ds = load_dataset(args.dataset, args.split, model.class_names)
    test_recs = common.first_by_id(test_ds.records, args.test_images)
    print(f"model:    {args.model}  (backbone {model.backbone.name}, SVM layer {model.cfg.svm.layer}, "
          f"scales {ext1.scales}, device {ext1.device})")
    print(f"test:     {args.dataset} split {args.split}: the first {len(test_recs)} images by id "
          f"({test_recs[0].image_id} .. {test_recs[-1].image_id}); proposals: top {args.test_proposals or pcfg.top_k} "
          f"(selective search {pcfg.mode}, cache {cache})")
    print(f"R-CNN:    {CROP}x{CROP} warp, context padding {PAD}, mean-pixel fill, batches of {args.rcnn_batch}")

    # ------------------------------------------------------------ each arm trained on its own vectors
    arms = {}  # name -> (embedder, W, b, svm scale)
    if not args.timing_only:
        train_ds = load_dataset(args.dataset, args.train_split, model.class_names)
        train_recs = common.first_by_id(train_ds.records, args.train_images)
        print(f"training: split {args.train_split}: the first {len(train_recs)} images by id "
              f"({train_recs[0].image_id} .. {train_recs[-1].image_id}), GT + top {args.train_proposals} "
              f"proposals each, and their mirror images; fine-tuning: {model.cfg.finetune.iterations} iterations "
              f"per arm (the model's recipe)")
        print()
        props = get_proposals(train_recs)
        t0 = time.perf_counter()
        images, vecs = training_vectors(model, train_recs, props, args.train_proposals, args.rcnn_batch)
        n_win = sum(len(im.windows.boxes) for im in images)
        print(f"training vectors: {len(images)} images, {n_win} windows x 2 orientations, both arms, "
              f"{time.perf_counter() - t0:.1f} s")
        for m, name in (("spp", "SPP-net"), ("rcnn", "R-CNN-style")):
            emb = train_arm(model, images, vecs[m], name)
            W, b, s = train_method_svms(model, svm_rows(emb, images, vecs[m][False]), name)
            arms[m] = (emb, W, b, s)
        del vecs
        print()

    # ------------------------------------------------------------ test subset: features, timings, detections
    props = get_proposals(test_recs)
    if args.test_proposals:
        props = {k: v[: args.test_proposals] for k, v in props.items()}
    images = {r.image_id: load_image(r.path) for r in test_recs}
    spp_emb = arms["spp"][0] if arms else model.embedder
    rcnn_emb = arms["rcnn"][0] if arms else model.embedder
    # Warm-up (untimed) on a slice of the first image's windows: allocators, kernels, thread pools.
    warm_img, warm_boxes = images[test_recs[0].image_id], props[test_recs[0].image_id][: args.rcnn_batch]
    if len(warm_boxes):
        spp_features(ext1, warm_img, warm_boxes, spp_emb)
        spp_features(ext5, warm_img, warm_boxes, model.embedder)
        rcnn_features(model, warm_img, warm_boxes, rcnn_emb, args.rcnn_batch, check=True)

    times = {"spp1": [], "spp5": [], "rcnn": []}
    results = {"spp": [], "rcnn": [], "full": []}
    n_rcnn = len(test_recs) if not args.timing_only else args.rcnn_time_images
    n_props = []
    for i, r in enumerate(test_recs):
        img, boxes = images[r.image_id], props[r.image_id]
        n_props.append(len(boxes))
        if len(boxes) == 0:
            print(f"note: {r.image_id} has no proposals; it gets no detections and no timings")
            for v in results.values():
                v.append(empty_result())
            continue
        x, t = spp_features(ext1, img, boxes, spp_emb)
        times["spp1"].append(t)
        times["spp5"].append(spp_features(ext5, img, boxes, model.embedder)[1])
        size = (img.shape[1], img.shape[0])
        if arms:
            _, W, b, s = arms["spp"]
            results["spp"].append(detections(model, boxes, (x * s) @ W + b, size))
            full = spp_features(ext1, img, boxes, model.embedder)[0]
            full_scores = model.predictor.scores(torch.from_numpy(full)).numpy()
            results["full"].append(detections(model, boxes, full_scores, size))
        if i < n_rcnn:
            xr, tr = rcnn_features(model, img, boxes, rcnn_emb, args.rcnn_batch)
            times["rcnn"].append(tr)
            if arms:
                _, W, b, s = arms["rcnn"]
                results["rcnn"].append(detections(model, boxes, (xr * s) @ W + b, size))
        print(f"  {r.image_id}: {len(boxes)} windows; SPP {t['total']:.3f} s"
              + (f", R-CNN {times['rcnn'][-1]['total']:.2f} s" if i < n_rcnn else ""), flush=True)

    # ------------------------------------------------------------ report
    def med(which: str, key: str) -> float:
        return common.median(t[key] for t in times[which])

    print()
    print(f"feature time per image (s), median over images; proposals per image: median "
          f"{common.median(n_props):.0f}; SPP timed on {len(times['spp1'])} images, R-CNN on {len(times['rcnn'])}")
    r_tot, s1_tot, s5_tot = med("rcnn", "total"), med("spp1", "total"), med("spp5", "total")
    rows = [
        ["resize (SPP) / crop + warp + normalise (R-CNN)", f"{med('spp1', 'resize'):.4f}",
         f"{med('spp5', 'resize'):.4f}", f"{med('rcnn', 'crop'):.4f}"],
        ["conv", f"{med('spp1', 'conv'):.4f}", f"{med('spp5', 'conv'):.4f}", f"{med('rcnn', 'conv'):.4f}"],
        ["projection + SPP (SPP) / pool (R-CNN)", f"{med('spp1', 'spp'):.4f}", f"{med('spp5', 'spp'):.4f}",
         f"{med('rcnn', 'pool'):.4f}"],
        ["fc", f"{med('spp1', 'fc'):.4f}", f"{med('spp5', 'fc'):.4f}", f"{med('rcnn', 'fc'):.4f}"],
        ["total (image -> SVM features)", f"{s1_tot:.4f}", f"{s5_tot:.4f}", f"{r_tot:.4f}"],
        ["speed-up over R-CNN-style", f"{r_tot / s1_tot:.1f}x", f"{r_tot / s5_tot:.1f}x", "1.0x"],
    ]
    maps = {}
    if arms:
        sub = Dataset(f"{test_ds.name} first {len(test_recs)}", list(model.class_names), test_recs)
        for m in results:
            maps[m] = score_detections(sub, results[m])
        rows.append([f"mAP, own fc + SVMs on the {args.train_images}-image subset (VOC07, no bbox reg)",
                     f"{maps['spp']['map']:.4f}", "-", f"{maps['rcnn']['map']:.4f}"])
        rows.append(["mAP, the full model (all training images; reference)", f"{maps['full']['map']:.4f}", "-", "-"])
        for k, name in enumerate(model.class_names):
            rows.append([f"  AP {name} (subset-trained arms)", f"{maps['spp']['ap'][k]:.4f}", "-",
                         f"{maps['rcnn']['ap'][k]:.4f}"])
    print(common.table(["", f"SPP {ext1.scales}", f"SPP {len(scales5)} scales", "R-CNN-style"], rows))
    print(f"({len(scales5)} scales {scales5}: timing only, with the model's fc layers; the arms were trained at "
          f"the model's scales)")
    print()
    sp1, sp5 = r_tot / s1_tot, r_tot / s5_tot
    print(f"speedup_1scale = {sp1:.2f}  # target >= {TARGET_1SCALE:g}x: {common.check_target(sp1 >= TARGET_1SCALE)}")
    print(f"speedup_5scale = {sp5:.2f}  # target >= {TARGET_5SCALE:g}x: {common.check_target(sp5 >= TARGET_5SCALE)}")
    if maps:
        d = float(maps["spp"]["map"] - maps["rcnn"]["map"])
        print(f"map_delta = {d:.4f}  # SPP minus R-CNN-style, each with its own fc and SVMs on the same subset; "
              f"target |delta| <= "
              f"{TARGET_MAP_DELTA}: {common.check_target(abs(d) <= TARGET_MAP_DELTA)}")
    else:
        print("map_delta = nan  # not measured (--timing-only)")
    return 0


if __name__ == "__main__":  # the guard matters: proposal workers are spawned processes
    sys.exit(main())
