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
from detector.distributed import barrier, check_same_config, check_shared_folder, log_shard, shard, world
from detector.datasets.imagefolder import ImageFolderSplit, load_image_folder
from detector.core.embedder import WindowEmbedder
from detector.errors import DatasetError, ImageError
from detector.core.feature_cache import FeatureCache
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.images import image_pixels

log = logging.getLogger(__name__)


def epoch_size(cfg: Config, epoch: int) -> int:
    """The input size of an epoch: the crop size, the full-image scale, or the multi-size schedule's."""
    c = cfg.classifier
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
        self.full = c.input == "full"
        if self.full:
            self.cache = FeatureCache(Path(cache_root) / "features", extractor, dtype)
        else:
            self.cache = CropCache(Path(cache_root) / "crops", extractor, dtype, c.view_scale, c.view_size,
                                   c.crop_positions)

    def get(self, path: str, size: int) -> list[ScaleFeatures]:
        if self.full:
            return [self.cache.get(path, flip)[0] for flip in (False, True)]
        maps, (w, h) = self.cache.get_crops(path, size)
        return [ScaleFeatures(size, 1.0, m, (w, h)) for m in maps]


@dataclass
class Samples:
    """The usable training images and, for a frozen trunk, their unscaled pool5 per size."""
    paths: list[str]
    labels: np.ndarray
    maps: TrainingMaps
    tables: dict  # size -> float16 [images, samples per image, D] (frozen trunk only)
    skipped: list


def collect(samples: Samples, size: int, embedder: Optional[WindowEmbedder], progress: bool) -> None:
    """Fill the cache at `size` (and, given the unscaled embedder of a frozen trunk, the pool5
    table); images that cannot be read are dropped from `samples`, with a warning, and counted."""
    keep, rows = [], []
    for i, p in enumerate(progress_bar(samples.paths, desc=f"conv maps, size {size}", unit="img", disable=not progress)):
        try:
            maps = samples.maps.get(p, size)
        except (ImageError, OSError) as e:
            log.warning("skipping %s: %s", p, e)
            samples.skipped.append((p, str(e)))
            continue
        keep.append(i)
        if embedder is not None:
            rows.append(torch.cat([whole_pool5(embedder, sf) for sf in maps]).half())
    if len(keep) < len(samples.paths):
        samples.paths = [samples.paths[i] for i in keep]
        samples.labels = samples.labels[keep]
        samples.tables = {s: t[torch.as_tensor(keep)] for s, t in samples.tables.items()}
    if embedder is not None:
        samples.tables[size] = torch.stack(rows) if rows else torch.zeros(0)


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
        return {"epoch": epoch + 1, "size": size, "lr": lr, "loss": sum(losses) / n, "train_acc": correct / n}

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
    per_image = len(s.maps.get(s.paths[0], size))
    rng = np.random.default_rng([seed, 7])
    flat = rng.choice(len(s.paths) * per_image, size=min(n, len(s.paths) * per_image), replace=False)

    def sample(embedder: WindowEmbedder) -> torch.Tensor:
        with torch.no_grad():
            return trainer.pool5(flat // per_image, flat % per_image, size, embedder)

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
        raise DatasetError(f"class {empty[0]!r} of {root}/train has no readable image left")


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
    extractor = classifier_extractor(cfg, frozen, c.full_scale, cfg.features.device)
    embedder = classifier_embedder(cfg, backbone, len(data.class_names))
    samples = Samples(list(data.paths), np.array(data.labels, np.int64), TrainingMaps(cfg, extractor, cache_root),
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
