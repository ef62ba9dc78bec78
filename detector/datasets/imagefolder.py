"""Image-folder classification data: `ROOT/<split>/<class>/*.jpg`.

Class names are the class folders' names, sorted (or the list a trained model
gives, for its test split).  Folders whose names start with '.' are ignored, and
so are files that are not images by their ending.  Each problem a user can fix
is a DatasetError naming the folder: a split folder that does not exist, a split
with no class folders (or, for training, only one), an empty class folder, a class
folder the model does not know.  Zero-byte files cannot be images: they are skipped here, with a warning
naming them, and counted in `skipped`; images that fail to decode are found
(and skipped and counted the same way) when they are read.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from detector.errors import DatasetError
from detector.images import list_images

log = logging.getLogger(__name__)


@dataclass
class ImageFolderSplit:
    root: str
    split: str
    class_names: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __len__(self) -> int:
        return len(self.paths)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in a split folder."""
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist (expected ROOT/<split>/<class>/*.jpg)")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    return names


def load_image_folder(root: str | os.PathLike, split: str = "train",
                      class_names: Optional[Sequence[str]] = None) -> ImageFolderSplit:
    """Every image of `root/split`, labelled by its folder's index in `class_names`
    (default: this split's folder names, sorted).  With `class_names` given (a trained
    model's), a folder not in it is an error, and classes with no folder are allowed."""
    split_dir = Path(root) / split
    found = class_folders(split_dir)
    if class_names is None:
        if len(found) < 2:
            raise DatasetError(f"{split_dir} has one class folder ({found[0]}): a classifier needs two or more "
                               f"(expected {split_dir}/<class>/*.jpg, one folder per class)")
        names = found
    else:
        names = list(class_names)
        unknown = [c for c in found if c not in names]
        if unknown:
            raise DatasetError(f"class folder {split_dir / unknown[0]} is not a class the model knows "
                               f"(it knows {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
    index = {c: i for i, c in enumerate(names)}
    out = ImageFolderSplit(str(root), split, names, [], [])
    for c in found:
        files = list_images(split_dir / c)
        usable = []
        for p in files:
            if os.path.getsize(p) == 0:
                log.warning("skipping %s: zero-byte file", p)
                out.skipped.append((p, "zero-byte file"))
            else:
                usable.append(p)
        if not usable:
            raise DatasetError(f"class folder {split_dir / c} holds no images"
                               + (f" (only {len(files)} zero-byte files)" if files else ""))
        out.paths += usable
        out.labels += [index[c]] * len(usable)
    return out

