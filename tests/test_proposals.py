"""Selective search, the proposal cache, proposal files and recall, on generated images only."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.io
from PIL import Image

from detector.proposals import search
from detector.proposals import store as proposal_store
from detector.config import ProposalConfig
from detector.datasets.records import ImageRecord
from detector.proposals import load_proposals, load_rcnn_mat, read_proposals_npz, write_proposals_npz
from detector.proposals import proposal_recall, selective_search


# ---------------------------------------------------------------- helpers

def _scene(h=120, w=160, rects=((20, 30, 70, 90), (90, 10, 150, 60)), seed=0) -> np.ndarray:
    """Noisy grey background with flat coloured rectangles (x1, y1, x2, y2, continuous coords)."""
    rng = np.random.default_rng(seed)
    img = (110 + rng.integers(-12, 13, size=(h, w, 3))).astype(np.uint8)
    colours = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 220, 30)]
    for (x1, y1, x2, y2), c in zip(rects, colours):
        img[y1:y2, x1:x2] = c
    return img


def _best_match(boxes: np.ndarray, target) -> np.ndarray:
    """The box with the smallest largest-edge distance to target."""
    d = np.abs(boxes - np.asarray(target, np.float32)).max(1)
    return boxes[int(np.argmin(d))]


def _save_png(path, arr) -> str:
    Image.fromarray(arr).save(path)
    return str(path)


def _naive_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size * 0.8, size=(n, 2))
    wh = rng.uniform(2, size * 0.5, size=(n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ---------------------------------------------------------------- selective search

def test_two_calls_identical():
    img = _scene()
    a = selective_search(img, resize=None)
    b = selective_search(img, resize=None)
    assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 4 and len(a) > 5
    assert np.array_equal(a, b)


def test_boxes_inside_image_integer_unique_and_valid():
    img = _scene(h=97, w=143)
    for resize in (None, 60, 300):
        b = selective_search(img, resize=resize, min_size=4)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= 143).all() and (b[:, 3] <= 97).all()
        assert ((b[:, 2] - b[:, 0]) >= 4).all() and ((b[:, 3] - b[:, 1]) >= 4).all()
        assert np.array_equal(b, np.round(b))
        assert len(np.unique(b, axis=0)) == len(b)


@pytest.mark.parametrize("resize", [None, 80, 320])
def test_strong_rectangle_recovered_in_original_pixels(resize):
    rect = (40, 30, 110, 85)  # drawn, so its box is known independently of the code
    img = _scene(h=120, w=160, rects=(rect,))
    boxes = selective_search(img, resize=resize)
    best = _best_match(boxes, rect)
    tol = 0 if resize is None else 3  # resampling blurs edges by about one resized pixel
    assert np.abs(best - np.array(rect)).max() <= tol, (best, rect)


def test_boxes_mapped_back_by_hand(monkeypatch):
    """Fake OpenCV output in resized pixels; check mapping, clipping, min_size and dedup by hand."""
    seen = {}

    def fake_rects(bgr, mode, base_k, inc_k, sigma, threads=1):
        seen["shape"], seen["pixel"] = bgr.shape, bgr[0, 0].copy()
        return np.array([[10, 5, 20, 10],    # -> [20, 10, 60, 30]
                         [10, 5, 20, 10],    # duplicate
                         [90, 40, 10, 10],   # -> [180, 80, 200, 100]
                         [0, 0, 2, 2],       # -> [0, 0, 4, 4]: thinner than min_size 8
                         [40, 0, 60, 50]],   # -> [80, 0, 200, 100]: x2 = 200 already at the border
                        np.float64)

    monkeypatch.setattr(search, "_opencv_rects", fake_rects)
    img = np.zeros((100, 200, 3), np.uint8)
    img[:] = (255, 10, 0)  # RGB red
    b = selective_search(img, resize=100, min_size=8)
    assert seen["shape"] == (50, 100, 3)
    assert tuple(seen["pixel"]) == (0, 10, 255)  # OpenCV got BGR
    expected = {(20, 10, 60, 30), (180, 80, 200, 100), (80, 0, 200, 100)}
    assert set(map(tuple, b.astype(int).tolist())) == expected and len(b) == 3


def test_clipping_of_rounded_boxes(monkeypatch):
    monkeypatch.setattr(search, "_opencv_rects",
                        lambda *a: np.array([[0, 0, 34, 34]], np.float64))  # 34 * 101/33 > 101
    b = selective_search(np.zeros((101, 101, 3), np.uint8), resize=33, min_size=0)
    assert b.tolist() == [[0, 0, 101, 101]]


def test_min_size_top_k_and_order_prefix():
    img = _scene(h=100, w=140, rects=((10, 10, 40, 30), (60, 20, 130, 90), (20, 50, 50, 95)))
    everything = selective_search(img, resize=None, min_size=0, top_k=None)
    w, h = everything[:, 2] - everything[:, 0], everything[:, 3] - everything[:, 1]
    reference = everything[(w >= 20) & (h >= 20)]
    filtered = selective_search(img, resize=None, min_size=20, top_k=None)
    assert len(filtered) < len(everything)
    assert np.array_equal(np.unique(filtered, axis=0), np.unique(reference, axis=0))
    top = selective_search(img, resize=None, min_size=20, top_k=7)
    assert len(top) == 7
    assert np.array_equal(top, filtered[:7])  # truncation keeps the same order


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_threaded_search_equals_opencv_switch(mode):
    # threads > 1 rebuilds OpenCV's fast/quality configuration unit by unit; the reference is
    # OpenCV's own switchToSelectiveSearchFast/Quality in one object (num_threads=1).
    # Smooth random texture: unlike flat rectangles it is sensitive to the segmentation's blur
    # (a sigma of 0.8 instead of OpenCV's 0.8f changes ~1% of the boxes here).
    import cv2

    noise = np.random.default_rng(6).integers(0, 256, (30, 40, 3)).astype(np.uint8)  # seed 6: sensitive
    textured = cv2.resize(noise, (160, 120), interpolation=cv2.INTER_CUBIC)
    rects = _scene(h=90, w=120, rects=((10, 10, 40, 40), (50, 30, 110, 80), (20, 55, 45, 85)), seed=3)
    for img in (textured, rects):
        ref = selective_search(img, mode, resize=None, min_size=0, top_k=None, num_threads=1)
        for threads in (2, 3):
            got = selective_search(img, mode, resize=None, min_size=0, top_k=None, num_threads=threads)
            assert np.array_equal(got, ref)
        assert len(ref) > 20


@pytest.mark.parametrize("mode", ["fast", "quality", "single"])
def test_every_mode_returns_opencvs_own_boxes_in_a_seeded_order(mode):
    """The boxes are exactly OpenCV's own switch's rectangles (x, y, w, h) -> [x, y, x+w, y+h],
    deduplicated and filtered by min_size, in the order of numpy's permutation of the sorted set;
    and the drawn square is one of them, at its drawn coordinates."""
    import cv2

    img = _scene(h=60, w=80, rects=((10, 10, 40, 40),))
    got = selective_search(img, mode, resize=None, min_size=4, top_k=None, base_k=50, inc_k=50, sigma=0.8,
                           seed=5)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img[:, :, ::-1]))
    {"fast": lambda: ss.switchToSelectiveSearchFast(50, 50, 0.8),
     "quality": lambda: ss.switchToSelectiveSearchQuality(50, 50, 0.8),
     "single": lambda: ss.switchToSingleStrategy(50, 0.8)}[mode]()
    want = {(x, y, x + w, y + h) for x, y, w, h in ss.process().reshape(-1, 4).tolist() if w >= 4 and h >= 4}
    assert len(got) == len(want) > 3
    assert {tuple(b) for b in got.astype(int).tolist()} == want
    order = np.random.default_rng(5).permutation(len(want))
    np.testing.assert_array_equal(got, np.array(sorted(want), np.float32)[order])
    assert (10, 10, 40, 40) in want


def test_bad_options_raise():
    img = _scene(h=40, w=40)
    with pytest.raises(ValueError, match="mode"):
        selective_search(img, "slow")
    with pytest.raises(ValueError, match="top_k"):
        selective_search(img, top_k=-1)
    with pytest.raises(ValueError, match="expected an HxW"):
        selective_search(np.zeros((4, 4, 5), np.uint8))


# ---------------------------------------------------------------- recall

def test_recall_matches_naive_loop():
    rng = np.random.default_rng(3)
    props, gts, labels, diff = [], [], [], []
    for i in range(6):
        props.append(_random_boxes(rng, [0, 5, 40, 120, 7, 60][i]))
        g = _random_boxes(rng, [3, 0, 4, 6, 2, 5][i])
        gts.append(g)
        labels.append(rng.integers(0, 3, len(g)))
        diff.append(rng.random(len(g)) < 0.2)
    ns, ious = [1, 10, 50, 1000], [0.3, 0.5, 0.7]
    res = proposal_recall(props, gts, labels, ious, ns, diff, class_names=["a", "b", "c"])

    def naive(cls=None):
        table = np.zeros((len(ns), len(ious)))
        count = 0
        for p, g, lab, d in zip(props, gts, labels, diff):
            for j in range(len(g)):
                if d[j] or (cls is not None and lab[j] != cls):
                    continue
                count += 1
                for ti, n in enumerate(ns):
                    best = max([_naive_iou(g[j], q) for q in p[:n]], default=0.0)
                    for ki, t in enumerate(ious):
                        table[ti, ki] += best >= t
        return table / count, count

    rec, cnt = naive()
    assert res["num_gt"] == cnt
    np.testing.assert_allclose(res["recall"], rec)
    np.testing.assert_allclose(res["ar"], rec.mean(1))
    for c, name in enumerate("abc"):
        rec_c, cnt_c = naive(c)
        if cnt_c == 0:
            assert name not in res["per_class"]
            continue
        assert res["per_class"][name]["num_gt"] == cnt_c
        np.testing.assert_allclose(res["per_class"][name]["recall"], rec_c)
    np.testing.assert_allclose(res["mean_proposals"], [np.mean([min(n, len(p)) for p in props]) for n in ns])


def test_recall_hand_example_and_errors():
    gt = [np.array([[0, 0, 10, 10]], np.float32)]
    # IoU of [0,0,10,8] with the GT is 0.8; of [0,0,10,5] 0.5
    props = [np.array([[0, 0, 10, 5], [0, 0, 10, 8]], np.float32)]
    res = proposal_recall(props, gt, iou_thresholds=[0.5, 0.7, 0.9], top_ns=[1, 2])
    assert res["recall"].tolist() == [[1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError, match="ground-truth"):
        proposal_recall(props, gt + gt)
    with pytest.raises(ValueError, match="shape"):
        proposal_recall([np.zeros((3, 5))], gt)


# ---------------------------------------------------------------- cache

@pytest.fixture
def images(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    return [_save_png(d / f"im{i}.png", _scene(h=60, w=80, rects=((10 + 5 * i, 10, 50, 45),), seed=i))
            for i in range(3)]


def _cfg(**kw) -> ProposalConfig:
    return ProposalConfig(**{"resize": 0, **kw})


@pytest.fixture
def counter(monkeypatch):
    calls = []
    real = search.selective_search

    def counting(image, *a, **k):
        calls.append(1)
        return real(image, *a, **k)

    monkeypatch.setattr(search, "selective_search", counting)
    return calls


def test_cache_second_run_reads_cache(tmp_path, images, counter):
    cache = tmp_path / "cache"
    first = proposal_store.compute_proposals(images, cache, _cfg(), workers=1, progress=False)
    assert len(counter) == 3 and first.computed == 3 and first.cached == 0
    assert list(first) == ["im0", "im1", "im2"]
    second = proposal_store.compute_proposals(images, cache, _cfg(), workers=1, progress=False)
    assert len(counter) == 3 and second.cached == 3 and second.computed == 0
    for i, k in enumerate(first):
        assert np.array_equal(first[k], second[k])
        direct = selective_search(_scene(h=60, w=80, rects=((10 + 5 * i, 10, 50, 45),), seed=i), resize=None)
        assert np.array_equal(first[k], direct)


def test_changed_params_change_key(tmp_path, images, counter):
    cache = tmp_path / "cache"
    a = proposal_store.ProposalStore(cache, _cfg())
    assert a.dir == proposal_store.ProposalStore(cache, _cfg()).dir
    for change in ({"top_k": 100}, {"mode": "single"}, {"min_size": 3}, {"resize": 50}):
        assert proposal_store.ProposalStore(cache, _cfg(**change)).dir != a.dir, change
    proposal_store.compute_proposals(images, cache, _cfg(), workers=1, progress=False)
    proposal_store.compute_proposals(images, cache, _cfg(top_k=5), workers=1, progress=False)
    assert len(counter) == 6
    assert json.loads((a.dir / "params.json").read_text())["top_k"] == 2000


def test_corrupt_cache_entry_recomputed(tmp_path, images, counter):
    cache = tmp_path / "cache"
    first = proposal_store.compute_proposals(images, cache, _cfg(), workers=1, progress=False)
    store = proposal_store.ProposalStore(cache, _cfg())
    store.file(images[1]).write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = proposal_store.compute_proposals(images, cache, _cfg(), workers=1, progress=False)
    assert again.computed == 1 and again.cached == 2 and len(counter) == 4
    assert np.array_equal(again["im1"], first["im1"])


def test_corrupt_and_missing_images_skipped(tmp_path, images, caplog):
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    missing = str(tmp_path / "img" / "gone.png")
    with caplog.at_level(logging.WARNING, logger="detector.proposals.store"):
        out = proposal_store.compute_proposals([images[0], str(bad), missing, images[2]], tmp_path / "c",
                                               _cfg(), workers=1, progress=False)
    assert [f[0] for f in out.failed] == ["broken", "gone"]
    assert out["broken"].shape == (0, 4) and out["gone"].shape == (0, 4)
    assert len(out["im0"]) > 0 and len(out["im2"]) > 0 and out.computed == 2
    assert str(bad) in caplog.text and missing in caplog.text


def test_parallel_workers_match_in_process(tmp_path, images):
    par = proposal_store.compute_proposals(images, tmp_path / "p", _cfg(), workers=2, progress=False)
    ser = proposal_store.compute_proposals(images, tmp_path / "s", _cfg(), workers=1, progress=False)
    assert par.computed == 3 and list(par) == list(ser)
    for k in ser:
        assert np.array_equal(par[k], ser[k])


def test_all_filtered_out_warns(tmp_path, images, caplog):
    with caplog.at_level(logging.WARNING, logger="detector.proposals.store"):
        out = proposal_store.compute_proposals(images[:1], tmp_path / "c", _cfg(min_size=1000),
                                               workers=1, progress=False)
    assert out.empty == ["im0"] and out["im0"].shape == (0, 4)
    assert images[0] in caplog.text


def test_records_and_duplicate_ids(tmp_path, images):
    recs = [ImageRecord("a", images[0], 80, 60), ImageRecord("b", images[1], 80, 60)]
    store = proposal_store.ProposalStore(tmp_path / "c", _cfg())
    out = proposal_store.compute_proposals(recs, tmp_path / "c", _cfg(), workers=1, progress=False)
    assert list(out) == ["a", "b"] and np.array_equal(out["a"], store.get(recs[0]))
    with pytest.raises(ValueError, match="twice"):
        proposal_store.compute_proposals([images[0], images[0]], tmp_path / "c", _cfg(), workers=1)


# ---------------------------------------------------------------- proposal files

def _cell(items) -> np.ndarray:
    c = np.empty((1, len(items)), dtype=object)
    for i, x in enumerate(items):
        c[0, i] = x
    return c


def test_rcnn_mat_conversion(tmp_path):
    p = tmp_path / "ss.mat"
    scipy.io.savemat(p, {"boxes": _cell([np.array([[1, 2, 30, 40], [5, 6, 7, 8]], np.uint16),
                                         np.zeros((0, 4)), np.array([[10., 20., 110., 220.]])]),
                         "images": _cell(["000005", "000007", "000009"])})
    got = load_rcnn_mat(p)
    assert list(got) == ["000005", "000007", "000009"]
    # row y1 x1 y2 x2 (1-based inclusive) -> x1-1, y1-1, x2, y2
    assert got["000005"].tolist() == [[1, 0, 40, 30], [5, 4, 8, 7]]
    assert got["000007"].shape == (0, 4)
    assert got["000009"].tolist() == [[19, 9, 220, 110]]
    assert got["000005"].dtype == np.float32
    reordered = load_proposals(p, ["000009", "000005"])
    assert list(reordered) == ["000009", "000005"]
    assert reordered["000009"].tolist() == [[19, 9, 220, 110]]
    with pytest.raises(ValueError, match="'000006'"):
        load_rcnn_mat(p, ["000005", "000006", "000007"])
    # ids saved as a MATLAB char matrix rather than a cell array
    scipy.io.savemat(p, {"boxes": _cell([np.array([[2, 3, 4, 5]]), np.array([[1, 1, 9, 9]])]),
                         "images": np.array(["id_a", "id_b"])})
    assert load_rcnn_mat(p, ["id_b", "id_a"])["id_a"].tolist() == [[2, 1, 5, 4]]


def test_rcnn_mat_without_images(tmp_path):
    p = tmp_path / "noimg.mat"
    scipy.io.savemat(p, {"boxes": _cell([np.array([[1, 1, 2, 2]]), np.array([[3, 4, 5, 6]])])})
    got = load_rcnn_mat(p, ["a", "b"])
    assert got["b"].tolist() == [[3, 2, 6, 5]]
    with pytest.raises(ValueError, match="no 'images' variable.*3 images"):
        load_rcnn_mat(p, ["a", "b", "c"])
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(bad, {"boxes": _cell([np.ones((2, 3))])})
    with pytest.raises(ValueError, match="n x 4"):
        load_rcnn_mat(bad, ["a"])
    scipy.io.savemat(bad, {"other": np.ones(3)})
    with pytest.raises(ValueError, match="no 'boxes' variable"):
        load_rcnn_mat(bad, ["a"])


def test_own_format_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = {"img_b": _random_boxes(rng, 5), "img_a": np.zeros((0, 4), np.float32), "c": _random_boxes(rng, 1)}
    p = tmp_path / "props.npz"
    write_proposals_npz(p, data)
    back = read_proposals_npz(p)
    assert list(back) == list(data)
    for k in data:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], data[k])
    sub = load_proposals(p, ["c", "img_b"])
    assert list(sub) == ["c", "img_b"] and np.array_equal(sub["c"], data["c"])
    with pytest.raises(ValueError, match="'zzz'"):
        read_proposals_npz(p, ["c", "zzz"])
    np.savez(tmp_path / "wrong.npz", boxes=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="not a proposal file"):
        read_proposals_npz(tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match="unknown proposal file type"):
        load_proposals(tmp_path / "x.txt")


# ---------------------------------------------------------------- tools

def _tiny_voc(root, rects) -> None:
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    ids = []
    for i, rect in enumerate(rects):
        iid = f"im{i}"
        ids.append(iid)
        _save_png(root / "JPEGImages" / f"{iid}.png", _scene(h=60, w=80, rects=(rect,), seed=i))
        x1, y1, x2, y2 = rect
        (root / "Annotations" / f"{iid}.xml").write_text(
            f"<annotation><filename>{iid}.png</filename><size><width>80</width><height>60</height>"
            f"<depth>3</depth></size><object><name>blob</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            f"</bndbox></object></annotation>")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")


def test_tools_end_to_end(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    def tool(name):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    monkeypatch.chdir(tmp_path)
    _tiny_voc(tmp_path / "voc", [(10, 10, 50, 45), (30, 5, 70, 40)])
    common = ["--dataset", "voc", "--split", "test", "--workers", "1", "--set", "proposals.resize=0"]
    assert tool("compute_proposals").main(common + ["--no-progress", "--export", "p.npz"]) == 0
    assert tool("eval_proposals").main(common + ["--json", "r.json", "--plot", "r.png"]) == 0
    assert tool("eval_proposals").main(common + ["--proposals", "p.npz", "--json", "r2.json"]) == 0
    r, r2 = json.loads((tmp_path / "r.json").read_text()), json.loads((tmp_path / "r2.json").read_text())
    assert r["num_gt"] == 2 and r["recall"] == r2["recall"]
    assert r["recall"][-1][0] == 1.0  # the drawn rectangles are found at IoU 0.5
    assert (tmp_path / "r.png").stat().st_size > 1000


def _dies_on_second(task):
    """A worker that kills its own process on image 1 (top-level, so spawned workers can load it)."""
    import os

    if task[0] == 1:
        os._exit(3)
    return proposal_store._worker(task)


def test_dead_worker_loses_only_its_image(tmp_path, images):
    store = proposal_store.ProposalStore(tmp_path / "c", _cfg())
    todo = [(i, p, str(store.file(p)), store.options) for i, p in enumerate(images)]
    got = {}

    class Bar:
        def update(self):
            pass

    proposal_store._run_pool(todo, 2, lambda i, b, e: got.__setitem__(i, (b, e)), Bar(), store.dir,
                             worker=_dies_on_second)
    assert sorted(got) == [0, 1, 2]
    assert got[1][0] is None and "died" in got[1][1]
    assert got[0][1] is None and got[2][1] is None
    assert np.array_equal(got[0][0], store.get(images[0]))


def _always_dies(task):
    import os

    os._exit(3)


def test_workers_that_never_run_give_a_clear_error(tmp_path, images):
    store = proposal_store.ProposalStore(tmp_path / "c", _cfg())
    todo = [(i, p, str(store.file(p)), store.options) for i, p in enumerate(images[:2])]
    with pytest.raises(RuntimeError, match="__main__"):
        proposal_store._run_pool(todo, 2, lambda *a: None, None, store.dir, worker=_always_dies)


def test_max_upscale_searches_a_small_image_at_its_own_size():
    img = _scene(h=60, w=80, rects=((10, 10, 40, 40),))
    native = selective_search(img, resize=None, min_size=4)
    assert np.array_equal(selective_search(img, resize=320, min_size=4, max_upscale=1.0), native)
    assert not np.array_equal(selective_search(img, resize=320, min_size=4), native)  # 4x larger search
    p = ProposalConfig()
    assert "max_upscale" not in search.search_options(p)  # the default's cache key is unchanged
    p.max_upscale = 1.0
    assert search.search_options(p)["max_upscale"] == 1.0
