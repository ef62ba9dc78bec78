"""detector.metrics.error_analysis (TIDE-style dAP) and tools/analyze_errors.py.

Hand-built cases, one per error type, whose AP before and after the fix is worked out in the
comments; then random scenes where each oracle is checked against an independent route: apply
the fix to the input arrays (drop, relabel or move the detections, drop the GT) and rescore with
detector.metrics.voc; base AP against eval_detection_voc; every type's definition re-derived
from continuous IoU; all fixes together give AP 1; proposal recall against proposals.recall."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.metrics.error_analysis import (ERROR_TYPES, FP_TYPES, IGNORED, TP, analyze_errors, format_errors,
                                             format_recall_breakdown, plot_errors, recall_breakdown, size_names)
from detector.metrics.voc import eval_detection_voc, to_devkit_boxes

ROOT = Path(__file__).resolve().parents[1]
A, B = 0, 1  # class indices


def arr(*rows):
    return np.array(rows, np.float64).reshape(-1, 4)


def run(dets, gts, n_classes, **kw):
    """dets: [(label, score, box)], gts: [(label, box)] or [(label, box, difficult)], one image."""
    pb = [arr(*[d[2] for d in dets])]
    pl = [np.array([d[0] for d in dets], np.int64)]
    ps = [np.array([d[1] for d in dets], np.float64)]
    gb = [arr(*[g[1] for g in gts])]
    gl = [np.array([g[0] for g in gts], np.int64)]
    gd = [np.array([bool(g[2]) if len(g) > 2 else False for g in gts])]
    return analyze_errors(pb, pl, ps, gb, gl, gd, n_classes=n_classes, **kw)


def types_of(rep):
    return [("TP" if t == TP else "ignored" if t == IGNORED else FP_TYPES[t]) for t in rep["det_type"][0]]


def only(rep, t, value, tol=1e-12):
    """dAP of type t is `value`, every other of the six is 0."""
    for u in ERROR_TYPES:
        assert rep["dap"][u] == pytest.approx(value if u == t else 0.0, abs=tol), (u, rep["dap"])


# --------------------------------------------------------------------------- one case per type

def test_background():
    # GT a0.  An FP far from it scores 0.9, the TP 0.5: precision [0, 1/2] at recall [0, 1], so
    # both APs are 1/2; without the FP, 1.
    rep = run([(A, 0.9, (50, 50, 60, 60)), (A, 0.5, (0, 0, 10, 10))], [(A, (0, 0, 10, 10))], 1)
    assert types_of(rep) == ["bkg", "TP"]
    assert rep["map"] == pytest.approx(0.5)
    only(rep, "bkg", 0.5)
    assert rep["counts"]["bkg"].tolist() == [1] and rep["counts"]["missed"].tolist() == [0]


def test_duplicate_07_and_area():
    # GT a0, a1.  TP a0 0.9, its duplicate 0.8, TP a1 0.7: precision [1, 1/2, 2/3] at recall
    # [1/2, 1/2, 1].  VOC07: thresholds 0..0.5 (6) see 1, 0.6..1 (5) see 2/3: (6 + 10/3) / 11 =
    # 28/33.  Area: 1/2 * 1 + 1/2 * 2/3 = 5/6.  Fixed: 1.
    dets = [(A, 0.9, (0, 0, 10, 10)), (A, 0.8, (0, 0, 10, 10)), (A, 0.7, (100, 0, 110, 10))]
    gts = [(A, (0, 0, 10, 10)), (A, (100, 0, 110, 10))]
    rep = run(dets, gts, 1)
    assert types_of(rep) == ["TP", "dupe", "TP"]
    assert rep["map"] == pytest.approx(28 / 33)
    only(rep, "dupe", 5 / 33)
    rep = run(dets, gts, 1, metric="area")
    assert rep["map"] == pytest.approx(5 / 6)
    only(rep, "dupe", 1 / 6)
    # COCO 101-point: envelope 1 up to recall 1/2 (51 thresholds 0..0.5), 2/3 above (50): 253/303
    rep = run(dets, gts, 1, metric="coco101")
    assert rep["map"] == pytest.approx(253 / 303)
    only(rep, "dupe", 50 / 303)


def test_localisation():
    # GT a0, a1.  A box covering 4/10 of a0 (IoU 0.4) scores 0.9, the TP on a1 0.5: precision
    # [0, 1/2] at recall [0, 1/2]; VOC07 = 6 * 1/2 / 11 = 3/11.  Fixed, it is the TP of a0: AP 1.
    rep = run([(A, 0.9, (0, 0, 10, 4)), (A, 0.5, (100, 0, 110, 10))], [(A, (0, 0, 10, 10)), (A, (100, 0, 110, 10))], 1)
    assert types_of(rep) == ["loc", "TP"]
    assert rep["map"] == pytest.approx(3 / 11)
    only(rep, "loc", 8 / 11)
    assert rep["gt_state"][0].tolist() == [1, 0]  # a0 covered by the loc error, so not missed
    # FN oracle: a0 leaves the positives, so precision [0, 1/2] at recall [0, 1]: VOC07 1/2.
    assert rep["dap"]["FN"] == pytest.approx(0.5 - 3 / 11)
    assert rep["dap"]["FP"] == pytest.approx(6 / 11 - 3 / 11)  # only the TP left: precision 1 to recall 1/2


def test_classification():
    # b0 (class B) and a0.  A class-A box exactly on b0 scores 0.9, the TP on a0 0.5.  Class A:
    # precision [0, 1/2], recall [0, 1]: 1/2.  Class B: no detection: 0.  mAP 1/4.  Fixed, the
    # box becomes B's TP: both classes 1, dAP 3/4 (per class 1/2 and 1).
    rep = run([(A, 0.9, (0, 0, 10, 10)), (A, 0.5, (100, 0, 110, 10))], [(B, (0, 0, 10, 10)), (A, (100, 0, 110, 10))], 2)
    assert types_of(rep) == ["cls", "TP"]
    assert rep["map"] == pytest.approx(0.25)
    only(rep, "cls", 0.75)
    assert rep["dap_per_class"]["cls"].tolist() == pytest.approx([0.5, 1.0])
    assert rep["counts"]["cls"].tolist() == [1, 0]  # counted under the predicted class


def test_both():
    # As above but the class-A box covers 4/10 of b0: wrong class, IoU 0.4, so "both"; b0 is
    # then missed (no cls/loc error aims at it).  Base: A 1/2, B 0.  Fixing "both" removes the
    # box: A 1, mAP 1/2, dAP 1/4.  Fixing "missed" drops b0: B has nothing left to find (1), mAP
    # 3/4, dAP 1/2.
    rep = run([(A, 0.9, (0, 0, 10, 4)), (A, 0.5, (100, 0, 110, 10))], [(B, (0, 0, 10, 10)), (A, (100, 0, 110, 10))], 2)
    assert types_of(rep) == ["both", "TP"]
    assert rep["dap"]["both"] == pytest.approx(0.25)
    assert rep["dap"]["missed"] == pytest.approx(0.5)
    assert rep["counts"]["missed"].tolist() == [0, 1]
    for t in ("cls", "loc", "dupe", "bkg"):
        assert rep["dap"][t] == 0


def test_missed():
    # a0, a1; only a0 detected: precision [1] at recall [1/2]: VOC07 6/11; without a1: 1.
    rep = run([(A, 0.9, (0, 0, 10, 10))], [(A, (0, 0, 10, 10)), (A, (100, 0, 110, 10))], 1)
    assert rep["map"] == pytest.approx(6 / 11)
    only(rep, "missed", 5 / 11)
    assert rep["gt_state"][0].tolist() == [0, 2]


def test_thresholds_are_inclusive_below():
    # IoU exactly 0.1 (a 10x1 strip of a 10x10 GT) is localisation, not background; exactly 0.5
    # (10x5) is a match; 0.09 (9x1) is background.
    gts = [(A, (0, 0, 10, 10))]
    assert types_of(run([(A, 0.9, (0, 0, 10, 1))], gts, 1)) == ["loc"]
    assert types_of(run([(A, 0.9, (0, 0, 10, 5))], gts, 1)) == ["TP"]
    assert types_of(run([(A, 0.9, (0, 0, 9, 1))], gts, 1)) == ["bkg"]
    # with another class's object, IoU exactly 0.1 is "both", below it background
    assert types_of(run([(A, 0.9, (0, 0, 10, 1))], [(B, (0, 0, 10, 10))], 2)) == ["both"]
    assert types_of(run([(A, 0.9, (0, 0, 9, 1))], [(B, (0, 0, 10, 10))], 2)) == ["bkg"]
    # t_f and t_b are parameters: at t_b 0.05 the 9x1 strip is localisation
    assert types_of(run([(A, 0.9, (0, 0, 9, 1))], gts, 1, bg_iou=0.05)) == ["loc"]


def test_precedence_loc_before_cls_as_tidecv():
    # A class-A box on b0 (IoU 1, other class) that also overlaps a0 at 0.4 is localisation,
    # the order of tidecv's tests, and is fixed as one: it becomes a0's TP (A: 0 -> 1, mAP +1/2).
    # b0 is then missed (dropping it: B 0 -> 1); fixing classification changes nothing.
    rep = run([(A, 0.9, (0, 0, 10, 10))], [(B, (0, 0, 10, 10)), (A, (0, 0, 10, 4))], 2)
    assert types_of(rep) == ["loc"]
    assert rep["dap"]["loc"] == pytest.approx(0.5) and rep["dap"]["missed"] == pytest.approx(0.5)
    assert rep["dap"]["cls"] == 0 and rep["counts"]["cls"].sum() == 0


def test_one_winner_per_gt_and_used_gt():
    # Two loc errors on a0 (0.9 and 0.8) and one on a1 (0.85), which a TP (0.95) already took.
    # Fixed: the 0.9 one becomes a0's TP, the 0.8 one and the one on a1 are removed, so only two
    # TPs are left.  With a third, missed GT that is recall 1/3, 2/3 at precision 1: VOC07 counts
    # the thresholds 0..0.6 (7 of 11).  Had the 0.8 one become a TP too, recall would reach 1.
    dets = [(A, 0.95, (100, 0, 110, 10)), (A, 0.9, (0, 0, 10, 4)), (A, 0.8, (0, 0, 4, 10)),
            (A, 0.85, (100, 0, 110, 4))]
    gts = [(A, (0, 0, 10, 10)), (A, (100, 0, 110, 10))]
    rep = run(dets, gts + [(A, (300, 300, 310, 310))], 1)
    assert types_of(rep) == ["TP", "loc", "loc", "loc"]
    assert rep["map"] + rep["dap"]["loc"] == pytest.approx(7 / 11)


def test_tidecv_oracle():
    # b0 has a cls error (class A, 0.9) and a loc error (class B, IoU 0.4, 0.8); a0 a TP.  Fixing
    # loc makes the loc error b0's TP: B 0 -> 1, dAP 1/2.  tidecv lets the higher-scoring cls
    # error keep b0 even then, so the loc error is only removed: B stays 0.
    dets = [(A, 0.9, (0, 0, 10, 10)), (B, 0.8, (0, 0, 10, 4)), (A, 0.5, (100, 0, 110, 10))]
    gts = [(B, (0, 0, 10, 10)), (A, (100, 0, 110, 10))]
    assert types_of(run(dets, gts, 2)) == ["cls", "loc", "TP"]
    assert run(dets, gts, 2)["dap"]["loc"] == pytest.approx(0.5)
    assert run(dets, gts, 2, tidecv_oracle=True)["dap"]["loc"] == 0
    assert run(dets, gts, 2, tidecv_oracle=True)["dap"]["cls"] == run(dets, gts, 2)["dap"]["cls"]


def test_difficult_objects():
    # A match to a difficult GT is neither TP nor FP; a difficult GT is never missed.
    rep = run([(A, 0.9, (0, 0, 10, 10)), (A, 0.8, (100, 0, 110, 10))],
              [(A, (0, 0, 10, 10), True), (A, (100, 0, 110, 10))], 1)
    assert types_of(rep) == ["ignored", "TP"]
    assert rep["gt_state"][0].tolist() == [-1, 0]
    assert rep["map"] == pytest.approx(1.0) and rep["n_gt"].tolist() == [1]


def test_class_without_objects_is_left_out_of_the_mean():
    rep = run([(B, 0.9, (0, 0, 10, 10)), (A, 0.8, (100, 0, 110, 10))], [(A, (100, 0, 110, 10))], 2)
    assert np.isnan(rep["ap"][B]) and rep["map"] == pytest.approx(1.0)
    assert types_of(rep) == ["bkg", "TP"]


def test_bad_input():
    with pytest.raises(ValueError, match="metric"):
        run([], [(A, (0, 0, 1, 1))], 1, metric="11")
    with pytest.raises(ValueError, match="bg_iou"):
        run([], [(A, (0, 0, 1, 1))], 1, bg_iou=0.6)
    with pytest.raises(ValueError, match="images"):
        analyze_errors([arr()], [np.zeros(0)], [np.zeros(0)], [], [])


# --------------------------------------------------------------------------- random scenes

def scene(seed, n_img=12, n_cls=3, difficult=True):
    """Clustered boxes so that every error type occurs: GT, and detections jittered from them
    (some with another class, some far off), plus background boxes."""
    rng = np.random.default_rng(seed)
    pb, pl, ps, gb, gl, gd = [], [], [], [], [], []
    for _ in range(n_img):
        m = int(rng.integers(0, 7))
        xy = rng.uniform(0, 300, (m, 2))
        wh = rng.uniform(8, 80, (m, 2))
        g = np.concatenate([xy, xy + wh], 1)
        glab = rng.integers(0, n_cls, m)
        gdif = (rng.random(m) < 0.1) if difficult else np.zeros(m, bool)
        boxes, labels = [], []
        for k in range(m):
            for _ in range(int(rng.integers(0, 4))):
                j = rng.normal(0, rng.choice([0.05, 0.25, 0.6]), 4) * np.tile(wh[k], 2)
                boxes.append(g[k] + j)
                labels.append(glab[k] if rng.random() < 0.8 else rng.integers(0, n_cls))
        for _ in range(int(rng.integers(0, 4))):
            xy0 = rng.uniform(0, 350, 2)
            boxes.append(np.concatenate([xy0, xy0 + rng.uniform(5, 60, 2)]))
            labels.append(rng.integers(0, n_cls))
        b = np.array(boxes, np.float64).reshape(-1, 4)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        pb.append(b), pl.append(np.array(labels, np.int64)), ps.append(rng.random(len(b)))
        gb.append(g), gl.append(glab), gd.append(gdif)
    return pb, pl, ps, gb, gl, gd


def voc(pb, pl, ps, gb, gl, gd, n_cls, m07):
    return eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl, gd,
                              use_07_metric=m07, n_classes=n_cls)["ap"]


def iou(a, b):
    """Continuous IoU, written out plainly (the reference for the type definitions)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def fixed_input(data, rep, fix):
    """The arrays with the errors of `fix` fixed by hand (independently of the module's oracle),
    for rescoring with eval_detection_voc."""
    pb, pl, ps, gb, gl, gd = [[x.copy() for x in lst] for lst in data]
    aims = {}  # (image, gt) -> [(score, image, row)] of the loc/cls errors being fixed
    drop = [np.zeros(len(b), bool) for b in pb]
    for i in range(len(pb)):
        for r, t in enumerate(rep["det_type"][i]):
            if t < 0:
                continue
            name = FP_TYPES[t]
            if name in ("both", "dupe", "bkg") and name in fix:
                drop[i][r] = True
            if name in ("loc", "cls") and name in fix:
                same = gl[i] == pl[i][r]
                cand = [j for j in range(len(gb[i])) if not gd[i][j] and (same[j] if name == "loc" else not same[j])]
                j = max(cand, key=lambda j: iou(pb[i][r], gb[i][j]))
                drop[i][r] = True
                if rep["gt_state"][i][j] != 0:  # not yet detected: candidates for its TP
                    aims.setdefault((i, j), []).append((-ps[i][r], i, r))
    for (i, j), cands in aims.items():
        _, _, r = min(cands)  # the highest score (ties: first in input order)
        drop[i][r] = False
        pb[i][r], pl[i][r] = gb[i][j], gl[i][j]  # it becomes that object's detection
    keep_gt = [np.ones(len(g), bool) for g in gb]
    if "missed" in fix:
        keep_gt = [s != 2 for s in rep["gt_state"]]
    for i in range(len(pb)):
        pb[i], pl[i], ps[i] = pb[i][~drop[i]], pl[i][~drop[i]], ps[i][~drop[i]]
        gb[i], gl[i], gd[i] = gb[i][keep_gt[i]], gl[i][keep_gt[i]], gd[i][keep_gt[i]]
    return pb, pl, ps, gb, gl, gd


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m07", [True, False])
def test_oracles_match_rescoring_the_fixed_input(seed, m07):
    data = scene(seed)
    n_cls = 3
    rep = analyze_errors(*data, n_classes=n_cls, metric="07" if m07 else "area")
    base = voc(*data, n_cls, m07)
    np.testing.assert_allclose(rep["ap"], base, rtol=0, atol=1e-12)  # NaN where no objects, both
    seen = set()
    for t in ERROR_TYPES:
        ref = voc(*fixed_input(data, rep, {t}), n_cls, m07)
        got = rep["ap"] + rep["dap_per_class"][t]
        defined = ~np.isnan(ref)  # the module scores a class left with no objects 1; voc.py: NaN
        np.testing.assert_allclose(got[defined], ref[defined], rtol=0, atol=1e-12, err_msg=t)
        assert np.all(got[np.isnan(ref) & ~np.isnan(base)] == 1.0)
        assert rep["dap"][t] >= -1e-12  # fixing never hurts
        seen |= {t} if rep["counts"][t].sum() else set()
    if seed == 0:
        assert seen == set(ERROR_TYPES), seen  # the scene exercises every type


