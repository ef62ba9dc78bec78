"""Fine-tuning the fc layers on SPP vectors pooled from cached conv maps (paper section 4.1).

The conv layers stay frozen, so every batch is pooled straight from the
feature cache: 128 windows, 25% foreground (IoU >= 0.5 with a GT, labelled
with its class; GT boxes included), the rest background (IoU in [0.1, 0.5)),
drawn uniformly from the windows of *all* training images.

Augmentation:
- flip: with probability 0.5 a window is pooled from the conv map of the
  mirror image (computed and cached like any other map, not a flipped feature
  map: conv features are not mirror-symmetric), with its box mirrored;
- scale: in multi-scale mode each window is pooled at a random scale.

With the trunk's last blocks trainable (`finetune.trunk_trainable_blocks: k`) the cache
holds the maps of the blocks before them, and batches are image-centric, as in Fast R-CNN:
`images_per_batch` images drawn uniformly, `batch_size / images_per_batch` windows from each
(the same foreground fraction, fewer foreground windows only when an image has fewer), one
flip and one scale per image, so each iteration runs the blocks forward and back once per
image.  Drawn across all images, a 128-window batch would touch ~128 maps per step.

With a box layer (`bbox.method: finetune`, Fast R-CNN's multi-task loss) the foreground
windows also learn their matched box: smooth L1 (beta 1) on their own class's four deltas,
normalised by BOX_LAYER_STDS, summed and divided by the batch size, times `bbox.loss_weight`.
A mirrored window's target is its unmirrored one with tx negated.  Without one, every draw
and step is what it was before the option existed.

Checkpoints (head, box layer, optimiser, iteration and RNG states) are written atomically
every `checkpoint_every` iterations; a rerun resumes from the last one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from detector.progress import progress_bar

from detector.cache import load_checkpoint, save_checkpoint
from detector.config import ConfigError, FinetuneConfig
from detector.core.boxes import mirror_boxes
from detector.detection.bbox_regression import box_layer_targets
from detector.core.embedder import StackedMaps, WindowEmbedder
from detector.distributed import world
from detector.errors import DatasetError
from detector.core.features import ScaleFeatures
from detector.core.heads import FCHead
from detector.detection.matching import Windows

log = logging.getLogger(__name__)


@dataclass
class TrainImage:
    path: str
    width: int
    height: int
    windows: Windows


FeatureGetter = Callable[[int, bool], Sequence[ScaleFeatures]]  # (image index, flip) -> maps
PairPooler = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], torch.Tensor]  # (pairs, flips, scales)


def sample_pools(images: Sequence[TrainImage], fg_iou: float, bg_lo: float) -> tuple[np.ndarray, np.ndarray]:
    """(image, row) pairs of all foreground and background windows."""
    fg, bg = [], []
    for i, im in enumerate(images):
        w = im.windows
        f = np.nonzero(w.max_iou >= fg_iou)[0]
        b = np.nonzero((w.max_iou >= bg_lo) & (w.max_iou < fg_iou) & ~w.is_gt)[0]
        fg.append(np.stack([np.full(len(f), i), f], 1))
        bg.append(np.stack([np.full(len(b), i), b], 1))
    return np.concatenate(fg).astype(np.int64), np.concatenate(bg).astype(np.int64)


def window_labels(images: Sequence[TrainImage], pairs: np.ndarray, fg_iou: float) -> np.ndarray:
    """Softmax targets of (image, row) pairs: 1 + the matched class for foreground, 0 for background."""
    out = np.zeros(len(pairs), np.int64)
    for i in np.unique(pairs[:, 0]):
        sel = np.flatnonzero(pairs[:, 0] == i)
        out[sel] = images[i].windows.softmax_targets(pairs[sel, 1], fg_iou)
    return out


def pool_pairs(embedder: WindowEmbedder, images: Sequence[TrainImage], pairs: np.ndarray, flips: np.ndarray,
               scale_idx: Optional[np.ndarray], get_features: FeatureGetter) -> torch.Tensor:
    """Scaled pool5 of (image, row) pairs, grouped so each conv map is read once."""
    out = None
    keys = pairs[:, 0] * 2 + flips.astype(np.int64)
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        i, flip = int(key // 2), bool(key % 2)
        im = images[i]
        boxes = im.windows.boxes[pairs[sel, 1]]
        if flip:
            boxes = mirror_boxes(boxes, im.width)
        v = embedder.pool5(get_features(i, flip), boxes, None if scale_idx is None else scale_idx[sel],
                           name=f"windows of {im.path}")
        if out is None:
            out = torch.empty((len(pairs), v.shape[1]), dtype=torch.float32)
        out[torch.from_numpy(sel)] = v
    return out


def stacked_pooler(embedder: WindowEmbedder, images: Sequence[TrainImage], maps: StackedMaps) -> PairPooler:
    """pool(pairs, flips, scales) over StackedMaps whose slot 2*i + flip holds image i's maps:
    the whole batch in one roi_pool call per level (the GPU fine-tuning path)."""
    widths = np.array([im.width for im in images], np.float64)

    def pool(pairs: np.ndarray, flips: np.ndarray, scales: Optional[np.ndarray]) -> torch.Tensor:
        boxes = np.stack([images[i].windows.boxes[r] for i, r in pairs]).astype(np.float64)
        f = flips.astype(bool)
        boxes[f] = mirror_boxes(boxes[f], widths[pairs[f, 0]])
        slots = pairs[:, 0] * 2 + flips.astype(np.int64)
        return embedder.pool5_stacked(maps, slots, boxes, scales)

    return pool


def tail_pooler(embedder: WindowEmbedder, images: Sequence[TrainImage], get_features: FeatureGetter):
    """pool(pairs, flips, scales, tail): scaled pool5 of (image, row) pairs through the trainable
    last blocks `tail`, run once per (image, flip, scale) of the batch on the cached maps of the
    blocks before them; differentiable in the blocks' weights (SPP by roi_pool)."""

    def pool(pairs: np.ndarray, flips: np.ndarray, scales: Optional[np.ndarray], tail: nn.Module) -> torch.Tensor:
        s = np.zeros(len(pairs), np.int64) if scales is None else np.asarray(scales, np.int64)
        keys = np.stack([pairs[:, 0], flips.astype(np.int64), s], 1)
        parts, order = [], []
        for i, flip, k in np.unique(keys, axis=0):
            sel = np.flatnonzero((keys == (i, flip, k)).all(1))
            im = images[int(i)]
            sf = get_features(int(i), bool(flip))[int(k)]
            f = sf.features.float()
            if f.is_inference():  # maps made under inference_mode (FeatureExtractor's) cannot enter autograd
                f = f.clone()
            x = tail(f[None])[0]
            boxes = im.windows.boxes[pairs[sel, 1]]
            if flip:
                boxes = mirror_boxes(boxes, im.width)
            parts.append(embedder.pool5([ScaleFeatures(sf.scale, sf.factor, x, sf.image_size)], boxes,
                                        np.zeros(len(sel), np.int64), name=f"windows of {im.path}"))
            order.append(sel)
        if not parts:
            return torch.zeros((0, embedder.pool5_dim))
        inverse = np.empty(len(pairs), np.int64)
        inverse[np.concatenate(order)] = np.arange(len(pairs))
        return torch.cat(parts)[torch.from_numpy(inverse).to(parts[0].device)]

    return pool


