"""Training the SPP-net classifier on cached conv maps (paper sections 3.1.3 and 3.1.4).

Input modes (`classifier.input`):

- `crop224`: fixed-size crops, the network that only ever sees 224x224 inputs (the
  no-SPP baseline: its pyramid always pools a 14x14 map the same way).  The crops are
  the views of `crop_positions` (corners and middle, or the 9-position grid) of 224 px
  on the image resized to 256, and the same on its mirror image; each epoch takes one
  at random per image, as the paper draws a random crop.
- `multisize`: the same crops, each also resized to the other `sizes` (paper 3.1.3:
  224 and 180, same content at two resolutions); `size_schedule: alternate` trains
  each epoch at one size and the next at the other, `random` draws the epoch's size
  uniformly from the integers in [min, max] (the paper's variant).  Each new size is
  one conv pass over every crop, so `random` costs a pass per distinct size drawn.
- `full`: the whole image at `full_scale` (shorter side) and its mirror image, pooled
  whole by SPP: no crop, no warp (paper 3.1.4).
- `scales`: the views the `multi` test scheme averages (grid9 windows of `view_size`,
  and their mirror images, at every scale of `test_scales`, plus the whole image at
  `full_scale` and its mirror), pooled from each image's conv maps at those scales.  Each
  epoch draws one view per image: a scale (or the full image) uniformly, then a view of
  it.  The network so sees, in training, the scales it is tested at (paper 3.1.3 trains
  at several sizes for that reason); trained at 224 and 256 only, the views at 448 and
  560 are ones it never saw.  The pool5 of every view is kept in memory (float16, about
  3 MB an image at stride 32), so a frozen trunk is required.

The trunk is frozen by default: every crop's or image's map is computed once into a
content-keyed cache (crops.CropCache, features.FeatureCache), its pool5 vector once per
run, and an epoch costs only the fc layers.  With `trunk_trainable_blocks: k` the cache
holds the maps before the last k blocks, and those blocks are trained with the head.

Each epoch's order, crops and dropout come from RNGs seeded by (seed, epoch), so a run
that resumes from its last checkpoint (written atomically after each epoch) gives the
same model as one that never stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from detector.progress import progress_bar

from detector.core.backbones import build_backbone, split_trunk
from detector.cache import atomic_write_json, atomic_write_text, load_checkpoint, make_dir, params_digest, save_checkpoint
from detector.classification.classifier import SPPClassifier, classifier_embedder, classifier_extractor, whole_pool5
from detector.config import Config, result_settings
from detector.classification.crops import CropCache
from detector.classification.views import view_boxes
from detector.distributed import barrier, check_same_config, check_shared_folder, log_shard, shard, world
from detector.datasets.imagefolder import ImageFolderSplit, load_image_folder
from detector.core.embedder import WindowEmbedder
from detector.errors import DatasetError, ImageError
from detector.core.feature_cache import FeatureCache
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.images import image_pixels

log = logging.getLogger(__name__)


SCALES = 0  # the "size" under which `scales` training keeps its views (they have every test scale)


def epoch_size(cfg: Config, epoch: int) -> int:
    """The input size of an epoch: the crop size, the full-image scale, or the multi-size schedule's
    (SCALES for `scales` training, whose views have every test scale)."""
    c = cfg.classifier
    if c.input == "scales":
        return SCALES
    if c.input == "crop224":
        return c.view_size
    if c.input == "full":
        return c.full_scale
    if c.size_schedule == "alternate":
        return c.sizes[epoch % len(c.sizes)]
    return int(np.random.default_rng([cfg.seed, epoch, 1]).integers(min(c.sizes), max(c.sizes) + 1))


class TrainingMaps:
    """Each training image's sample maps at an input size, from the cache (computed once)."""

    def __init__(self, cfg: Config, extractor: FeatureExtractor, cache_root: str):
        c, dtype = cfg.classifier, cfg.features.cache_dtype
        self.full = c.input in ("full", "scales")
        self.scales = c.input == "scales"
        if self.full:  # `scales`: the extractor has every test scale and the full-image scale
            self.cache = FeatureCache(Path(cache_root) / "features", extractor, dtype)
        else:
            self.cache = CropCache(Path(cache_root) / "crops", extractor, dtype, c.view_scale, c.view_size,
                                   c.crop_positions)

    def get(self, path: str, size: int) -> list[ScaleFeatures]:
        """`full`: the image's map and its mirror image's; `scales`: the maps of every scale, then
        the mirror image's; crops: each crop's map at `size`."""
        if self.scales:
            return self.cache.get(path, False) + self.cache.get(path, True)
        if self.full:
            return [self.cache.get(path, flip)[0] for flip in (False, True)]
        maps, (w, h) = self.cache.get_crops(path, size)
        return [ScaleFeatures(size, 1.0, m, (w, h)) for m in maps]