def sparse_scene(seed, n_img=30, n_cls=3):
    """Objects in separate 100-px cells (no two overlap), so COCOeval's greedy matching and the
    devkit's agree."""
    rng = np.random.default_rng(seed)
    pb, pl, ps, gb, gl = [], [], [], [], []
    for _ in range(n_img):
        cells = rng.permutation(16)[: int(rng.integers(1, 6))]
        xy = np.stack([100 * (cells % 4) + 20, 100 * (cells // 4) + 20], 1).astype(float)
        g = np.concatenate([xy, xy + rng.uniform(20, 55, (len(cells), 2))], 1)
        glab = rng.integers(0, n_cls, len(cells))
        boxes, labels = [], []
        for k in range(len(g)):
            for _ in range(int(rng.integers(0, 4))):
                boxes.append(g[k] + rng.normal(0, rng.choice([3.0, 10.0]), 4))
                labels.append(glab[k] if rng.random() < 0.8 else rng.integers(0, n_cls))
        b = np.array(boxes, np.float64).reshape(-1, 4)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        pb.append(b), pl.append(np.array(labels, np.int64)), ps.append(rng.random(len(b)))
        gb.append(g), gl.append(glab)
    return pb, pl, ps, gb, gl


def test_coco101_reads_recall_as_cocoeval():
    # 20 objects, one per image.  TPs on 7 (recall 0.35, precision 1), an FP, a TP (recall 0.4,
    # precision 8/9).  Thresholds 0..0.34 (35) read 1, 0.35..0.40 (6) read 8/9, the rest 0:
    # COCOeval's np.linspace(0, 1, 101)[35] is 0.35000000000000003, which recall 0.35 does not
    # reach (with k/100, as tidecv, it would read 1: (36 + 5 * 8/9) / 101).
    from detector.metrics.result_files import coco_results_from_arrays
    from detector.metrics.coco import coco_gt_from_arrays, eval_coco

    gb = [arr((0, 0, 10, 10))] * 20
    gl = [np.array([0])] * 20
    pb = [arr((0, 0, 10, 10))] * 7 + [arr((50, 50, 60, 60)), arr((0, 0, 10, 10))] + [arr()] * 11
    ps = [np.array([0.9 - 0.01 * k]) for k in range(9)] + [np.zeros(0)] * 11
    pl = [np.zeros(len(b), np.int64) for b in pb]
    rep = analyze_errors(pb, pl, ps, gb, gl, n_classes=1, metric="coco101")
    assert rep["map"] == pytest.approx((35 + 6 * 8 / 9) / 101, abs=1e-12)
    stats = eval_coco(coco_gt_from_arrays(gb, gl), coco_results_from_arrays(list(range(1, 21)), [1], pb, pl, ps))
    assert rep["map"] == pytest.approx(stats["AP50"], abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_coco101_base_ap_is_pycocotools_ap50(seed):
    from detector.metrics.result_files import coco_results_from_arrays
    from detector.metrics.coco import coco_gt_from_arrays, eval_coco

    pb, pl, ps, gb, gl = sparse_scene(seed)
    rep = analyze_errors(pb, pl, ps, gb, gl, n_classes=3, metric="coco101")
    gt = coco_gt_from_arrays(gb, gl, class_names=["a", "b", "c"])
    stats = eval_coco(gt, coco_results_from_arrays(list(range(1, len(pb) + 1)), [1, 2, 3], pb, pl, ps))
    assert rep["map"] == pytest.approx(stats["AP50"], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_fp_and_fn_oracles(seed):
    data = scene(seed, difficult=False)
    pb, pl, ps, gb, gl, gd = data
    rep = analyze_errors(*data, n_classes=3)
    base = rep["ap"]
    tp = [t == TP for t in rep["det_type"]]
    ref_fp = voc([b[k] for b, k in zip(pb, tp)], [x[k] for x, k in zip(pl, tp)], [x[k] for x, k in zip(ps, tp)],
                 gb, gl, gd, 3, True)
    np.testing.assert_allclose((base + rep["dap_per_class"]["FP"])[~np.isnan(ref_fp)], ref_fp[~np.isnan(ref_fp)])
    found = [s == 0 for s in rep["gt_state"]]
    ref_fn = voc(pb, pl, ps, [b[k] for b, k in zip(gb, found)], [x[k] for x, k in zip(gl, found)],
                 [x[k] for x, k in zip(gd, found)], 3, True)
    ok = ~np.isnan(ref_fn)
    np.testing.assert_allclose((base + rep["dap_per_class"]["FN"])[ok], ref_fn[ok])


@pytest.mark.parametrize("seed", range(6))
def test_types_follow_their_definitions(seed):
    pb, pl, ps, gb, gl, gd = data = scene(seed)
    rep = analyze_errors(*data, n_classes=3)
    n_fp = 0
    for i in range(len(pb)):
        for r, t in enumerate(rep["det_type"][i]):
            own = [iou(pb[i][r], gb[i][j]) for j in range(len(gb[i])) if gl[i][j] == pl[i][r] and not gd[i][j]]
            other = [iou(pb[i][r], gb[i][j]) for j in range(len(gb[i])) if gl[i][j] != pl[i][r] and not gd[i][j]]
            o, x = max(own, default=0.0), max(other, default=0.0)
            if t < 0:
                continue
            n_fp += 1
            name = FP_TYPES[t]
            if name == "loc":
                assert 0.1 <= o < 0.5
            elif name == "cls":
                assert not 0.1 <= o < 0.5 and x >= 0.5
            elif name == "dupe":
                assert o >= 0.5 and x < 0.5
            elif name == "bkg":
                assert o < 0.1 and x < 0.1
            else:
                assert o < 0.1 and 0.1 <= x < 0.5
    counts = sum(int(rep["counts"][t].sum()) for t in FP_TYPES)
    assert counts == n_fp == sum(int((d >= 0).sum()) for d in rep["det_type"])
    states = np.concatenate(rep["gt_state"])
    assert int((states == 2).sum()) == int(rep["counts"]["missed"].sum())
    assert int((states >= 0).sum()) == int(rep["n_gt"].sum())
    assert int((states == 0).sum()) == int(rep["n_tp"].sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m07", [True, False])
def test_fixing_everything_gives_ap_1(seed, m07):
    data = scene(seed)
    rep = analyze_errors(*data, n_classes=3, metric="07" if m07 else "area")
    ref = voc(*fixed_input(data, rep, set(ERROR_TYPES)), 3, m07)
    assert ref[~np.isnan(ref)] == pytest.approx(np.ones(int((~np.isnan(ref)).sum())), abs=1e-12)


# --------------------------------------------------------------------------- recall by class and size

def test_recall_breakdown_by_hand():
    # sizes (sqrt area): 10 (small), 40 (medium), 100 (large), 31.9 (small); classes A A B B
    gb = [arr((0, 0, 10, 10), (0, 0, 40, 40), (0, 0, 100, 100), (200, 200, 231.9, 231.9))]
    gl = [np.array([A, A, B, B])]
    state = [np.array([0, 2, 1, -1])]  # detected, missed, covered, difficult (left out)
    props = [arr((0, 0, 10, 10.0), (0, 0, 40, 25))]  # covers the small at 1.0, the medium at 0.625
    bd = recall_breakdown(gb, gl, state, props, n_classes=2)
    assert bd["size_names"] == ["small", "medium", "large"]
    assert [r["n_gt"] for r in bd["by_size"]] == [1, 1, 1]
    assert bd["all"]["n_gt"] == 3 and bd["all"]["detected"] == pytest.approx(1 / 3)
    assert bd["by_class"][A]["proposal_recall"] == pytest.approx([1.0, 0.5])  # IoU 0.5 and 0.7
    assert bd["by_class"][B]["proposal_recall"] == pytest.approx([0.0, 0.0])
    assert bd["by_size"][1]["missed"] == 1.0 and bd["by_size"][1]["missed_unproposed"] == 0
    assert bd["by_size"][1]["proposal_recall"] == pytest.approx([1.0, 0.0])
    assert recall_breakdown(gb, gl, state, None, n_classes=2)["all"]["proposal_recall"] is None
    assert size_names([20]) == ["<20px", ">=20px"]
    assert [r["n_gt"] for r in recall_breakdown(gb, gl, state, n_classes=2, size_edges=[20, 50])["by_size"]] \
        == [1, 1, 1]


@pytest.mark.parametrize("seed", range(3))
def test_proposal_recall_agrees_with_proposals_recall(seed):
    from detector.proposals.recall import proposal_recall

    rng = np.random.default_rng(seed)
    pb, pl, ps, gb, gl, gd = scene(seed)
    props = []
    for g in gb:
        xy = rng.uniform(0, 300, (20, 2))
        p = np.concatenate([g + rng.normal(0, 6, g.shape), np.concatenate([xy, xy + rng.uniform(10, 60, (20, 2))], 1)])
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
        props.append(p)
    rep = analyze_errors(pb, pl, ps, gb, gl, gd, n_classes=3)
    bd = recall_breakdown(gb, gl, rep["gt_state"], props, n_classes=3)
    ref = proposal_recall(props, gb, gl, iou_thresholds=(0.5, 0.7), top_ns=(10 ** 6,), difficult_list=gd)
    assert bd["all"]["proposal_recall"] == pytest.approx(ref["recall"][0].tolist())
    for c, r in ref["per_class"].items():
        assert bd["by_class"][c]["proposal_recall"] == pytest.approx(r["recall"][0].tolist())


def test_report_text_and_plot(tmp_path):
    data = scene(0)
    rep = analyze_errors(*data, n_classes=3)
    names = ["alpha", "beta", "gamma"]
    text = format_errors(rep, names)
    for word in ("classification", "localisation", "duplicate", "background", "missed", "alpha", "VOC07"):
        assert word in text
    bd = recall_breakdown(data[3], data[4], rep["gt_state"], [g for g in data[3]], n_classes=3)
    assert "small" in format_recall_breakdown(bd, names)
    png = tmp_path / "e.png"
    plot_errors(rep, names, png, bd, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the tool

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-image VOC dataset (no pixels needed: the tool reads annotations only), with devkit
    result files and a COCO json holding one TP, one duplicate and one background box."""
    root = tmp_path_factory.mktemp("ea") / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    import cv2

    objs = {"im0": [("cat", (10, 10, 50, 50))], "im1": [("dog", (20, 20, 80, 60))], "im2": []}
    for iid, obs in objs.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{iid}.jpg"), np.zeros((100, 120, 3), np.uint8))
        xml = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
                      f"<ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                      for n, b in obs)
        (root / "Annotations" / f"{iid}.xml").write_text(
            f"<annotation><filename>{iid}.jpg</filename><size><width>120</width><height>100</height>"
            f"<depth>3</depth></size>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("im0\nim1\nim2\n")
    from detector.metrics.result_files import write_coco_results, write_voc_results

    boxes = [arr((10, 10, 50, 50), (10, 10, 50, 50)), arr(), arr((0, 0, 30, 30))]
    labels = [np.array([0, 0]), np.zeros(0, np.int64), np.array([1])]
    scores = [np.array([0.9, 0.8]), np.zeros(0), np.array([0.7])]
    res = root.parent / "res"
    write_voc_results(res, "test", ["cat", "dog"], ["im0", "im1", "im2"], boxes, labels, scores)
    write_coco_results(res / "coco_results_test.json", [1, 2, 3], [1, 2], boxes, labels, scores)
    return root, res


def tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "analyze_errors.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))


@pytest.mark.parametrize("form", ["devkit", "coco"])
def test_tool_end_to_end(tiny, tmp_path, form):
    root, res = tiny
    dets = res if form == "devkit" else res / "coco_results_test.json"
    p = tool("--dataset", root, "--split", "test", "--detections", dets, "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert "duplicate" in p.stdout and "cat" in p.stdout
    # cat: TP 0.9 then its duplicate: AP 1; dog: its object missed, a background box: AP 0
    assert "mAP 0.5000" in p.stdout
    js = json.loads((tmp_path / "o" / "errors_test.json").read_text())
    assert js["errors"]["counts"]["dupe"] == [1, 0] and js["errors"]["counts"]["bkg"] == [0, 1]
    assert js["errors"]["dap"]["missed"] == pytest.approx(0.5)
    assert (tmp_path / "o" / "errors_test.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "o" / "errors_test.txt").read_text().strip() in p.stdout


def test_tool_with_proposal_file(tiny, tmp_path):
    from detector.proposals import write_proposals_npz

    root, res = tiny
    npz = tmp_path / "p.npz"
    write_proposals_npz(npz, {"im0": arr((10, 10, 50, 50)), "im1": arr((20, 20, 80, 35)), "im2": arr()})
    p = tool("--dataset", root, "--split", "test", "--detections", res, "--out", tmp_path / "o", "--proposals", npz)
    assert p.returncode == 0, p.stderr
    js = json.loads((tmp_path / "o" / "errors_test.json").read_text())
    # im1's dog (60x40) has one proposal of 60x15, IoU 0.375: recall 1/2 at 0.5 and 0.7 (cat 1,
    # dog 0), and the missed dog is one that no proposal covered
    assert js["recall"]["all"]["proposal_recall"] == pytest.approx([0.5, 0.5])
    assert js["recall"]["all"]["missed_unproposed"] == 1


def test_tool_reads_a_coco_datasets_own_ids(tiny, tmp_path):
    # the same three images as a COCO annotation file with ids 10/20/30 and categories 5 (cat), 7 (dog)
    root, _ = tiny
    gt = {"images": [{"id": 10 * (k + 1), "file_name": f"im{k}.jpg", "width": 120, "height": 100} for k in range(3)],
          "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 20, "category_id": 7, "bbox": [20, 20, 60, 40], "area": 2400,
                           "iscrowd": 0}]}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    res = [{"image_id": 10, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.9},
           {"image_id": 20, "category_id": 5, "bbox": [20, 20, 60, 40], "score": 0.8}]  # a cls error
    dets = tmp_path / "res.json"
    dets.write_text(json.dumps(res))
    p = tool("--dataset", ann, "--image-dir", root / "JPEGImages", "--detections", dets, "--json-ids", "dataset",
             "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    js = json.loads((tmp_path / "o" / "errors_test.json").read_text())
    assert js["errors"]["counts"]["cls"] == [1, 0] and js["errors"]["n_tp"] == [1, 0]
    # with our positional ids, image 10 and category 5 do not exist: one error line
    p = tool("--dataset", ann, "--image-dir", root / "JPEGImages", "--detections", dets, "--out", tmp_path / "o")
    assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr


@pytest.mark.parametrize("case", ["missing", "bad_json", "bad_line"])
def test_tool_bad_input_is_one_error_line(tiny, tmp_path, case):
    import shutil

    root, res = tiny
    bad = tmp_path / "res"
    shutil.copytree(res, bad)
    if case == "missing":
        (bad / "comp4_det_test_dog.txt").unlink()
        dets = bad
    elif case == "bad_json":
        dets = bad / "coco_results_test.json"
        dets.write_text("[{]")
    else:
        (bad / "comp4_det_test_cat.txt").write_text("im0 0.5 1 2 3\n")
        dets = bad
    p = tool("--dataset", root, "--split", "test", "--detections", dets, "--out", tmp_path / "o")
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
