#!/usr/bin/env python
"""Our TIDE-style error analysis against tidecv itself (the TIDE authors' package) on random scenes.

tidecv cannot join this toolkit's environment (it installs opencv-python, which replaces the
opencv-contrib-python-headless we pin, plus seaborn and pandas), so it runs in a venv of its own:

  python -m venv /tmp/tidevenv && /tmp/tidevenv/bin/pip install tidecv
  python bench/tidecv_agreement.py --tidecv-python /tmp/tidevenv/bin/python [--scenes 8]

Ours runs with tidecv's AP (metric="coco101", with tidecv's recall thresholds k/100 in place of
COCOeval's np.linspace, which differ by 1 ulp at 10 of the 101) and its oracle
(tidecv_oracle=True), on sparse
scenes (objects never overlap) and crowded ones (objects overlap; an object's detections may
have any class).  Per scene it prints base AP, every dAP (the six types, FP, FN) and every
count, ours/tidecv, in tidecv's units (AP x 100).  Then the crowded scenes again with our
default oracle (the best error among the types being fixed takes a GT), whose cls and loc dAP
may exceed tidecv's.  Ends with

  max_abs_diff = X      largest |ours - tidecv| over the compared figures (AP points)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo root on sys.path)

import numpy as np  # noqa: E402

from detector.metrics import error_analysis  # noqa: E402
from detector.metrics.error_analysis import ERROR_TYPES, analyze_errors  # noqa: E402

NAMES = {"Cls": "cls", "Loc": "loc", "Both": "both", "Dupe": "dupe", "Bkg": "bkg", "Miss": "missed",
         "FalsePos": "FP", "FalseNeg": "FN"}

# Runs in tidecv's interpreter: scenes (json on stdin) -> tidecv's figures (json on stdout).
TIDECV_SIDE = r"""
import contextlib, io, json, sys
from tidecv import TIDE, Data
out = []
for sc in json.load(sys.stdin):
    gt, pr = Data("gt"), Data("pred")
    for i, im in enumerate(sc):
        gt.add_image(i, f"im{i}")  # else an image without objects is skipped, its detections unseen
        for b, l in zip(im["gt"], im["gl"]):
            gt.add_ground_truth(i, l, [b[0], b[1], b[2] - b[0], b[3] - b[1]])
        for l, s, b in im["dets"]:
            pr.add_detection(i, l, s, [b[0], b[1], b[2] - b[0], b[3] - b[1]])
    t = TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        t.evaluate(gt, pr, mode=TIDE.BOX, pos_threshold=0.5, background_threshold=0.1, name="p")
    run = t.runs["p"]
    dap = {e: v for e, v in t.get_main_errors()["p"].items()}
    dap.update(t.get_special_errors()["p"])
    out.append({"ap": run.ap, "dap": dap, "counts": {e.short_name: len(v) for e, v in run.error_dict.items()}})
