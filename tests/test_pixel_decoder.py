"""MSDeformAttnPixelDecoder: parity with transformers' Mask2Former pixel decoder (encoder layer, sine position
embedding, whole decoder) with copied weights, the official state-dict layout, the seed's shapes on the meta
device, input validation, and a few training steps. CPU, offline, seconds."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Mask2FormerConfig  # noqa: E402
from transformers.models.mask2former.modeling_mask2former import (  # noqa: E402
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderLayer,
    Mask2FormerSinePositionEmbedding,
)

from dinolab.pixel_decoder import (  # noqa: E402
    DINOV3_M2F_CONFIG,
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
    MSDeformAttnTransformerEncoderLayer,
    PositionEmbeddingSine,
    pixel_decoder_shapes,
)
from dinolab.seg_heads import FPNSegHead  # noqa: E402
from dinolab.train import fit  # noqa: E402

# transformers' encoder layer -> official (DINOv3 / Mask2Former) names. Same computation, renamed modules:
# self_attn_layer_norm = norm1, fc1 = linear1, fc2 = linear2, final_layer_norm = norm2. transformers applies
# dropout functionally (no Dropout modules) and, in training only, clamps non-finite activations; its layer
# hard-codes n_levels=3 and n_points=4 (the official layer takes them as arguments). None of it matters in eval.
HF_LAYER_TO_OFFICIAL = {
    "self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2",
}


def _hf_config(C=64, heads=4, ffn=96, layers=2, mask_dim=48):
    return Mask2FormerConfig(feature_size=C, mask_feature_size=mask_dim, num_attention_heads=heads,
                             encoder_feedforward_dim=ffn, encoder_layers=layers, dropout=0.0)


def _randomize(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _hf_layer_to_official(sd: dict, prefix_in="", prefix_out="") -> dict:
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix_in):
            continue
        rest = k[len(prefix_in):]
        head, _, tail = rest.partition(".")
        out[prefix_out + HF_LAYER_TO_OFFICIAL.get(head, head) + "." + tail] = v
    return out


CONV_GN = {"0.weight": "weight", "1.weight": "norm.weight", "1.bias": "norm.bias"}


def _hf_decoder_to_official(sd: dict, n_layers: int) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("input_projections."):
            out["input_convs." + k[len("input_projections."):]] = v
        elif k == "level_embed":
            out["encoder.level_encoding"] = v
        elif k.startswith("adapter_1."):  # Sequential(conv, GN) -> detectron2 Conv2d(weight, norm)
            out["lateral_convs.0." + CONV_GN[k[len("adapter_1."):]]] = v
        elif k.startswith("layer_1."):
            out["output_convs.0." + CONV_GN[k[len("layer_1."):]]] = v
        elif k.startswith("mask_projection."):
            out["mask_feature." + k[len("mask_projection."):]] = v
    for i in range(n_layers):
        out.update(_hf_layer_to_official(sd, f"encoder.layers.{i}.", f"encoder.encoder.layers.{i}."))
    return out


def official_pixel_decoder_keys(in_channels, conv_dim, mask_dim, ffn, n_layers, heads, points=4) -> dict:
    """name -> shape of the official MSDeformAttnPixelDecoder's state dict, written out from the official code
    (3 encoder levels "4", "3", "2"; FPN on "1"; norm "GN" so the lateral/output convs have no bias)."""
    C, L = conv_dim, 3
    c1, c2, c3, c4 = in_channels
    keys = {}
    for i, c in enumerate([c4, c3, c2]):
        keys[f"input_convs.{i}.0.weight"] = (C, c, 1, 1)
        keys[f"input_convs.{i}.0.bias"] = (C,)
        keys[f"input_convs.{i}.1.weight"] = (C,)
        keys[f"input_convs.{i}.1.bias"] = (C,)
    keys["encoder.level_encoding"] = (L, C)
    for i in range(n_layers):
        p = f"encoder.encoder.layers.{i}."
        keys.update({
            p + "self_attn.sampling_offsets.weight": (heads * L * points * 2, C),
            p + "self_attn.sampling_offsets.bias": (heads * L * points * 2,),
            p + "self_attn.attention_weights.weight": (heads * L * points, C),
            p + "self_attn.attention_weights.bias": (heads * L * points,),
            p + "self_attn.value_proj.weight": (C, C), p + "self_attn.value_proj.bias": (C,),
            p + "self_attn.output_proj.weight": (C, C), p + "self_attn.output_proj.bias": (C,),
            p + "norm1.weight": (C,), p + "norm1.bias": (C,),
            p + "linear1.weight": (ffn, C), p + "linear1.bias": (ffn,),
            p + "linear2.weight": (C, ffn), p + "linear2.bias": (C,),
            p + "norm2.weight": (C,), p + "norm2.bias": (C,),
        })
    keys["mask_feature.weight"] = (mask_dim, C, 1, 1)
    keys["mask_feature.bias"] = (mask_dim,)
    keys["lateral_convs.0.weight"] = (C, c1, 1, 1)
    keys["lateral_convs.0.norm.weight"] = (C,)
    keys["lateral_convs.0.norm.bias"] = (C,)
    keys["output_convs.0.weight"] = (C, C, 3, 3)
    keys["output_convs.0.norm.weight"] = (C,)
    keys["output_convs.0.norm.bias"] = (C,)
    return keys


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("normalize", [True, False])
def test_sine_position_embedding_matches_transformers(normalize):
    x = torch.randn(2, 5, 6, 7)
    ours = PositionEmbeddingSine(16, normalize=normalize)(x)
    hf = Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=normalize)(x.shape, x.device, x.dtype)
    assert ours.shape == (2, 32, 6, 7)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-6)


def test_sine_position_embedding_with_mask_matches_transformers():
    # Conventions differ: the official mask is True = *padding* (cumsum of ~mask); transformers' ``mask`` argument
    # is cumsummed as is, i.e. True = *valid*. Same embedding once the mask is inverted.
    x = torch.randn(2, 4, 5, 6)
    pad = torch.zeros(2, 5, 6, dtype=torch.bool)
    pad[0, :, 4:] = True
    pad[1, 3:, :] = True
    ours = PositionEmbeddingSine(8, normalize=True)(x, pad)
    hf = Mask2FormerSinePositionEmbedding(num_position_features=8, normalize=True)(x.shape, x.device, x.dtype, ~pad)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-6)


def test_encoder_layer_matches_transformers_float64():
    C, heads, ffn = 64, 4, 96
    hf = _randomize(Mask2FormerPixelDecoderEncoderLayer(_hf_config(C, heads, ffn)).double().eval())
    ours = MSDeformAttnTransformerEncoderLayer(C, ffn, dropout=0.0, n_levels=3, n_heads=heads, n_points=4).double()
    ours.load_state_dict(_hf_layer_to_official(hf.state_dict()), strict=True)
    ours.eval()

    shapes = [(2, 3), (4, 5), (6, 4)]
    S = sum(h * w for h, w in shapes)
    src = torch.randn(2, S, C, dtype=torch.float64)
    pos = torch.randn(2, S, C, dtype=torch.float64)
    ref = MSDeformAttnTransformerEncoder.get_reference_points(shapes, torch.ones(2, 3, 2, dtype=torch.float64),
                                                             "cpu", torch.float64)
    start = torch.tensor([0, 6, 26])
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, -5:] = True  # True = padding in both (value zeroed there)
    out_hf = hf(src, pad, position_embeddings=pos, reference_points=ref, spatial_shapes_list=shapes,
                level_start_index=start)[0]
    out = ours(src, pos, ref, shapes, start, pad)
    torch.testing.assert_close(out, out_hf, atol=1e-10, rtol=1e-10)


def test_reference_points_are_pixel_centres():
    ref = MSDeformAttnTransformerEncoder.get_reference_points([(2, 4), (1, 2)], torch.ones(1, 2, 2), "cpu")
    assert ref.shape == (1, 10, 2, 2)
    x_centres = torch.tensor([0.125, 0.375, 0.625, 0.875])
    torch.testing.assert_close(ref[0, :4, 0], torch.stack([x_centres, torch.full((4,), 0.25)], -1))
    torch.testing.assert_close(ref[0, 8:, 1], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    torch.testing.assert_close(ref[:, :, 0], ref[:, :, 1])  # same point on every level (valid ratios 1)


def test_whole_pixel_decoder_matches_transformers_float64():
    C, heads, ffn, layers, mask_dim = 64, 4, 96, 2, 48
    chans = [16, 24, 32, 40]
    hf = _randomize(Mask2FormerPixelDecoder(_hf_config(C, heads, ffn, layers, mask_dim), feature_channels=chans))
    hf = hf.double().eval()
    ours = MSDeformAttnPixelDecoder(chans, conv_dim=C, mask_dim=mask_dim, num_heads=heads, dim_feedforward=ffn,
                                    num_layers=layers).double().eval()
    ours.load_state_dict(_hf_decoder_to_official(hf.state_dict(), layers), strict=True)

    sizes = [(12, 16), (6, 8), (3, 4), (2, 2)]  # strides 4/8/16/32 of a 48×64 image (last level rounded up)
    feats = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip(chans, sizes)]
    out_hf = hf(feats)
    mask_features, ms = ours({str(i + 1): f for i, f in enumerate(feats)})
    assert mask_features.shape == (2, mask_dim, 12, 16)
    assert [tuple(m.shape[-2:]) for m in ms] == [(2, 2), (3, 4), (6, 8)]  # coarse to fine
    torch.testing.assert_close(mask_features, out_hf.mask_features, atol=1e-9, rtol=1e-9)
    for a, b in zip(ms, out_hf.multi_scale_features):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # the official triple: out[0] is the coarsest encoder map
    mf, coarsest, ms2 = ours.forward_features(feats)
    torch.testing.assert_close(coarsest, ms2[0])


# ------------------------------------------------------------------------------------------------ official layout


def test_state_dict_matches_official_layout_and_loads_strict():
    chans, C, M, ffn, L, H = [16, 24, 32, 40], 64, 96, 128, 2, 4
    dec = MSDeformAttnPixelDecoder(chans, conv_dim=C, mask_dim=M, num_heads=H, dim_feedforward=ffn, num_layers=L)
    got = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert got == official_pixel_decoder_keys(chans, C, M, ffn, L, H)
    sd = {k: torch.randn(s) for k, s in got.items()}
    dec.load_state_dict(sd, strict=True)


def test_official_input_shape_dict_and_transformer_in_features():
    # official Mask2FormerHead: input_shape {"1": [D, h, w, 4], ...}, every stride 4, all four names given
    shape_spec = {"1": [32, 64, 64, 4], "2": [32, 32, 32, 4], "3": [32, 16, 16, 4], "4": [32, 8, 8, 4]}
    a = MSDeformAttnPixelDecoder(shape_spec, conv_dim=32, mask_dim=32, num_heads=2, dim_feedforward=64, num_layers=1)
    b = MSDeformAttnPixelDecoder(32, conv_dim=32, mask_dim=32, num_heads=2, dim_feedforward=64, num_layers=1,
                                 transformer_in_features=("2", "3", "4"))
    for d in (a, b):
        assert d.encoder_features == ["4", "3", "2"] and d.fpn_feature == "1"
    assert a.state_dict().keys() == b.state_dict().keys()


def test_seed_config_shapes_on_meta_and_param_count():
    """The seed / DINOv3 config (ViT-L adapter features, conv_dim = mask_dim = 2048, 16 heads, FFN 4096, 6 layers)
    at B=4, 512×512: mask_features [4, 2048, 128, 128] (seed README), ≈208.6M parameters (reference §3.5)."""
    with torch.device("meta"):
        dec = MSDeformAttnPixelDecoder(1024)  # defaults = DINOV3_M2F_CONFIG
        feats = {str(i + 1): torch.empty(4, 1024, 512 // s, 512 // s) for i, s in enumerate((4, 8, 16, 32))}
    assert dec.conv_dim == DINOV3_M2F_CONFIG["conv_dim"] and len(dec.encoder.encoder.layers) == 6
    assert dec.encoder.encoder.layers[0].self_attn.n_heads == 16
    assert dec.encoder.encoder.layers[0].linear1.out_features == 4096
    mask_features, ms = dec(feats)
    shapes = pixel_decoder_shapes()
    assert tuple(mask_features.shape) == shapes["mask_features"] == (4, 2048, 128, 128)
    assert [tuple(m.shape) for m in ms] == [shapes["multi_scale_features[0] (1/32)"],
                                           shapes["multi_scale_features[1] (1/16)"],
                                           shapes["multi_scale_features[2] (1/8)"]]
    assert shapes["tokens (flattened)"] == (4, 5376, 2048)
    assert shapes["level_start_index"] == (0, 256, 1280)
    n = sum(p.numel() for p in dec.parameters())
    assert round(n / 1e6, 1) == 208.6, n
    # the seed's FPN head on the decoder's output pyramid (finest first): logits at the input size
    with torch.device("meta"):
        fpn = FPNSegHead([2048] * 4, 256, 1)
    pyramid = [mask_features, ms[2], ms[1], ms[0]]
    assert fpn(pyramid).shape == (4, 1, 512, 512)
    assert fpn(pyramid, output_size=(64, 64)).shape == (4, 1, 64, 64)


# ------------------------------------------------------------------------------------------------ behaviour


def _tiny(**kw):
    cfg = dict(conv_dim=32, mask_dim=16, num_heads=2, dim_feedforward=48, num_layers=1)
    cfg.update(kw)
    return MSDeformAttnPixelDecoder([8, 12, 16, 20], **cfg)


def _tiny_feats(B=2):
    return {"1": torch.randn(B, 8, 8, 8), "2": torch.randn(B, 12, 4, 4), "3": torch.randn(B, 16, 2, 2),
            "4": torch.randn(B, 20, 1, 1)}


def test_fine_level_only_feeds_mask_features():
    dec = _tiny().eval()
    feats = _tiny_feats()
    m1, ms1 = dec(feats)
    feats2 = dict(feats, **{"1": torch.randn(2, 8, 8, 8)})
    m2, ms2 = dec(feats2)
    for a, b in zip(ms1, ms2):
        torch.testing.assert_close(a, b)  # the encoder never sees level "1"
    assert not torch.allclose(m1, m2)
    # list input (finest first) = dict input
    m3, _ = dec(list(feats.values()))
    torch.testing.assert_close(m1, m3)


def test_input_validation():
    dec = _tiny()
    feats = _tiny_feats()
    with pytest.raises(KeyError, match="missing feature levels"):
        dec({k: v for k, v in feats.items() if k != "3"})
    with pytest.raises(ValueError, match="channels"):
        dec(dict(feats, **{"2": torch.randn(2, 13, 4, 4)}))
    with pytest.raises(ValueError, match="batch size"):
        dec(dict(feats, **{"4": torch.randn(3, 20, 1, 1)}))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        dec(dict(feats, **{"4": torch.randn(2, 20)}))
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        dec(list(feats.values())[:3])
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny(conv_dim=48)
    with pytest.raises(ValueError, match="not input levels"):
        _tiny(transformer_in_features=("2", "3", "5"))
    with pytest.raises(ValueError, match="needs 3 levels"):
        _tiny(transformer_in_features=("3", "4"))


def test_half_inputs_run_in_float32():
    dec = _tiny().eval()
    feats = {k: v.bfloat16() for k, v in _tiny_feats().items()}
    m, ms = dec(feats)
    assert m.dtype == torch.float32 and all(x.dtype == torch.float32 for x in ms)


def test_pixel_decoder_trains():
    torch.manual_seed(0)
    dec = _tiny()
    feats = _tiny_feats()
    target = torch.randn(2, 16, 8, 8)

    def loss_fn(model, batch):
        m, ms = model(batch)
        return (m - target).pow(2).mean() + sum(x.pow(2).mean() for x in ms) * 0.01

    hist = fit(dec, None, loss_fn, [feats], steps=15, lr=3e-3, weight_decay=0.0, progress=False)
    assert len(hist) == 15
    assert sum(hist[-3:]) / 3 < 0.7 * sum(hist[:3]) / 3, hist
    # gradients reach the deformable attention's offsets (pure-PyTorch backward)
    assert dec.encoder.encoder.layers[0].self_attn.sampling_offsets.weight.grad is not None
