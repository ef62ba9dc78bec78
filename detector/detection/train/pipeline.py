"""The training pipeline: a loop over resumable stages (detector.detection.train.stages lists them).

proposals -> conv features -> fine-tuning -> SVMs -> box regression -> model file.

Proposals and conv maps live in content-keyed caches (`--cache`, default `data/cache`),
shared between runs, so those two stages always run and cost little when cached.  Every
other stage writes its result into the run folder atomically and records, in
`stages.json`, the digest of what its result depends on (`detector.detection.train.stages.stage_digests`).
A rerun reuses a stage whose digest and artifact are still there and redoes it when
anything it depends on changed; fine-tuning also checkpoints inside the stage, and the SVM
and regression rows are kept per image (detector.detection.train.rows) until their stage is done.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from detector.core.backbones import Backbone, build_backbone, split_trunk
from detector.detection.bbox_regression import BoxRegressor, box_layer, train_box_regressors
from detector.cache import (arrays_digest, atomic_save_npz, atomic_write_text, file_digest, load_npz, make_dir,
                            params_digest)
from detector.config import Config, box_layer_trained, regression_reference
from detector.datasets import load_dataset
from detector.datasets.records import Dataset
from detector.core.embedder import StackedMaps, WindowEmbedder
from detector.errors import CacheError, DatasetError
from detector.distributed import (all_gather, all_local_cores, barrier, broadcast, check_same_config,
                                  check_shared_folder, fault_point, log_shard, shard, world)
from detector.core.feature_cache import FeatureCache, MapMemory, TailExtractor, extract_all
from detector.core.features import FeatureExtractor
from detector.detection.train.finetune import (TrainImage, finetune, pool5_sample, pool_pairs, stacked_pooler,
                                               tail_pooler)
from detector.core.heads import FCHead
from detector.proposals.files import dataset_proposals
from detector.detection.matching import match_windows
from detector.detection.detector import SPPDetector
from detector.detection.calibration import fit_calibration, held_out_margins
from detector.detection.predictor import WindowPredictor
from detector.progress import progress_bar
from detector.detection.train.stages import (STAGE_NAMES, STAGES, StageRecords, data_digest, mirror_maps,
                                             relevant_config, stage_digests)
from detector.detection.svm import format_summary, train_svms
from detector.detection.train.rows import RowStore, regression_examples, svm_feature_scale, svm_images, write_rows

log = logging.getLogger(__name__)


def load_training_set(dataset: str, split: str, cfg: Config, image_dir: Optional[str] = None) -> Dataset:
    ds = load_dataset(dataset, split, cfg.classes, image_dir)
    if len(ds) == 0:
        raise DatasetError(f"{dataset}: training split '{split}' has no usable images")
    if sum(len(r.boxes) for r in ds) == 0:
        raise DatasetError(f"{dataset}: training split '{split}' has no objects to learn from")
    return ds


@dataclass
class TrainRun:
    """What the stages share: the config (a private copy), folders, dataset, digests, and
    the objects built along the way."""

    cfg: Config
    run: Path
    cache: Path
    ds: Dataset
    progress: bool
    records: StageRecords
    digests: dict = field(default_factory=dict)
    backbone: Optional[Backbone] = None
    fcache: Optional[FeatureCache] = None
    images: list = field(default_factory=list)  # TrainImage per record
    embedder: Optional[WindowEmbedder] = None
    maps: Optional[MapMemory] = None
    proposals_file: Optional[str] = None  # published proposals instead of selective search
    rpn: Optional[object] = None  # the learned proposals' head (proposals.method: rpn)
    box: Optional[torch.nn.Linear] = None  # the box layer fine-tuned with the fc layers (bbox.method: finetune)
    # The trunk's last blocks, fine-tuned with the fc layers (finetune.trunk_trainable_blocks > 0).  Then
    # `first_cache` holds the maps of the blocks before them (what the features stage computes and
    # fine-tuning reads), and `fcache` the whole trunk's, computed from those by the pretrained blocks
    # until fine-tuning ends and by the fine-tuned ones after.  Without: both are the same cache.
    tail: Optional[torch.nn.Module] = None
    first_cache: Optional[FeatureCache] = None
    first_maps: Optional[MapMemory] = None

    def features(self, i: int, flip: bool):
        """Image i's conv maps (of its mirror image if flip), from RAM or the feature cache."""
        return self.maps.get(self.ds.records[i].path, flip)

    def first_features(self, i: int, flip: bool):
        """Image i's maps of the trunk's blocks before the fine-tuned ones."""
        return self.first_maps.get(self.ds.records[i].path, flip)

    def forget(self, i: int) -> None:
        self.maps.forget(self.ds.records[i].path)

    def my_images(self, stage: str) -> np.ndarray:
        """This rank's share of the images (all of them in one process), balanced by pixels."""
        mine = shard([rec.width * rec.height for rec in self.ds])
        log_shard(stage, len(mine))
        return mine

    def stale(self, name: str) -> bool:
        """Whether stage `name` has to run: always for one that is not reusable, else when its
        record's digest differs or one of its output files is gone (never for a stage the
        config does not have)."""
        spec = STAGES[STAGE_NAMES.index(name)]
        if not spec.applies(self.cfg):
            return False
        files = [self.run / f for f in spec.outputs(self.cfg)]
        return not spec.reusable or not self.records.fresh(name, self.digests[name], files)


