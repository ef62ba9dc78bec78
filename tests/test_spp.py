"""SPP against a naive per-window loop written from the paper's bin rule (appendix A)."""
import math

import pytest
import torch

from detector.core.spp import SpatialPyramidPooling, spatial_pyramid_pool, spp_length

LEVELS = (1, 2, 3, 6)


def naive_spp(f, windows, levels=LEVELS):
    out = []
    for x1, y1, x2, y2 in windows.tolist():
        h, w = y2 - y1 + 1, x2 - x1 + 1
        parts = []
        for n in levels:
            blk = torch.empty(f.shape[0], n, n, dtype=f.dtype)
            for i in range(n):
                for j in range(n):
                    r0, r1 = y1 + math.floor(i * h / n), y1 + math.ceil((i + 1) * h / n)
                    c0, c1 = x1 + math.floor(j * w / n), x1 + math.ceil((j + 1) * w / n)
                    assert r1 > r0 and c1 > c0  # no bin is ever empty
                    blk[:, i, j] = f[:, r0:r1, c0:c1].amax(dim=(1, 2))
            parts.append(blk.reshape(-1))  # [channel][bin_y][bin_x]
        out.append(torch.cat(parts))
    return torch.stack(out)


def edge_windows(H, W):
    """1x1 windows, windows thinner than 6 bins, windows on every border, the whole map."""
    w = [[0, 0, 0, 0], [W - 1, H - 1, W - 1, H - 1], [0, H - 1, 0, H - 1], [W - 1, 0, W - 1, 0],
         [0, 0, W - 1, H - 1], [3, 2, 3, 9], [1, 5, 12, 5], [0, 0, 1, 2], [W - 2, H - 3, W - 1, H - 1],
         [0, 4, 4, H - 1], [W - 5, 0, W - 1, 4], [2, 0, 6, 0], [5, 5, 7, 6]]
    return torch.tensor(w)


def random_windows(g, H, W, n):
    x1 = torch.randint(0, W, (n,), generator=g)
    y1 = torch.randint(0, H, (n,), generator=g)
    x2 = torch.minimum(x1 + torch.randint(0, W, (n,), generator=g), torch.tensor(W - 1))
    y2 = torch.minimum(y1 + torch.randint(0, H, (n,), generator=g), torch.tensor(H - 1))
    return torch.stack([x1, y1, x2, y2], 1)


@pytest.mark.parametrize("method", ["table", "roi_pool"])
@pytest.mark.parametrize("shape", [(8, 13, 17), (3, 1, 1), (5, 7, 2), (4, 40, 33)])
def test_matches_naive_loop(method, shape):
    C, H, W = shape
    g = torch.Generator().manual_seed(C * 1000 + H * 10 + W)
    f = torch.randn(C, H, W, generator=g)
    win = random_windows(g, H, W, 60)
    win = torch.cat([win, edge_windows(H, W).clamp(min=0).minimum(torch.tensor([W - 1, H - 1, W - 1, H - 1]))])
    got = spatial_pyramid_pool(f, win, LEVELS, method=method)
    assert got.shape == (len(win), spp_length(C, LEVELS)) == (len(win), C * 50)
    assert torch.equal(got, naive_spp(f, win))


def test_methods_agree_bitwise_on_realistic_map():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(32, 43, 58, generator=g)
    win = random_windows(g, 43, 58, 500)
    assert torch.equal(spatial_pyramid_pool(f, win, method="table"), spatial_pyramid_pool(f, win, method="roi_pool"))


def test_other_levels_and_float16_input():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, 20, 20, generator=g).half()
    win = random_windows(g, 20, 20, 30)
    got = spatial_pyramid_pool(f, win, levels=(4, 1))
    assert torch.equal(got, naive_spp(f.float(), win, levels=(4, 1)))


@pytest.mark.parametrize("levels", [(3, 6, 2, 1), (5, 2, 10, 4), (8, 4, 2, 1, 7), (2, 2, 4)])
def test_table_handles_any_level_list_in_any_order(levels):
    # unsorted, repeated and non-dividing levels, windows on every border and single cells
    g = torch.Generator().manual_seed(3)
    f = torch.randn(5, 26, 31, generator=g)
    win = torch.cat([random_windows(g, 26, 31, 120), torch.tensor([[0, 0, 30, 25], [4, 7, 4, 7], [0, 25, 30, 25]])])
    got = spatial_pyramid_pool(f, win, levels=levels, method="table")
    assert torch.equal(got, naive_spp(f, win, levels=levels))


def test_fixed_length_whatever_the_window():
    f = torch.randn(4, 30, 30)
    lens = {spatial_pyramid_pool(f, torch.tensor([[0, 0, s, s]])).shape[1] for s in range(30)}
    assert lens == {4 * 50}


@pytest.mark.parametrize("bad,msg", [
    ([[5, 0, 4, 3]], "x2 < x1"),
    ([[0, 3, 2, 1]], "y2 < y1"),
    ([[0, 0, 10, 3]], "outside"),
    ([[-1, 0, 2, 3]], "outside"),
    ([[0, 0, 2.5, 3]], "integer"),
])
def test_bad_windows_raise(bad, msg):
    f = torch.randn(2, 6, 10)
    with pytest.raises(ValueError, match=msg):
        spatial_pyramid_pool(f, torch.tensor(bad))


def test_empty_windows():
    assert spatial_pyramid_pool(torch.randn(3, 5, 5), torch.zeros((0, 4), dtype=torch.long)).shape == (0, 150)


def test_module_any_input_size_gives_fixed_length_and_matches_function():
    layer = SpatialPyramidPooling(LEVELS)
    for H, W in [(7, 9), (13, 5), (1, 1)]:
        x = torch.randn(2, 3, H, W)
        y = layer(x)
        assert y.shape == (2, 150)
        whole = torch.tensor([[0, 0, W - 1, H - 1]])
        assert torch.equal(y[1], spatial_pyramid_pool(x[1], whole)[0])
    x = torch.randn(2, 3, 10, 12)
    win = torch.tensor([[1, 0, 0, 5, 5], [0, 2, 3, 11, 9], [1, 4, 4, 4, 4]])
    y = layer(x, win)
    for k, (b, *w) in enumerate(win.tolist()):
        assert torch.equal(y[k], naive_spp(x[b], torch.tensor([w]))[0])


def test_module_backpropagates_through_roi_pool():
    layer = SpatialPyramidPooling((1, 2))
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
