"""A trained classifier over an image-folder split: top-1 / top-5 error, time per image,
per-class accuracy, for one view scheme or several (tools/test_classifier.py), and the
breakdown by view set (each test scale alone, the scales cumulated, the named schemes) with
both ways of averaging the views, from one pass over the conv maps."""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from detector.cache import atomic_write_json, atomic_write_text
from detector.classification.classifier import AVERAGES, SPPClassifier, combine_views
from detector.classification.views import ViewGroup, breakdown_schemes, plan_views
from detector.images import load_image
from detector.progress import progress_bar
from detector.timing import NO_TIMER
from detector.datasets.imagefolder import ImageFolderSplit
from detector.distributed import all_gather
from detector.errors import DatasetError, ImageError

log = logging.getLogger(__name__)


def topk_errors(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: the true label is not among the k highest scores (ties: the lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ~(order == labels[:, None]).any(axis=1)


def run_scheme(clf: SPPClassifier, data: ImageFolderSplit, scheme: str, progress: bool = True,
               mine: Optional[Sequence[int]] = None, average: Optional[str] = None) -> dict:
    """Scores of every readable image under one scheme; unreadable images are skipped and counted.
    Time per image is the whole classify() from the file, after one warm-up image.  Under
    torchrun each rank classifies `mine` (its share of the image indices) and every rank gets
    the gathered result, in the split's order."""
    mine = list(range(len(data))) if mine is None else list(mine)
    done, times, skipped = [], [], []
    if mine:
        try:
            clf.classify(data.paths[mine[0]], views=scheme, average=average)  # warm-up: first-call allocations are not the method's
        except ImageError:
            pass
    for i in progress_bar(mine, desc=f"views {scheme}", unit="img", disable=not progress):
        t = time.perf_counter()
        try:
            res = clf.classify(data.paths[i], views=scheme, average=average)
        except ImageError as e:
            log.warning("skipping %s: %s", data.paths[i], e)
            skipped.append((i, str(e)))
            continue
        times.append(time.perf_counter() - t)
        done.append((i, res["scores"]))
    parts = all_gather((done, times, skipped))
    done = sorted(x for part in parts for x in part[0])
    times = [t for part in parts for t in part[1]]
    skipped = [(data.paths[i], e) for i, e in sorted(x for part in parts for x in part[2])]
    if not done:
        raise DatasetError(f"{data.root}/{data.split}: no readable image to test on")
    S = np.stack([sc for _, sc in done])
    y = np.array([data.labels[i] for i, _ in done], np.int64)
    return {"scheme": scheme, "scores": S, "labels": y, "paths": [data.paths[i] for i, _ in done],
            "skipped": skipped, "top1_err": float(topk_errors(S, y, 1).mean()),
            "top5_err": float(topk_errors(S, y, 5).mean()),
            "s_per_image": float(np.mean(times)), "median_s": float(np.median(times))}


def per_class_accuracy(result: dict, n_classes: int) -> list:
    """Top-1 accuracy of each class (None where the split has no image of it)."""
    hit = ~topk_errors(result["scores"], result["labels"], 1)
    return [float(hit[result["labels"] == k].mean()) if (result["labels"] == k).any() else None
            for k in range(n_classes)]


def format_results(results: Sequence[dict], class_names: Sequence[str]) -> str:
    """The scheme table, then per-class top-1 accuracy, one column per scheme."""
    lines = [f"{'views':<8} {'images':>6} {'top1_err':>9} {'top5_err':>9} {'s/image':>8}"]
    for r in results:
        lines.append(f"{r['scheme']:<8} {len(r['labels']):>6} {r['top1_err']:>9.4f} {r['top5_err']:>9.4f} "
                     f"{r['s_per_image']:>8.3f}")
    counts = np.bincount(results[0]["labels"], minlength=len(class_names))
    width = max(12, max(len(n) for n in class_names))
    lines += ["", "per-class top-1 accuracy:", f"{'class':<{width}} {'images':>6} "
              + " ".join(f"{r['scheme']:>7}" for r in results)]
    accs = [per_class_accuracy(r, len(class_names)) for r in results]
    for k, name in enumerate(class_names):
        cells = " ".join(f"{'-':>7}" if a[k] is None else f"{a[k]:>7.3f}" for a in accs)
        lines.append(f"{name:<{width}} {counts[k]:>6} {cells}")
    return "\n".join(lines)


def write_results(out: Path, results: Sequence[dict], class_names: Sequence[str]) -> None:
    """predictions_<scheme>.csv (path, true, predicted, its score) and results.json (the figures)."""
    for r in results:
        if "average" in r:  # a breakdown's view sets: their figures only
            continue
        fh = io.StringIO(newline="")
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "score"])
        for p, y, s in zip(r["paths"], r["labels"], r["scores"]):
            k = int(np.argmax(s))
            w.writerow([p, class_names[y], class_names[k], f"{s[k]:.6f}"])
        atomic_write_text(out / f"predictions_{r['scheme']}.csv", fh.getvalue())
    atomic_write_json(out / "results.json", [{k: r[k] for k in ("scheme", "average", "views", "top1_err", "top5_err",
                                                                 "s_per_image", "median_s", "skipped") if k in r}
                                              | {"images": len(r["labels"])} for r in results])


