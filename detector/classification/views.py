"""Test-time views (paper sections 3.1.4 and 3.1.5): where they lie, at which scale, flipped or not.

A view is a square window of `size` pixels *on the resized image* at one scale
(shorter side = scale), or the whole image.  Views are given as boxes in
original-image pixels (x1, y1, x2, y2, continuous), so one box serves both ways
of evaluating it: as a window on that scale's conv map (SPP pools it) or as a
crop of the resized image run through the trunk on its own (the baseline).

Positions, on the resized image of Ws x Hs pixels, with the view's corner at
integer pixels (as crops have):  left 0, middle (Ws - size) // 2, right Ws - size,
and likewise top / middle / bottom.

- `center`:  the middle view.
- `corners5`: the four corners and the middle (the standard 10 views with flips).
- `grid9`:  those plus the four side midpoints (the paper's 18 views per scale).

Views that coincide are kept once: at s = 224 a landscape image is 224 pixels
high, so top, middle and bottom views are the same and grid9 gives 3 distinct
views, 6 with flips (the paper's "6 different views" at 224).  A view larger than
the resized image (only when `max_size` capped the scale) is clipped to it.

A flipped view is the same position on the mirror image: since every position set
here is mirror-symmetric, the flipped views of a scale are the same boxes on the
mirror image's conv map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from detector.config import CLASSIFIER_VIEWS
from detector.core.resize import resize_factor, resized_size

POSITIONS = ("center", "corners5", "grid9")


@dataclass
class ViewGroup:
    """Views on one conv map: the image at `scale` (its mirror image if `flip`)."""
    scale: int
    flip: bool
    boxes: np.ndarray  # [n, 4] float64, original-image pixels (of the mirror image if flip)
    whole: bool = False  # the full-image view (the whole map) rather than size x size windows


def _offsets(extent: int, size: int) -> tuple[int, int, int]:
    """(first, middle, last) integer offsets of a `size` window on `extent` pixels; 0 when it does not fit."""
    room = max(extent - size, 0)
    return 0, room // 2, room


def view_boxes(width: int, height: int, scale: int, size: int, positions: str, max_size: int) -> np.ndarray:
    """Distinct views of `size` pixels at `scale`, as [n, 4] boxes in original-image pixels,
    in a fixed order (row by row, top-left first; the middle view first for corners5)."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    f = resize_factor(width, height, scale, max_size)
    Ws, Hs = resized_size(width, height, f)
    xs, ys = _offsets(Ws, size), _offsets(Hs, size)
    if positions == "center":
        corners = [(xs[1], ys[1])]
    elif positions == "corners5":
        corners = [(xs[1], ys[1])] + [(x, y) for y in (ys[0], ys[2]) for x in (xs[0], xs[2])]
    else:
        corners = [(x, y) for y in ys for x in xs]
    distinct = list(dict.fromkeys(corners))  # keeps the first of coinciding views, in order
    b = np.array([[x, y, min(x + size, Ws), min(y + size, Hs)] for x, y in distinct], np.float64) / f
    return np.minimum(b, [width, height, width, height])  # Ws / f may round a hair past W


def full_box(width: int, height: int) -> np.ndarray:
    return np.array([[0.0, 0.0, width, height]])


@dataclass(frozen=True)
class ViewScheme:
    """Which views a scheme averages: `positions` at each of `scales`, plus full-image views."""
    scales: tuple[int, ...]
    positions: str
    flips: bool
    full_scale: int = 0  # 0: no full-image views
    full_flips: bool = False
    crops: bool = False  # run each view through the trunk on its own (the 10-crop baseline)


SCHEMES = CLASSIFIER_VIEWS  # center, full, 10, 10crop, multi


def scheme(name: str, view_scale: int, full_scale: int, multi_scales: Sequence[int]) -> ViewScheme:
    """The paper's schemes (section 3.1.5): `center` one view at `view_scale`; `full` the
    whole image at `full_scale`; `10` the corners and middle with flips at `view_scale`, on
    the conv maps; `10crop` the same views cropped and run through the trunk one by one;
    `multi` grid9 with flips at every scale of `multi_scales` plus the two full-image views."""
    if name == "center":
        return ViewScheme((view_scale,), "center", False)
    if name == "full":
        return ViewScheme((), "center", False, full_scale, False)
    if name in ("10", "10crop"):
        return ViewScheme((view_scale,), "corners5", True, crops=name == "10crop")
    if name == "multi":
        return ViewScheme(tuple(sorted(multi_scales)), "grid9", True, full_scale, True)
    raise ValueError(f"unknown view scheme {name!r}; choose one of {', '.join(SCHEMES)} or all")


def breakdown_schemes(view_scale: int, full_scale: int, multi_scales: Sequence[int]) -> dict[str, ViewScheme]:
    """The view sets `--views breakdown` reports, by name: `center`, `full` and `10` (the
    schemes), `scale S` (grid9 with flips at S alone, for each test scale), and `up to S`
    (those of every scale <= S plus the two full-image views; the last is `multi`)."""
    out = {name: scheme(name, view_scale, full_scale, multi_scales) for name in ("center", "full", "10")}
    ordered = sorted(multi_scales)
    for s in ordered:
        out[f"scale {s}"] = ViewScheme((s,), "grid9", True)
    for k, s in enumerate(ordered):
        name = "multi" if k == len(ordered) - 1 else f"up to {s}"
        out[name] = ViewScheme(tuple(ordered[:k + 1]), "grid9", True, full_scale, True)
    return out


def plan_views(s: ViewScheme, width: int, height: int, size: int, max_size: int) -> list[ViewGroup]:
    """The view groups of scheme `s` for a `width` x `height` image: one group per conv map
    (scale, flip), so each map is computed once and all its views are pooled from it."""
    groups = []
    for scale in s.scales:
        boxes = view_boxes(width, height, scale, size, s.positions, max_size)
        groups += [ViewGroup(scale, flip, boxes) for flip in ((False, True) if s.flips else (False,))]
    if s.full_scale:
        for flip in ((False, True) if s.full_flips else (False,)):
            groups.append(ViewGroup(s.full_scale, flip, full_box(width, height), whole=True))
    return groups


def count_views(groups: Sequence[ViewGroup]) -> int:
    return int(sum(len(g.boxes) for g in groups))