# --------------------------------------------------------------------------- the stages

def run_rpn(r: TrainRun) -> dict:
    """Learned proposals: the head trained on the cached conv maps (rank 0; ~1 min on BCCD, so
    DistributedDataParallel on a 2-image batch would save little), written to rpn.npz."""
    def new_head():
        from detector.proposals import rpn as R

        cfg, bb = r.cfg, r.backbone
        spec = R.derive_anchors([rec.boxes for rec in r.ds], [(rec.width, rec.height) for rec in r.ds],
                                cfg.features.scales, cfg.features.max_size, bb.stride, bb.offset,
                                sizes=cfg.rpn.anchor_sizes or None, ratios=cfg.rpn.anchor_ratios or None)
        print(f"rpn anchors: {spec.rule}")
        return R.RPN(bb.channels, spec, R.proposal_settings(cfg.rpn), seed=cfg.seed).to(r.fcache.extractor.device)

    return _fit_head(r, "rpn", new_head)


def reuse_rpn(r: TrainRun) -> None:
    _load_head(r, "rpn")


def _fit_head(r: TrainRun, stage: str, start: Callable) -> dict:
    """Train the proposal head `start()` gives on `r.features` (rank 0), write it to
    RUN/<stage>.npz and load it back as `r.rpn` on every rank; returns the training summary."""
    from detector.proposals import rpn as R

    info = {}
    if world().main:
        head = start()
        info = R.train_rpn(head, r.features, [rec.boxes for rec in r.ds], R.train_config(r.cfg.rpn), r.cfg.seed,
                           r.run / f"{stage}_ckpt_{r.digests[stage]}.pt", r.progress)
        info["train_seconds"] = info.pop("seconds")  # the record's own "seconds" is the stage's
        atomic_save_npz(r.run / f"{stage}.npz", **R.to_npz_arrays(head))
    barrier()
    _load_head(r, stage)
    return info


def _load_head(r: TrainRun, stage: str) -> None:
    from detector.proposals import rpn as R

    z = load_npz(r.run / f"{stage}.npz")
    if z is None:
        raise CacheError(f"{r.run / f'{stage}.npz'} is unreadable; delete it and run again")
    r.rpn = R.from_npz_arrays(z, R.proposal_settings(r.cfg.rpn)).to(r.fcache.extractor.device)