def pool5_sample(images: Sequence[TrainImage], get_features: FeatureGetter, samples: int = 2000,
                 seed: int = 0) -> Callable[[WindowEmbedder], torch.Tensor]:
    """What `WindowEmbedder.fit_pool5_scale` estimates pool5's constant from: `samples` windows
    drawn with a fixed seed over all training images, pooled through the embedder given."""
    rng = np.random.default_rng(seed)
    pairs = np.concatenate([np.stack([np.full(len(im.windows.boxes), i), np.arange(len(im.windows.boxes))], 1)
                            for i, im in enumerate(images)])
    pick = pairs[rng.choice(len(pairs), size=min(samples, len(pairs)), replace=False)]
    pick = pick[np.lexsort((pick[:, 1], pick[:, 0]))]
    return lambda embedder: pool_pairs(embedder, images, pick, np.zeros(len(pick), bool), None, get_features)


def _save_checkpoint(path: Path, head: FCHead, box: Optional[nn.Linear], opt: torch.optim.Optimizer, it: int,
                     rng: np.random.Generator, tail: Optional[nn.Module] = None) -> None:
    if world().main:  # every rank holds the same state; one file
        state = {"iteration": it, "head": head.state_dict(), "optimizer": opt.state_dict(),
                 "rng": rng.bit_generator.state}
        if box is not None:
            state["box"] = box.state_dict()
        if tail is not None:
            state["tail"] = tail.state_dict()
        save_checkpoint(path, state)


