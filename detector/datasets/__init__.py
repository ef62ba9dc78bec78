"""Dataset readers: VOC layout, COCO json and the built-in synthetic generator."""
from .records import Dataset, ImageRecord

__all__ = ["Dataset", "ImageRecord"]