def learned_proposals(r: TrainRun) -> dict:
    """The head's proposals of every training image (train_top_n each), from the cached maps;
    under torchrun each rank does its share and all get all."""
    from detector.proposals import rpn as R

    settings = R.proposal_settings(r.cfg.rpn, training=True)
    mine = {r.ds.records[i].image_id: r.rpn.propose(r.features(i, False), settings)[0]
            for i in progress_bar(r.my_images("proposals"), desc="learned proposals", unit="img",
                                  disable=not r.progress)}
    return {k: v for part in all_gather(mine) for k, v in part.items()}


def _matched_images(r: TrainRun, props: dict) -> list:
    """A TrainImage per record: its proposals matched to its ground-truth boxes."""
    images, empty = [], 0
    for rec in r.ds:
        boxes = props.get(rec.image_id)
        if boxes is None or len(boxes) == 0:
            empty += 1
            boxes = np.zeros((0, 4), np.float32)
        images.append(TrainImage(rec.path, rec.width, rec.height,
                                 match_windows(rec.boxes, rec.labels, boxes, len(r.ds.class_names))))
    if empty:
        log.warning("%d training images have no proposals; only their ground-truth boxes are used", empty)
    return images


def run_rpn_refit(r: TrainRun) -> dict:
    """Learned proposals with fine-tuned trunk blocks (Faster R-CNN's alternating training, its
    third step): the head, trained before fine-tuning on the pretrained trunk's maps, trained
    again from there on the fine-tuned trunk's, the maps it reads at test time; then the training
    images' proposals again, from it, for the SVMs and box regression (the fourth step)."""
    first = r.rpn
    info = _fit_head(r, "rpn_refit", lambda: copy.deepcopy(first))
    r.images = _matched_images(r, learned_proposals(r))
    return info


def reuse_rpn_refit(r: TrainRun) -> None:
    _load_head(r, "rpn_refit")
    r.images = _matched_images(r, learned_proposals(r))  # cheap: one head pass per image


def run_proposals(r: TrainRun) -> dict:
    computed = cached = 0
    if r.proposals_file is not None:
        props = dataset_proposals(r.proposals_file, r.ds.records)
    elif r.rpn is not None:
        props = learned_proposals(r)
        computed = len(props)
    else:
        from detector.proposals import sharded_proposals

        props = sharded_proposals(r.ds.records, r.cache / "proposals", r.cfg.proposals, progress=r.progress)
        computed, cached = props.computed, props.cached
    r.images = _matched_images(r, props)
    return {"boxes_per_image": float(np.mean([len(v) for v in props.values()])) if props else 0.0,
            "computed": computed, "cached": cached, "file": r.proposals_file}


def run_features(r: TrainRun) -> dict:
    flips = (False, True) if mirror_maps(r.cfg) else (False,)
    stats = extract_all([r.ds.records[i].path for i in r.my_images("features")], r.first_cache,
                        progress=r.progress, flips=flips)
    failed = [f for part in all_gather(stats["failed"]) for f in part]
    if failed:
        path, why = failed[0]
        raise DatasetError(f"{len(failed)} training images are unreadable, e.g. {path}: {why}")
    return {"cache": str(r.first_cache.dir), "computed": stats["computed"], "cached": stats["cached"]}


def _head(r: TrainRun) -> FCHead:
    ft = r.cfg.finetune
    pool5_dim = WindowEmbedder.from_config(r.cfg, r.backbone).pool5_dim
    return FCHead(pool5_dim, ft.fc_dims, len(r.ds.class_names), ft.dropout).to(r.fcache.extractor.device)


