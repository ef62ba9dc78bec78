"""Per-image training rows of the SVM and box-regression stages, kept on disk.

One pass over the training images computes, per image:
- SVM rows: the classifier features (fc7 by default) of its ground-truth boxes and
  proposals, with each row's GT class and per-class IoU;
- box-regression rows: pool5 of the windows that overlap a ground-truth box, with the
  window, its assigned GT box and class.

Each image's rows go to their own file, written atomically into a folder named after the
digest of what produced them, so the pass resumes after an interruption and memory does
not grow with the dataset: the stages read the files back one image at a time (R-CNN's
release also cached these features on disk).  A folder is removed once its stage is done.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from detector.progress import progress_bar

from detector.cache import atomic_save_npz, load_npz
from detector.core.embedder import WindowEmbedder
from detector.errors import CacheError
from detector.detection.train.finetune import FeatureGetter, TrainImage
from detector.detection.svm import SVMImage, sample_feature_rows


class RowStore:
    """A folder of per-image row files `<index>.npz`."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def file(self, i: int) -> Path:
        return self.dir / f"{i:06d}.npz"

    def has(self, i: int) -> bool:
        return self.file(i).is_file()

    def write(self, i: int, **arrays: np.ndarray) -> None:
        atomic_save_npz(self.file(i), **arrays)

    def read(self, i: int) -> dict:
        z = load_npz(self.file(i))
        if z is None:
            raise CacheError(f"{self.file(i)} is missing or unreadable; delete {self.dir} and run again")
        return z

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _regression_rows(p5: torch.Tensor, image: TrainImage, iou: float,
                     reference: Optional[np.ndarray] = None) -> dict:
    """`reference`: the boxes the targets are relative to, one per window (default: the windows'
    own proposal boxes)."""
    w = image.windows
    rows = w.regression_rows(iou)
    if not len(rows):
        return {"x": np.zeros((0, p5.shape[1]), np.float16), "boxes": np.zeros((0, 4), np.float32),
                "gt": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    x = p5[torch.from_numpy(rows).to(p5.device)].cpu().numpy().astype(np.float16)
    boxes = w.boxes[rows] if reference is None else reference[rows].astype(np.float32)
    return {"x": x, "boxes": boxes, "gt": w.matched_boxes(rows), "labels": w.labels[rows]}


def write_rows(embedder: WindowEmbedder, images: Sequence[TrainImage], get_features: FeatureGetter,
               svm: Optional[RowStore], bbox: Optional[RowStore], bbox_iou: float, progress: bool = True,
               done: Callable[[int], None] = lambda i: None, indices: Optional[Sequence[int]] = None,
               reference: str = "proposal") -> None:
    """Write the missing row files of the images at `indices` (default: all; SVM rows into
    `svm`, regression rows into `bbox`; either may be None).  `done(i)` is called after image i,
    e.g. to drop its conv maps from memory.  `reference` (bbox.reference): the regression rows'
    boxes are the proposals, or the boxes their SPP windows cover."""
    stores = [s for s in (svm, bbox) if s is not None]
    indices = range(len(images)) if indices is None else indices
    for i in progress_bar(indices, desc="SVM/regression rows", unit="img", disable=not progress):
        im = images[i]
        if all(s.has(i) for s in stores):
            continue
        feats = get_features(i, False)
        windows = embedder.windows(feats, im.windows.boxes, name=f"windows of {im.path}")
        p5 = embedder.pool5_windows(feats, windows)
        if bbox is not None and not bbox.has(i):
            ref = embedder.window_boxes(feats, windows) if reference == "window" else None
            bbox.write(i, **_regression_rows(p5, im, bbox_iou, ref))
        if svm is not None and not svm.has(i):
            w = im.windows
            svm.write(i, x=embedder.embed(p5).cpu().numpy().astype(np.float16), gt_labels=w.gt_labels,
                      class_iou=w.class_iou)
        done(i)


def svm_feature_scale(store: RowStore, n: int, norm_images: int, norm_boxes: int, target: float, seed: int) -> float:
    """R-CNN's norm-20 scale of the SVM features, from a seeded sample of the stored rows."""
    from detector.core.embedder import norm_scale

    sample = sample_feature_rows(lambda i: store.read(i)["x"], n, norm_images, norm_boxes, seed)
    return norm_scale(sample.astype(np.float32), target, "SVM features")


def svm_images(store: RowStore, n: int, scale: float,
               indices: Optional[Sequence[int]] = None) -> Callable[[], Iterator[SVMImage]]:
    """A callable giving a fresh pass over the stored SVM rows (of the images at `indices`,
    default all n), scaled (train_svms reads twice)."""
    def images() -> Iterator[SVMImage]:
        for i in (range(n) if indices is None else indices):
            z = store.read(i)
            yield SVMImage(z["x"].astype(np.float32) * scale, z["gt_labels"], z["class_iou"])

    return images


class StoredRows:
    """The stored regression rows' pool5 as one read-only [N, D] float16 array whose rows are
    read from the per-image files when indexed (`train_box_regressors` reads them in chunks),
    so box regression never holds every example in memory (BCCD: ~58k examples, ~650 MB)."""

    def __init__(self, store: RowStore, n: int, dim: int):
        self.store, self.dim = store, dim
        self.offsets = np.zeros(n + 1, np.int64)
        self._file, self._x = -1, None

    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.dim

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index) -> np.ndarray:
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64).reshape(-1)
        out = np.empty((len(idx), self.dim), np.float16)
        files = np.searchsorted(self.offsets, idx, side="right") - 1
        for f in np.unique(files):
            sel = np.flatnonzero(files == f)
            out[sel] = self._rows(int(f))[idx[sel] - self.offsets[f]]
        return out

    def _rows(self, f: int) -> np.ndarray:
        if f != self._file:  # rows are asked for in increasing order: one file at a time
            self._file, self._x = f, self.store.read(f)["x"]
        return self._x


def regression_examples(store: RowStore, n: int) -> dict:
    """The stored regression rows: boxes, GT boxes and labels concatenated (small), pool5 as a
    `StoredRows` view that stays on disk."""
    parts, counts, dim = [], [], 0
    for i in range(n):
        z = store.read(i)
        counts.append(len(z["labels"]))
        dim = z["x"].shape[1]
        parts.append({k: z[k] for k in ("boxes", "gt", "labels")})
    out = {k: np.concatenate([z[k] for z in parts]) for k in ("boxes", "gt", "labels")}
    out["x"] = StoredRows(store, n, dim)
    out["x"].offsets[1:] = np.cumsum(counts)
    return out
