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
import shutil
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
        # One pair of files per image (fc features of GT + proposals; pool5 of the box-regression
        # examples), written atomically and keyed by what produced them: the pass resumes after
        # an interruption, and the SVMs read the images back one at a time, so memory does not
        # grow with the dataset (fc7 of ~1,900 windows is ~3.9 MB per image in fp16; held in
        # RAM this made peak RSS grow by ~11 MB per training image on BCCD). R-CNN's release
        # also cached these features on disk. Removed once both stages are done.
        rows_digest = params_digest({"ft": ft_digest if head is not None else None, "layer": cfg.svm.layer,
                                     "bbox_iou": cfg.bbox.iou_thresh, "bbox": cfg.bbox.enabled, "in": feat_sig,
                                     "scale_rule": cfg.features.scale_rule})
        rows_dir = run / f"svm_rows_{rows_digest[:16]}"
        probe = SPPDetector(cfg, ds.class_names, backbone, head, pool5_scale, 1.0,
                            np.zeros((1, K), np.float32), np.zeros(K, np.float32), device=cfg.features.device)
        for i, r in enumerate(tqdm(ds.records, desc="SVM features", unit="img", disable=not progress)):
            svm_path, reg_path = rows_dir / f"{i:06d}_svm.npz", rows_dir / f"{i:06d}_bbox.npz"
            if svm_path.is_file() and reg_path.is_file():
                continue
            w = images[i].windows
            feats = get_features(i, False)
            p5 = pool_boxes(feats, w.boxes, backbone, levels, cfg.features.scale_rule,
                            projection=cfg.spp.projection, name=f"windows of {r.path}") * pool5_scale
            reg = {"x": np.zeros((0, p5.shape[1]), np.float16), "boxes": np.zeros((0, 4), np.float32),
                   "gt": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
            if cfg.bbox.enabled and len(r.boxes):
                ex = select_regression_examples(w.boxes[~w.is_gt], r.boxes, r.labels, cfg.bbox.iou_thresh)
                if len(ex):
                    rows = np.where(ex.is_gt, ex.index, ex.index + len(r.boxes))
                    reg = {"x": p5[torch.from_numpy(rows)].numpy().astype(np.float16), "boxes": ex.boxes,
                           "gt": ex.gt_boxes, "labels": ex.labels}
            atomic_save_npz(reg_path, **reg)
            atomic_save_npz(svm_path, x=probe.svm_features(p5).astype(np.float16), gt_labels=w.gt_labels,
                            class_iou=w.class_iou)
            maps.pop((i, False), None)
            maps.pop((i, True), None)
        maps.clear()
        t_feat = time.perf_counter() - t

        def read_rows(i: int, kind: str) -> dict:
            z = load_npz(rows_dir / f"{i:06d}_{kind}.npz")
            if z is None:
                raise RuntimeError(f"{rows_dir / f'{i:06d}_{kind}.npz'} is missing or unreadable; delete "
                                   f"{rows_dir} and run again")
            return z

        rng = np.random.default_rng(cfg.seed)
        n_img = min(cfg.svm.norm_images, len(ds.records))
        sample = []
        for i in np.sort(rng.choice(len(ds.records), n_img, replace=False)):
            x = read_rows(int(i), "svm")["x"]
            sample.append(x[np.sort(rng.choice(len(x), min(cfg.svm.norm_boxes, len(x)), replace=False))])
        sample = np.concatenate(sample).astype(np.float32)
        svm_scale = cfg.svm.target_norm / float(np.linalg.norm(sample, axis=1).mean())

        def svm_images():  # read again for each pass (positives, then mining)
            for i in range(len(ds.records)):
                z = read_rows(i, "svm")
                yield SVMImage(z["x"].astype(np.float32) * svm_scale, z["gt_labels"], z["class_iou"])

        t = time.perf_counter()
        W, b, summary = train_svms(svm_images, K, cfg.svm, ds.class_names, progress=progress)
        print(format_summary(summary))
        atomic_save_npz(svm_file, W=W, b=b, svm_scale=np.float64(svm_scale), pool5_scale=np.float64(pool5_scale))
        stages.finish("svm", svm_digest, time.perf_counter() - t + t_feat, feature_seconds=round(t_feat, 2),
                      summary=[{k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))} for s in summary])
        if cfg.bbox.enabled:
            t = time.perf_counter()
            parts = [read_rows(i, "bbox") for i in range(len(ds.records))]
            reg = {k: np.concatenate([z.pop(k) for z in parts]) for k in ("x", "boxes", "gt", "labels")}
            del parts
            if not len(reg["labels"]):
                raise ValueError("box regression: no proposal overlaps a ground-truth box; check the proposals")
            # pool5 stays fp16 here (ridge_solve upcasts row chunks to float64; fp16 -> float64 is
            # exact, so the result is the same as from a float32 copy, without 4 bytes per value)
            regressor = train_box_regressors(reg["x"], reg["boxes"], reg["gt"], reg["labels"], K,
                                             cfg.bbox.lam, cfg.bbox.whiten, class_names=ds.class_names)
            atomic_save_npz(bbox_file, **regressor.to_arrays())
            stages.finish("bbox", svm_digest, time.perf_counter() - t, examples=int(len(reg["labels"])))
            del reg
        shutil.rmtree(rows_dir, ignore_errors=True)

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