def _pooler(r: TrainRun):
    """How fine-tuning turns (image, row) pairs into pool5: on a GPU, when every map fits in
    features.ram_cache_mb, one batched roi_pool over maps resident on the device; else image by
    image from maps in RAM (on the CPU the range-max table and small roi_pools are faster)."""
    device = r.fcache.extractor.device
    if device.type != "cpu":
        flips = (False, True)
        first = [r.features(0, f) for f in flips]
        per_image = sum(sf.features.numel() * 4 for m in first for sf in m)
        if per_image * len(r.images) <= r.cfg.features.ram_cache_mb * 1024 * 1024:
            slots = [r.fcache.get(im.path, f) for im in r.images for f in flips]
            stacked = StackedMaps(slots, device)
            return stacked_pooler(r.embedder, r.images, stacked)

    def pool(pairs, flips, scales):
        return pool_pairs(r.embedder, r.images, pairs, flips, scales, r.features)

    return pool


def _use_tuned_trunk(r: TrainRun) -> None:
    """After fine-tuning the last blocks: later stages read the whole trunk's maps, cached under
    the first blocks' cache and the blocks' weights; the model file gets the same id."""
    tuned = arrays_digest({k: v.detach().cpu().numpy() for k, v in r.tail.state_dict().items()})
    r.backbone.weights_id = f"{r.backbone.weights_id}+finetuned:{tuned}"
    _whole_trunk_maps(r, r.tail)
    r.first_maps.clear()  # fine-tuning was their only reader


def _whole_trunk_maps(r: TrainRun, tail: torch.nn.Module) -> None:
    """`fcache` and `maps`: the whole trunk's maps, the last blocks `tail` run on the first blocks'
    cached maps, cached under the backbone's current weights id."""
    r.fcache = FeatureCache(r.cache / "features", TailExtractor(r.first_cache, tail, r.backbone.weights_id),
                            r.cfg.features.cache_dtype)
    r.maps = MapMemory(r.fcache, r.cfg.features.ram_cache_mb, r.fcache.extractor.device)


def run_finetune(r: TrainRun) -> dict:
    cfg = r.cfg
    head = _head(r) if cfg.finetune.enabled else None
    r.embedder = WindowEmbedder.from_config(cfg, r.backbone, head)
    sample = pool5_sample(r.images, r.features, seed=cfg.seed)
    scale = broadcast(r.embedder.fit_pool5_scale(sample, cfg.svm.target_norm) if world().main else None)
    r.embedder.pool5_scale = scale
    info: dict = {"pool5_scale": scale}
    arrays = {"pool5_scale": np.float64(scale)}
    if head is not None:
        ckpt = r.run / f"finetune_ckpt_{r.digests['finetune']}.pt"
        r.box = box_layer(cfg.finetune.fc_dims[1], len(r.ds.class_names)).to(r.fcache.extractor.device) \
            if box_layer_trained(cfg) else None
        pool = _pooler(r) if r.tail is None else tail_pooler(r.embedder, r.images, r.first_features)
        info.update(finetune(head, r.images, pool, cfg.finetune, len(cfg.features.scales), cfg.seed, ckpt,
                             r.progress, box=r.box, box_weight=cfg.bbox.loss_weight, tail=r.tail))
        if world().main:
            print(f"fine-tuning: {info}")
        arrays.update({f"head.{k}": v.cpu().numpy() for k, v in head.state_dict().items()})
        if r.box is not None:
            arrays.update({f"box.{k}": v.detach().cpu().numpy() for k, v in r.box.state_dict().items()})
        if r.tail is not None:
            arrays.update({f"tail.{k}": v.detach().cpu().numpy() for k, v in r.tail.state_dict().items()})
    if world().main:
        atomic_save_npz(r.run / "finetune.npz", **arrays)
    barrier()
    if r.tail is not None:
        _use_tuned_trunk(r)
    return info