@dataclass
class Samples:
    """The usable training images and, for a frozen trunk, their unscaled pool5 per size."""
    cfg: Config
    paths: list[str]
    labels: np.ndarray
    maps: TrainingMaps
    tables: dict  # size -> float16 [images, samples per image, D] (frozen trunk only); SCALES -> [views, D]
    skipped: list
    groups: Optional[list] = None  # `scales`: per image, (first row, rows) of each scale's views and the full image's


def scale_view_rows(cfg: Config, embedder: WindowEmbedder, maps: list[ScaleFeatures]) -> tuple[torch.Tensor, list]:
    """Unscaled pool5 of the `multi` scheme's views of one image ([n, D]) and the (first row,
    rows) of each group: one per test scale (its grid9 views on the image and on its mirror
    image), then the full image and its mirror.  `maps`: TrainingMaps.get's, every scale of
    the image, then of its mirror image."""
    c = cfg.classifier
    half = len(maps) // 2
    by_scale = [{sf.scale: sf for sf in maps[:half]}, {sf.scale: sf for sf in maps[half:]}]
    W, H = maps[0].image_size
    rows, groups, n = [], [], 0
    for scale in sorted(c.test_scales):
        boxes = view_boxes(W, H, scale, c.view_size, "grid9", cfg.features.max_size)
        for side in by_scale:
            rows.append(embedder.pool5([side[scale]], boxes, np.zeros(len(boxes), np.int64)))
        groups.append((n, 2 * len(boxes)))
        n += 2 * len(boxes)
    rows += [whole_pool5(embedder, side[c.full_scale]) for side in by_scale]
    groups.append((n, 2))
    return torch.cat(rows), groups


def draw_views(groups: list, rng: np.random.Generator) -> np.ndarray:
    """One row per image: a group (a test scale, or the full image) uniformly, then a view of it."""
    out = np.empty(len(groups), np.int64)
    for i, g in enumerate(groups):
        first, count = g[rng.integers(len(g))]
        out[i] = first + rng.integers(count)
    return out


def collect(samples: Samples, size: int, embedder: Optional[WindowEmbedder], progress: bool) -> None:
    """Fill the cache at `size` (and, given the unscaled embedder of a frozen trunk, the pool5
    table); images that cannot be read are dropped from `samples`, with a warning, and counted."""
    keep, rows, groups, n = [], [], [], 0
    desc = "conv maps, test scales" if size == SCALES else f"conv maps, size {size}"
    for i, p in enumerate(progress_bar(samples.paths, desc=desc, unit="img", disable=not progress)):
        try:
            maps = samples.maps.get(p, size)
        except (ImageError, OSError) as e:
            log.warning("skipping %s: %s", p, e)
            samples.skipped.append((p, str(e)))
            continue
        keep.append(i)
        if size == SCALES:
            r, g = scale_view_rows(samples.cfg, embedder, maps)
            rows.append(r.half())
            groups.append([(first + n, count) for first, count in g])
            n += len(r)
        elif embedder is not None:
            rows.append(torch.cat([whole_pool5(embedder, sf) for sf in maps]).half())
    if len(keep) < len(samples.paths):
        samples.paths = [samples.paths[i] for i in keep]
        samples.labels = samples.labels[keep]
        samples.tables = {s: t[torch.as_tensor(keep)] for s, t in samples.tables.items()}
    if size == SCALES:  # one flat table: images have different numbers of distinct views
        samples.tables[size] = concat_releasing(rows)
        samples.groups = groups
    elif embedder is not None:
        samples.tables[size] = torch.stack(rows) if rows else torch.zeros(0)


def concat_releasing(rows: list) -> torch.Tensor:
    """torch.cat(rows), emptying `rows` as it copies: the peak is the table plus one image's
    rows, not twice the table (the `scales` table of flowers17 is 3.4 GB of float16)."""
    if not rows:
        return torch.zeros(0)
    out = torch.empty((sum(len(r) for r in rows),) + tuple(rows[0].shape[1:]), dtype=rows[0].dtype)
    rows.reverse()
    n = 0
    while rows:
        r = rows.pop()
        out[n:n + len(r)] = r
        n += len(r)
    return out


