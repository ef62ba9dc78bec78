"""Spatial pyramid pooling (paper section 2.2; bins as in its appendix A).

A window of h x w feature cells (inclusive) is max-pooled, for each level n,
into n x n bins; bin i spans rows `[floor(i*h/n), ceil((i+1)*h/n))` from the
window's first row, and columns likewise.  Bins may overlap, a window smaller
than n cells repeats cells, and no bin is ever empty, so every window gives a
vector of the same length: `C * sum(n*n)` (C=256, levels 1,2,3,6 -> 12,800).

Two exact implementations, selected by `method`:

- `"roi_pool"`: `torchvision.ops.roi_pool` with `spatial_scale=1` on integer,
  inclusive cell windows uses exactly this floor/ceil bin rule.  It is the
  library op and the reference; on the CPU it scans every cell of every bin
  once per channel.
- `"table"` (the CPU default): a range-max table.  The max over any bin equals
  the max of four (overlapping) power-of-two blocks, because max is
  idempotent.  Block maxima for every power-of-two height and width are built
  with elementwise maxima (log H * log W passes), stored channels-last, and
  each bin then costs four contiguous C-vector gathers, whatever its size.
  Same numbers to the bit, several times faster than roi_pool on the CPU
  (BENCHMARKS.md, "Spatial pyramid pooling").  No library offers a range-max
  query, hence the hand-written path.

`"auto"` uses roi_pool on a GPU (its CUDA kernel is fast) and for fewer than
64 windows (fine-tuning batches), the table otherwise.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.ops import roi_pool

DEFAULT_LEVELS = (1, 2, 3, 6)


def spp_length(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> int:
    return channels * sum(n * n for n in levels)


def _check_windows(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ValueError(f"windows must be an [N, 4] tensor of x1, y1, x2, y2 cells, got shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point:
        if not torch.equal(windows, windows.round()):
            raise ValueError("windows must hold integer feature-cell coordinates (see detector.core.projection)")
    if len(windows) == 0:
        return windows.long()
    w = windows.long()
    x1, y1, x2, y2 = w.unbind(1)
    bad = (x2 < x1) | (y2 < y1)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"window {i} {w[i].tolist()} has x2 < x1 or y2 < y1")
    outside = (x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height)
    if outside.any():
        i = int(torch.nonzero(outside)[0])
        raise ValueError(f"window {i} {w[i].tolist()} lies outside the {height}x{width} feature map")
    return w


def _bin_edges(start: torch.Tensor, size: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, n] first and one-past-last cell of each bin: floor(i*size/n), ceil((i+1)*size/n)."""
    i = torch.arange(n, device=start.device)
    lo = start[:, None] + torch.div(i[None] * size[:, None], n, rounding_mode="floor")
    hi = start[:, None] - torch.div(-(i[None] + 1) * size[:, None], n, rounding_mode="floor")
    return lo, hi


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    return torch.frexp(x.double())[1].long() - 1


def _range_max_table(feats: torch.Tensor, ky_max: int, kx_max: int) -> torch.Tensor:
    """T[ky, kx, y, x, :] = max of feats over rows [y, y+2^ky) and columns [x, x+2^kx).
    Entries whose block would leave the map are never read and left unset."""
    C, H, W = feats.shape
    T = feats.new_empty((ky_max + 1, kx_max + 1, H, W, C))
    T[0, 0] = feats.permute(1, 2, 0)
    for kx in range(1, kx_max + 1):
        s, v = 1 << (kx - 1), W - (1 << kx) + 1
        torch.maximum(T[0, kx - 1, :, :v], T[0, kx - 1, :, s:s + v], out=T[0, kx, :, :v])
    for ky in range(1, ky_max + 1):
        s, v = 1 << (ky - 1), H - (1 << ky) + 1
        torch.maximum(T[ky - 1, :, :v], T[ky - 1, :, s:s + v], out=T[ky, :, :v])
    return T


