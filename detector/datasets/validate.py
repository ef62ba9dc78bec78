"""Validation shared by the dataset readers: errors, warnings and the load summary.

Readers (`load_voc`, `load_coco`) feed every problem they meet into a `LoadReport`.
Each problem becomes a `DatasetWarning` naming the file (at most `max_warnings`
per kind, then one line saying how many more), and `LoadReport.finish` logs one
summary line and returns the counts as a plain dict, which the readers store on
the dataset as `dataset.summary`:

    {"images": 292, "classes": 3, "objects": 3981, "difficult": 0,
     "images_without_objects": 0, "degenerate_dropped": 2, "outside_dropped": 0,
     "clipped": 0, "difficult_dropped": 0, "skipped_images": 0, "size_mismatch": 0,
     "size_from_image": 0, "details": {kind: [message, ...]}, "text": "<the summary line>"}

`validate_dataset` checks any `Dataset` (however it was built) without changing it.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from typing import Any

import numpy as np

from detector.datasets.records import Dataset
from detector.errors import DatasetError

logger = logging.getLogger(__name__)
REEXPORTED = (DatasetError,)  # detector.datasets.validate.DatasetError: voc, coco and synthetic import it from here


class DatasetWarning(UserWarning):
    """A problem in the data that was repaired or skipped (the message names the file)."""


# kind -> words used in the summary line: (singular, plural, what happened).
_KINDS = {
    "degenerate_dropped": ("degenerate box", "degenerate boxes", "dropped"),
    "outside_dropped": ("box outside its image", "boxes outside their image", "dropped"),
    "clipped": ("box", "boxes", "clipped to the image"),
    "skipped_images": ("image", "images", "skipped"),
    "size_mismatch": ("<size> field", "<size> fields", "disagreeing with the image (image size used)"),
}


class LoadReport:
    """Collects the issues found while loading one dataset split."""

    def __init__(self, name: str, max_warnings: int = 10):
        self.name = name
        self.max_warnings = max_warnings
        self.details: dict[str, list[str]] = defaultdict(list)
        self.files: dict[str, list[str]] = defaultdict(list)  # kind -> file names, for the summary line
        self.size_from_image = 0
        self.difficult_dropped = 0

    def issue(self, kind: str, file: str, message: str) -> None:
        """Record one problem and warn about it (warnings are capped per kind)."""
        self.details[kind].append(message)
        self.files[kind].append(os.path.basename(file))
        n = len(self.details[kind])
        if n <= self.max_warnings:
            warnings.warn(message, DatasetWarning, stacklevel=3)
        if n == self.max_warnings + 1:
            warnings.warn(f"{self.name}: more '{kind}' issues; the rest are only counted "
                          f"(see dataset.summary['details'])", DatasetWarning, stacklevel=3)

    def clean_boxes(self, boxes: np.ndarray, names: list[str], file: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip `boxes` (our convention, [N,4]) to the image and drop the ones with no area left.

        Degenerate boxes must already be removed by the reader (what counts as degenerate
        depends on the file format).  Returns (clipped boxes, keep mask).
        """
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
        keep = np.ones(len(boxes), bool)
        for i in range(len(boxes)):
            if np.array_equal(clipped[i], boxes[i]):
                continue
            box = _fmt_box(boxes[i])
            if clipped[i, 2] <= clipped[i, 0] or clipped[i, 3] <= clipped[i, 1]:
                keep[i] = False
                self.issue("outside_dropped", file, f"{file}: '{names[i]}' box {box} lies outside the "
                           f"{width}x{height} image; dropped")
            else:
                self.issue("clipped", file, f"{file}: '{names[i]}' box {box} extends outside the "
                           f"{width}x{height} image; clipped to {_fmt_box(clipped[i])}")
        return clipped.astype(np.float32), keep

    def finish(self, dataset: Dataset) -> dict[str, Any]:
        """Log the summary line and return the counts (see the module docstring)."""
        recs = dataset.records
        n_obj = sum(len(r.boxes) for r in recs)
        summary: dict[str, Any] = {
            "images": len(recs),
            "classes": len(dataset.class_names),
            "objects": n_obj,
            "difficult": int(sum(int(r.difficult.sum()) for r in recs)),
            "images_without_objects": sum(1 for r in recs if len(r.boxes) == 0),
            "difficult_dropped": self.difficult_dropped,
            "size_from_image": self.size_from_image,
        }
        for kind in _KINDS:
            summary[kind] = len(self.details.get(kind, ()))
        summary["details"] = {k: list(v) for k, v in self.details.items()}
        parts = [f"{summary['images']:,} images", f"{summary['classes']} classes",
                 f"{n_obj:,} objects ({summary['difficult']:,} difficult)"]
        notes = []
        if summary["images_without_objects"]:
            notes.append(f"{summary['images_without_objects']:,} images without objects (kept as negatives)")
        for kind, (one, many, verb) in _KINDS.items():
            n = summary[kind]
            if n:
                files = sorted(set(self.files[kind]))
                shown = ", ".join(files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
                notes.append(f"{n:,} {one if n == 1 else many} {verb} ({shown})")
        if self.difficult_dropped:
            notes.append(f"{self.difficult_dropped:,} difficult objects left out (keep_difficult=False)")
        if self.size_from_image:
            notes.append(f"{self.size_from_image:,} sizes read from the image (no <size> in the file)")
        text = f"{self.name}: loaded " + ", ".join(parts) + "; " + ("; ".join(notes) if notes else "no issues")
        summary["text"] = text
        logger.info(text)
        return summary


def _fmt_box(b) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in b) + "]"


def validate_dataset(dataset: Dataset, check_files: bool = True) -> dict[str, list[str]]:
    """Check a `Dataset` without changing it; returns {problem kind: [messages]} (empty: all good).

    Kinds: duplicate_id, bad_size, bad_box (non-finite or no area), outside (beyond the image),
    bad_label (not an index into class_names), missing_file.
    """
    problems: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    k = len(dataset.class_names)
    for r in dataset.records:
        where = f"{dataset.name}: image '{r.image_id}'"
        if r.image_id in seen:
            problems["duplicate_id"].append(f"{where} appears more than once")
        seen.add(r.image_id)
        if r.width <= 0 or r.height <= 0:
            problems["bad_size"].append(f"{where} has size {r.width}x{r.height}")
        b = r.boxes
        bad = ~np.isfinite(b).all(1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        for i in np.flatnonzero(bad):
            problems["bad_box"].append(f"{where}: box {i} {_fmt_box(b[i])} has no area")
        out = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > r.width) | (b[:, 3] > r.height)
        for i in np.flatnonzero(out & ~bad):
            problems["outside"].append(f"{where}: box {i} {_fmt_box(b[i])} is outside the {r.width}x{r.height} image")
        for i in np.flatnonzero((r.labels < 0) | (r.labels >= k)):
            problems["bad_label"].append(f"{where}: label {int(r.labels[i])} is not in 0..{k - 1}")
        if check_files and not os.path.isfile(r.path):
            problems["missing_file"].append(f"{where}: file {r.path} not found")
    return dict(problems)
