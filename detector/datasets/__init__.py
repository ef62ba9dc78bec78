"""Dataset readers: VOC layout, COCO json and the built-in synthetic generator.

`load_dataset` is the one entry point the detection tools use: it takes either layout.
Classification reads image folders (`imagefolder.load_image_folder`; not imported here,
since it needs torch through detector.core.features).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from detector.datasets.coco import COCODataset, load_coco, voc_to_coco_dict
from detector.datasets.records import Dataset, ImageRecord
from detector.datasets.validate import DatasetError, DatasetWarning, validate_dataset
from detector.datasets.voc import VOCDataset, load_voc, read_voc_classes

__all__ = ["load_dataset", "Dataset", "ImageRecord", "load_voc", "read_voc_classes", "VOCDataset", "load_coco",
           "voc_to_coco_dict", "COCODataset", "DatasetError", "DatasetWarning", "validate_dataset", "make_synthetic"]


def load_dataset(path: str | os.PathLike, split: str = "trainval", class_names: Optional[Sequence[str]] = None,
                 image_dir: Optional[str | os.PathLike] = None) -> Dataset:
    """A VOC-layout root (its `split`), or a COCO annotation .json (images in `image_dir`,
    default: the json's folder; `split` is ignored: one json is one split)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return load_coco(p, image_dir or p.parent, class_names)
    if image_dir is not None:
        raise DatasetError(f"--image-dir is for COCO annotation files; {p} is a VOC-layout folder")
    return load_voc(p, split, class_names)


def __getattr__(name):
    # The generator pulls in OpenCV; load it only when asked for.
    if name == "make_synthetic":
        from detector.datasets.synthetic import make_synthetic

        return make_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