def _resume(checkpoint: Optional[Path], head: FCHead, box: Optional[nn.Linear], opt: torch.optim.Optimizer,
            rng: np.random.Generator, tail: Optional[nn.Module] = None) -> int:
    state = None if checkpoint is None else load_checkpoint(checkpoint)
    if state is None:
        return 0
    for key, name, part in (("box", "a box layer", box), ("tail", "trainable trunk blocks", tail)):
        if (part is not None) != (key in state):
            log.warning("fine-tuning: %s was written %s %s; starting again", checkpoint,
                        "without" if part is not None else "with", name)
            return 0
    head.load_state_dict(state["head"])
    if box is not None:
        box.load_state_dict(state["box"])
    if tail is not None:
        tail.load_state_dict(state["tail"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    log.info("fine-tuning: resuming from iteration %d (%s)", int(state["iteration"]), checkpoint)
    return int(state["iteration"])


@dataclass
class WindowPools:
    """The (image, row) pairs batches are drawn from, and the foreground ones' softmax targets."""
    fg: np.ndarray  # [F, 2]
    bg: np.ndarray  # [B, 2]
    fg_labels: np.ndarray  # [F] 1 + class
    fg_targets: Optional[np.ndarray] = None  # [F, 4] the box layer's targets (box_layer_targets), if one trains


@dataclass
class Batch:
    """One global fine-tuning batch: windows, their targets, flips and scale indices."""
    pairs: np.ndarray
    labels: np.ndarray
    flips: np.ndarray
    scales: Optional[np.ndarray]
    targets: Optional[np.ndarray] = None  # [batch, 4] the box layer's targets (rows of background: unused)


def fg_box_targets(images: Sequence[TrainImage], pairs: np.ndarray) -> np.ndarray:
    """The box layer's targets of foreground (image, row) pairs: each window onto its matched box."""
    out = np.zeros((len(pairs), 4), np.float32)
    for i in np.unique(pairs[:, 0]):
        sel = np.flatnonzero(pairs[:, 0] == i)
        w = images[i].windows
        out[sel] = box_layer_targets(w.boxes[pairs[sel, 1]], w.matched_boxes(pairs[sel, 1]))
    return out


def window_pools(images: Sequence[TrainImage], fc: FinetuneConfig, box_targets: bool = False) -> WindowPools:
    """Foreground (IoU >= fg_iou, GT boxes included) and background (IoU in [bg_iou_lo, fg_iou),
    proposals only) windows of every image; with no window in the background range, every
    proposal below fg_iou, with a warning."""
    fg, bg = sample_pools(images, fc.fg_iou, fc.bg_iou_lo)
    if len(fg) == 0:
        raise DatasetError("fine-tuning: no foreground windows (IoU >= %.2f with a ground-truth box) in the "
                           "training set; check the annotations" % fc.fg_iou)
    if len(bg) == 0:
        log.warning("fine-tuning: no windows with IoU in [%.2f, %.2f); using all windows below %.2f as background",
                    fc.bg_iou_lo, fc.fg_iou, fc.fg_iou)
        fg, bg = sample_pools(images, fc.fg_iou, 0.0)
        if len(bg) == 0:
            raise DatasetError("fine-tuning: no background windows at all; are the proposals missing?")
    targets = fg_box_targets(images, fg) if box_targets else None
    return WindowPools(fg, bg, window_labels(images, fg, fc.fg_iou), targets)


def draw_batch(rng: np.random.Generator, pools: WindowPools, fc: FinetuneConfig, n_scales: int) -> Batch:
    """fc.batch_size windows drawn uniformly, with replacement, across all images: round(batch x
    fg_fraction) (at least one) from the foreground pool, the rest from the background pool
    (paper: 128, 25%); each flipped with probability 0.5 (fc.flip) and, with several scales,
    pooled at a random one."""
    n_fg = max(1, int(round(fc.batch_size * fc.fg_fraction)))
    n_bg = fc.batch_size - n_fg
    fi = rng.integers(0, len(pools.fg), n_fg)
    bi = rng.integers(0, len(pools.bg), n_bg)
    pairs = np.concatenate([pools.fg[fi], pools.bg[bi]])
    labels = np.concatenate([pools.fg_labels[fi], np.zeros(n_bg, np.int64)])
    flips = rng.random(fc.batch_size) < 0.5 if fc.flip else np.zeros(fc.batch_size, bool)
    scales = rng.integers(0, n_scales, fc.batch_size) if n_scales > 1 else None
    targets = None
    if pools.fg_targets is not None:
        targets = np.zeros((fc.batch_size, 4), np.float32)
        targets[:n_fg] = pools.fg_targets[fi]
        targets[:n_fg, 0] *= np.where(flips[:n_fg], -1.0, 1.0)  # the mirrored window's centre moves the other way
    return Batch(pairs, labels, flips, scales, targets)


def draw_image_batch(rng: np.random.Generator, pools: WindowPools, by_image: list, fc: FinetuneConfig,
                     n_scales: int) -> Batch:
    """Fast R-CNN's hierarchical batch: fc.images_per_batch images drawn uniformly (without
    replacement when there are enough), then from each its share of fc.batch_size windows:
    round(share x fg_fraction) foreground ones without replacement (all of them when it has
    fewer), the rest background (without replacement when it has enough; with none, foreground
    again).  One flip and one scale per image: the trainable blocks run once per image.
    `by_image`: `image_pool_rows(pools, n_images)`."""
    usable = np.flatnonzero([len(f) + len(b) > 0 for f, b in by_image])
    n_img = fc.images_per_batch
    picked = rng.choice(usable, size=n_img, replace=len(usable) < n_img)
    shares = np.full(n_img, fc.batch_size // n_img)
    shares[: fc.batch_size % n_img] += 1
    pairs, labels, targets, at = [], [], [], []
    for k, (i, share) in enumerate(zip(picked, shares)):  # image by image: a rank's slice of rows holds few images
        f, b = by_image[i]
        n_fg = min(len(f), int(round(share * fc.fg_fraction)))
        fg = rng.choice(f, size=n_fg, replace=False) if n_fg else f[:0]
        n_bg = share - n_fg
        if len(b):
            bg = rng.choice(b, size=n_bg, replace=len(b) < n_bg)
        else:  # an image with no background windows: more of its foreground ones
            fg = np.concatenate([fg, rng.choice(f, size=n_bg, replace=True)])
            bg = b[:0]
        pairs += [pools.fg[fg], pools.bg[bg]]
        labels += [pools.fg_labels[fg], np.zeros(len(bg), np.int64)]
        if pools.fg_targets is not None:
            targets += [pools.fg_targets[fg], np.zeros((len(bg), 4), np.float32)]
        at.append(np.full(share, k))
    at = np.concatenate(at)
    image_flip = rng.random(n_img) < 0.5 if fc.flip else np.zeros(n_img, bool)
    image_scale = rng.integers(0, n_scales, n_img) if n_scales > 1 else None
    flips = image_flip[at]  # an image drawn twice may get two flips or scales: tail_pooler runs both
    scales = None if image_scale is None else image_scale[at]
    t = None
    if targets:
        t = np.concatenate(targets).astype(np.float32)
        t[:, 0] *= np.where(flips, -1.0, 1.0)  # the mirrored window's centre moves the other way
    pairs = np.concatenate(pairs).astype(np.int64)
    return Batch(pairs, np.concatenate(labels), flips, scales, t)


def image_pool_rows(pools: WindowPools, n_images: int) -> list:
    """[(rows of pools.fg, rows of pools.bg)] of each image: where `draw_image_batch` draws from."""
    def split(pairs: np.ndarray) -> list:
        order = np.argsort(pairs[:, 0], kind="stable")
        edges = np.searchsorted(pairs[order, 0], np.arange(n_images + 1))
        return [order[edges[i]:edges[i + 1]] for i in range(n_images)]

    return list(zip(split(pools.fg), split(pools.bg)))


def box_loss(deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed smooth L1 (beta 1, Fast R-CNN's) of the foreground rows' own-class deltas.
    deltas [N, 4K] (K classes, no background), labels [N] (0: background, 1 + class), targets [N, 4]."""
    fg = torch.nonzero(labels > 0).flatten()
    if not len(fg):
        return deltas.sum() * 0.0
    k = labels[fg] - 1
    cols = (4 * k)[:, None] + torch.arange(4, device=deltas.device)
    return F.smooth_l1_loss(deltas[fg[:, None], cols], targets[fg], beta=1.0, reduction="sum")


class _WithTail(nn.Module):
    """The trainable last blocks of the trunk before the fc layers (`fc`: the head, or
    `_WithBox`) as one module: forward takes the batch's (image, row) pairs, runs the blocks on
    the cached maps, pools, and gives what `fc` gives.  The blocks stay in eval mode (batch norm
    keeps its ImageNet statistics: one or two images make no batch to estimate them from)."""

    def __init__(self, fc: nn.Module, tail: nn.Module, pool):
        super().__init__()
        self.fc, self.tail, self._pool = fc, tail, pool

    def train(self, mode: bool = True):
        super().train(mode)
        self.tail.eval()
        return self

    def forward(self, pairs: np.ndarray, flips: np.ndarray, scales: Optional[np.ndarray], masks: tuple):
        return self.fc(self._pool(pairs, flips, scales, self.tail), masks)


class _WithBox(nn.Module):
    """The fc layers and the box layer as one module (for DistributedDataParallel and SGD)."""

    def __init__(self, head: FCHead, box: nn.Linear):
        super().__init__()
        self.head, self.box = head, box

    def forward(self, x: torch.Tensor, masks: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        logits, fc7 = self.head(x, masks, with_fc7=True)
        return logits, self.box(fc7)


def finetune(head: FCHead, images: Sequence[TrainImage], pool: PairPooler, fc: FinetuneConfig, n_scales: int,
             seed: int = 0, checkpoint: Optional[Path] = None, progress: bool = True,
             box: Optional[nn.Linear] = None, box_weight: float = 1.0, tail: Optional[nn.Module] = None) -> dict:
    """Train `head` in place on the training windows; returns a summary (iterations, final
    loss and accuracy).  `pool(pairs, flips, scale_index)` gives the scaled pool5 of (image,
    row) pairs: SPP from cached maps in training (`pool_pairs`); a benchmark may pass another
    way of turning windows into vectors and train with the same recipe.

    Under torchrun the head is wrapped in DistributedDataParallel.  Every rank draws the same
    global batch (windows, flips, scales and dropout masks come from generators seeded alike)
    and pools and forwards only its slice; its loss is its slice's summed cross-entropy times
    world size / batch size, so DDP's average over the ranks is the mean over the whole batch:
    one process or several take the same steps, up to floating-point order.

    box: a box layer on fc7 (`bbox_regression.box_layer`) trained beside fc8 with the smooth-L1
    loss times `box_weight` (see the module docstring); None: the softmax loss alone.

    tail: the trunk's last blocks, trained too (lr x fc.trunk_lr_mult) on image-centric
    batches; `pool` is then `tail_pooler`'s, called with the blocks."""
    w = world()
    if w.size > fc.batch_size:
        raise ConfigError(f"finetune.batch_size ({fc.batch_size}) is smaller than the number of processes ({w.size})")
    pools = window_pools(images, fc, box_targets=box is not None)
    model = head if box is None else _WithBox(head, box)
    if tail is None:
        groups = [{"params": list(model.parameters())}]
    else:
        groups = [{"params": list(model.parameters()), "lr_mult": 1.0},
                  {"params": [p.requires_grad_(True) for p in tail.parameters()], "lr_mult": fc.trunk_lr_mult}]
        model = _WithTail(model, tail, pool)
        by_image = image_pool_rows(pools, len(images))
    if w.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(groups, lr=fc.lr, momentum=fc.momentum, weight_decay=fc.weight_decay)
    rng = np.random.default_rng(seed)
    start = _resume(checkpoint, head, box, opt, rng, tail)
    mine = np.array_split(np.arange(fc.batch_size), w.size)[w.rank]  # this rank's batch rows
    device = next(head.parameters()).device
    model.train()
    losses, accs, box_losses = [], [], []
    bar = progress_bar(range(start, fc.iterations), desc="fine-tune fc", unit="it",
                       disable=not progress or not w.main, initial=start, total=fc.iterations)
    for it in bar:
        lr = fc.lr * (0.1 ** sum(it >= s for s in fc.lr_steps))
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        b = draw_batch(rng, pools, fc, n_scales) if tail is None else draw_image_batch(rng, pools, by_image, fc,
                                                                                        n_scales)
        labels = torch.from_numpy(b.labels[mine]).to(device)
        masks = head.dropout_masks(fc.batch_size, torch.Generator().manual_seed(seed * 1_000_003 + it))
        masks = tuple(m[torch.from_numpy(mine)].to(device) for m in masks)
        scales = None if b.scales is None else b.scales[mine]
        if tail is None:
            out = model(pool(b.pairs[mine], b.flips[mine], scales), masks)
        else:
            out = model(b.pairs[mine], b.flips[mine], scales, masks)
        logits = out if box is None else out[0]
        ce = F.cross_entropy(logits, labels, reduction="sum")
        loss = ce
        if box is not None:
            bl = box_loss(out[1], labels, torch.from_numpy(b.targets[mine]).to(device))
            loss = ce + box_weight * bl
            box_losses.append(bl.item() / max(len(mine), 1))
        opt.zero_grad()
        (loss * (w.size / fc.batch_size)).backward()
        opt.step()
        losses.append(ce.item() / max(len(mine), 1))
        accs.append(float((logits.argmax(1) == labels).float().mean()) if len(mine) else 0.0)
        if progress and (it % 20 == 0 or it == fc.iterations - 1):
            extra = {"box": f"{np.mean(box_losses[-50:]):.3f}"} if box_losses else {}
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.3f}", **extra,
                            lr=f"{lr:g}")
        if checkpoint is not None and (it + 1) % fc.checkpoint_every == 0:
            _save_checkpoint(Path(checkpoint), head, box, opt, it + 1, rng, tail)
    if checkpoint is not None:
        _save_checkpoint(Path(checkpoint), head, box, opt, fc.iterations, rng, tail)
    head.eval()
    if box is not None:
        box.eval()
    out = {"iterations": fc.iterations, "foreground_windows": int(len(pools.fg)),
           "background_windows": int(len(pools.bg)),
           "final_loss": float(np.mean(losses[-50:])) if losses else None,
           "final_accuracy": float(np.mean(accs[-50:])) if accs else None}
    if box is not None:
        out["final_box_loss"] = float(np.mean(box_losses[-50:])) if box_losses else None
    return out
