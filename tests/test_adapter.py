"""DINOv3 adapter: shapes, official key names, freezing, the injector variant, errors, state-dict round trip.

Small and fast: the tiny backbone (D=192, 6 blocks), a narrow SPM (conv_inplane=16), 64×64-ish images.
ViT-L at 512×512 is checked on the meta device (shapes and keys only, no memory, no arithmetic).
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from dinolab.adapter import (
    ConvFFN, DINOv3_Adapter, DINOv3Adapter, DWConv, Extractor, Injector, InteractionBlockWithCls,
    SpatialPriorModule, deform_inputs, drop_path, get_reference_points,
)
from dinolab.msdeform import MSDeformAttn
from dinolab.trace import trace
from dinolab.hub import dinov3_vitl16, dinov3_vittiny16

IDX = [1, 2, 4, 5]  # 4 of the tiny model's 6 blocks
SMALL = dict(interaction_indexes=IDX, conv_inplane=16, deform_num_heads=4)  # int(192 * 0.5) = 96 = 4 × 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: on a shared, busy CPU one thread is ~10× faster than two contending."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dinov3_vittiny16().eval()


def make(backbone, seed=0, **kw):
    torch.manual_seed(seed)
    return DINOv3Adapter(backbone, **{**SMALL, **kw})


def weighted_sum(out: dict, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for v in out.values())


# ----------------------------------------------------------------------------------------------- small pieces


def test_reference_points_are_pixel_centres():
    ref = get_reference_points([(2, 3), (1, 2)], "cpu")
    assert ref.shape == (1, 6 + 2, 1, 2)
    xs = (torch.arange(3) + 0.5) / 3
    ys = (torch.arange(2) + 0.5) / 2
    expect0 = torch.stack([xs.repeat(2), ys.repeat_interleave(3)], -1)  # row-major, (x, y)
    torch.testing.assert_close(ref[0, :6, 0], expect0)
    torch.testing.assert_close(ref[0, 6:, 0], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_deform_inputs_shapes():
    d1, d2 = deform_inputs(torch.zeros(1, 3, 64, 96), 16)
    ref1, shapes1, start1 = d1
    ref2, shapes2, start2 = d2
    # injector: ViT tokens (4×6) read the three SPM levels
    assert ref1.shape == (1, 24, 1, 2)
    assert shapes1.tolist() == [[8, 12], [4, 6], [2, 3]] and start1.tolist() == [0, 96, 120]
    # extractor: SPM tokens (96 + 24 + 6) read the ViT map
    assert ref2.shape == (1, 126, 1, 2)
    assert shapes2.tolist() == [[4, 6]] and start2.tolist() == [0]
    assert shapes1.dtype == start1.dtype == torch.long
    # 512×512, the seed's setting
    d1, d2 = deform_inputs(torch.empty(4, 3, 512, 512, device="meta"), 16)
    assert d1[0].shape == (1, 1024, 1, 2) and d1[2].tolist() == [0, 4096, 5120]
    assert d2[0].shape == (1, 5376, 1, 2) and d2[1].tolist() == [[32, 32]]


def test_dwconv_is_per_level_depthwise_conv():
    m = DWConv(8)
    H, W = 4, 6
    x = torch.randn(2, 96 + 24 + 6, 8)  # (8×12) + (4×6) + (2×3) = 126 tokens
    out = m(x, H, W)
    parts = x.split([96, 24, 6], 1)
    ref = [
        F.conv2d(p.transpose(1, 2).reshape(2, 8, h, w), m.dwconv.weight, m.dwconv.bias, padding=1, groups=8)
        .flatten(2).transpose(1, 2)
        for p, (h, w) in zip(parts, [(8, 12), (4, 6), (2, 3)])
    ]
    torch.testing.assert_close(out, torch.cat(ref, 1))
    with pytest.raises(ValueError, match="three SPM levels"):
        m(x[:, :-1], H, W)


def test_convffn_and_extractor_shapes():
    ffn = ConvFFN(32, hidden_features=8)
    assert ffn(torch.randn(2, 126, 32), 4, 6).shape == (2, 126, 32)
    d1, d2 = deform_inputs(torch.zeros(2, 3, 64, 96), 16)
    ext = Extractor(32, num_heads=4, n_points=2, deform_ratio=0.5, cffn_ratio=0.25)
    c, vit = torch.randn(2, 126, 32), torch.randn(2, 24, 32)
    assert ext(c, d2[0], vit, d2[1], d2[2], 4, 6).shape == (2, 126, 32)
    inj = Injector(32, num_heads=4, n_points=2, n_levels=3, deform_ratio=0.5, init_values=0.0)
    torch.testing.assert_close(inj(vit, d1[0], c, d1[1], d1[2]), vit)  # gamma = 0: identity
    inj.gamma.data.fill_(1.0)
    assert not torch.allclose(inj(vit, d1[0], c, d1[1], d1[2]), vit)


def test_drop_path():
    x = torch.ones(1000, 3)
    assert drop_path(x, 0.3, training=False) is x
    y = drop_path(x, 0.3, training=True)
    kept = y[:, 0] != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert (y == y[:, :1]).all()  # per sample


def test_spm_shapes_and_keys():
    spm = SpatialPriorModule(inplanes=16, embed_dim=48)
    c1, c2, c3, c4 = spm(torch.randn(2, 3, 64, 96))
    assert c1.shape == (2, 48, 16, 24)
    assert c2.shape == (2, 8 * 12, 48) and c3.shape == (2, 4 * 6, 48) and c4.shape == (2, 2 * 3, 48)
    with pytest.raises(ValueError, match="3, H, W"):
        spm(torch.randn(2, 4, 64, 64))


# ----------------------------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (96, 32), (32, 128)])
def test_output_keys_shapes_strides(tiny, hw):
    a = make(tiny).eval()
    H, W = hw
    out = a(torch.randn(2, 3, H, W))
    assert list(out) == ["1", "2", "3", "4"]
    for key, stride in zip(out, (4, 8, 16, 32)):
        assert out[key].shape == (2, 192, H // stride, W // stride), (key, out[key].shape)
        assert torch.isfinite(out[key]).all()


def test_official_class_name_alias():
    assert DINOv3_Adapter is DINOv3Adapter


def _official_adapter_keys(n_interactions: int, with_extra: bool = True) -> set[str]:
    """The official adapter's own state-dict keys, written out from the module tree of dinov3_adapter.py."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"level_embed", "up.weight", "up.bias"}
    keys |= {f"norm{i}.{b}" for i in range(1, 5) for b in bn}
    for i in (0, 3, 6):
        keys.add(f"spm.stem.{i}.weight")
        keys |= {f"spm.stem.{i + 1}.{b}" for b in bn}
    for name in ("conv2", "conv3", "conv4"):
        keys.add(f"spm.{name}.0.weight")
        keys |= {f"spm.{name}.1.{b}" for b in bn}
    keys |= {f"spm.fc{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")}
    extractor = [f"{n}.{p}" for n in (
        "query_norm", "feat_norm", "attn.sampling_offsets", "attn.attention_weights", "attn.value_proj",
        "attn.output_proj", "ffn.fc1", "ffn.dwconv.dwconv", "ffn.fc2", "ffn_norm") for p in ("weight", "bias")]
    for i in range(n_interactions):
        keys |= {f"interactions.{i}.extractor.{k}" for k in extractor}
    if with_extra:
        last = n_interactions - 1
        keys |= {f"interactions.{last}.extra_extractors.{j}.{k}" for j in (0, 1) for k in extractor}
    return keys


