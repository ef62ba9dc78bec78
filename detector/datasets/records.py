"""The one record type every dataset reader produces.

Pixel convention (used everywhere in this library): boxes are float
`x1, y1, x2, y2` in 0-based *continuous* pixel coordinates, where pixel i
covers [i, i+1).  So `x2 - x1` is the width in pixels and a box covering the
whole image is `[0, 0, W, H]` (torchvision's convention).  A VOC box
`xmin..xmax` (1-based, inclusive) becomes `x1 = xmin - 1, x2 = xmax`; the
devkit's "+1" widths then equal our plain widths exactly, so IoUs agree.

Labels are 0-based indices into the dataset's `class_names`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecord:
    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N,4] float32
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [N] int64
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))  # [N] bool (COCO: iscrowd)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        self.difficult = np.asarray(self.difficult, bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(f"{self.image_id}: boxes, labels and difficult differ in length")


@dataclass
class Dataset:
    """A list of records plus the class names their labels index."""

    name: str
    class_names: list[str]
    records: list[ImageRecord]
    root: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i) -> ImageRecord:
        return self.records[i]
