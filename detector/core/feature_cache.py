"""Conv maps kept on disk and in memory (the original caches conv5 per image and scale).

Disk (`FeatureCache`): one float16 .npz per image per scale, written atomically, at
`<root>/<key>/<image digest>_s<scale>.npz`, where `key` hashes the backbone, its weights
(file digest), the max-size cap and the preprocessing version, and the image digest hashes
the image file's bytes.  A changed setting or image therefore never reads a stale file, and
a rerun skips finished work.

Memory (`MapMemory`): the maps a training reads again and again, up to a budget.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from detector.cache import atomic_save_npz, atomic_write_json, file_digest, load_npz, make_dir, params_digest
from detector.core.features import FeatureExtractor, ScaleFeatures
from detector.images import ImageError
from detector.progress import progress_bar

log = logging.getLogger(__name__)


class FeatureCache:
    """Conv features per image and scale, from disk when present, else computed and stored."""

    def __init__(self, root: str | os.PathLike, extractor: FeatureExtractor, dtype: str = "float16",
                 extra: Optional[dict] = None):
        self.extractor = extractor
        self.dtype = np.dtype(dtype)
        # `extra`: what else decides a file's content (the crop settings of crops.CropCache)
        params = dict(extractor.cache_params(), dtype=self.dtype.name, **(extra or {}))
        self.key = params_digest(params)
        self.dir = Path(root) / self.key
        make_dir(self.dir)
        meta = self.dir / "params.json"
        if not meta.exists():
            atomic_write_json(meta, params)
        self._digests: dict[str, str] = {}

    def _digest(self, path: str) -> str:
        d = self._digests.get(path)
        if d is None:
            d = self._digests[path] = file_digest(path)
        return d

    def file(self, image_path: str, scale: int, flip: bool = False) -> Path:
        return self.dir / f"{self._digest(str(image_path))}_s{scale}{'_flip' if flip else ''}.npz"

    def complete(self, image_path: str, flip: bool = False) -> bool:
        return all(self.file(image_path, s, flip).exists() for s in self.extractor.scales)

    def load(self, image_path: str, flip: bool = False) -> Optional[list[ScaleFeatures]]:
        out = []
        for s in self.extractor.scales:
            z = load_npz(self.file(image_path, s, flip))
            if z is None or not {"features", "factor", "image_size"} <= set(z):
                return None
            out.append(ScaleFeatures(s, float(z["factor"]), torch.from_numpy(z["features"]),
                                     tuple(int(v) for v in z["image_size"])))
        return out

    def get(self, image_path: str, flip: bool = False) -> list[ScaleFeatures]:
        """Features for every scale (of the mirror image if `flip`); computes and stores missing ones."""
        cached = self.load(image_path, flip)
        if cached is not None:
            return cached
        feats = self.extractor(image_path, flip=flip)
        for sf in feats:
            arr = sf.features.cpu().numpy().astype(self.dtype)
            atomic_save_npz(self.file(image_path, sf.scale, flip), features=arr,
                            factor=np.float64(sf.factor), image_size=np.array(sf.image_size, np.int64))
            sf.features = torch.from_numpy(arr)  # same values whether this run computed or read them
        return feats


class TailExtractor:
    """The whole trunk's maps from a cache of its first blocks' maps: `tail` (the last blocks,
    fine-tuned with the fc layers) run on each cached map.  Stands in for a FeatureExtractor
    behind a FeatureCache, so the maps of a trunk whose last blocks were fine-tuned are cached
    too, keyed by the first blocks' cache and `tail_id` (what trained the blocks), at the cost
    of the last blocks alone."""

    def __init__(self, first: FeatureCache, tail: torch.nn.Module, tail_id: str):
        self.first, self.tail, self.tail_id = first, tail, str(tail_id)
        self.scales = first.extractor.scales
        self.device = first.extractor.device

    @torch.inference_mode()
    def __call__(self, image_path: str, flip: bool = False) -> list[ScaleFeatures]:
        self.tail.eval()
        return [ScaleFeatures(sf.scale, sf.factor, self.tail(sf.features.to(self.device).float()[None])[0],
                              sf.image_size) for sf in self.first.get(image_path, flip)]

    def cache_params(self) -> dict:
        return {"first_blocks": self.first.key, "tail": self.tail_id}


class MapMemory:
    """Conv maps held in RAM for training, up to `budget_mb`; the least recently used go first.

    Fine-tuning draws windows from every image in every batch, so when all maps fit they stay
    (BCCD: ~320 MB with mirror maps); beyond the budget, maps are read back from the cache on
    disk, which keeps a training's memory flat in the number of images."""

    def __init__(self, cache: FeatureCache, budget_mb: int = 1024, device: Optional[torch.device] = None):
        from collections import OrderedDict

        self.cache = cache
        self.device = device  # None: where the cache puts them (the CPU)
        self.budget = int(budget_mb) * 1024 * 1024
        self.used = 0
        self.maps: "OrderedDict[tuple, tuple[list[ScaleFeatures], int]]" = OrderedDict()

    def get(self, path: str, flip: bool = False) -> list[ScaleFeatures]:
        key = (path, flip)
        hit = self.maps.get(key)
        if hit is not None:
            self.maps.move_to_end(key)
            return hit[0]
        feats = self.cache.get(path, flip)
        if self.device is not None:
            for sf in feats:
                sf.features = sf.features.to(self.device)
        size = sum(sf.features.numel() * sf.features.element_size() for sf in feats)
        self.maps[key] = (feats, size)
        self.used += size
        while self.used > self.budget and len(self.maps) > 1:
            _, (_, dropped) = self.maps.popitem(last=False)
            self.used -= dropped
        return feats

    def forget(self, path: str) -> None:
        for flip in (False, True):
            hit = self.maps.pop((path, flip), None)
            if hit is not None:
                self.used -= hit[1]

    def clear(self) -> None:
        self.maps.clear()
        self.used = 0


def extract_all(paths: Sequence[str], cache: FeatureCache, progress: bool = True,
                flips: Sequence[bool] = (False,)) -> dict:
    """Fill the cache for `paths` (a shard of the images is the caller's choice:
    detector.distributed.shard).  Unreadable images are skipped with a warning and counted;
    every other image is still done.  Returns counts and the failures."""
    stats = {"images": len(paths), "computed": 0, "cached": 0, "failed": []}
    for p in progress_bar(sorted(paths), desc="conv features", unit="img", disable=not progress):
        try:
            if all(cache.complete(p, f) for f in flips):
                stats["cached"] += 1
                continue
            for f in flips:
                cache.get(p, f)
            stats["computed"] += 1
        except (ImageError, OSError) as e:
            why = str(e)
            why = why[len(p) + 2:] if why.startswith(p + ": ") else why  # ImageError names the file already
            log.warning("%s: %s; skipped", p, why)
            stats["failed"].append((p, why))
    return stats