def test_vitl_512_meta_shapes_keys_and_size():
    bb = dinov3_vitl16(device="meta")
    a = DINOv3Adapter(bb, interaction_indexes=[4, 11, 17, 23], device="meta")
    x = torch.empty(4, 3, 512, 512, device="meta")
    out = a(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "1": (4, 1024, 128, 128), "2": (4, 1024, 64, 64), "3": (4, 1024, 32, 32), "4": (4, 1024, 16, 16)}

    # the tensor-flow table: SPM c1 map + c2/c3/c4 tokens; extractor query c = 5376 tokens
    t = trace(a, x, max_depth=1)
    rows = {r.name: r for r in t}
    assert rows["spm"].output == "([4,1024,128,128], [4,4096,1024], [4,1024,1024], [4,256,1024])"
    assert rows["interactions.0-3"].output == "([4,1024,1024], [4,5376,1024], [4,1024])"
    assert rows["up"].input == "[4,1024,64,64]" and rows["up"].output == "[4,1024,128,128]"

    # keys: official adapter keys + the backbone's own keys under "backbone."
    sd_keys = set(a.state_dict())
    assert sd_keys == _official_adapter_keys(4) | {f"backbone.{k}" for k in bb.state_dict()}
    shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    assert shapes["interactions.0.extractor.attn.sampling_offsets.weight"] == (16 * 1 * 4 * 2, 1024)
    assert shapes["interactions.0.extractor.attn.attention_weights.weight"] == (16 * 4, 1024)
    assert shapes["interactions.0.extractor.attn.value_proj.weight"] == (512, 1024)
    assert shapes["interactions.0.extractor.ffn.fc1.weight"] == (256, 1024)
    assert shapes["interactions.0.extractor.ffn.dwconv.dwconv.weight"] == (256, 1, 3, 3)
    assert shapes["spm.stem.0.weight"] == (64, 3, 3, 3) and shapes["spm.fc4.weight"] == (1024, 256, 1, 1)
    assert shapes["up.weight"] == (1024, 1024, 2, 2) and shapes["level_embed"] == (3, 1024)

    # trainable size: ≈16.7M per the reference notes; counted here independently from the structure
    D, M, P, h = 1024, 16, 4, 256
    extractor = (3 * 2 * D + (D + 1) * M * P * 2 + (D + 1) * M * P + (D + 1) * D // 2 + (D // 2 + 1) * D
                 + (D + 1) * h + 10 * h + (h + 1) * D)
    spm = (9 * (3 * 64 + 64 * 64 * 2 + 64 * 128 + 128 * 256 + 256 * 256) + 2 * (3 * 64 + 128 + 256 + 256)
           + (64 + 128 + 256 + 256 + 4) * D)
    expected = 6 * extractor + spm + 3 * D + (4 * D * D + D) + 4 * 2 * D
    trainable = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert trainable == expected
    assert 16.6e6 < trainable < 16.75e6
    assert not any(p.requires_grad for p in a.backbone.parameters())