def reuse_finetune(r: TrainRun) -> None:
    z = load_npz(r.run / "finetune.npz")
    if z is None:
        raise CacheError(f"{r.run / 'finetune.npz'} is unreadable; delete it and run again")
    head = None
    if r.cfg.finetune.enabled:
        head = _head(r)
        head.load_state_dict({k[5:]: torch.from_numpy(v).to(head.fc6.weight.device)
                              for k, v in z.items() if k.startswith("head.")})
        head.eval()
        if box_layer_trained(r.cfg):
            if "box.weight" not in z:
                raise CacheError(f"{r.run / 'finetune.npz'} has no box layer; delete it and run again")
            r.box = box_layer(r.cfg.finetune.fc_dims[1], len(r.ds.class_names))
            r.box.load_state_dict({k: torch.from_numpy(z[f"box.{k}"]) for k in ("weight", "bias")})
    if r.tail is not None:
        keys = set(r.tail.state_dict())
        if {k[5:] for k in z if k.startswith("tail.")} != keys:
            raise CacheError(f"{r.run / 'finetune.npz'} does not hold the fine-tuned trunk blocks; delete it and "
                             "run again")
        device = next(r.tail.parameters()).device
        r.tail.load_state_dict({k: torch.from_numpy(z[f"tail.{k}"]).to(device) for k in keys})
        _use_tuned_trunk(r)
    r.embedder = WindowEmbedder.from_config(r.cfg, r.backbone, head, pool5_scale=float(z["pool5_scale"]))


def _row_stores(r: TrainRun) -> tuple[RowStore, RowStore]:
    return (RowStore(r.run / f"svm_rows_{r.digests['svm_rows']}"),
            RowStore(r.run / f"bbox_rows_{r.digests['bbox_rows']}"))


def _write_rows(r: TrainRun, want_svm: bool) -> float:
    """One pass for both row sets when both stages have to run (conv maps are read once);
    returns its seconds."""
    t = time.perf_counter()
    svm_store, bbox_store = _row_stores(r)
    want_bbox = r.cfg.bbox.enabled and not box_layer_trained(r.cfg) and r.stale("bbox")
    write_rows(r.embedder, r.images, r.features, svm_store if want_svm else None,
               bbox_store if want_bbox else None, r.cfg.bbox.iou_thresh,
               r.progress, done=r.forget, indices=r.my_images("svm rows" if want_svm else "bbox rows"),
               reference=regression_reference(r.cfg))
    r.maps.clear()
    barrier()  # every rank's rows are on disk
    return time.perf_counter() - t


def run_svm(r: TrainRun) -> dict:
    s, n = r.cfg.svm, len(r.ds)
    store = _row_stores(r)[0]
    rows_s = _write_rows(r, want_svm=True)
    K, w = len(r.ds.class_names), world()
    scale = svm_feature_scale(store, n, s.norm_images, s.norm_boxes, s.target_norm, r.cfg.seed)
    # The classes are independent: under torchrun each rank trains every W-th class from the
    # shared row files (each rank reads all rows), and rank 0 gathers the columns.  On BCCD
    # that is seconds, on COCO's 80 classes ~40 h for one process (BENCHMARKS.md, "Scale on paper").
    mine = list(range(w.rank, K, w.size))
    log_shard("svm classes", len(mine), unit="classes")
    calib = None
    if mine:
        W, b, summary = train_svms(svm_images(store, n, scale), K, s, r.ds.class_names, progress=r.progress,
                                   classes=mine)
        if s.calibrate:
            held = held_out_margins(lambda idx: svm_images(store, n, scale, idx), n, K, s, mine, s.calibration_folds)
            calib = fit_calibration(held, K)[mine]
    parts = all_gather((mine, W[:, mine], b[mine], summary, calib) if mine else ([], None, None, [], None))
    if not w.main:
        barrier()
        return {}
    W, b = np.zeros((W.shape[0], K), np.float32), np.zeros(K, np.float32)
    ab = np.tile([1.0, 0.0], (K, 1))
    for classes, Wk, bk, _, cal in parts:
        if classes:
            W[:, classes], b[classes] = Wk, bk
            if cal is not None:
                ab[classes] = cal
    summary = sorted((row for part in parts for row in part[3]), key=lambda row: row["index"])
    print(format_summary(summary))
    extra = {"calibration": ab} if s.calibrate else {}
    atomic_save_npz(r.run / "svm.npz", W=W, b=b, svm_scale=np.float64(scale), **extra)
    store.remove()
    barrier()
    return {"feature_seconds": round(rows_s, 2),
            "summary": [{k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))} for row in summary]}


