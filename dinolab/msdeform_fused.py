"""The fused multi-scale deformable attention core: ``ms_deform_attn(..., fused=True)`` of :mod:`dinolab.msdeform`.

The same numbers as the readable ``F.grid_sample`` core (:func:`dinolab.msdeform.ms_deform_attn_core_pytorch`,
the official code), computed as one weighted gather-sum (``F.embedding_bag``) with a hand-written backward:
faster on a CPU (tests/benchmarks/msdeform_speed.py). Shapes as in :mod:`dinolab.msdeform`. How and why it
works is the comment below; nothing here is needed to follow the notebooks.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# How the reference does it (official ``ms_deform_attn_core_pytorch`` = transformers' ``MultiScaleDeformableAttention``):
# per level, ``F.grid_sample`` the [B·heads, d, H, W] value map at [B·heads, Lq, P] points, giving a
# [B·heads, d, Lq, P] tensor of samples; stack the levels, multiply by the attention weights, sum. The backward
# is ``grid_sampler_2d_backward`` per level plus the backward of the big stack/multiply/sum.
#
# What we do instead. For one (batch b, query q, head h) — one output row n — bilinear sampling followed by the
# attention-weighted sum reads L levels × P points × 4 bilinear corners = K rows of the value table, each
# scaled by (attention weight × bilinear corner weight):
#
#     out[n] = Σ_k  weight[n, k] · table[index[n, k]]          (table row = (b, position, h), d floats)
#
# That is exactly ``F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)``: one fused,
# multi-threaded C++ kernel that reads each d-float value row once and writes only the [B·Lq·heads, d] output —
# no [B·heads, d, Lq, L·P] intermediate, no stack. The other tricks:
#
# 1. No permute of ``value``: [B, ΣHW, heads, d] viewed as a [B·ΣHW·heads, d] table already has one row per
#    (b, position, h), and output rows ordered (b, q, h) are already the [B, Lq, heads·d] result.
# 2. Zero padding by *real* zeros: every level gets a 2-pixel zero border. A point whose top-left corner is at
#    x0 ∈ [-1, W-1] then reads its out-of-map corners from the border (weight × 0 = 0, exactly what
#    ``padding_mode="zeros"`` means), and a point further out is clamped to x0 ∈ {-2, W}, where all four
#    corners are border zeros. So there are no validity masks, and the four corners of a point are always
#    the rows tl, tl+heads, tl+W'·heads, tl+(W'+1)·heads of the padded table (W' = W+4): one index per point.
# 3. A hand-written backward (a custom autograd Function) instead of autograd through the index/weight
#    arithmetic:
#    * per corner, g[n, k] = <grad_out[n], table[index[n, k]]>: PyTorch's fused kernel for the gradient of
#      embedding_bag's per-sample weights. From g, closed-form bilinear derivatives give the gradients of the
#      attention weights and the sampling locations (a dozen elementwise ops on [B, Lq, heads, L, P]).
#    * grad_table[r] = Σ_{(n,k): index[n,k] = r} weight[n,k] · grad_out[n] is the *transposed* gather-sum.
#      Sorting the points by their top-left row groups them by destination, so it is again embedding_bag
#      (bags = table rows, looked-up table = grad_out) — one bag per (corner, top-left row) — followed by a
#      tiny second embedding_bag that adds each real row's four corner sums (read at the corner's row shift)
#      and drops the border. Sorting the points (not the 4x more corners) keeps the sort small, and
#      embedding_bag needs no atomics. (Letting autograd differentiate F.embedding_bag w.r.t. the table
#      instead — a sort of all corners, then a row-by-row accumulation — made the whole step ~2x slower.)
#    Few, large kernels also matter: when other processes compete for the cores, every multi-threaded op
#    waits for its slowest thread, so the op count (not only the flops) sets the time.
# 4. Layout for the elementwise work: each bag lists its entries corner-major, [corner, level, point], and
#    per-level constants are small contiguous [heads, L, P] blocks rather than [L, 1] broadcasts. Both keep
#    the inner loops of the elementwise kernels long and contiguous; with a trailing 2-element corner axis
#    they ran several times slower.
# 5. int32 indices wherever they fit: embedding_bag and sort are markedly faster on them.

_INT32_LIMIT = 2**31  # use int32 indices when every table row fits (faster embedding_bag and sort)
_PAD = 2  # zero border (pixels) around each level; 2 so that clamped far-away points read only zeros


class _Geometry:
    """Index bookkeeping for one problem size, built once and cached (see :func:`_geometry`).

    The padded table has one row per (b, padded position, h); level l is stored as an (H+2·PAD) × (W+2·PAD) map.
    All per-(head, level, point) constants are small contiguous [M, L, P, ...] blocks: broadcasting a contiguous
    block gives long vectorised inner loops, whereas an [L, 1] constant (stride 0 over the points) makes
    every elementwise op step a few elements at a time — several times slower on CPU.
    """

    def __init__(self, B, Lq, M, L, P, shapes, device, dtype, int32_limit):
        hp = [h + 2 * _PAD for h, _ in shapes]
        wp = [w + 2 * _PAD for _, w in shapes]
        starts = [0]  # padded position where each level starts
        for h_, w_ in zip(hp, wp):
            starts.append(starts[-1] + h_ * w_)
        s_pad = starts.pop()
        self.n_rows = n_rows = B * s_pad * M
        self.itype = itype = torch.int32 if n_rows + (max(wp) + 1) * M < int32_limit else torch.int64

        def const(per_level, t):
            c = torch.tensor(per_level, dtype=t, device=device)
            c = c.view(1, L, 1, *c.shape[1:])
            return c.expand(M, L, P, *c.shape[3:]).contiguous()

        # (W, H) per level, matching the (x, y) order of the locations: pixel coordinate = loc · size - 0.5.
        self.size = const([(w, h) for h, w in shapes], dtype)  # [M, L, P, 2]
        self.minus_half = torch.full_like(self.size, -0.5)
        self.lowest = torch.full_like(self.size, -_PAD)  # top-left corners are clamped to [-PAD, size]
        # Table row of the (unpadded) pixel (x, y), x, y >= -PAD: origin + y · y_step + x · M.
        self.y_step = const([w_ * M for w_ in wp], itype)  # [M, L, P]
        head = torch.arange(M, dtype=itype, device=device).view(M, 1, 1)
        batch = torch.arange(B, dtype=itype, device=device).view(B, 1, 1, 1, 1) * (s_pad * M)
        self.origin = const(starts, itype) * M + head + batch + self.y_step * _PAD + _PAD * M  # [B, 1, M, L, P]
        # Corners top-left, top-right, bottom-left, bottom-right = row offsets 0, M, y_step, y_step + M.
        y = self.y_step[0]
        self.shift = torch.stack([y * 0, y * 0 + M, y, y + M])  # [4, L, P]

        # Row of every real pixel (b, s, h) in the padded table, in value's [B, ΣHW, M] order.
        inner = []
        for (h, w), w_, s0 in zip(shapes, wp, starts):
            yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            inner.append(((yy + _PAD) * w_ + xx + _PAD + s0).reshape(-1))
        pos = torch.cat(inner)  # [ΣHW] padded positions
        rows = (torch.arange(B, device=device).view(B, 1, 1) * s_pad + pos.view(1, -1, 1)) * M
        self.interior = (rows + torch.arange(M, device=device).view(1, 1, M)).reshape(-1)  # int64 (index_copy_)
        # Backward: the gradient of real row r collects corner c of the points whose top-left row is
        # r - shift_c, and those sums are stored at row c · n_rows + (r - shift_c) of the stacked corner
        # gradients. The border guarantees r - shift_c stays inside r's level.
        # output_size: repeat_interleave cannot infer it on the meta device (shape-only runs, dinolab.trace)
        level = torch.repeat_interleave(
            torch.arange(L, device=device), torch.tensor([h * w for h, w in shapes], device=device),
            output_size=sum(h * w for h, w in shapes),
        )
        level = level.view(1, -1, 1).expand(B, -1, M).reshape(-1)
        shift_of_row = self.shift[:, :, 0].to(torch.int64)[:, level]  # [4, B·ΣHW·M]
        corner = torch.arange(4, device=device).view(4, 1) * n_rows
        self.gather_rows = (self.interior + corner - shift_of_row).t().contiguous().to(itype)  # [B·ΣHW·M, 4]
        # Start of every bag's entries (the K = 4·L·P entries of bag n are n·K ... n·K + K-1).
        N, K = B * Lq * M, 4 * L * P
        self.bag_offsets = torch.arange(0, N * K, K, dtype=itype, device=device)


@functools.lru_cache(maxsize=4)
def _geometry(B, Lq, M, L, P, shapes, device, dtype, int32_limit) -> _Geometry:
    # Cached: a training loop calls the same sizes every step, and this is ~a dozen small ops we need not repeat.
    return _Geometry(B, Lq, M, L, P, shapes, device, dtype, int32_limit)


class _MSDeformAttnFunction(torch.autograd.Function):
    """value [B, ΣHW, M, D], locations [B, Lq, M, L, P, 2], weights [B, Lq, M, L, P] -> [B, Lq, M·D]."""

    @staticmethod
    def forward(ctx, value: Tensor, loc: Tensor, attn: Tensor, shapes: tuple[tuple[int, int], ...]) -> Tensor:
        B, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        N = B * Lq * M  # output rows = "bags" of the gather-sum
        geo = _geometry(B, Lq, M, L, P, shapes, value.device, value.dtype, _INT32_LIMIT)

        # Continuous pixel coordinates (grid_sample, align_corners=False): pixel centres sit at integers.
        # (Fused ops such as addcmul and out= writes below only save passes over memory / kernel launches.)
        pix = torch.addcmul(geo.minus_half, loc, geo.size)  # loc · size - 0.5, [B, Lq, M, L, P, 2]
        p0 = pix.floor()
        frac = pix - p0  # (fx, fy): weights of the right / bottom neighbours
        # Top-left corner, clamped into the border (trick 2), and its table row.
        p0 = torch.clamp(p0, min=geo.lowest, max=geo.size).to(geo.itype)
        tl = torch.addcmul(geo.origin, p0[..., 1], geo.y_step).add_(p0[..., 0], alpha=M)  # [B, Lq, M, L, P]

        # Each bag (b, q, h) lists its K = 4·L·P entries corner-major, [corner, level, point] (trick 4).
        index = (tl.view(N, 1, L, P) + geo.shift).view(N, 4 * L * P)
        # Corner weights = attention × y-weight × x-weight, written straight into the corner-major layout.
        fx, fy = frac[..., 0], frac[..., 1]
        a_bottom = attn * fy
        a_top = attn - a_bottom  # attn · (1 - fy)
        weight = attn.new_empty(B, Lq, M, 4, L, P)
        w00, w01, w10, w11 = weight.unbind(3)
        torch.mul(a_top, fx, out=w01)
        torch.sub(a_top, w01, out=w00)
        torch.mul(a_bottom, fx, out=w11)
        torch.sub(a_bottom, w11, out=w10)
        weight = weight.view(N, 4 * L * P)

        # The zero-bordered value table (trick 2): real rows copied in with one index_copy_.
        table = value.new_zeros(geo.n_rows, D).index_copy_(0, geo.interior, value.reshape(-1, D))
        out = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)

        ctx.save_for_backward(table, index, weight, tl, frac, attn)
        ctx.geo = geo
        return out.view(B, Lq, M * D)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, index, weight, tl, frac, attn = ctx.saved_tensors
        geo = ctx.geo
        B, Lq, M, L, P = tl.shape
        N, LP, D = B * Lq * M, L * P, table.shape[1]
        need_value, need_loc, need_attn = ctx.needs_input_grad[:3]
        go = grad_out.reshape(N, D).contiguous()
        grad_value = grad_loc = grad_attn = None

        if need_loc or need_attn:
            # g[n, k] = <grad_out[n], table[index[n, k]]>, the gradient of every corner weight: PyTorch's fused
            # kernel for the per-sample-weight gradient of embedding_bag (a private ATen op, stable since
            # torch 1.8; calling it directly skips the second forward pass and bag bookkeeping that
            # torch.autograd.grad through F.embedding_bag would add).
            K = index.shape[1]
            entry_bag = torch.arange(N, dtype=index.dtype, device=index.device).view(N, 1).expand(N, K).reshape(-1)
            g = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                go, table, index.view(-1), geo.bag_offsets, entry_bag, 0, -1  # mode 0 = sum, no padding_idx
            )
            g00, g01, g10, g11 = g.view(B, Lq, M, 4, L, P).unbind(3)
            fx, fy = frac[..., 0], frac[..., 1]
            # Closed-form bilinear derivatives. With corner weight attn · wy_i · wx_j, wx = (1-fx, fx),
            # wy = (1-fy, fy), and top/bottom = the x-interpolated corner gradients:
            #   d/d attn = (1-fy)·top + fy·bottom,   d/d fy = attn·(bottom - top),
            #   d/d fx   = attn·((1-fy)·(g01 - g00) + fy·(g11 - g10)).
            dx_top, dx_bottom = g01 - g00, g11 - g10
            top = torch.addcmul(g00, fx, dx_top)
            dy = torch.addcmul(g10, fx, dx_bottom).sub_(top)  # bottom - top
            if need_attn:
                grad_attn = torch.addcmul(top, fy, dy)
            if need_loc:
                # pix = loc · size - 0.5 and frac = pix - floor(pix), so d frac / d loc = size.
                grad_loc = torch.empty_like(frac)
                torch.mul(attn, torch.addcmul(dx_top, fy, dx_bottom.sub_(dx_top)), out=grad_loc[..., 0])
                torch.mul(attn, dy, out=grad_loc[..., 1])
                grad_loc.mul_(geo.size)

        if need_value:
            # Transposed gather-sum (trick 3), in two embedding_bags:
            # (a) sort the points by top-left row; then for corner c the points feeding row r + shift_c are one
            #     contiguous run, and G[c, r] = Σ_{points with tl = r} w_c · grad_out[bag] is one bag. All four
            #     corners go in one call: the sorted point list is repeated once per corner, with that corner's
            #     weights, and bag c·n_rows + r covers run r of copy c.
            n_rows = geo.n_rows
            rows_sorted, perm = torch.sort(tl.view(-1))
            counts = torch.bincount(rows_sorted, minlength=n_rows)
            starts = torch.zeros_like(counts)
            torch.cumsum(counts[:-1], 0, out=starts[1:])
            n_pts = perm.numel()
            corner = torch.arange(4, device=perm.device).view(4, 1)
            offsets = (starts + corner * n_pts).view(-1).to(geo.itype)
            bag = torch.div(perm, LP, rounding_mode="floor")  # output row (b, q, h) of each sorted point
            pos = torch.add(perm, bag, alpha=3 * LP)  # where its top-left weight sits in the [N, 4, L·P] weights
            w_sorted = weight.view(-1).index_select(0, (pos + corner * LP).view(-1))  # [4 · points]
            G = F.embedding_bag(bag.to(geo.itype).repeat(4), go, offsets, mode="sum", per_sample_weights=w_sorted)
            # (b) each real table row sums its four corner contributions, read at their shifted rows; this also
            #     drops the zero border and returns the rows in value's own [B, ΣHW, M] order.
            grad_value = F.embedding_bag(geo.gather_rows, G, mode="sum").view(B, -1, M, D)

        return grad_value, grad_loc, grad_attn, None
