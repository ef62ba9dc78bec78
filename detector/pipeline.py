"""The whole training pipeline, stage by stage, resumable.

proposals -> conv features -> fine-tuning -> SVMs -> box regression -> model file.

Proposals and conv maps live in content-keyed caches (`--cache`, default
`data/cache`), shared between runs.  Every other stage writes its result into
the run directory atomically and records, in `stages.json`, a digest of what
produced it (its config sections, the dataset, the stages before it).  A rerun
skips a stage whose digest still matches and redoes it, and every stage after
it, when anything it depends on changed.  Fine-tuning also checkpoints inside
the stage.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import build_backbone
from .bbox_regression import BoxRegressor, select_regression_examples, train_box_regressors
from .cache import atomic_save_npz, atomic_write_json, load_npz, params_digest
from .config import Config
from .datasets.records import Dataset
from .features import FeatureCache, FeatureExtractor, extract_all
from .finetune import TrainImage, estimate_pool5_scale, finetune
from .heads import FCHead
from .labeling import label_windows
from .model import SPPDetector
from .pooling import pool_boxes
from .svm import SVMImage, format_summary, train_svms

log = logging.getLogger(__name__)


class _Stages:
    """stages.json: digest of each finished stage's inputs."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.timings: dict[str, float] = {}

    def fresh(self, name: str, digest: str, *files: Path) -> bool:
        return self.done.get(name, {}).get("digest") == digest and all(f.is_file() for f in files)

    def finish(self, name: str, digest: str, seconds: float, **info) -> None:
        self.done[name] = {"digest": digest, "seconds": round(seconds, 2), **info}
        atomic_write_json(self.path, self.done)