def run_bbox(r: TrainRun) -> dict:
    if not r.cfg.bbox.enabled:
        return {"enabled": False}
    if box_layer_trained(r.cfg):  # trained with the fc layers: only written in the regressors' form
        if world().main:
            atomic_save_npz(r.run / "bbox.npz", **BoxRegressor.from_box_layer(
                r.box.weight.detach().cpu().numpy(), r.box.bias.detach().cpu().numpy()).to_arrays())
        barrier()
        return {"method": "finetune"}
    store = _row_stores(r)[1]
    rows_s = _write_rows(r, want_svm=False)
    if not world().main:
        barrier()
        return {}
    reg = regression_examples(store, len(r.ds))
    if not len(reg["labels"]):
        raise DatasetError("box regression: no proposal overlaps a ground-truth box by more than "
                           f"{r.cfg.bbox.iou_thresh}; check the proposals and annotations")
    with all_local_cores():
        regressor = train_box_regressors(reg["x"], reg["boxes"], reg["gt"], reg["labels"], len(r.ds.class_names),
                                         r.cfg.bbox.lam, r.cfg.bbox.whiten, class_names=r.ds.class_names,
                                         progress=r.progress)
    atomic_save_npz(r.run / "bbox.npz", **regressor.to_arrays())
    store.remove()
    barrier()
    return {"examples": int(len(reg["labels"])), "feature_seconds": round(rows_s, 2)}


def run_model(r: TrainRun) -> dict:
    if not world().main:
        return {}
    z = load_npz(r.run / "svm.npz")
    if z is None:
        raise CacheError(f"{r.run / 'svm.npz'} is unreadable; delete it and run again")
    r.embedder.feature_scale = float(z["svm_scale"])
    regressor = BoxRegressor.from_arrays(load_npz(r.run / "bbox.npz")) if r.cfg.bbox.enabled else None
    predictor = WindowPredictor(z["W"], z["b"], regressor, z.get("calibration"))
    model = SPPDetector(r.cfg, r.ds.class_names, r.embedder, predictor, rpn=r.rpn, device=r.cfg.features.device)
    model.save(r.run / "model.safetensors")
    return {}


@dataclass(frozen=True)
class Step:
    """The code of one stage of `stages.STAGES`: `run` does the work and returns its summary;
    `reuse` restores what later stages need from a reused stage's outputs."""
    run: Callable[[TrainRun], dict]
    reuse: Callable[[TrainRun], None] = lambda r: None


STEPS = {
    "features": Step(run_features),
    "rpn": Step(run_rpn, reuse_rpn),
    "proposals": Step(run_proposals),
    "finetune": Step(run_finetune, reuse_finetune),
    "rpn_refit": Step(run_rpn_refit, reuse_rpn_refit),
    "svm": Step(run_svm),
    "bbox": Step(run_bbox),
    "model": Step(run_model),
}
PIPELINE = tuple((spec, STEPS[spec.name]) for spec in STAGES)  # a stage without code fails at import


def feature_source(cfg: Config, features_root) -> tuple[Backbone, Optional[torch.nn.Module], FeatureCache]:
    """(backbone, its trainable last blocks or None, the cache the features stage fills): the whole
    trunk's maps, or with `finetune.trunk_trainable_blocks` k > 0 the maps of the blocks before
    the last k (`tools/extract_features.py` fills the same cache)."""
    backbone = build_backbone(cfg.backbone)
    first, tail = split_trunk(backbone, cfg.finetune.trunk_trainable_blocks, "finetune.trunk_trainable_blocks")
    extractor = FeatureExtractor(first, cfg.features.scales, cfg.features.max_size, cfg.features.device,
                                 channels_last=cfg.features.channels_last, max_upscale=cfg.features.max_upscale)
    if tail is not None:
        tail.to(extractor.device).eval()
    return backbone, tail, FeatureCache(features_root, extractor, cfg.features.cache_dtype)