json.dump(out, sys.stdout)
"""


def scene(seed: int, crowded: bool, n_img: int = 40, n_cls: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(n_img):
        cells = rng.permutation(16)[: int(rng.integers(0, 6))]
        g, gl, dets = [], [], []
        for c in cells:
            xy = rng.uniform(0, 150, 2) if crowded else np.array([100.0 * (c % 4) + 20, 100.0 * (c // 4) + 20])
            wh = rng.uniform(20, 80 if crowded else 55, 2)
            box = np.concatenate([xy, xy + wh])
            lab = int(rng.integers(n_cls))
            g.append(box.tolist()), gl.append(lab)
            # sparse: all of an object's detections share one class, so no GT has both a cls and a
            # loc error (where our default oracle and tidecv's part)
            one = lab if rng.random() < 0.75 else int((lab + 1 + rng.integers(n_cls - 1)) % n_cls)
            for _ in range(int(rng.integers(0, 4))):
                dlab = (lab if rng.random() < 0.75 else int(rng.integers(n_cls))) if crowded else one
                b = box + rng.normal(0, rng.choice([0.05, 0.25, 0.5]), 4) * np.tile(wh, 2)
                b[2:] = np.maximum(b[2:], b[:2] + 1)
                dets.append((dlab, float(rng.random()), b.tolist()))
        for _ in range(int(rng.integers(0, 3))):
            xy = rng.uniform(0, 400, 2)
            dets.append((int(rng.integers(n_cls)), float(rng.random()), [*xy.tolist(), *(xy + rng.uniform(5, 40, 2))
                                                                         .tolist()]))
        imgs.append({"gt": g, "gl": gl, "dets": dets})
    return imgs


def ours(sc: list[dict], tidecv_oracle: bool) -> dict:
    pb = [np.array([d[2] for d in im["dets"]], np.float64).reshape(-1, 4) for im in sc]
    pl = [np.array([d[0] for d in im["dets"]], np.int64) for im in sc]
    ps = [np.array([d[1] for d in im["dets"]], np.float64) for im in sc]
    gb = [np.array(im["gt"], np.float64).reshape(-1, 4) for im in sc]
    gl = [np.array(im["gl"], np.int64) for im in sc]
    rep = analyze_errors(pb, pl, ps, gb, gl, n_classes=3, metric="coco101", tidecv_oracle=tidecv_oracle)
    return {"ap": 100 * rep["map"], "dap": {k: 100 * v for k, v in rep["dap"].items()},
            "counts": {k: int(v.sum()) for k, v in rep["counts"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tidecv-python", required=True, help="a python with tidecv installed (its own venv)")
    ap.add_argument("--scenes", type=int, default=8, help="random scenes of 40 images per kind")
    args = ap.parse_args(argv)

    error_analysis.COCO_RECALL_THRESHOLDS = np.arange(101) / 100  # tidecv's (see the docstring)
    kinds = [("sparse", False, True), ("crowded", True, True), ("crowded, our oracle", True, False)]
    scenes = {crowded: [scene(s, crowded) for s in range(args.scenes)] for crowded in (False, True)}
    theirs = {}
    for crowded, scs in scenes.items():
        p = subprocess.run([args.tidecv_python, "-c", TIDECV_SIDE], input=json.dumps(scs), capture_output=True,
                           text=True)
        if p.returncode != 0:
            print(f"error: tidecv's side failed:\n{p.stderr}", file=sys.stderr)
            return 2
        theirs[crowded] = json.loads(p.stdout)
    version = subprocess.run([args.tidecv_python, "-c", "import importlib.metadata as m; print(m.version('tidecv'))"],
                             capture_output=True, text=True).stdout.strip()
    common.print_header(f"our error analysis against tidecv {version}: AP x 100, ours/tidecv")
    worst = 0.0
    for kind, crowded, compat in kinds:
        print(f"{kind} scenes (metric coco101, tidecv_oracle={compat}):")
        for s, (sc, th) in enumerate(zip(scenes[crowded], theirs[crowded])):
            us = ours(sc, compat)
            cells = [f"AP {us['ap']:.3f}/{th['ap']:.3f}"]
            diffs = [us["ap"] - th["ap"]]
            for name, v in th["dap"].items():
                k = NAMES[name]
                cells.append(f"{k} {us['dap'][k]:.3f}/{v:.3f}")
                diffs.append(us["dap"][k] - v)
            for name, n in th["counts"].items():
                k = NAMES[name]
                cells[1 + list(NAMES.values()).index(k)] += f" n {us['counts'][k]}/{n}"
                diffs.append(us["counts"][k] - n)
            if compat:
                worst = max(worst, max(abs(d) for d in diffs))
            print(f"  scene {s}: " + "; ".join(cells))
    print(f"(types: {', '.join(ERROR_TYPES)}; 'our oracle' rows are not in max_abs_diff)")
    print(f"max_abs_diff = {worst:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