def test_no_extra_extractor_keys(tiny):
    a = make(tiny, use_extra_extractor=False)
    own = {k for k in a.state_dict() if not k.startswith("backbone.")}
    assert own == _official_adapter_keys(4, with_extra=False)


def test_gradients_reach_adapter_not_backbone(tiny):
    a = make(tiny, drop_path_rate=0.0).train()
    assert not a.backbone.training  # frozen backbone stays in eval
    before = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    weighted_sum(a(torch.randn(2, 3, 64, 64))).backward()
    for name, p in a.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            # At the official init the offset/attention-weight Linears have zero weights, so query_norm
            # (read only through them) gets a zero gradient on the first step; everything else moves.
            if ".query_norm." not in name:
                assert p.grad.abs().sum() > 0, name
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpointing_changes_nothing(tiny):
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for with_cp in (True, False):
        a = make(tiny, seed=3, drop_path_rate=0.0, with_cp=with_cp).train()
        loss = weighted_sum(a(x))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in a.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], msg=n)


def test_backbone_outputs_unchanged_by_adapter(tiny):
    """Extractor-only: the adapter reads the ViT exactly as get_intermediate_layers gives it."""
    a = make(tiny).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = tiny.get_intermediate_layers(x, n=IDX, return_class_token=True)
    seen = []
    orig = tiny.get_intermediate_layers

    def spy(*args, **kw):
        out = orig(*args, **kw)
        seen.append(out)
        return out

    tiny.get_intermediate_layers = spy
    try:
        with torch.no_grad():
            out = a(x)
    finally:
        del tiny.get_intermediate_layers
    assert len(seen) == 1
    for (p0, c0), (p1, c1) in zip(direct, seen[0]):
        assert torch.equal(p0, p1) and torch.equal(c0, c1)

    # add_vit_feature=False: f3 no longer contains the (normalised) ViT map; outputs still well formed
    b = make(tiny, add_vit_feature=False).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        out_b = b(x)
    assert not torch.allclose(out["3"], out_b["3"])


def test_injector_variant(tiny):
    x = torch.randn(2, 3, 64, 64)
    plain = make(tiny).eval()
    inj = make(tiny, seed=5, use_injector=True, init_values=0.0).eval()
    missing, unexpected = inj.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".injector." in k for k in missing)
    assert {k.split(".injector.")[1] for k in missing} == {
        "gamma", "query_norm.weight", "query_norm.bias", "feat_norm.weight", "feat_norm.bias",
        "attn.sampling_offsets.weight", "attn.sampling_offsets.bias", "attn.attention_weights.weight",
        "attn.attention_weights.bias", "attn.value_proj.weight", "attn.value_proj.bias",
        "attn.output_proj.weight", "attn.output_proj.bias"}
    assert inj.interactions[0].injector.attn.n_levels == 3

    # gamma = 0: the chunked ViT run with injectors is the extractor-only adapter
    with torch.no_grad():
        ref, got = plain(x), inj(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)

    # gamma != 0: the ViT's token stream changes (captured at the last interaction's block)
    for blk in inj.interactions:
        blk.injector.gamma.data.fill_(0.5)
    captured = []
    h = tiny.blocks[IDX[-1]].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            tiny.get_intermediate_layers(x, n=IDX)
            got = inj(x)
    finally:
        h.remove()
    assert len(captured) == 2 and captured[0].shape == captured[1].shape
    assert not torch.allclose(captured[0], captured[1])
    assert not torch.allclose(got["3"], ref["3"])

    # training: gradients reach the injectors through the frozen blocks, not the frozen weights
    inj.train()
    weighted_sum(inj(x)).backward()
    for blk in inj.interactions:
        assert blk.injector.gamma.grad is not None and blk.injector.gamma.grad.abs().sum() > 0
        assert blk.injector.attn.value_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in inj.backbone.parameters())


