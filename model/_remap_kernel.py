"""The fused CPU kernel behind `model.remap.remap`'s inference path (numba). Call `remap`, not this.

One pass over the image: for each band of rows between two low-resolution rows, those two rows
are interpolated along the columns once (into a buffer that stays in cache), then every pixel
interpolates a and b (and wc, ww) between them and applies design.md's formula

    y = clip(a * x + b, 0, 1)        u = 4 (y - wc) / ww     (z = sigmoid(u), torch's, after)

Nothing image-sized is written but y (and u). Both interpolations are lerps v0 + w (v1 - v0), so
a constant map stays constant; the weights are F.interpolate's (bilinear, align_corners=False),
passed in by the caller: per row and column as arrays, and the ds weights that repeat in every
whole band (`band_w`: row k of a band, (k + 0.5) / ds) and every interior low column
(`phase_w`) as tuples, whose length is part of their type. So ds is a compile-time constant,
the loops over a band's rows and a column's phases unroll and vectorise, and numba caches one
compiled kernel per factor on disk. tests/test_remap.py checks it against remap's plain,
differentiable path.
"""
from __future__ import annotations

import numba
import numpy as np

_ZERO, _HALF, _ONE, _FOUR = np.float32(0), np.float32(0.5), np.float32(1), np.float32(4)
_OPTIONS = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_OPTIONS)
def _columns(row, out, left, right, cw, phase_w):
    """One low-resolution row interpolated to full width."""
    ds = len(phase_w)
    w_low, w_full = row.shape[0], out.shape[0]
    half = ds // 2  # phases that lean on the previous low column
    # interior low columns whose ds outputs all lie inside the image (the maps may reach beyond
    # it: those of a larger image, for a crop at its top left)
    end = min(w_low - 1, w_full // ds)
    for j in range(1, end):
        base = j * ds
        lo, mid, hi = row[j - 1], row[j], row[j + 1]
        d_lo, d_hi = mid - lo, hi - mid
        for k in range(half):
            out[base + k] = lo + phase_w[k] * d_lo
        for k in range(half, ds):
            out[base + k] = mid + phase_w[k] * d_hi
    for c in range(min(ds, w_full)):  # the edges, where the index may be clamped
        v0 = row[left[c]]
        out[c] = v0 + cw[c] * (row[right[c]] - v0)
    for c in range(max(ds, end * ds), w_full):
        v0 = row[left[c]]
        out[c] = v0 + cw[c] * (row[right[c]] - v0)


@numba.njit(**_OPTIONS)
def _band_y(xb, yb, a0, da, b0, db, band_w):
    """A whole band, y only, column by column: each column's a, b loaded once for all its rows."""
    ds = len(band_w)
    for c in range(xb.shape[1]):
        a_, d_a, b_, d_b = a0[c], da[c], b0[c], db[c]
        for k in range(ds):
            f = band_w[k]
            yb[k, c] = min(max((a_ + f * d_a) * xb[k, c] + (b_ + f * d_b), _ZERO), _ONE)


@numba.njit(**_OPTIONS)
def _band_yu(xb, yb, ub, base, diff, band_w):
    """A whole band, y and u."""
    ds = len(band_w)
    a0, da, b0, db, w0, dw, ww0, dww = base[0], diff[0], base[1], diff[1], base[2], diff[2], base[3], diff[3]
    for c in range(xb.shape[1]):
        a_, d_a, b_, d_b = a0[c], da[c], b0[c], db[c]
        w_, d_w, ww_, d_ww = w0[c], dw[c], ww0[c], dww[c]
        for k in range(ds):
            f = band_w[k]
            v = min(max((a_ + f * d_a) * xb[k, c] + (b_ + f * d_b), _ZERO), _ONE)
            yb[k, c] = v
            ub[k, c] = _FOUR * (v - (w_ + f * d_w)) / (ww_ + f * d_ww)


@numba.njit(**_OPTIONS)
def remap_rows(x, low, left, right, cw, top, bottom, rw, r0, r1, y, u, band_w, phase_w):
    """Rows r0 .. r1 - 1 of y (and u when low has 4 maps a, b, wc, ww; 2 maps a, b: y only).

    x, y, u: (H, W) float32; low: (n, h, w) float32; left/right/cw: each column's low columns and
    weight; top/bottom/rw: each row's; band_w, phase_w: see the module's docstring. The rows may
    be any chunk of the image (threads)."""
    ds = len(band_w)
    n, w_full = low.shape[0], x.shape[1]
    rows = np.empty((2, n, w_full), dtype=np.float32)  # two low rows, along the columns
    diff = np.empty((n, w_full), dtype=np.float32)      # the lower one minus the upper one
    current, have_lower, slot = -1, -1, 0  # rows[slot] is low row `top`, rows[1 - slot] `bottom`
    r = r0
    while r < r1:
        t, b = top[r], bottom[r]
        if t != current:  # a new band: the two low rows it lies between
            if t == have_lower:
                slot = 1 - slot
            else:
                for m in range(n):
                    _columns(low[m, t], rows[slot, m], left, right, cw, phase_w)
            for m in range(n):
                _columns(low[m, b], rows[1 - slot, m], left, right, cw, phase_w)
            have_lower, current = b, t
            for m in range(n):
                lo_m, hi_m, d_m = rows[slot, m], rows[1 - slot, m], diff[m]
                for c in range(w_full):
                    d_m[c] = hi_m[c] - lo_m[c]
        base = rows[slot]
        whole = r + ds <= r1 and top[r + ds - 1] == t and b == t + 1
        if whole:
            for k in range(ds):
                whole = whole and rw[r + k] == band_w[k]
        if whole and n == 2:
            _band_y(x[r:r + ds], y[r:r + ds], base[0], diff[0], base[1], diff[1], band_w)
            r += ds
        elif whole:
            _band_yu(x[r:r + ds], y[r:r + ds], u[r:r + ds], base, diff, band_w)
            r += ds
        else:  # one row: the edges of the image and of a chunk
            f, xr, yr = rw[r], x[r], y[r]
            a0, da, b0, db = base[0], diff[0], base[1], diff[1]
            if n == 2:
                for c in range(w_full):
                    yr[c] = min(max((a0[c] + f * da[c]) * xr[c] + (b0[c] + f * db[c]), _ZERO), _ONE)
            else:
                ur, w0, dw, ww0, dww = u[r], base[2], diff[2], base[3], diff[3]
                for c in range(w_full):
                    v = min(max((a0[c] + f * da[c]) * xr[c] + (b0[c] + f * db[c]), _ZERO), _ONE)
                    yr[c] = v
                    ur[c] = _FOUR * (v - (w0[c] + f * dw[c])) / (ww0[c] + f * dww[c])
            r += 1