class Trainer:
    """The head (and the fine-tuned last blocks, if any) trained epoch by epoch."""

    def __init__(self, cfg: Config, embedder: WindowEmbedder, suffix: Optional[torch.nn.Module], samples: Samples):
        c = cfg.classifier
        self.cfg, self.embedder, self.suffix, self.samples = cfg, embedder, suffix, samples
        groups = [{"params": embedder.head.parameters(), "lr_mult": 1.0}]
        if suffix is not None:
            groups.append({"params": suffix.parameters(), "lr_mult": c.trunk_lr_mult})
        self.opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def pool5(self, idx: np.ndarray, pick: np.ndarray, size: int,
              embedder: Optional[WindowEmbedder] = None) -> torch.Tensor:
        """Scaled pool5 [B, D] of sample pick[k] of image idx[k] (through `embedder`, default the
        trainer's own)."""
        s, emb = self.samples, embedder or self.embedder
        if size == SCALES:  # `pick` holds rows of the flat table
            return s.tables[size][torch.from_numpy(pick)].float() * emb.pool5_scale
        if self.suffix is None:
            return s.tables[size][torch.from_numpy(idx), torch.from_numpy(pick)].float() * emb.pool5_scale
        rows = []
        for i, j in zip(idx, pick):
            sf = s.maps.get(s.paths[i], size)[j]
            out = self.suffix(sf.features.float()[None])[0]
            rows.append(whole_pool5(emb, ScaleFeatures(sf.scale, sf.factor, out, sf.image_size)))
        return torch.cat(rows)

    def epoch(self, epoch: int, progress: bool) -> dict:
        c, n = self.cfg.classifier, len(self.samples.paths)
        size = epoch_size(self.cfg, epoch)
        lr = c.lr * 0.1 ** sum(epoch >= s for s in c.lr_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        rng = np.random.default_rng([self.cfg.seed, epoch])
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)  # dropout
        order = rng.permutation(n)
        if size == SCALES:
            pick = draw_views(self.samples.groups, rng)
        else:
            per_image = len(self.samples.maps.get(self.samples.paths[0], size)) if self.suffix is not None \
                else self.samples.tables[size].shape[1]
            pick = rng.integers(0, per_image, n)
        head = self.embedder.head.train()
        losses, correct = [], 0
        for b in range(0, n, c.batch_size):
            idx = order[b:b + c.batch_size]
            y = torch.from_numpy(self.samples.labels[idx])
            logits = head(self.pool5(idx, pick[idx], size))
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(loss.item() * len(idx))
            correct += int((logits.argmax(1) == y).sum())
        head.eval()
        return {"epoch": epoch + 1, "size": "scales" if size == SCALES else size, "lr": lr, "loss": sum(losses) / n, "train_acc": correct / n}

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "head": self.embedder.head.state_dict(), "optimizer": self.opt.state_dict(),
                "suffix": None if self.suffix is None else self.suffix.state_dict(),
                "pool5_scale": self.embedder.pool5_scale}

    def restore(self, state: dict) -> int:
        self.embedder.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        if self.suffix is not None:
            self.suffix.load_state_dict(state["suffix"])
        self.embedder.pool5_scale = float(state["pool5_scale"])
        return int(state["epoch"])


def pool5_sample(trainer: Trainer, size: int, seed: int, n: int = 2000):
    """What `WindowEmbedder.fit_pool5_scale` estimates pool5's constant from (as in detection):
    up to `n` seeded samples at `size`, pooled through the embedder given."""
    s = trainer.samples
    rng = np.random.default_rng([seed, 7])
    if size == SCALES:  # rows of the flat table: every view of every image alike
        rows = rng.choice(len(s.tables[size]), size=min(n, len(s.tables[size])), replace=False)
        idx, pick = np.zeros_like(rows), rows
    else:
        per_image = len(s.maps.get(s.paths[0], size))
        flat = rng.choice(len(s.paths) * per_image, size=min(n, len(s.paths) * per_image), replace=False)
        idx, pick = flat // per_image, flat % per_image

    def sample(embedder: WindowEmbedder) -> torch.Tensor:
        with torch.no_grad():
            return trainer.pool5(idx, pick, size, embedder)

    return sample


def _run_digest(cfg: Config, data: ImageFolderSplit, feature_key: str) -> str:
    """What a checkpoint's training depends on: a checkpoint of another run is not resumed."""
    c = result_settings(cfg)
    paths = [str(Path(p).relative_to(data.root)) for p in data.paths]  # the same data wherever it lies
    return params_digest({"config": {k: c[k] for k in ("seed", "backbone", "features", "spp", "classifier")},
                          "paths": paths, "labels": data.labels, "features": feature_key})