def prepare(dataset: str, run_dir: str, cfg: Config, train_split: str = "trainval", cache_root: str = "data/cache",
            progress: bool = True, image_dir: Optional[str] = None, proposals_file: Optional[str] = None) -> TrainRun:
    """Load the training set, build the backbone and feature cache, and compute every digest."""
    cfg = copy.deepcopy(cfg)  # the caller's config is never changed
    run = make_dir(run_dir)
    ds = load_training_set(dataset, train_split, cfg, image_dir)
    cfg.classes = list(ds.class_names)
    w = world()
    check_same_config(params_digest({"config": relevant_config(cfg), "data": data_digest(ds)}))
    check_shared_folder(Path(cache_root))
    check_shared_folder(run)
    if w.main:
        atomic_write_text(run / "config.yaml", cfg.dump())
        print(f"training set: {len(ds)} images, {len(ds.class_names)} classes ({', '.join(ds.class_names)})"
              + (f"; {w.size} processes" if w.distributed else ""))
    r = TrainRun(cfg, run, Path(cache_root), ds, progress and w.main, StageRecords(run))
    torch.manual_seed(cfg.seed)  # before the backbone: building it draws from the generator, then the fc init does
    r.backbone, r.tail, r.first_cache = feature_source(cfg, r.cache / "features")
    r.fcache = r.first_cache
    r.maps = MapMemory(r.fcache, cfg.features.ram_cache_mb, r.fcache.extractor.device)
    if r.tail is not None:
        r.first_maps = r.maps
        # a copy: the pretrained blocks' maps must not change when fine-tuning changes `tail`
        _whole_trunk_maps(r, copy.deepcopy(r.tail))
    if proposals_file is not None:
        if not Path(proposals_file).is_file():
            raise FileNotFoundError(f"proposals file not found: {proposals_file}")
        r.proposals_file = str(proposals_file)
    r.digests = stage_digests(cfg, data_digest(ds), r.first_cache.key,
                              file_digest(proposals_file) if proposals_file else None)
    barrier()  # every rank has read stages.json before rank 0 writes it again
    return r


def train(dataset: str, run_dir: str, cfg: Config, train_split: str = "trainval", cache_root: str = "data/cache",
          progress: bool = True, stop_after: str = "model", image_dir: Optional[str] = None,
          proposals_file: Optional[str] = None) -> Optional[Path]:
    """Run (or resume) the stages up to `stop_after`; returns the model file's path when it is
    written.  proposals_file: R-CNN .mat or our .npz boxes to train on instead of selective search."""
    if stop_after not in STAGE_NAMES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGE_NAMES)}, got {stop_after!r}")
    r = prepare(dataset, run_dir, cfg, train_split, cache_root, progress, image_dir, proposals_file)
    for spec, step in PIPELINE[: STAGE_NAMES.index(stop_after) + 1]:
        if not spec.applies(r.cfg):
            continue
        fault_point(spec.name)
        if not r.stale(spec.name):
            step.reuse(r)
            r.records.reuse(spec.name)
            if world().main:
                print(f"{spec.name}: done before with the same inputs, reused")
            continue
        t = time.perf_counter()
        info = step.run(r)
        r.records.finish(spec.name, r.digests[spec.name], time.perf_counter() - t, **info)
    if world().main:
        print(r.records.report())
    if stop_after != "model":
        return None
    if world().main:
        print(f"model written to {r.run / 'model.safetensors'}")
    return r.run / "model.safetensors"