def test_injector_with_trainable_backbone():
    torch.manual_seed(0)
    bb = dinov3_vittiny16()
    kw = {**SMALL, "interaction_indexes": [1, 2, 3, 4]}
    a = DINOv3Adapter(bb, **kw, use_injector=True, freeze_backbone=False, init_values=1e-2, drop_path_rate=0.0)
    a.train()
    assert a.backbone.training
    weighted_sum(a(torch.randn(2, 3, 64, 64))).backward()
    assert bb.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert bb.norm.weight.grad.abs().sum() > 0
    assert bb.blocks[5].attn.qkv.weight.grad is None  # blocks after the last index are never run


def test_interaction_block_passes_vit_tokens_through():
    blk = InteractionBlockWithCls(32, num_heads=4, n_points=2, deform_ratio=0.5, extra_extractor=True)
    assert len(blk.extra_extractors) == 2 and blk.injector is None
    d1, d2 = deform_inputs(torch.zeros(2, 3, 64, 64), 16)
    x, c, cls = torch.randn(2, 16, 32), torch.randn(2, 84, 32), torch.randn(2, 32)
    x2, c2, cls2 = blk(x, c, cls, d1, d2, 4, 4, 4, 4)
    assert x2 is x and cls2 is cls and c2.shape == c.shape and not torch.allclose(c2, c)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("hw", [(60, 64), (64, 80), (48, 48), (65, 64)])
def test_bad_sizes_raise(tiny, hw):
    a = make(tiny).eval()
    with pytest.raises(ValueError, match=f"{hw[0]}x{hw[1]}"):
        a(torch.randn(1, 3, *hw))


def test_bad_inputs_raise(tiny):
    a = make(tiny).eval()
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        a(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        a(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        a(torch.randn(3, 64, 64))


def test_bad_construction_raises(tiny):
    with pytest.raises(ValueError, match="strictly increasing"):
        make(tiny, interaction_indexes=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        make(tiny, interaction_indexes=[1, 2, 3, 6])
    with pytest.raises(ValueError, match="need 4 interaction_indexes"):
        make(tiny, interaction_indexes=[1, 3, 5])
    with pytest.raises(ValueError, match="n_heads"):
        make(tiny, deform_num_heads=5)
    make(tiny, interaction_indexes=[1, 3, 5], add_vit_feature=False)  # fine without the ViT maps
    with pytest.raises(ValueError, match="disagree"):
        DINOv3Adapter(tiny, **{**SMALL, "conv_inplane": 16}, conv_inplanes=32)
    assert DINOv3Adapter(tiny, interaction_indexes=IDX, deform_num_heads=4, conv_inplanes=8).spm.fc1.in_channels == 8


def test_rgbd_backbone_gets_rgbd_spm():
    bb = dinov3_vittiny16(in_chans=4)
    a = DINOv3Adapter(bb, **SMALL).eval()
    assert a.spm.stem[0].weight.shape[1] == 4
    assert a(torch.randn(1, 4, 64, 64))["1"].shape == (1, 192, 16, 16)


# ----------------------------------------------------------------------------------------------- state dict


def test_state_dict_round_trip_strict(tiny):
    x = torch.randn(2, 3, 64, 96)
    a = make(tiny, seed=1).train()
    a(x)  # move the BN running stats away from their init
    a.eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(dinov3_vittiny16(), seed=2).eval()  # a fresh backbone too: "backbone." keys load as well
    with torch.no_grad():
        assert not torch.allclose(a(x)["1"], b(x)["1"])
    result = b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        for k, v in a(x).items():
            torch.testing.assert_close(b(x)[k], v)


def test_msdeform_modules_have_official_init(tiny):
    a = make(tiny)
    for m in a.modules():
        if isinstance(m, MSDeformAttn):
            assert torch.count_nonzero(m.sampling_offsets.weight) == 0
            assert torch.count_nonzero(m.attention_weights.weight) == 0