# ---------------------------------------------------------------- breakdown by view set
@torch.inference_mode()
def view_set_logits(clf: SPPClassifier, image) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """fc8 outputs [R, K] of every distinct view the breakdown's sets use, and each set's rows.
    Each (scale, flip) map is computed once, each distinct view pooled once."""
    c = clf.cfg.classifier
    img = load_image(image)
    H, W = img.shape[:2]
    index: dict = {}  # (scale, flip, whole, box) -> row
    merged: dict = {}  # (scale, flip, whole) -> [(row, box)]
    members = {}
    for name, sch in breakdown_schemes(c.view_scale, c.full_scale, c.test_scales).items():
        rows = []
        for g in plan_views(sch, W, H, c.view_size, clf.cfg.features.max_size):
            for b in g.boxes:
                key = (g.scale, g.flip, g.whole, tuple(b.tolist()))
                if key not in index:
                    index[key] = len(index)
                    merged.setdefault(key[:3], []).append((index[key], b))
                rows.append(index[key])
        members[name] = np.array(rows, np.int64)
    groups = [ViewGroup(scale, flip, np.stack([b for _, b in items]), whole)
              for (scale, flip, whole), items in merged.items()]
    order = torch.as_tensor([r for items in merged.values() for r, _ in items])
    logits = clf.logits(clf._view_pool5(img, groups, NO_TIMER))
    out = torch.empty_like(logits)
    out[order] = logits
    return out, members


def run_breakdown(clf: SPPClassifier, data: ImageFolderSplit, progress: bool = True,
                  mine: Optional[Sequence[int]] = None) -> list[dict]:
    """One result per (view set, average): scores, labels, top-1 / top-5 error and views per image,
    from one pass (view_set_logits) over every readable image; `s_per_image` is the whole pass's."""
    mine = list(range(len(data))) if mine is None else list(mine)
    done, times, skipped = [], [], []
    for i in progress_bar(mine, desc="views breakdown", unit="img", disable=not progress):
        t = time.perf_counter()
        try:
            logits, members = view_set_logits(clf, data.paths[i])
        except ImageError as e:
            log.warning("skipping %s: %s", data.paths[i], e)
            skipped.append((i, str(e)))
            continue
        scores = {(name, avg): combine_views(logits[rows], avg).numpy()
                  for name, rows in members.items() for avg in AVERAGES}
        times.append(time.perf_counter() - t)
        done.append((i, scores, {name: len(rows) for name, rows in members.items()}))
    parts = all_gather((done, times, skipped))
    done = sorted((x for part in parts for x in part[0]), key=lambda x: x[0])
    times = [t for part in parts for t in part[1]]
    skipped = [(data.paths[i], e) for i, e in sorted(x for part in parts for x in part[2])]
    if not done:
        raise DatasetError(f"{data.root}/{data.split}: no readable image to test on")
    y = np.array([data.labels[i] for i, _, _ in done], np.int64)
    paths = [data.paths[i] for i, _, _ in done]
    out = []
    for key in done[0][1]:
        S = np.stack([sc[key] for _, sc, _ in done])
        out.append({"scheme": key[0], "average": key[1], "scores": S, "labels": y, "paths": paths,
                    "skipped": skipped, "views": float(np.mean([n[key[0]] for _, _, n in done])),
                    "top1_err": float(topk_errors(S, y, 1).mean()), "top5_err": float(topk_errors(S, y, 5).mean()),
                    "s_per_image": float(np.mean(times)), "median_s": float(np.median(times))})
    return out


def format_breakdown(results: Sequence[dict]) -> str:
    """One row per view set: views per image, top-1 and top-5 error under each averaging."""
    by = {(r["scheme"], r["average"]): r for r in results}
    names = list(dict.fromkeys(r["scheme"] for r in results))
    lines = [f"{'view set':<12} {'views':>6} " + " ".join(f"{'top1 ' + a:>13}" for a in AVERAGES) + " "
             + " ".join(f"{'top5 ' + a:>13}" for a in AVERAGES)]
    for n in names:
        lines.append(f"{n:<12} {by[(n, AVERAGES[0])]['views']:>6.1f} "
                     + " ".join(f"{by[(n, a)]['top1_err']:>13.4f}" for a in AVERAGES) + " "
                     + " ".join(f"{by[(n, a)]['top5_err']:>13.4f}" for a in AVERAGES))
    lines.append(f"(one pass for every set: {results[0]['s_per_image']:.3f} s/image; each scheme's own cost: "
                 f"--views all)")
    return "\n".join(lines)
