"""Multi-scale deformable attention: parity with transformers' pure-PyTorch reference, a brute-force loop,
gradcheck, the official init, and input validation. Everything is CPU and offline (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DeformableDetrConfig  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import (  # noqa: E402
    DeformableDetrMultiscaleDeformableAttention,
    MultiScaleDeformableAttention,
)

import dinolab.msdeform_fused as msd_fused  # noqa: E402
from dinolab.msdeform import MSDeformAttn, ms_deform_attn  # noqa: E402

SHAPES = [(5, 7), (3, 2), (4, 1)]  # non-square levels, including a 1-pixel-wide one


def _inputs(B=2, shapes=SHAPES, M=3, D=4, P=3, Lq=17, dtype=torch.float64, lo=-0.4, hi=1.4, seed=0):
    """Random core inputs; sampling locations in [lo, hi] so many points fall (partly) outside the map."""
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    loc = lo + (hi - lo) * torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=dtype)
    attn = torch.rand(B, Lq, M, L, P, generator=g, dtype=dtype)
    return value, loc, attn


def _hf_core(value, shapes, loc, attn):
    st = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([st.new_zeros(1), st.prod(1).cumsum(0)[:-1]])
    return MultiScaleDeformableAttention()(value, st, [tuple(s) for s in shapes], start, loc, attn, 64)


def _grads(fn, value, loc, attn, grad_out=None):
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(*ins)
    if grad_out is None:
        grad_out = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    return out.detach(), [t.grad for t in ins], grad_out


# ------------------------------------------------------------------------------------------------------ core


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
@pytest.mark.parametrize("B,shapes", [(2, SHAPES), (1, [(6, 4)]), (3, [(1, 1), (2, 3)])])
def test_core_matches_transformers_forward_and_grads_float64(B, shapes, fused):
    value, loc, attn = _inputs(B=B, shapes=shapes)
    out_ref, grads_ref, go = _grads(lambda v, l, a: _hf_core(v, shapes, l, a), value, loc, attn)
    out, grads, _ = _grads(lambda v, l, a: ms_deform_attn(v, torch.tensor(shapes), l, a, fused=fused), value, loc, attn,
                           go)
    assert out.shape == (B, loc.shape[1], value.shape[2] * value.shape[3])
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    for name, g, g_ref in zip(["value", "sampling_locations", "attention_weights"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-11, rtol=1e-11, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
def test_core_float32_close_to_transformers(fused):
    value, loc, attn = _inputs(B=2, M=4, D=8, P=4, Lq=40, dtype=torch.float32)
    out_ref, grads_ref, go = _grads(lambda v, l, a: _hf_core(v, SHAPES, l, a), value, loc, attn)
    out, grads, _ = _grads(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a, fused=fused), value, loc, attn, go)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def _bilinear_brute(vmap, x, y):
    """vmap [H, W, D]; (x, y) normalised; bilinear with zero padding, align_corners=False — written out."""
    H, W, D = vmap.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(D, dtype=vmap.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * vmap[yy, xx]
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
def test_core_matches_bruteforce_loop(fused):
    shapes = [(3, 4), (2, 1)]
    B, M, D, P, Lq = 2, 2, 3, 2, 5
    value, loc, attn = _inputs(B=B, shapes=shapes, M=M, D=D, P=P, Lq=Lq, lo=-0.3, hi=1.3, seed=3)
    ref = torch.zeros(B, Lq, M, D, dtype=value.dtype)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(B):
        for q in range(Lq):
            for h in range(M):
                for lvl, ((H, W), s0) in enumerate(zip(shapes, starts)):
                    vmap = value[b, s0 : s0 + H * W, h].reshape(H, W, D)
                    for p in range(P):
                        x, y = loc[b, q, h, lvl, p].tolist()
                        ref[b, q, h] += attn[b, q, h, lvl, p] * _bilinear_brute(vmap, x, y)
    out = ms_deform_attn(value, shapes, loc, attn, fused=fused)
    torch.testing.assert_close(out, ref.reshape(B, Lq, M * D), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
def test_core_known_values(fused):
    """Pixel centres read the pixel exactly; the corner (0, 0) reads a quarter of pixel (0, 0)."""
    H, W = 2, 3
    value = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1, 1) + 1.0  # pixel (i, j) = 3i + j + 1
    centres = [((j + 0.5) / W, (i + 0.5) / H) for i in range(H) for j in range(W)]
    loc = torch.tensor(centres + [(0.0, 0.0), (2.0, 2.0)], dtype=torch.float64).view(1, -1, 1, 1, 1, 2)
    attn = torch.ones(1, loc.shape[1], 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(H, W)], loc, attn, fused=fused).flatten()
    expected = torch.tensor([1, 2, 3, 4, 5, 6, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
def test_core_gradcheck(fused):
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = _inputs(B=1, shapes=shapes, M=2, D=2, P=2, Lq=3, lo=-0.2, hi=1.2, seed=5)
    # keep every point away from the pixel grid, where bilinear interpolation has kinks
    for lvl, (H, W) in enumerate(shapes):
        for k, n in ((0, W), (1, H)):
            c = loc[..., lvl, :, k] * n - 0.5
            frac = c - c.floor()
            loc[..., lvl, :, k] = (c.floor() + 0.15 + 0.7 * frac + 0.5) / n
    ins = tuple(t.clone().requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, l, a, fused=fused), ins, eps=1e-6,
                                    atol=1e-8)


def test_core_int64_index_path(monkeypatch):
    """Fused core: tables too big for int32 indices switch to int64: same numbers (forced here with a tiny limit)."""
    value, loc, attn = _inputs(B=2)
    out32, grads32, go = _grads(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a, fused=True), value, loc, attn)
    monkeypatch.setattr(msd_fused, "_INT32_LIMIT", 0)  # the fused core lives in dinolab.msdeform_fused
    out64, grads64, _ = _grads(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a, fused=True), value, loc, attn, go)
    torch.testing.assert_close(out64, out32, atol=0, rtol=0)
    for g, g_ref in zip(grads64, grads32):
        torch.testing.assert_close(g, g_ref, atol=0, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["grid_sample", "fused"])
def test_core_no_grad_and_partial_grads(fused):
    value, loc, attn = _inputs(B=1)
    with torch.no_grad():
        ref = ms_deform_attn(value, SHAPES, loc, attn, fused=fused)
    v = value.clone().requires_grad_(True)  # only value needs a gradient
    out = ms_deform_attn(v, SHAPES, loc, attn, fused=fused)
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    _, grads_ref, _ = _grads(lambda a, b, c: _hf_core(a, SHAPES, b, c), value, loc, attn, torch.ones_like(ref))
    torch.testing.assert_close(v.grad, grads_ref[0], atol=1e-12, rtol=1e-12)


def test_fused_core_equals_the_grid_sample_core():
    """The fused gather-sum (fused=True) and the official grid_sample core: same output and gradients (float64),
    also through the module."""
    value, loc, attn = _inputs(B=2, M=4, D=5, P=3, Lq=23, seed=7)
    out, grads, go = _grads(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a), value, loc, attn)
    out_f, grads_f, _ = _grads(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a, fused=True), value, loc, attn, go)
    torch.testing.assert_close(out_f, out, atol=1e-12, rtol=1e-12)
    for g_f, g in zip(grads_f, grads):
        torch.testing.assert_close(g_f, g, atol=1e-11, rtol=1e-11)
    m = MSDeformAttn(24, n_levels=len(SHAPES), n_heads=3, n_points=2).double()
    _randomise(m)
    query, feat, ref = _module_inputs(2, 9, 24, SHAPES)
    plain = m(query, ref, feat, torch.tensor(SHAPES))
    m.fused = True
    torch.testing.assert_close(m(query, ref, feat, torch.tensor(SHAPES)), plain, atol=1e-12, rtol=1e-12)
    assert MSDeformAttn(24, n_levels=3, n_heads=3, fused=True).fused


def test_core_bad_inputs():
    value, loc, attn = _inputs(B=1)
    with pytest.raises(ValueError, match=r"ΣHW .* != value.shape\[1\]"):
        ms_deform_attn(value, [(5, 7), (3, 2), (4, 2)], loc, attn)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value[:, :35], [(5, 7)], loc, attn)
    with pytest.raises(ValueError, match="attention_weights shape"):
        ms_deform_attn(value, SHAPES, loc, attn[..., :2])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ms_deform_attn(value, SHAPES, loc[..., 0], attn)
    with pytest.raises(ValueError, match="heads"):
        ms_deform_attn(value, SHAPES, loc[:, :, :2], attn[:, :, :2])
    with pytest.raises(ValueError, match="value must be"):
        ms_deform_attn(value[0], SHAPES, loc, attn)
    with pytest.raises(ValueError, match=r"\[L, 2\]"):
        ms_deform_attn(value, torch.tensor([35, 6, 4]), loc, attn)


# ---------------------------------------------------------------------------------------------------- module


def _hf_module(d_model, heads, levels, points):
    cfg = DeformableDetrConfig(
        d_model=d_model, encoder_attention_heads=heads, num_feature_levels=levels, encoder_n_points=points
    )
    return DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=heads, n_points=points)


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _module_inputs(B, Lq, d_model, shapes, ref_dim=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    query = torch.randn(B, Lq, d_model, generator=g, dtype=dtype)
    feat = torch.randn(B, S, d_model, generator=g, dtype=dtype)
    ref = torch.rand(B, Lq, len(shapes), ref_dim, generator=g, dtype=dtype)
    if ref_dim == 4:
        ref[..., 2:] = 0.1 + 0.5 * ref[..., 2:]  # box sizes
    return query, feat, ref


@pytest.mark.parametrize("ref_dim,use_mask", [(2, False), (2, True), (4, True)])
def test_module_matches_transformers(ref_dim, use_mask):
    d_model, heads, points = 24, 3, 2
    shapes = SHAPES
    st = torch.tensor(shapes)
    start = torch.cat([st.new_zeros(1), st.prod(1).cumsum(0)[:-1]])
    ours = MSDeformAttn(d_model, n_levels=len(shapes), n_heads=heads, n_points=points).double()
    _randomise(ours)
    peer = _hf_module(d_model, heads, len(shapes), points).double()
    peer.load_state_dict(ours.state_dict())  # identical parameter names

    query, feat, ref = _module_inputs(2, 9, d_model, shapes, ref_dim)
    pad = None
    if use_mask:
        pad = torch.zeros(2, feat.shape[1], dtype=torch.bool)
        pad[0, 30:35] = True  # bottom row of level 0 in image 0
        pad[1, 35:] = True  # levels 1 and 2 of image 1
    out = ours(query, ref, feat, st, start, pad)
    out_ref, _ = peer(
        hidden_states=query,
        attention_mask=None if pad is None else ~pad,  # HF: True = valid; official: True = padding
        encoder_hidden_states=feat,
        position_embeddings=None,  # HF would add it to the query
        reference_points=ref,
        spatial_shapes=st,
        spatial_shapes_list=shapes,
        level_start_index=start,
    )
    assert out.shape == (2, 9, d_model)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    if use_mask:  # the mask matters
        assert not torch.allclose(out, ours(query, ref, feat, st, start, None))


def test_module_gradients_match_transformers():
    d_model, heads, points = 16, 2, 3
    shapes = [(4, 5), (2, 3)]
    st = torch.tensor(shapes)
    ours = MSDeformAttn(d_model, n_levels=2, n_heads=heads, n_points=points).double()
    _randomise(ours, seed=4)
    peer = _hf_module(d_model, heads, 2, points).double()
    peer.load_state_dict(ours.state_dict())
    query, feat, ref = _module_inputs(2, 7, d_model, shapes)
    go = torch.randn(2, 7, d_model, dtype=torch.float64)
    ours(query, ref, feat, st, None).backward(go)
    peer(query, None, feat, None, None, ref, st, shapes, None)[0].backward(go)
    for (name, p), p_ref in zip(ours.named_parameters(), peer.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-11, rtol=1e-11, msg=lambda m: f"{name}: {m}")


def test_module_ratio_half():
    """DINOv3 adapter setting: value/output projections through int(d_model * ratio) channels."""
    d_model, heads, points, shapes = 32, 4, 2, [(4, 4)]
    m = MSDeformAttn(d_model, n_levels=1, n_heads=heads, n_points=points, ratio=0.5).double()
    assert m.value_proj.weight.shape == (16, 32) and m.output_proj.weight.shape == (32, 16)
    _randomise(m, seed=2)
    query, feat, ref = _module_inputs(2, 6, d_model, shapes)
    st = torch.tensor(shapes)
    out = m(query, ref, feat, st, torch.tensor([0]))
    # the same computation spelled out with transformers' core
    value = m.value_proj(feat).view(2, 16, heads, 16 // heads)
    off = m.sampling_offsets(query).view(2, 6, heads, 1, points, 2)
    attn = m.attention_weights(query).view(2, 6, heads, points).softmax(-1).view(2, 6, heads, 1, points)
    loc = ref[:, :, None, :, None, :] + off / torch.tensor([4.0, 4.0], dtype=torch.float64)
    expected = m.output_proj(_hf_core(value, shapes, loc, attn))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_module_init():
    heads, levels, points = 8, 2, 3
    m = MSDeformAttn(64, n_levels=levels, n_heads=heads, n_points=points)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    assert torch.count_nonzero(m.value_proj.bias) == 0 and torch.count_nonzero(m.output_proj.bias) == 0
    # zero attention logits -> uniform weights over the L*P samples of a head
    logits = m.attention_weights(torch.randn(5, 64)).view(5, heads, levels * points)
    torch.testing.assert_close(logits.softmax(-1), torch.full_like(logits, 1 / (levels * points)))
    # offsets at init: head h points in direction 2πh/heads, on the unit square, point i at distance i+1
    bias = m.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    unit = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for i in range(points):
        for lvl in range(levels):
            torch.testing.assert_close(bias[:, lvl, i], unit * (i + 1), atol=1e-5, rtol=0)
    # xavier-uniform projections: |w| <= sqrt(6 / (fan_in + fan_out))
    assert m.value_proj.weight.abs().max() <= math.sqrt(6 / 128) + 1e-6


def test_module_bad_inputs():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(30, n_heads=4)
    with pytest.raises(ValueError, match=r"int\(d_model \* ratio\)"):
        MSDeformAttn(64, n_heads=16, ratio=0.3)  # int(19.2) = 19 channels cannot be split in 16 heads
    MSDeformAttn(1024, n_levels=1, n_heads=16, ratio=0.5)  # the DINOv3 adapter's setting is fine
    m = MSDeformAttn(16, n_levels=2, n_heads=2, n_points=1)
    shapes = torch.tensor([(4, 5), (2, 3)])
    query, feat, ref = _module_inputs(1, 3, 16, [(4, 5), (2, 3)], dtype=torch.float32)
    with pytest.raises(ValueError, match="input_flatten.shape"):
        m(query, ref, feat[:, :-1], shapes, None)
    with pytest.raises(ValueError, match="n_levels"):
        m(query, ref, feat[:, :20], shapes[:1], None)
    with pytest.raises(ValueError, match="2 or 4"):
        m(query, torch.rand(1, 3, 2, 3), feat, shapes, None)
    with pytest.raises(ValueError, match="reference_points must be"):
        m(query, ref[:, :, :1], feat, shapes, None)
