"""The resize of each scale (paper section 4.1): shorter side = the scale, longer side capped.

One definition for the conv maps, the views and crops of classification, and anything that
maps boxes between the original image and a resized one.
"""
from __future__ import annotations


def resize_factor(width: int, height: int, scale: int, max_size: int, max_upscale: float = 0.0) -> float:
    """Factor that makes the shorter side `scale`, unless the longer side would pass `max_size`;
    and never above `max_upscale` when it is positive (a small image is not blown up to the
    scale: `features.max_upscale`)."""
    f = scale / min(width, height)
    if max(width, height) * f > max_size:
        f = max_size / max(width, height)
    if max_upscale > 0:
        f = min(f, float(max_upscale))
    return f


def resized_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, int(round(width * factor))), max(1, int(round(height * factor)))
