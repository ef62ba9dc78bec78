"""A folder-per-class classification set from a detection set's annotated objects.

Each object of a VOC-layout split becomes one image: a square around its box, `margin`
times its longer side added on every side as context, moved inside the image where it
sticks out (clipped only where the image is smaller than the square), cut from the
original pixels (grayscale stays grayscale, no resampling) and saved as PNG under
OUT/<split>/<class>/<image id>_<object index>.png.  `max_per_class` keeps a seeded random
subset of each class's objects per split, so the same arguments always give the same files.
OUT/params.json records the arguments; a second run with the same ones does nothing, one
with other arguments into the same folder is refused rather than mixing two sets.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from detector.cache import atomic_write_json, make_dir
from detector.datasets.voc import load_voc
from detector.errors import DatasetError
from detector.progress import progress_bar

CROPS_VERSION = 1


def crop_box(box: Sequence[float], width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """Integer (x1, y1, x2, y2) of the square of side (1 + 2 margin) x the box's longer side,
    centred on the box, moved inside the image (and clipped to it only where it is larger)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(1, int(round(max(x2 - x1, y2 - y1) * (1 + 2 * margin))))
    out = []
    for lo, hi, extent in ((x1, x2, width), (y1, y2, height)):
        s = min(side, extent)
        start = int(round((lo + hi) / 2 - s / 2))
        start = min(max(start, 0), extent - s)
        out.append((start, start + s))
    (a, b), (c, d) = out
    return a, c, b, d


def make_object_crops(voc_root: str | os.PathLike, out: str | os.PathLike,
                      splits: Sequence[tuple[str, str]] = (("trainval", "train"), ("test", "test")),
                      margin: float = 0.5, max_per_class: Union[None, int, Sequence[Optional[int]]] = None,
                      seed: int = 0, progress: bool = True) -> dict:
    """Write the crops of every object of each (VOC split, output split) pair; returns
    {output split: {class: count}}.  `max_per_class`: one cap for every split, or one per split
    (None: every object).  See the module docstring."""
    if margin < 0:
        raise DatasetError(f"margin must be >= 0, got {margin}")
    caps = list(max_per_class) if isinstance(max_per_class, (list, tuple)) else [max_per_class] * len(splits)
    if len(caps) != len(splits):
        raise DatasetError(f"max_per_class: give one number or one per split ({len(splits)}), got {len(caps)}")
    if any(c is not None and c < 1 for c in caps):
        raise DatasetError(f"max_per_class must be >= 1, got {max_per_class}")
    out = Path(out)
    params = {"voc_root": str(Path(voc_root).resolve()), "splits": [list(s) for s in splits], "margin": margin,
              "max_per_class": caps, "seed": seed, "version": CROPS_VERSION}
    meta = out / "params.json"
    if meta.is_file():
        done = json.loads(meta.read_text())
        if done.get("params") == params:
            return done["counts"]
        raise DatasetError(f"{out} already holds crops made with other arguments ({meta}); "
                           f"choose another --out or remove it")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no params.json of object crops; choose another --out")
    counts: dict = {}
    for (voc_split, name), cap in zip(splits, caps):
        ds = load_voc(voc_root, voc_split)
        objects = [(r, k) for r in ds.records for k in range(len(r.labels))]
        chosen = []
        for c in range(len(ds.class_names)):
            mine = [o for o in objects if o[0].labels[o[1]] == c]
            if cap is not None and len(mine) > cap:
                rng = np.random.default_rng([seed, c])
                mine = [mine[i] for i in sorted(rng.choice(len(mine), cap, replace=False))]
            chosen += mine
        counts[name] = {}
        for rec, k in progress_bar(chosen, desc=f"crops {voc_split} -> {name}", unit="obj", disable=not progress):
            cls = ds.class_names[rec.labels[k]]
            folder = out / name / cls
            make_dir(folder)
            with Image.open(rec.path) as im:
                im.load()
                x1, y1, x2, y2 = crop_box(rec.boxes[k], im.width, im.height, margin)
                im.crop((x1, y1, x2, y2)).save(folder / f"{rec.image_id}_{k}.png")
            counts[name][cls] = counts[name].get(cls, 0) + 1
    atomic_write_json(meta, {"params": params, "counts": counts})
    return counts