def _spp_table(feats: torch.Tensor, w: torch.Tensor, levels: Sequence[int], chunk: int = 64) -> torch.Tensor:
    C, H, W = feats.shape
    N, L = len(w), sum(n * n for n in levels)
    x1, y1, x2, y2 = w.unbind(1)
    hs, ws = y2 - y1 + 1, x2 - x1 + 1
    ky_max, kx_max = int(_floor_log2(hs.max())), int(_floor_log2(ws.max()))
    flat = _range_max_table(feats, ky_max, kx_max).view(-1, C)
    corners: list[list[torch.Tensor]] = [[], [], [], []]
    for n in levels:
        r0, r1 = _bin_edges(y1, hs, n)
        c0, c1 = _bin_edges(x1, ws, n)
        ky, kx = _floor_log2(r1 - r0), _floor_log2(c1 - c0)
        r_last, c_last = r1 - (1 << ky), c1 - (1 << kx)  # start of the block that ends on the bin's last cell
        base = (ky[:, :, None] * (kx_max + 1) + kx[:, None, :]) * H
        for k, (r, c) in enumerate(((r0, c0), (r0, c_last), (r_last, c0), (r_last, c_last))):
            corners[k].append(((base + r[:, :, None]) * W + c[:, None, :]).reshape(N, n * n))
    idx = [torch.cat(c, dim=1) for c in corners]  # 4 x [N, L] rows of `flat`
    out = feats.new_empty((N, spp_length(C, levels)))
    a = feats.new_empty((chunk * L, C))
    b = feats.new_empty((chunk * L, C))
    for s in range(0, N, chunk):  # chunks keep the working set in cache
        e = min(N, s + chunk)
        m = (e - s) * L
        torch.index_select(flat, 0, idx[0][s:e].reshape(-1), out=a[:m])
        for k in (1, 2, 3):
            torch.index_select(flat, 0, idx[k][s:e].reshape(-1), out=b[:m])
            torch.maximum(a[:m], b[:m], out=a[:m])
        bins = a[:m].view(e - s, L, C)
        col = bin_ = 0
        for n in levels:  # channels-last bins -> [channel][bin_y][bin_x] blocks
            out[s:e, col:col + C * n * n].view(e - s, C, n * n).copy_(bins[:, bin_:bin_ + n * n].transpose(1, 2))
            col += C * n * n
            bin_ += n * n
    return out


def _spp_roi_pool(feats: torch.Tensor, w: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    n = len(w)
    rois = torch.cat([torch.zeros(n, 1, dtype=feats.dtype, device=feats.device),
                      w.to(device=feats.device, dtype=feats.dtype)], dim=1)
    blocks = [roi_pool(feats[None], rois, (lv, lv), spatial_scale=1.0).reshape(n, -1) for lv in levels]
    return torch.cat(blocks, dim=1)


def spatial_pyramid_pool(features: torch.Tensor, windows: torch.Tensor,
                         levels: Sequence[int] = DEFAULT_LEVELS, method: str = "auto") -> torch.Tensor:
    """Pool each window of a [C, H, W] feature map into a fixed-length vector.

    `windows`: integer [N, 4] tensor of inclusive, 0-based cell coordinates
    `x1, y1, x2, y2`.  Returns [N, C * sum(n*n)]: one block per level in the
    order given; inside a block the layout is [channel][bin_y][bin_x].
    `method`: "auto", "table" or "roi_pool" (identical results; see above).
    The table path has no autograd; use roi_pool to backpropagate into features.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [C, H, W], got shape {tuple(features.shape)}")
    C, H, W = features.shape
    w = _check_windows(windows, H, W).to(features.device)
    feats = features if features.dtype in (torch.float32, torch.float64) else features.float()
    if len(w) == 0:
        return feats.new_zeros((0, spp_length(C, levels)))
    if method == "auto":
        # The table costs a fixed build per map; for a handful of windows scanning them directly is cheaper.
        direct = feats.is_cuda or (feats.requires_grad and torch.is_grad_enabled()) or len(w) < 64
        method = "roi_pool" if direct else "table"
    if method == "table":
        return _spp_table(feats, w, levels)
    if method == "roi_pool":
        return _spp_roi_pool(feats, w, levels)
    raise ValueError(f"method must be 'auto', 'table' or 'roi_pool', got {method!r}")


class SpatialPyramidPooling(nn.Module):
    """SPP as a layer.

    `forward(features [B, C, H, W], windows [N, 5])` with rows
    `(batch_index, x1, y1, x2, y2)` in cells, or `forward(features)` alone,
    which pools each whole map (one window per image): either way any input
    size gives `C * sum(n*n)` values per window.
    """

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS):
        super().__init__()
        self.levels = tuple(int(n) for n in levels)

    def output_length(self, channels: int) -> int:
        return spp_length(channels, self.levels)

    def forward(self, features: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(f"features must be [B, C, H, W], got shape {tuple(features.shape)}")
        B, C, H, W = features.shape
        if windows is None:
            windows = torch.tensor([[b, 0, 0, W - 1, H - 1] for b in range(B)], device=features.device)
        if windows.ndim != 2 or windows.shape[1] != 5:
            raise ValueError("windows must be [N, 5]: batch index, x1, y1, x2, y2")
        out = features.new_empty((len(windows), self.output_length(C)))
        for b in range(B):  # a loop over images, never over windows
            sel = torch.nonzero(windows[:, 0] == b).flatten()
            if len(sel):
                out[sel] = spatial_pyramid_pool(features[b], windows[sel, 1:], self.levels)
        return out

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
