"""Window projection (paper appendix A and the release) against the formulas written literally, and the scale choice."""
import math

import numpy as np
import pytest

from detector.core.projection import choose_scales, project_boxes

from detector.core.boxes import check_boxes

from detector.core.resize import resize_factor


def spec_zf5_code_rule(x1_1b, y1_1b, x2_1b, y2_1b, map_w, map_h):
    """The release's projection for ZF-5, verbatim on 1-based inclusive pixels."""
    def lo(v):
        return math.floor((v - 21 + 6.5) / 16 + 0.5)

    def hi(v):
        return math.ceil((v - 21 - 6.5) / 16 - 0.5)
    out = []
    for a, b, lim in ((lo(x1_1b), hi(x2_1b), map_w), (lo(y1_1b), hi(y2_1b), map_h)):
        if a > b:
            a = b = (a + b) // 2
        out.append((min(max(a, 0), lim - 1), min(max(b, 0), lim - 1)))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


def test_code_rule_equals_spec_formula_for_zf5():
    rng = np.random.default_rng(0)
    W, H, mw, mh = 600, 500, 36, 30
    x1 = rng.integers(1, W, 400)
    y1 = rng.integers(1, H, 400)
    x2 = np.minimum(x1 + rng.integers(0, 300, 400), W)
    y2 = np.minimum(y1 + rng.integers(0, 300, 400), H)
    ours = np.stack([x1 - 1, y1 - 1, x2, y2], 1).astype(float)  # our continuous convention
    got = project_boxes(ours, 1.0, 16, 20.0, (mh, mw), "code")
    want = [spec_zf5_code_rule(a, b, c, d, mw, mh) for a, b, c, d in zip(x1, y1, x2, y2)]
    assert got.tolist() == want


def _paper_rule_naive(lo_px: float, hi_px: float, stride: int, offset: float, n: int) -> tuple[int, int]:
    """The appendix, on one axis: the first and last cell whose centre lies inside the box's
    pixel centres; none inside -> the midpoint of the two rounded edges; clamped to the map."""
    centres = offset + 0.5 + stride * np.arange(n)
    inside = np.nonzero((centres > lo_px + 0.5) & (centres < hi_px - 0.5))[0]
    if len(inside):
        return int(inside[0]), int(inside[-1])
    a = math.floor((lo_px + 0.5 - offset - 0.5) / stride) + 1
    b = math.ceil((hi_px - 0.5 - offset - 0.5) / stride) - 1
    if a > b:
        a = b = (a + b) // 2
    return min(max(a, 0), n - 1), min(max(b, 0), n - 1)


def test_paper_rule_is_cells_whose_centres_lie_inside():
    rng = np.random.default_rng(1)
    stride, offset, mh, mw = 16, 7.5, 30, 40
    xy = rng.uniform(0, 600, (300, 2)) * [1, 0.75]
    boxes = np.concatenate([xy, xy + rng.uniform(2, 200, (300, 2))], 1).clip(0, [640, 480, 640, 480])
    got = project_boxes(boxes, 1.0, stride, offset, (mh, mw), "paper")
    n_inside = 0
    for b, g in zip(boxes, got):
        x = _paper_rule_naive(b[0], b[2], stride, offset, mw)
        y = _paper_rule_naive(b[1], b[3], stride, offset, mh)
        assert [x[0], y[0], x[1], y[1]] == g.tolist(), b
        n_inside += x[0] < x[1]
    assert 100 < n_inside < 300  # both the ordinary and the collapsed case occur


def test_collapsed_window_takes_midpoint_and_clamps():
    # a 4-px box: code rule pulls both edges past each other
    w = project_boxes(np.array([[100.0, 100.0, 104.0, 104.0]]), 1.0, 16, 20.0, (50, 50), "code")
    assert w[0, 0] == w[0, 2] and w[0, 1] == w[0, 3]
    # whole image on a small map: clamped to the map
    w = project_boxes(np.array([[0.0, 0.0, 640.0, 480.0]]), 1.0, 16, 20.0, (10, 12), "code")
    assert w.tolist() == [[0, 0, 11, 9]]
    assert (project_boxes(np.array([[0.0, 0.0, 1.0, 1.0]]), 1.0, 16, 20.0, (5, 5)) >= 0).all()


def test_resize_factor_scales_the_box():
    b = np.array([[32.0, 32.0, 320.0, 320.0]])
    assert (project_boxes(b, 2.0, 16, 0.0, (100, 100)) == project_boxes(b * 2, 1.0, 16, 0.0, (100, 100))).all()


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_choose_scales_matches_naive(rule):
    rng = np.random.default_rng(2)
    W, H = 640, 480
    scales = [480, 576, 688, 864, 1200]
    factors = [resize_factor(W, H, s, 10000) for s in scales]
    xy = rng.uniform(0, 300, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 330, (500, 2))], 1)
    got = choose_scales(boxes, factors, (W, H), rule)
    for b, k in zip(boxes, got):
        area = (b[2] - b[0]) * (b[3] - b[1])
        if rule == "paper":
            d = [abs(area * f * f - 224 * 224) for f in factors]
        else:
            expected = round(208 * min(W, H) / math.sqrt(area))
            d = [abs(expected - s) for s in scales]
        best = min(d)
        assert k == d.index(best)  # first minimum: ties go to the smaller scale


def test_choose_scales_tie_goes_to_smaller():
    # code rule: expected = round(208*480/sqrt(area)); pick area so expected is halfway between 480 and 576 -> 528
    side = 208 * 480 / 528
    k = choose_scales(np.array([[0, 0, side, side]]), [1.0, 1.2], (640, 480), "code")
    assert k[0] == 0


def test_resize_factor_cap():
    assert resize_factor(640, 480, 688, 2000) == pytest.approx(688 / 480)
    assert resize_factor(4000, 400, 688, 2000) == pytest.approx(2000 / 4000)


@pytest.mark.parametrize("box,msg", [
    ([10, 10, 5, 20], "x2 < x1"),
    ([0, 0, 700, 20], "outside"),
    ([-5, 0, 10, 20], "outside"),
    ([0, np.nan, 10, 20], "not finite"),
])
def test_bad_boxes_raise_clear_errors(box, msg):
    with pytest.raises(ValueError, match=msg):
        check_boxes(np.array([box], float), 640, 480, "proposals")


def test_max_upscale_keeps_a_small_image_from_being_blown_up():
    from detector.core.resize import resize_factor

    assert resize_factor(200, 200, 688, 2000) == pytest.approx(3.44)
    assert resize_factor(200, 200, 688, 2000, max_upscale=1.5) == 1.5
    assert resize_factor(640, 480, 688, 2000, max_upscale=1.5) == pytest.approx(688 / 480)  # under the cap
    assert resize_factor(4000, 400, 688, 2000, max_upscale=1.5) == pytest.approx(0.5)  # max_size still rules