def fill_cache_sharded(samples: Samples, sizes: list[int], progress: bool) -> None:
    """Under torchrun: each rank computes its share of the conv maps (balanced by pixels) into
    the shared cache, then all wait; rank 0 then reads every map from the cache.  Unreadable
    images are left to rank 0, which skips and reports them."""
    mine = shard([image_pixels(p) for p in samples.paths])
    log_shard("conv maps", len(mine))
    for size in sizes:
        for i in progress_bar(mine, desc=f"conv maps {world().rank}/{world().size}, size {size}", unit="img",
                      disable=not progress):
            try:
                samples.maps.get(samples.paths[i], size)
            except (ImageError, OSError):
                pass
    barrier()


def _check_classes(samples: Samples, names: list[str], root: str) -> None:
    left = set(samples.labels.tolist())
    empty = [n for k, n in enumerate(names) if k not in left]
    if empty:
        raise DatasetError(f"class folder {Path(root) / 'train' / empty[0]} has no readable image "
                           f"(every one was skipped: see the warnings)")


def train_classifier(dataset: str, out: str, cfg: Config, cache_root: str = "data/cache",
                     progress: bool = True) -> Optional[Path]:
    """Train on `dataset`/train and write `out`/model.safetensors; resumes from `out`/checkpoint.pt.
    Under torchrun the conv maps are split over the ranks; rank 0 trains and returns the model's
    path, the other ranks return None once their maps are in the cache."""
    t0 = time.time()
    c, run = cfg.classifier, Path(out)
    make_dir(run)
    atomic_write_text(run / "config.yaml", cfg.dump())
    data = load_image_folder(dataset, "train")
    torch.manual_seed(cfg.seed)  # the head's initial weights
    backbone = build_backbone(cfg.backbone)
    frozen, suffix = split_trunk(backbone, c.trunk_trainable_blocks)
    scales = sorted(set(c.test_scales) | {c.full_scale}) if c.input == "scales" else [c.full_scale]
    extractor = classifier_extractor(cfg, frozen, scales, cfg.features.device)
    embedder = classifier_embedder(cfg, backbone, len(data.class_names))
    samples = Samples(cfg, list(data.paths), np.array(data.labels, np.int64), TrainingMaps(cfg, extractor, cache_root),
                      {}, list(data.skipped))
    unscaled = None if suffix is not None else embedder.unscaled()
    sizes = sorted({epoch_size(cfg, e) for e in range(c.epochs)}, reverse=True)
    sizes = sizes if unscaled is not None or c.size_schedule != "random" else sizes[:1]
    if world().distributed:
        # the conv maps are the per-image cost; the fc epochs over cached pool5 take about a
        # second each, so rank 0 alone trains them and the other ranks are done
        check_same_config(params_digest({"config": cfg.to_dict(), "paths": samples.paths}))
        check_shared_folder(Path(cache_root))
        fill_cache_sharded(samples, sizes, progress)
        if not world().main:
            return None
    for size in sizes:
        collect(samples, size, unscaled, progress)
    _check_classes(samples, data.class_names, dataset)
    trainer = Trainer(cfg, embedder, suffix, samples)
    ckpt, digest = run / "checkpoint.pt", _run_digest(cfg, data, samples.maps.cache.key)
    start = 0
    state = load_checkpoint(ckpt)
    if state is not None:
        if state.get("digest") == digest:
            start = trainer.restore(state)
            log.info("resuming from epoch %d (%s)", start, ckpt)
        else:
            log.warning("%s is from another training (settings or data differ); starting over", ckpt)
    if start == 0:
        embedder.fit_pool5_scale(pool5_sample(trainer, epoch_size(cfg, 0), cfg.seed), c.target_norm)
    history = []
    bar = progress_bar(range(start, c.epochs), desc="train fc", unit="epoch", disable=not progress, initial=start,
               total=c.epochs)
    for e in bar:
        history.append(trainer.epoch(e, progress))
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['train_acc']:.3f}",
                        size=history[-1]["size"])
        if (e + 1) % c.checkpoint_every == 0 or e + 1 == c.epochs:
            save_checkpoint(ckpt, {**trainer.state(e + 1), "digest": digest})
    model_path = run / "model.safetensors"
    SPPClassifier(cfg, data.class_names, embedder, cfg.features.device).save(model_path)
    atomic_write_json(run / "train_summary.json", {
        "images": len(samples.paths), "classes": len(data.class_names), "skipped": samples.skipped,
        "epochs": history, "pool5_scale": embedder.pool5_scale, "seconds": round(time.time() - t0, 1)})
    return model_path
