import pytest
import torch

from dinolab import hub, vit
from dinolab.attention import LinearKMaskedBias, SelfAttention
from dinolab.block import RMSNorm, SelfAttentionBlock, SwiGLUFFN, swiglu_hidden_dim
from dinolab.patch_embed import PatchEmbed

# The official parameter counts (README / hub model definitions).
OFFICIAL_PARAMS = {
    "dinov3_vits16": 21_601_152, "dinov3_vits16plus": 28_697_472, "dinov3_vitb16": 85_669_632,
    "dinov3_vitl16": 303_154_176, "dinov3_vitl16plus": 403_915_776, "dinov3_vith16plus": 840_633_600,
    "dinov3_vit7b16": 6_716_043_264,
}
OFFICIAL_KEYS = {"dinov3_vits16": 188, "dinov3_vitb16": 188, "dinov3_vits16plus": 212, "dinov3_vitl16": 368,
                 "dinov3_vitl16plus": 416, "dinov3_vith16plus": 552, "dinov3_vit7b16": 610}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_released_configs_match_official_counts(name):
    model = getattr(hub, name)(device="meta")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    assert len(model.state_dict()) == OFFICIAL_KEYS[name]
    assert all(p.is_meta for p in model.parameters())


def test_7b_on_meta_runs_shapes_only():
    model = hub.dinov3_vit7b16(device="meta")
    out = model.forward_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert out["x_norm_patchtokens"].shape == (1, 196, 4096)
    assert out["x_prenorm"].shape == (1, 201, 4096)  # 1 cls + 4 storage + 196 patches (MODEL_CARD)
    assert "local_cls_norm.weight" in model.state_dict() and "blocks.0.attn.qkv.bias" not in model.state_dict()
    assert model.rope_embed.periods.shape == (32,)


def test_token_layout_and_outputs():
    model = hub.dinov3_vittiny16().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model.forward_features(x)
        cls = model(x)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 4 * 6, 192)
    assert out["x_norm_clstoken"].shape == (2, 192) and out["x_storage_tokens"].shape == (2, 4, 192)
    assert out["x_norm_patchtokens"].shape == (2, 24, 192) and out["masks"] is None
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(model.norm(out["x_prenorm"])[:, 5:], out["x_norm_patchtokens"])


def test_intermediate_layers_semantics():
    model = hub.dinov3_vittiny16().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last2 = model.get_intermediate_layers(x, n=2, norm=False)
        picked = model.get_intermediate_layers(x, n=[4, 5], norm=False)
        normed = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
        full = model.forward_features(x)
    assert len(last2) == 2 and all(torch.equal(a, b) for a, b in zip(last2, picked))
    torch.testing.assert_close(last2[-1], full["x_prenorm"][:, 5:])
    (patch_map, cls), = normed
    assert patch_map.shape == (1, 192, 4, 4)
    torch.testing.assert_close(cls, full["x_norm_clstoken"])
    torch.testing.assert_close(patch_map.flatten(2).transpose(1, 2), full["x_norm_patchtokens"])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[6])


def test_masks_replace_patch_tokens_with_mask_token():
    model = hub.dinov3_vittiny16().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    tokens, _ = model.prepare_tokens_with_masks(x, masks)
    torch.testing.assert_close(tokens[0, 5], model.mask_token[0])
    torch.testing.assert_close(tokens[0, 8], model.mask_token[0])
    assert not torch.allclose(tokens[1, 5], model.mask_token[0])
    with pytest.raises(ValueError, match="masks must have shape"):
        model.prepare_tokens_with_masks(x, masks[:, :3])


def test_masked_k_bias_has_no_effect_and_is_zeroed():
    attn = SelfAttention(64, num_heads=4, qkv_bias=True, mask_k_bias=True)
    assert isinstance(attn.qkv, LinearKMaskedBias)
    assert attn.qkv.bias_mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64
    x = torch.randn(2, 10, 64)
    before = attn(x)
    with torch.no_grad():
        attn.qkv.bias[64:128] += 5.0
    torch.testing.assert_close(attn(x), before)
    # and even without the mask, a k bias cannot change attention: softmax ignores a per-row constant
    plain = SelfAttention(64, num_heads=4, qkv_bias=True)
    ref = plain(x)
    with torch.no_grad():
        plain.qkv.bias[64:128] += 5.0
    torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)


def test_swiglu_hidden_rule_and_blocks():
    assert swiglu_hidden_dim(int(384 * 6)) == 1536
    assert swiglu_hidden_dim(int(4096 * 3), 64) == 8192
    assert swiglu_hidden_dim(100, 8) == 72  # int(66.67) = 66 -> rounded up to 72
    ffn = SwiGLUFFN(64, 256, align_to=32)
    assert ffn.w1.out_features == 192 and ffn.w3.in_features == 192


def test_rmsnorm_formula():
    n = RMSNorm(8)
    with torch.no_grad():
        n.weight.uniform_()
    x = torch.randn(3, 8, dtype=torch.float64)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * n.weight.double()
    torch.testing.assert_close(n(x), ref)


