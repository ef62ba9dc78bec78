"""Image loading: any path, array or PIL image becomes an HxWx3 uint8 RGB array.

Grayscale is replicated to three channels, alpha is dropped (composited on
black would change colours near edges; dropping matches what the devkit's
imread does), 16-bit images are scaled down to 8 bits.  EXIF orientation is
*not* applied: VOC and COCO annotations refer to the stored pixel grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from detector.errors import ImageError  # noqa: F401  (re-exported: detector.images.ImageError)


def _to_uint8_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: expected an HxW or HxWxC image with C in 1..4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: image is empty (shape {arr.shape})")
    c = arr.shape[2]
    if c == 2:  # gray + alpha
        arr = arr[:, :, :1]
    elif c == 4:  # RGBA
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray((arr >> 8).astype(np.uint8))
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: image contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return np.ascontiguousarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):
        hi = int(arr.max(initial=0))
        if hi > 255:  # e.g. 32-bit PIL mode "I" holding 16-bit data
            arr = arr.astype(np.float64) * (255.0 / (65535.0 if hi <= 65535 else hi))
        return np.ascontiguousarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")


def _pil_to_array(im: Image.Image, name: str) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16)
    elif im.mode in ("I", "F"):
        arr = np.asarray(im)
    elif im.mode in ("RGB", "L", "RGBA", "LA"):
        arr = np.asarray(im)
    else:  # P, CMYK, YCbCr, 1, ...
        arr = np.asarray(im.convert("RGB"))
    return _to_uint8_rgb(arr, name)


def load_image(image, name: str | None = None) -> np.ndarray:
    """Return an HxWx3 uint8 **RGB** array.

    `image` is a path (str or Path), a PIL image, or a numpy array that is
    already RGB (HxW, HxWx3 or HxWx4; uint8, uint16 or float in [0, 1]).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        label = name or str(path)
        if path.is_dir():
            raise ImageError(f"{label}: is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"{label}: image file not found")
        try:
            with Image.open(path) as im:
                im.load()
                return _pil_to_array(im, label)
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: cannot read image ({_without_path(e, path)})") from e
    if isinstance(image, Image.Image):
        return _pil_to_array(image, name or "<PIL image>")
    if isinstance(image, np.ndarray):
        return _to_uint8_rgb(image, name or "<array>")
    raise ImageError(f"{name or '<input>'}: unsupported image type {type(image).__name__}; "
                     "pass a path, a PIL image or an HxWx3 uint8 RGB array")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header only, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({_without_path(e, path)})") from e


def image_pixels(path: str | os.PathLike) -> int:
    """Width x height from the header; 0 for a file that cannot be read (it is reported where it
    is decoded).  The cost by which torchrun ranks share images."""
    try:
        width, height = image_size(path)
    except ImageError:
        return 0
    return width * height


def _without_path(error: Exception, path) -> str:
    """PIL's message without the file name it repeats (ours already starts with it)."""
    text = str(error)
    for form in (repr(str(path)), str(path)):
        text = text.replace(" " + form, "").replace(form, "")
    return text.strip() or type(error).__name__


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files in a folder (not recursive), sorted by name."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in exts)
