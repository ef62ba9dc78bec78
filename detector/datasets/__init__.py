"""Dataset readers: VOC layout, COCO json and the built-in synthetic generator."""
from .coco import COCODataset, load_coco, voc_to_coco_dict
from .records import Dataset, ImageRecord
from .validate import DatasetError, DatasetWarning, validate_dataset
from .voc import VOCDataset, load_voc, read_voc_classes

__all__ = ["Dataset", "ImageRecord", "load_voc", "read_voc_classes", "VOCDataset", "load_coco", "voc_to_coco_dict",
           "COCODataset", "DatasetError", "DatasetWarning", "validate_dataset", "make_synthetic"]


def __getattr__(name):
    # The generator pulls in OpenCV; load it only when asked for.
    if name == "make_synthetic":
        from .synthetic import make_synthetic

        return make_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
