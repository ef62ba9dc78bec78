"""Tests of detector.metrics.voc and detector.metrics.result_files against independent references:
hand-computed APs, a loop-by-loop port of the devkit's VOCevaldet.m / VOCap.m, torchvision's
IoU, and pycocotools."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detector.metrics.voc import (
    calc_detection_voc_ap, calc_detection_voc_prec_rec, detection_counts, eval_detection_voc, format_ap_table,
    from_devkit_boxes, to_devkit_boxes)
from detector.metrics.coco import COCO_STAT_NAMES, coco_gt_from_arrays, eval_coco
from detector.metrics.result_files import (
    coco_results_from_arrays, read_coco_results, read_voc_results, voc_results_path, write_coco_results,
    write_voc_results)


def A(x, dtype=np.float64):
    return np.asarray(x, dtype)


def E4():
    return np.zeros((0, 4))


# ----------------------------------------------------------------------------- independent reference

def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """MATLAB's a:d:b as MathWorks documents it: first half a + k*d, second half b - k*d,
    middle (a+b)/2 when the number of steps is even."""
    n = int(round((b - a) / d))
    v = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        v[k] = a + k * d
        v[n - k] = b - k * d
    if n % 2 == 0:
        v[n // 2] = (a + b) / 2
    return v


def devkit_iou(bb, bbgt):
    """VOCevaldet.m's overlap, +1 widths; None where the intersection is empty."""
    bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
    iw = bi[2] - bi[0] + 1
    ih = bi[3] - bi[1] + 1
    if iw > 0 and ih > 0:
        ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih
        return iw * ih / ua
    return None


def torchvision_iou(bb, bbgt):
    """Continuous IoU from torchvision (for boxes in our convention); None where there is no overlap."""
    v = float(box_iou(torch.tensor([bb], dtype=torch.float64), torch.tensor([bbgt], dtype=torch.float64))[0, 0])
    return v if v > 0 else None


def nanmax(values):
    """MATLAB's max: NaN entries are skipped; NaN if all are NaN."""
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else float("nan")