def load_dataset(path: str, split: str, class_names=None, image_dir: Optional[str] = None) -> Dataset:
    """A VOC-layout root (with `split`), or a COCO annotation json (images in `image_dir`,
    default: the json's folder)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        from .datasets.coco import load_coco

        return load_coco(p, image_dir or p.parent, class_names)
    from .datasets.voc import load_voc

    return load_voc(p, split, class_names)


def load_training_set(dataset_dir: str, split: str, cfg: Config, image_dir: Optional[str] = None) -> Dataset:
    ds = load_dataset(dataset_dir, split, cfg.classes, image_dir)
    if len(ds) == 0:
        raise ValueError(f"{dataset_dir}: training split '{split}' has no usable images")
    if sum(len(r.boxes) for r in ds) == 0:
        raise ValueError(f"{dataset_dir}: training split '{split}' has no objects")
    return ds


def get_proposals(ds: Dataset, cfg: Config, cache_root: Path, progress: bool = True) -> dict:
    from .proposal_cache import compute_proposals

    return compute_proposals(ds.records, cache_root / "proposals", cfg.proposals, workers=cfg.proposals.workers,
                             progress=progress)


def build_train_images(ds: Dataset, proposals: dict) -> list[TrainImage]:
    out = []
    empty = 0
    for r in ds:
        props = proposals.get(r.image_id)
        if props is None or len(props) == 0:
            empty += 1
            props = np.zeros((0, 4), np.float32)
        out.append(TrainImage(r.path, r.width, r.height,
                              label_windows(r.boxes, r.labels, props, len(ds.class_names))))
    if empty:
        log.warning("%d training images have no proposals; only their ground-truth boxes are used", empty)
    return out


STAGES = ("proposals", "features", "finetune", "svm", "bbox", "model")


def train(dataset_dir: str, run_dir: str, cfg: Config, train_split: str = "trainval",
          cache_root: str = "data/cache", progress: bool = True, stop_after: str = "model",
          image_dir: Optional[str] = None) -> Optional[Path]:
    """Run (or resume) the stages up to `stop_after`; returns the model file's path when it is written."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_root)
    torch.manual_seed(cfg.seed)
    stages = _Stages(run)

    t = time.perf_counter()
    ds = load_training_set(dataset_dir, train_split, cfg, image_dir)
    cfg.classes = list(ds.class_names)
    (run / "config.yaml").write_text(cfg.dump())
    K = len(ds.class_names)
    data_sig = params_digest({"ids": [r.image_id for r in ds], "boxes": [r.boxes.tolist() for r in ds],
                              "labels": [r.labels.tolist() for r in ds], "classes": ds.class_names})
    print(f"training set: {len(ds)} images, {K} classes ({', '.join(ds.class_names)})")

    # 1. proposals (cached per image)
    t = time.perf_counter()
    proposals = get_proposals(ds, cfg, cache, progress)
    stages.finish("proposals", params_digest(cfg.proposals.__dict__), time.perf_counter() - t,
                  boxes_per_image=float(np.mean([len(v) for v in proposals.values()])) if proposals else 0.0)
    images = build_train_images(ds, proposals)
    if stop_after == "proposals":
        return None

    # 2. conv features (cached per image and scale, mirror images too when fine-tuning flips)
    t = time.perf_counter()
    backbone = build_backbone(cfg.backbone)
    extractor = FeatureExtractor(backbone, cfg.features.scales, cfg.features.max_size, cfg.features.device)
    fcache = FeatureCache(cache / "features", extractor, cfg.features.cache_dtype)
    flips = (False, True) if (cfg.finetune.enabled and cfg.finetune.flip) else (False,)
    stats = extract_all([r.path for r in ds], fcache, progress=progress, flips=flips)
    if stats["failed"]:
        raise ValueError(f"{len(stats['failed'])} training images are unreadable, e.g. {stats['failed'][0][0]}: "
                         f"{stats['failed'][0][1]}")
    stages.finish("features", fcache.key, time.perf_counter() - t, cache=str(fcache.dir))
    if stop_after == "features":
        return None
    maps: dict = {}

    def get_features(i: int, flip: bool):
        key = (i, flip)
        if key not in maps:
            maps[key] = fcache.get(images[i].path, flip)
        return maps[key]

    levels = cfg.spp.levels
    feat_sig = params_digest({"data": data_sig, "features": fcache.key, "proposals": cfg.proposals.__dict__,
                              "levels": levels, "seed": cfg.seed, "projection": cfg.spp.projection})

    # 3. fine-tuning
    t = time.perf_counter()
    ft_digest = params_digest({"in": feat_sig, "finetune": cfg.finetune.__dict__, "scale_rule": cfg.features.scale_rule})
    head_file = run / "head.npz"
    pool5_scale = estimate_pool5_scale(images, get_features, backbone, levels, cfg.svm.target_norm, seed=cfg.seed,
                                       projection=cfg.spp.projection)
    in_dim = backbone.channels * sum(n * n for n in levels)
    head: Optional[FCHead] = None
    if cfg.finetune.enabled:
        head = FCHead(in_dim, cfg.finetune.fc_dims, K, cfg.finetune.dropout)
        if stages.fresh("finetune", ft_digest, head_file):
            z = load_npz(head_file)
            head.load_state_dict({k: torch.from_numpy(v) for k, v in z.items()})
            head.eval()
            print("fine-tuning: done before, reusing", head_file)
        else:
            ckpt = run / f"finetune_ckpt_{ft_digest}.pt"
            info = finetune(images, get_features, backbone, head, pool5_scale, cfg, ckpt, progress)
            atomic_save_npz(head_file, **{k: v.numpy() for k, v in head.state_dict().items()})
            stages.finish("finetune", ft_digest, time.perf_counter() - t, **info)
            print(f"fine-tuning: {info}")
    elif cfg.svm.layer != "pool5":
        raise ValueError("finetune.enabled=false needs svm.layer=pool5 (there are no fc layers to read)")
    if stop_after == "finetune":
        return None

    # 4 + 5. per-image SVM features (and pool5 of regression examples), then SVMs and regressors
    svm_digest = params_digest({"ft": ft_digest if head is not None else None, "svm": cfg.svm.__dict__,
                                "bbox": cfg.bbox.__dict__, "in": feat_sig, "scale_rule": cfg.features.scale_rule})
    svm_file, bbox_file = run / "svm.npz", run / "bbox.npz"
    if stages.fresh("svm", svm_digest, svm_file) and (not cfg.bbox.enabled or stages.fresh("bbox", svm_digest,
                                                                                          bbox_file)):
        print("SVMs and box regression: done before, reusing", svm_file)
    else:
        t = time.perf_counter()
        svm_rows, reg_x, reg_boxes, reg_gt, reg_labels = [], [], [], [], []
        probe = SPPDetector(cfg, ds.class_names, backbone, head, pool5_scale, 1.0,
                            np.zeros((1, K), np.float32), np.zeros(K, np.float32), device=cfg.features.device)
        for i, r in enumerate(tqdm(ds.records, desc="SVM features", unit="img", disable=not progress)):
            w = images[i].windows
            feats = get_features(i, False)
            p5 = pool_boxes(feats, w.boxes, backbone, levels, cfg.features.scale_rule,
                            projection=cfg.spp.projection, name=f"windows of {r.path}") * pool5_scale
            x = probe.svm_features(p5)
            svm_rows.append((x.astype(np.float16), w.gt_labels, w.class_iou))
            if cfg.bbox.enabled and len(r.boxes):
                ex = select_regression_examples(w.boxes[~w.is_gt], r.boxes, r.labels, cfg.bbox.iou_thresh)
                if len(ex):
                    rows = np.where(ex.is_gt, ex.index, ex.index + len(r.boxes))
                    reg_x.append(p5[torch.from_numpy(rows)].numpy().astype(np.float16))
                    reg_boxes.append(ex.boxes)
                    reg_gt.append(ex.gt_boxes)
                    reg_labels.append(ex.labels)
            maps.pop((i, False), None)
            maps.pop((i, True), None)
        t_feat = time.perf_counter() - t
        rng = np.random.default_rng(cfg.seed)
        n_img = min(cfg.svm.norm_images, len(svm_rows))
        sample = []
        for i in np.sort(rng.choice(len(svm_rows), n_img, replace=False)):
            x = svm_rows[i][0]
            sample.append(x[np.sort(rng.choice(len(x), min(cfg.svm.norm_boxes, len(x)), replace=False))])
        sample = np.concatenate(sample).astype(np.float32)
        svm_scale = cfg.svm.target_norm / float(np.linalg.norm(sample, axis=1).mean())

        class _Lazy:
            def __len__(self):
                return len(svm_rows)

            def __getitem__(self, i):
                x, gl, ci = svm_rows[i]
                return SVMImage(x.astype(np.float32) * svm_scale, gl, ci)

        t = time.perf_counter()
        W, b, summary = train_svms(_Lazy(), K, cfg.svm, ds.class_names, progress=progress)
        print(format_summary(summary))
        atomic_save_npz(svm_file, W=W, b=b, svm_scale=np.float64(svm_scale), pool5_scale=np.float64(pool5_scale))
        stages.finish("svm", svm_digest, time.perf_counter() - t + t_feat, feature_seconds=round(t_feat, 2),
                      summary=[{k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))} for s in summary])
        if cfg.bbox.enabled:
            t = time.perf_counter()
            if not reg_x:
                raise ValueError("box regression: no proposal overlaps a ground-truth box; check the proposals")
            reg = train_box_regressors(np.concatenate(reg_x).astype(np.float32), np.concatenate(reg_boxes),
                                       np.concatenate(reg_gt), np.concatenate(reg_labels), K, cfg.bbox.lam,
                                       cfg.bbox.whiten, class_names=ds.class_names)
            atomic_save_npz(bbox_file, **reg.to_arrays())
            stages.finish("bbox", svm_digest, time.perf_counter() - t, examples=int(sum(len(v) for v in reg_labels)))

    if stop_after in ("svm", "bbox"):
        return None
    # 6. the model file
    z = load_npz(svm_file)
    regressor = BoxRegressor.from_arrays(load_npz(bbox_file)) if cfg.bbox.enabled else None
    model = SPPDetector(cfg, ds.class_names, backbone, head, float(z["pool5_scale"]), float(z["svm_scale"]),
                        z["W"], z["b"], regressor, device=cfg.features.device)
    path = run / "model.safetensors"
    model.save(path)
    print("stage times (s): " + ", ".join(f"{k}={v.get('seconds')}" for k, v in stages.done.items()))
    print(f"model written to {path}")
    return path