def test_stochastic_depth_official_batch_subset():
    blk = SelfAttentionBlock(32, num_heads=2, drop_path=0.5, init_values=1.0)
    x = torch.randn(8, 5, 32)
    blk.eval()
    ref = blk(x)
    blk.train()
    torch.manual_seed(1)
    out = blk(x)
    # some samples skipped a branch, the others got it scaled by B / subset = 2
    changed = ~torch.isclose(out, ref, atol=1e-6).all(-1).all(-1)
    assert changed.any()
    blk.sample_drop_ratio = 0.0
    torch.testing.assert_close(blk(x), ref)


def test_layerscale_and_rope_dtype_of_released_models():
    model = hub.dinov3_vits16(device="meta")
    assert model.blocks[0].ls1.init_values == 1e-5
    assert model.rope_embed.periods.dtype == torch.float32
    assert model.norm.eps == 1e-5  # layernormbf16 = LayerNorm(eps=1e-5)
    assert model.rope_embed.rescale_coords == 2


def test_clear_errors_on_bad_input():
    model = hub.dinov3_vittiny16()
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="4-D image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="num_heads"):
        vit.DinoVisionTransformer(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="4 \\* num_heads"):
        vit.DinoVisionTransformer(embed_dim=72, num_heads=12)  # 6 per head splits, but not in 4
    with pytest.raises(ValueError, match="unknown ffn_layer"):
        vit.DinoVisionTransformer(embed_dim=64, num_heads=4, ffn_layer="geglu")
    with pytest.raises(ValueError, match="unknown configuration"):
        hub.build("dinov3_vitg14")


def test_official_crop_behaviour_when_not_strict():
    pe = PatchEmbed(patch_size=16, embed_dim=8, flatten_embedding=False, strict_img_size=False)
    x = torch.randn(1, 3, 70, 50)
    out = pe(x)
    assert out.shape == (1, 4, 3, 8)
    torch.testing.assert_close(out, pe(x[:, :, :64, :48]))


def test_patch_embed_is_unfold_then_matmul():
    pe = PatchEmbed(patch_size=16, embed_dim=32)
    x = torch.randn(2, 3, 48, 64)
    patches = torch.nn.functional.unfold(x, kernel_size=16, stride=16).transpose(1, 2)  # (B, N, 3*16*16)
    ref = patches @ pe.proj.weight.reshape(32, -1).T + pe.proj.bias
    torch.testing.assert_close(pe(x), ref, atol=1e-5, rtol=1e-5)


def test_train_mode_rope_augmentation_only_in_training():
    model = hub.dinov3_vittiny16(pos_embed_rope_rescale_coords=2)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c, d)


def test_untied_norms():
    m = vit.DinoVisionTransformer(embed_dim=64, depth=1, num_heads=4, n_storage_tokens=2,
                                  untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    keys = m.state_dict().keys()
    assert {"cls_norm.weight", "local_cls_norm.weight"} <= set(keys)
    with torch.no_grad():
        m.local_cls_norm.weight.fill_(3.0)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    g, l_ = m.forward_features([x, x])
    assert not torch.allclose(g["x_norm_clstoken"], l_["x_norm_clstoken"])  # local crops use local_cls_norm
    torch.testing.assert_close(g["x_norm_patchtokens"].shape, l_["x_norm_patchtokens"].shape)
    assert isinstance(vit.DinoVisionTransformer(embed_dim=64, depth=1, num_heads=4, norm_layer="rmsnorm").norm, RMSNorm)


def test_eval_rope_cache_follows_loaded_periods():
    model = hub.dinov3_vittiny16().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        sd = model.state_dict()
        sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.5
        model.load_state_dict(sd)
        b = model(x)
        fresh = hub.dinov3_vittiny16().eval()
        fresh.load_state_dict(sd)
        c = fresh(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)


def test_unknown_keyword_is_a_type_error_that_names_it():
    with pytest.raises(TypeError, match="drop_path"):
        vit.DinoVisionTransformer(drop_path=0.1)  # the real name is drop_path_rate


def test_public_rope_for_and_final_norm():
    """What the adapter uses: rope_for = the (sin, cos) a block gets, final_norm = the norm of forward_features."""
    model = hub.dinov3_vittiny16(untie_cls_and_patch_norms=True).eval()
    with torch.no_grad():
        model.cls_norm.weight.fill_(2.0)  # untied: the cls/storage tokens and the patches take different norms
        out = model.forward_features(torch.randn(2, 3, 32, 48))
    sin, cos = model.rope_for(2, 3)
    ref_sin, ref_cos = model.rope_embed(H=2, W=3)
    assert sin.shape == (6, 64)
    torch.testing.assert_close((sin, cos), (ref_sin, ref_cos))
    normed = model.final_norm(out["x_prenorm"])
    torch.testing.assert_close(normed[:, 0], out["x_norm_clstoken"])
    torch.testing.assert_close(normed[:, 1:5], out["x_storage_tokens"])
    torch.testing.assert_close(normed[:, 5:], out["x_norm_patchtokens"])