def reference_voc_ap(pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels, gt_difficults,
                     iou_thresh=0.5, use_07_metric=True, iou_fn=devkit_iou):
    """A straight port of VOCevaldet.m + VOCap.m with plain Python loops, one class at a time."""
    n_img = len(gt_boxes)
    labels_seen = [int(l) for x in list(pred_labels) + list(gt_labels) for l in x]
    n_cls = max(labels_seen) + 1 if labels_seen else 0
    aps = []
    for cls in range(n_cls):
        if cls not in labels_seen:
            aps.append(float("nan"))
            continue
        gt = []
        npos = 0
        for i in range(n_img):
            idx = [j for j in range(len(gt_labels[i])) if gt_labels[i][j] == cls]
            gt.append({"BB": [list(map(float, gt_boxes[i][j])) for j in idx],
                       "diff": [bool(gt_difficults[i][j]) for j in idx], "det": [False] * len(idx)})
            npos += sum(1 for j in idx if not gt_difficults[i][j])
        # the result file: image by image, row order
        ids, conf, BB = [], [], []
        for i in range(n_img):
            for j in range(len(pred_labels[i])):
                if pred_labels[i][j] == cls:
                    ids.append(i), conf.append(float(pred_scores[i][j])), BB.append(list(map(float, pred_boxes[i][j])))
        si = sorted(range(len(conf)), key=lambda d: -conf[d])  # Python's sort is stable, like MATLAB's
        nd = len(si)
        tp, fp = [0] * nd, [0] * nd
        for d in range(nd):
            i, bb = ids[si[d]], BB[si[d]]
            ovmax, jmax = -math.inf, -1
            for j, bbgt in enumerate(gt[i]["BB"]):
                ov = iou_fn(bb, bbgt)
                if ov is not None and ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax >= iou_thresh:
                if not gt[i]["diff"][jmax]:
                    if not gt[i]["det"][jmax]:
                        tp[d] = 1
                        gt[i]["det"][jmax] = True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        if npos == 0:  # the devkit divides by zero here; by our contract the AP is undefined
            aps.append(float("nan"))
            continue
        ctp, cfp, rec, prec = 0, 0, [], []
        for d in range(nd):
            ctp += tp[d]
            cfp += fp[d]
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp) if ctp + cfp else float("nan"))
        if use_07_metric:
            ap = 0.0
            for t in matlab_colon(0, 0.1, 1):
                sel = [p for p, r in zip(prec, rec) if r >= t]
                p = nanmax(sel) if sel else 0.0
                if math.isnan(p):  # documented deviation: the devkit's NaN becomes 0
                    p = 0.0
                ap += p / 11
        else:
            mrec = [0.0] + rec + [1.0]
            mpre = [0.0] + prec + [0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = nanmax([mpre[i], mpre[i + 1]])
            ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
        aps.append(ap)
    return np.array(aps, np.float64)


def random_problem(rng, n_img=None, n_cls=None, integer=True, tie_scores=True):
    """Random GT with clustered detections near them, some difficult, some score ties."""
    n_img = n_img or int(rng.integers(1, 7))
    n_cls = n_cls or int(rng.integers(1, 5))
    gb, gl, gd, pb, pl, ps = [], [], [], [], [], []
    for _ in range(n_img):
        m = int(rng.integers(0, 6))
        xy = rng.integers(1, 50, size=(m, 2))
        wh = rng.integers(3, 25, size=(m, 2))
        g = np.concatenate([xy, xy + wh], 1).astype(np.float64)
        lab = rng.integers(0, n_cls, size=m)
        diff = rng.random(m) < 0.25
        if m and rng.random() < 0.3:  # a duplicated annotation: equal IoUs, first GT must win
            g, lab, diff = np.r_[g, g[:1]], np.r_[lab, lab[:1]], np.r_[diff, ~diff[:1]]
            m += 1
        gb.append(g), gl.append(lab), gd.append(diff)
        dets, dl = [], []
        for j in range(m):
            for _ in range(int(rng.integers(0, 4))):  # jittered copies: TPs, duplicates, misses
                dets.append(g[j] + rng.integers(-3, 4, size=4))
                dl.append(lab[j] if rng.random() < 0.85 else rng.integers(n_cls))
        for _ in range(int(rng.integers(0, 4))):  # clutter
            p = rng.integers(1, 60, size=2)
            dets.append(np.concatenate([p, p + rng.integers(2, 20, size=2)]).astype(np.float64))
            dl.append(rng.integers(n_cls))
        d = np.array(dets, np.float64).reshape(-1, 4)
        if not integer:
            d = d + rng.random(d.shape) * 0.9
        pb.append(d), pl.append(np.array(dl, np.int64))
        s = rng.random(len(d))
        ps.append(np.round(s, 1) if tie_scores else s)
    return pb, pl, ps, gb, gl, gd


# ----------------------------------------------------------------------------- hand-computed cases

def hand_case(tie_order="devkit"):
    """Devkit boxes.  Class 0 (npos = 3, the difficult G2 not counted):
      img0: G1 [1,1,10,10], G2 [21,21,30,30] difficult
            a [1,1,10,10] 0.9 -> TP (G1)
            b [21,21,30,30] 0.8 -> best GT is difficult G2: ignored
            c [2,2,10,10] 0.7 -> best GT G1 (IoU 81/100), already matched: FP (duplicate)
            z (class 2) on G1 0.95 -> a class-2 detection, never matches class-0 GT
      img1: G3 [1,1,10,10]
            d [100,100,110,110] 0.6 -> FP (no overlap)
            e [1,1,10,10] 0.6 -> TP (G3); ties with d, d comes first in input order
      img2: G4 [41,41,50,50]
            g [60,60,70,70] 0.2 -> FP ;  f [41,41,50,50] 0.1 -> TP (G4)
      img3: G5 (class 1) [1,1,10,10], no detections at all
      img4: nothing at all (empty arrays)
      Class 3 has only a difficult GT (img2).
    Ranked class 0: a TP, b -, c FP, d FP, e TP, g FP, f TP
      tp 1 1 1 1 2 2 3 ; fp 0 0 1 2 2 3 3
      prec 1 1 .5 1/3 .5 .4 .5 ; rec 1/3 1/3 1/3 1/3 2/3 2/3 1
    VOC07: t in {0,.1,.2,.3}: max prec = 1 (4 thresholds); t in {.4,...,1}: max prec at rec >= t
      is .5 (7 thresholds) -> (4 + 3.5) / 11 = 7.5/11.
    Area: envelope 1 on (0,1/3], .5 on (1/3,1] -> 1/3 + 2/3 * .5 = 2/3.
    Class 1: GT, no detections -> 0.  Classes 2, 3: no (non-difficult) GT -> nan.
    With e before d (tie broken the other way) prec at d would be 2/3:
      VOC07 (4 + 3*2/3 + 4*.5)/11 = 8/11, area 1/3 + 1/3*2/3 + 1/3*.5 = 13/18.
    """
    img1_boxes = [[100, 100, 110, 110], [1, 1, 10, 10]]
    if tie_order == "swapped":
        img1_boxes = img1_boxes[::-1]
    pb = [A([[1, 1, 10, 10], [21, 21, 30, 30], [2, 2, 10, 10], [1, 1, 10, 10]]), A(img1_boxes),
          A([[60, 60, 70, 70], [41, 41, 50, 50]]), E4(), E4()]
    pl = [A([0, 0, 0, 2], np.int64), A([0, 0], np.int64), A([0, 0], np.int64), A([], np.int64), A([], np.int64)]
    ps = [A([.9, .8, .7, .95]), A([.6, .6]), A([.2, .1]), A([]), A([])]
    gb = [A([[1, 1, 10, 10], [21, 21, 30, 30]]), A([[1, 1, 10, 10]]), A([[41, 41, 50, 50], [5, 5, 9, 9]]),
          A([[1, 1, 10, 10]]), E4()]
    gl = [A([0, 0], np.int64), A([0], np.int64), A([0, 3], np.int64), A([1], np.int64), A([], np.int64)]
    gd = [A([0, 1], bool), A([0], bool), A([0, 1], bool), A([0], bool), A([], bool)]
    return pb, pl, ps, gb, gl, gd


def test_hand_computed_both_metrics():
    args = hand_case()
    r07 = eval_detection_voc(*args, use_07_metric=True)
    r10 = eval_detection_voc(*args, use_07_metric=False)
    assert len(r07["ap"]) == 4
    np.testing.assert_allclose(r07["ap"][:2], [7.5 / 11, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r10["ap"][:2], [2 / 3, 0.0], rtol=0, atol=1e-15)
    assert np.isnan(r07["ap"][2:]).all() and np.isnan(r10["ap"][2:]).all()
    assert r07["map"] == pytest.approx((7.5 / 11) / 2, abs=1e-15)  # nan classes left out
    assert r10["map"] == pytest.approx((2 / 3) / 2, abs=1e-15)
    assert isinstance(r07["map"], float)


def test_hand_computed_prec_rec_curve():
    prec, rec = calc_detection_voc_prec_rec(*hand_case())
    np.testing.assert_allclose(prec[0], [1, 1, .5, 1 / 3, .5, .4, .5], atol=1e-15)
    np.testing.assert_allclose(rec[0], [1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1], atol=1e-15)
    assert len(prec[1]) == 0 and len(rec[1]) == 0  # GT, no detections
    assert rec[2] is None and len(prec[2]) == 1  # detections, no GT
    assert rec[3] is None  # only a difficult GT


def test_score_ties_follow_input_order():
    r07 = eval_detection_voc(*hand_case("swapped"))
    r10 = eval_detection_voc(*hand_case("swapped"), use_07_metric=False)
    assert r07["ap"][0] == pytest.approx(8 / 11, abs=1e-15)
    assert r10["ap"][0] == pytest.approx(13 / 18, abs=1e-15)
    # Across images: a tie between a FP in image 0 and a TP in image 1 ranks the FP first
    # (prec 0, then 1/2 at recall 1 -> AP .5); with the images swapped the TP is first (AP 1).
    gt = [A([[1, 1, 10, 10]])]
    fp_box, tp_box = A([[50, 50, 60, 60]]), A([[1, 1, 10, 10]])
    zero = [A([0], np.int64)]
    r = eval_detection_voc([fp_box, tp_box], zero * 2, [A([.5]), A([.5])], [E4()] + gt, [A([], np.int64)] + zero)
    assert r["ap"][0] == pytest.approx(0.5, abs=1e-15)
    r = eval_detection_voc([tp_box, fp_box], zero * 2, [A([.5]), A([.5])], gt + [E4()], zero + [A([], np.int64)])
    assert r["ap"][0] == pytest.approx(1.0, abs=1e-15)


def test_plus_one_convention_and_threshold_is_inclusive():
    gt, lab = [A([[1, 1, 10, 10]])], [A([0], np.int64)]
    # devkit IoU of [1,1,10,5] with [1,1,10,10]: 10*5 / (10*10) = 0.5 exactly, and the devkit
    # accepts ovmax >= 0.5: a TP.  Without the +1 it would be 9*4 / (9*9) = 0.444: a FP.
    r = eval_detection_voc([A([[1, 1, 10, 5]])], lab, [A([1.0])], gt, lab)
    assert r["ap"][0] == pytest.approx(1.0, abs=1e-15)  # eleven p/11 summed, as the devkit does
    assert devkit_iou([1, 1, 10, 5], [1, 1, 10, 10]) == 0.5
    assert float(box_iou(torch.tensor([[1., 1, 10, 5]]), torch.tensor([[1., 1, 10, 10]]))[0, 0]) < 0.5
    # [1,1,10,4]: 40/100 < 0.5 -> FP
    assert eval_detection_voc([A([[1, 1, 10, 4]])], lab, [A([1.0])], gt, lab)["ap"][0] == 0.0
    # With iou_thresh just above 0.5 the exact-0.5 box fails.
    assert eval_detection_voc([A([[1, 1, 10, 5]])], lab, [A([1.0])], gt, lab, iou_thresh=0.5 + 1e-12)["ap"][0] == 0.0


def test_equal_iou_goes_to_the_first_gt():
    # Two annotations of the same box, one difficult.  The devkit keeps the first GT with the
    # highest IoU (strict `ov>ovmax`): listed first, the normal one makes the detection a TP
    # (AP 1); listed first, the difficult one makes it ignored (recall 0, AP 0).
    box, lab = A([[1, 1, 10, 10]]), [A([0], np.int64)]
    gb, gl = [A([[1, 1, 10, 10], [1, 1, 10, 10]])], [A([0, 0], np.int64)]
    r = eval_detection_voc([box], lab, [A([1.0])], gb, gl, [A([0, 1], bool)])
    assert r["ap"][0] == pytest.approx(1.0, abs=1e-15)
    r = eval_detection_voc([box], lab, [A([1.0])], gb, gl, [A([1, 0], bool)])
    assert r["ap"][0] == 0.0


def test_continuous_boxes_need_to_devkit_boxes():
    # Continuous GT [0,0,10,10] and detection [0,0,10,4.9]: continuous IoU 0.49 -> FP.
    g, d = A([[0, 0, 10, 10]]), A([[0, 0, 10, 4.9]])
    lab, sc = [A([0], np.int64)], [A([1.0])]
    assert eval_detection_voc([to_devkit_boxes(d)], lab, sc, [to_devkit_boxes(g)], lab)["ap"][0] == 0.0
    # Passed raw they would be read as +1 boxes: 11*5.9 / (11*11) = 0.536 -> TP; the helper matters.
    assert eval_detection_voc([d], lab, sc, [g], lab)["ap"][0] == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_array_equal(to_devkit_boxes(g), [[1, 1, 10, 10]])
    np.testing.assert_array_equal(from_devkit_boxes(to_devkit_boxes(d)), d)


def test_ap_from_curves_by_hand():
    # 11-point: a single point of precision 1 at recall r counts for every threshold t <= r.
    # The devkit's thresholds are MATLAB's 0:0.1:1, whose 4th value is 0.30000000000000004:
    # recall exactly 3/10 misses it (3/11, not 4/11); 6/10 and 7/10 reach 0.6 and 0.7 (7/11, 8/11;
    # np.arange(0, 1.1, 0.1) would have dropped them).
    for num, expected in ((3, 3 / 11), (6, 7 / 11), (7, 8 / 11), (10, 1.0), (0, 1 / 11)):
        ap = calc_detection_voc_ap([A([1.0])], [A([num]) / 10], use_07_metric=True)
        assert ap[0] == pytest.approx(expected, abs=1e-15), num
    assert matlab_colon(0, 0.1, 1)[3] == 0.30000000000000004
    # Area: prec [1, .5, 2/3] at rec [.25, .25, .5]: envelope 1 on (0,.25], 2/3 on (.25,.5], 0 after.
    ap = calc_detection_voc_ap([A([1, .5, 2 / 3])], [A([.25, .25, .5])], use_07_metric=False)
    assert ap[0] == pytest.approx(.25 + .25 * 2 / 3, abs=1e-15)
    # Leading NaN precision (a difficult match first) counts as 0 and is then lifted by the envelope.
    p, r = [A([np.nan, 1.0])], [A([0.0, 0.5])]
    assert calc_detection_voc_ap(p, r, True)[0] == pytest.approx(6 / 11, abs=1e-15)
    assert calc_detection_voc_ap(p, r, False)[0] == pytest.approx(0.5, abs=1e-15)
    # None -> nan; GT but no detections (empty curves) -> 0.
    ap = calc_detection_voc_ap([None, A([]), A([1.0])], [A([1.0]), A([]), None])
    assert np.isnan(ap[0]) and ap[1] == 0 and np.isnan(ap[2])


# ----------------------------------------------------------------------------- against the port

@pytest.mark.parametrize("use_07", [True, False])
def test_matches_devkit_port_on_random_data(use_07):
    for seed in range(150):
        rng = np.random.default_rng(seed)
        args = random_problem(rng, integer=seed % 2 == 0)
        thresh = [0.5, 0.3, 0.7][seed % 3]
        got = eval_detection_voc(*args, iou_thresh=thresh, use_07_metric=use_07)
        ref = reference_voc_ap(*args, iou_thresh=thresh, use_07_metric=use_07)
        np.testing.assert_allclose(got["ap"], ref, rtol=0, atol=1e-12, err_msg=f"seed {seed}")
        ok = ~np.isnan(ref)
        assert (got["map"] == pytest.approx(ref[ok].mean(), abs=1e-12)) if ok.any() else math.isnan(got["map"])


def test_continuous_boxes_match_torchvision_iou_reference():
    # Integer continuous boxes: to_devkit_boxes + the devkit's +1 IoU must equal torchvision's
    # continuous IoU bit for bit, so the whole evaluation agrees exactly.
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        pb, pl, ps, gb, gl, gd = random_problem(rng)
        got = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl, gd)
        ref = reference_voc_ap(pb, pl, ps, gb, gl, gd, iou_fn=torchvision_iou)
        np.testing.assert_array_equal(got["ap"], ref)


def test_empty_inputs():
    r = eval_detection_voc([E4()], [A([], np.int64)], [A([])], [E4()], [A([], np.int64)])
    assert len(r["ap"]) == 0 and math.isnan(r["map"])
    r = eval_detection_voc([], [], [], [], [])
    assert len(r["ap"]) == 0 and math.isnan(r["map"])
    # n_classes pads with nan for classes never seen.
    r = eval_detection_voc([E4()], [A([], np.int64)], [A([])], [A([[1, 1, 5, 5]])], [A([1], np.int64)], n_classes=3)
    assert r["ap"][1] == 0 and np.isnan(r["ap"][[0, 2]]).all()


# ----------------------------------------------------------------------------- bad input

def test_nan_and_inf_name_the_image_and_array():
    pb, pl, ps, gb, gl, gd = hand_case()
    bad = [s.copy() for s in ps]
    bad[2][1] = np.nan
    with pytest.raises(ValueError, match=r"image 2: pred_scores .*NaN or infinite"):
        eval_detection_voc(pb, pl, bad, gb, gl, gd)
    bad = [b.copy() for b in gb]
    bad[1][0, 3] = np.inf
    with pytest.raises(ValueError, match=r"image 1: gt_boxes"):
        eval_detection_voc(pb, pl, ps, bad, gl, gd)
    bad = [b.copy() for b in pb]
    bad[0][2, 0] = -np.inf
    with pytest.raises(ValueError, match=r"image 0: pred_boxes .*row 2"):
        eval_detection_voc(bad, pl, ps, gb, gl, gd)


def test_mismatched_lengths_and_shapes():
    pb, pl, ps, gb, gl, gd = hand_case()
    with pytest.raises(ValueError, match="differ in length"):
        eval_detection_voc(pb, pl[:-1], ps, gb, gl, gd)
    with pytest.raises(ValueError, match="covers"):
        eval_detection_voc(pb[:-1], pl[:-1], ps[:-1], gb, gl, gd)
    with pytest.raises(ValueError, match=r"image 1: pred_boxes .*pred_scores"):
        eval_detection_voc(pb, pl, [ps[0], ps[1][:1]] + ps[2:], gb, gl, gd)
    with pytest.raises(ValueError, match=r"image 0: gt_boxes has shape"):
        eval_detection_voc(pb, pl, ps, [A([1, 2, 3])] + gb[1:], gl, gd)
    with pytest.raises(ValueError, match=r"image 0: gt_boxes .*gt_difficults"):
        eval_detection_voc(pb, pl, ps, gb, gl, [A([0], bool)] + gd[1:])
    with pytest.raises(ValueError, match="negative"):
        eval_detection_voc(pb, [A([0, 0, -1, 2], np.int64)] + pl[1:], ps, gb, gl, gd)
    with pytest.raises(ValueError, match="n_classes"):
        eval_detection_voc(pb, pl, ps, gb, gl, gd, n_classes=2)


# ----------------------------------------------------------------------------- pycocotools

def continuous_grid_problem(rng, n_img, n_cls, cell=100):
    """Continuous boxes.  Each GT sits alone in its own cell of a grid; a detection is either a
    copy of a GT with every edge moved by at most 1 px (IoU >= 0.67 with both conventions for
    sides >= 20) or a box in an empty cell (IoU 0 with everything).  So each detection overlaps at
    most one GT, far from the 0.5 threshold: the +1 convention and the two matchers' different
    rules (devkit: best GT, FP if taken; COCO: best untaken GT) cannot disagree."""
    gb, gl, pb, pl = [], [], [], []
    for _ in range(n_img):
        cells = rng.permutation(25)
        m = int(rng.integers(1, 8))
        xy = np.stack([cells[:m] % 5, cells[:m] // 5], 1) * cell + rng.integers(5, 20, size=(m, 2))
        g = np.concatenate([xy, xy + rng.integers(20, 60, size=(m, 2))], 1).astype(np.float64)
        lab = rng.integers(0, n_cls, size=m)
        dets, dl = [], []
        for j in range(m):
            for _ in range(int(rng.integers(0, 3))):
                dets.append(g[j] + rng.uniform(-1, 1, size=4))
                dl.append(lab[j] if rng.random() < 0.8 else rng.integers(n_cls))
        for c in cells[m:m + int(rng.integers(0, 5))]:
            p = np.array([c % 5, c // 5]) * cell + 10
            dets.append(np.concatenate([p, p + rng.integers(20, 60, size=2)]).astype(np.float64))
            dl.append(rng.integers(n_cls))
        gb.append(g), gl.append(lab)
        pb.append(np.array(dets, np.float64).reshape(-1, 4)), pl.append(np.array(dl, np.int64))
    n_det = sum(len(d) for d in pb)
    scores = rng.permutation(n_det) / n_det + 0.01  # distinct: no ties for the two sorts to break
    ps, o = [], 0
    for d in pb:
        ps.append(scores[o:o + len(d)])
        o += len(d)
    return pb, pl, ps, gb, gl


def coco_ap50_per_class(pb, pl, ps, gb, gl, n_cls):
    gt = coco_gt_from_arrays(gb, gl, None, class_names=[f"c{k}" for k in range(n_cls)])
    res = coco_results_from_arrays(list(range(1, len(gb) + 1)), list(range(1, n_cls + 1)), pb, pl, ps)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = gt
        cg.createIndex()
        ev = COCOeval(cg, cg.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, 2]  # IoU .5, all recall thresholds, all classes, area all, 100 dets
    return prec.mean(axis=0), ev.eval["recall"][0, :, 0, 2], ev.params.recThrs, (gt, res)


def test_agrees_with_pycocotools_where_interpolation_cannot_matter():
    """Precision constant over the whole recall range [0, 1] makes every interpolation (VOC's 11
    points, VOC's area, COCO's 101 points) equal that constant.  Class 0: FP, TP alternating over
    4 GT -> precision 1/2 at every TP, recall reaches 1 -> AP 0.5.  Class 1: 3 TPs ranked above
    2 FPs -> AP 1.  Class 2: detections without GT -> nan in VOC, left out of COCO's mean.
    Boxes: TPs are GTs shifted by 1 px (IoU 0.905 continuous, 0.91 with +1), FPs overlap nothing,
    so neither the +1 convention nor the matching rules differ; no difficult, no score ties."""
    sq = lambda x, y: [x, y, x + 20, y + 20]
    sh = lambda x, y: [x + 1, y, x + 21, y + 20]
    gb = [A([sq(0, 0), sq(100, 0), sq(0, 200), sq(300, 300)]), A([sq(0, 0), sq(200, 0), sq(100, 100)])]
    gl = [A([0, 0, 1, 1], np.int64), A([0, 0, 1], np.int64)]
    pb = [A([sq(500, 500), sh(0, 0), sq(600, 500), sh(100, 0), sh(0, 200), sh(300, 300), sq(700, 700), sq(800, 800)]),
          A([sq(500, 500), sh(0, 0), sq(600, 500), sh(200, 0), sh(100, 100), sq(700, 700), sq(900, 900)])]
    pl = [A([0, 0, 0, 0, 1, 1, 1, 2], np.int64), A([0, 0, 0, 0, 1, 1, 2], np.int64)]
    # class 0 ranking: FP .99, TP .98, FP .97, TP .96, FP .95, TP .94, FP .93, TP .92
    # class 1 ranking: TP .90, .89, .88, then FP .80, .79
    ps = [A([.99, .98, .95, .94, .90, .89, .80, .5]), A([.97, .96, .93, .92, .88, .79, .4])]
    ap07 = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl)
    ap10 = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl,
                              use_07_metric=False)
    gt = coco_gt_from_arrays(gb, gl, class_names=["a", "b", "c"])
    stats = eval_coco(gt, coco_results_from_arrays([1, 2], [1, 2, 3], pb, pl, ps))
    np.testing.assert_allclose(ap07["ap"][:2], [0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(ap10["ap"][:2], [0.5, 1.0], atol=1e-12)
    assert np.isnan(ap07["ap"][2])
    assert stats["AP50"] == pytest.approx(ap07["map"], abs=1e-12)
    assert stats["AP50"] == pytest.approx(ap10["map"], abs=1e-12)
    assert stats["AP50"] == pytest.approx(0.75, abs=1e-12)
    assert set(stats) == set(COCO_STAT_NAMES)


def test_prec_rec_agree_with_pycocotools_on_random_data():
    """Random separated problems (see continuous_grid_problem): our precision/recall curves, put
    through COCO's 101-point interpolation, must reproduce pycocotools' AP50 per class and its max
    recall."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n_cls = 3
        pb, pl, ps, gb, gl = continuous_grid_problem(rng, n_img=int(rng.integers(2, 6)), n_cls=n_cls)
        coco_ap, coco_rec, rec_thrs, _ = coco_ap50_per_class(pb, pl, ps, gb, gl, n_cls)
        prec, rec = calc_detection_voc_prec_rec([to_devkit_boxes(b) for b in pb], pl, ps,
                                                [to_devkit_boxes(b) for b in gb], gl, n_classes=n_cls)
        for k in range(n_cls):
            if rec[k] is None:
                assert coco_rec[k] == -1  # no GT: pycocotools leaves the class out
                continue
            r, p = rec[k], np.nan_to_num(prec[k])
            env = np.maximum.accumulate(p[::-1])[::-1] if len(p) else p
            idx = np.searchsorted(r, rec_thrs, side="left")
            q = np.array([env[i] if i < len(r) else 0.0 for i in idx])
            assert q.mean() == pytest.approx(coco_ap[k], abs=1e-12), (seed, k)
            assert (r[-1] if len(r) else 0.0) == pytest.approx(coco_rec[k], abs=1e-12), (seed, k)


def test_difficult_becomes_crowd_and_is_ignored_by_coco():
    # One normal GT detected (score .5) and one difficult GT detected first (score .9): both
    # evaluators ignore the difficult match, so AP is 1 (counting it as a FP would give 0.5).
    gb = [A([[0, 0, 30, 30], [100, 100, 130, 130]])]
    gl, gd = [A([0, 0], np.int64)], [A([0, 1], bool)]
    pb, pl, ps = [A([[100, 100, 130, 130], [0, 0, 30, 30]])], [A([0, 0], np.int64)], [A([.9, .5])]
    gt = coco_gt_from_arrays(gb, gl, gd, image_sizes=[(200, 150)])
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    assert gt["images"][0] == {"id": 1, "width": 200, "height": 150}
    assert gt["annotations"][0]["bbox"] == [0, 0, 30, 30] and gt["annotations"][0]["area"] == 900
    stats = eval_coco(gt, coco_results_from_arrays([1], [1], pb, pl, ps))
    voc = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl, gd)
    assert stats["AP50"] == pytest.approx(1.0) and voc["map"] == pytest.approx(1.0)


def test_eval_coco_quiet_unless_asked(capsys):
    gt = coco_gt_from_arrays([A([[0, 0, 30, 30]])], [A([0], np.int64)])
    res = coco_results_from_arrays([1], [1], [A([[0, 0, 30, 30]])], [A([0], np.int64)], [A([1.0])])
    stats = eval_coco(gt, res)
    assert capsys.readouterr().out == ""
    assert stats["AP"] == pytest.approx(1.0)
    eval_coco(gt, res, print_summary=True)
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    # no detections at all: AP 0 rather than a pycocotools crash
    assert eval_coco(gt, [])["AP50"] == 0.0
    with pytest.raises(ValueError, match="image_id"):
        eval_coco(gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    bad = dict(gt, annotations=[dict(gt["annotations"][0], id=0)])
    with pytest.raises(ValueError, match="non-zero"):
        eval_coco(bad, res)


# ----------------------------------------------------------------------------- result files

def random_float32_detections(rng, n_img, n_cls):
    pb, pl, ps = [], [], []
    for i in range(n_img):
        n = int(rng.integers(0, 12)) if i else 0  # image 0 has no detections
        xy = rng.uniform(0, 300, size=(n, 2))
        b = np.concatenate([xy, xy + rng.uniform(1, 200, size=(n, 2))], 1).astype(np.float32)
        pb.append(b), pl.append(rng.integers(0, n_cls, size=n))
        ps.append(np.round(rng.normal(size=n), 1).astype(np.float32))  # rounded: score ties
    return pb, pl, ps


def test_voc_result_files_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    names, n_img = ["aeroplane", "bicycle", "bird", "boat"], 9
    ids = [f"{i:06d}" for i in range(n_img)]
    pb, pl, ps = random_float32_detections(rng, n_img, len(names) - 1)  # "boat" gets no detections
    gb = [b[:3].astype(np.float64) + rng.uniform(-3, 3, size=b[:3].shape) for b in pb]
    gl = [l[:3] for l in pl]
    gd = [rng.random(len(l)) < 0.2 for l in gl]
    paths = write_voc_results(tmp_path, "test", names, ids, pb, pl, ps)
    assert [p.name for p in paths] == [f"comp4_det_test_{c}.txt" for c in names]
    assert paths[3].read_text() == ""
    # the first line of a file is the devkit's 1-based box of the first detection of that class
    i, j = next((i, j) for i in range(n_img) for j in range(len(pl[i])) if pl[i][j] == 0)
    first = voc_results_path(tmp_path, "test", "aeroplane").read_text().splitlines()[0].split()
    assert first[0] == ids[i]
    np.testing.assert_array_equal(np.array(first[1:], np.float64),
                                  np.r_[float(ps[i][j]), pb[i][j].astype(np.float64) + [1, 1, 0, 0]])

    rb, rl, rs = read_voc_results(tmp_path, "test", names, ids)
    for i in range(n_img):
        order = np.argsort(pl[i], kind="stable")  # the reader groups an image's rows by class
        np.testing.assert_array_equal(rb[i], pb[i][order].astype(np.float64))
        np.testing.assert_array_equal(rl[i], pl[i][order])
        np.testing.assert_array_equal(rs[i], ps[i][order].astype(np.float64))
    for use_07 in (True, False):
        a = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl, gd,
                               use_07_metric=use_07, n_classes=4)
        b = eval_detection_voc([to_devkit_boxes(b) for b in rb], rl, rs, [to_devkit_boxes(b) for b in gb], gl, gd,
                               use_07_metric=use_07, n_classes=4)
        np.testing.assert_array_equal(a["ap"], b["ap"])


def test_voc_result_files_bad_input(tmp_path):
    names, ids = ["cat", "dog"], ["a", "b"]
    write_voc_results(tmp_path, "val", names, ids, [E4(), E4()], [A([], np.int64)] * 2, [A([])] * 2)
    voc_results_path(tmp_path, "val", "dog").write_text("a 0.5 1 1 10 10\nzzz 0.5 1 1 10 10\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_dog.txt:2: unknown image id 'zzz'"):
        read_voc_results(tmp_path, "val", names, ids)
    voc_results_path(tmp_path, "val", "dog").write_text("a 0.5 1 1 10\n")
    with pytest.raises(ValueError, match=r":1: expected"):
        read_voc_results(tmp_path, "val", names, ids)
    voc_results_path(tmp_path, "val", "dog").unlink()
    with pytest.raises(FileNotFoundError, match="dog"):
        read_voc_results(tmp_path, "val", names, ids)
    with pytest.raises(ValueError, match="whitespace"):
        write_voc_results(tmp_path, "val", names, ["a b", "c"], [E4(), E4()], [A([], np.int64)] * 2, [A([])] * 2)
    with pytest.raises(ValueError, match=r"image 1: pred_scores"):
        write_voc_results(tmp_path, "val", names, ids, [E4(), A([[0, 0, 1, 1]])], [A([], np.int64), A([0])],
                          [A([]), A([np.nan])])


def test_coco_results_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    n_img, n_cls = 6, 3
    pb, pl, ps = random_float32_detections(rng, n_img, n_cls)
    coco_ids, cat_ids = [11, 12, 13, 14, 15, 16], [5, 7, 9]
    path = tmp_path / "dets.json"
    res = write_coco_results(path, coco_ids, cat_ids, pb, pl, ps)
    assert len(res) == sum(len(b) for b in pb)
    b0 = pb[1][0].astype(np.float64)
    assert res[0]["image_id"] == 12 and res[0]["category_id"] == cat_ids[pl[1][0]]
    assert res[0]["bbox"] == [b0[0], b0[1], b0[2] - b0[0], b0[3] - b0[1]]
    rb, rl, rs = read_coco_results(path, coco_ids, cat_ids)
    for i in range(n_img):
        np.testing.assert_array_equal(rb[i], pb[i].astype(np.float64))
        np.testing.assert_array_equal(rl[i], pl[i])
        np.testing.assert_array_equal(rs[i], ps[i].astype(np.float64))
    gb = [b[:2].astype(np.float64) + 2 for b in pb]
    gl = [l[:2] for l in pl]
    gt = coco_gt_from_arrays(gb, gl, image_ids=coco_ids, category_ids=cat_ids)
    assert eval_coco(gt, path) == eval_coco(gt, coco_results_from_arrays(coco_ids, cat_ids, rb, rl, rs))
    a = eval_detection_voc([to_devkit_boxes(b) for b in pb], pl, ps, [to_devkit_boxes(b) for b in gb], gl)
    b = eval_detection_voc([to_devkit_boxes(b) for b in rb], rl, rs, [to_devkit_boxes(b) for b in gb], gl)
    np.testing.assert_array_equal(a["ap"], b["ap"])
    with pytest.raises(ValueError, match="entry 0"):
        read_coco_results([{"image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}], coco_ids, cat_ids)


# ----------------------------------------------------------------------------- table

def test_format_ap_table():
    names = ["aeroplane", "bicycle", "pottedplant"]
    ap = A([0.91234, np.nan, 0.5])
    n_gt, n_det = detection_counts([A([0, 0, 2]), A([2])], [A([0, 1, 1]), A([2])], [A([0, 0, 1], bool), A([0], bool)],
                                   n_classes=3)
    np.testing.assert_array_equal(n_gt, [1, 1, 1])
    np.testing.assert_array_equal(n_det, [2, 0, 2])
    text = format_ap_table(names, ap, float(np.nanmean(ap)), n_gt, n_det)
    lines = text.splitlines()
    assert lines[-1] == "mAP = 0.7062"  # (0.91234 + 0.5) / 2 = 0.70617
    rows = [l for l in lines if l.split() and l.split()[0] in names]
    assert [r.split()[0] for r in rows] == names
    assert rows[0].split()[1:] == ["0.9123", "1", "2"]
    assert rows[1].split()[1] == "nan"
    assert len({len(r) for r in rows}) == 1  # aligned columns
    assert format_ap_table(names, ap[:2], 0.25).splitlines()[-1] == "mAP = 0.2500"
    with pytest.raises(ValueError):
        format_ap_table(names[:2], ap, 0.5)
