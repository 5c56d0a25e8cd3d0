"""Parity of dinolab's ViT with transformers' DINOv3ViTModel (an independent implementation)."""
import pytest
import torch

from dinolab import weights
from dinolab.rope import RopePositionEmbedding
from hf_models import hf_tokens, our_tokens, tiny_hf_model

TOL = 1e-4


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("hw", [(64, 64), (48, 96)], ids=["square", "nonsquare"])
def test_forward_matches_transformers(gated, registers, hw):
    hf = tiny_hf_model(gated=gated, registers=registers)
    ours = weights.load_backbone(hf.state_dict(), num_heads=4)
    assert ours.n_storage_tokens == registers
    assert ours.blocks[0].mlp.__class__.__name__ == ("SwiGLUFFN" if gated else "Mlp")
    x = torch.randn(2, 3, *hw)
    ref, got = hf_tokens(hf, x), our_tokens(ours, x)
    assert got.shape == ref.shape == (2, 1 + registers + hw[0] // 16 * hw[1] // 16, 64)
    assert (got - ref).abs().max().item() < TOL
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(pixel_values=x).pooler_output, atol=TOL, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_intermediate_layers_match_hidden_states(gated):
    hf = tiny_hf_model(gated=gated, layers=3)
    ours = weights.load_backbone(hf.state_dict(), num_heads=4)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        hs = hf(pixel_values=x, output_hidden_states=True).hidden_states  # [embeddings, block 0, 1, 2]
        layers = ours.get_intermediate_layers(x, n=[0, 2], norm=False, return_class_token=True,
                                              return_extra_tokens=True)
        normed = ours.get_intermediate_layers(x, n=1, reshape=True)
    for (patch, cls, extra), ref in zip(layers, (hs[1], hs[3])):
        full = torch.cat([cls[:, None], extra, patch], 1)
        assert (full - ref).abs().max().item() < TOL
    # last layer, normed and reshaped = transformers' final patch tokens laid out as a (B, D, h, w) map
    last = hf_tokens(hf, x)[:, 5:].reshape(2, 4, 5, 64).permute(0, 3, 1, 2)
    assert normed[0].shape == (2, 64, 4, 5)
    assert (normed[0] - last).abs().max().item() < TOL


def test_masked_tokens_match_transformers():
    hf = tiny_hf_model()
    ours = weights.load_backbone(hf.state_dict(), num_heads=4)
    with torch.no_grad():
        hf.embeddings.mask_token.normal_()
        ours.mask_token.copy_(hf.embeddings.mask_token.reshape(1, -1))
    x = torch.randn(2, 3, 64, 64)
    masks = torch.rand(2, 16) < 0.4
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        o = ours.forward_features(x, masks=masks)
    assert (o["x_norm_patchtokens"] - ref[:, 5:]).abs().max().item() < TOL
    assert torch.equal(o["masks"], masks)


@pytest.mark.parametrize("hw", [(4, 4), (3, 7), (14, 14)])
def test_rope_matches_transformers(hw):
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    cfg = DINOv3ViTConfig(hidden_size=384, num_attention_heads=6, patch_size=16)
    ref = DINOv3ViTRopePositionEmbedding(cfg).eval()
    ours = RopePositionEmbedding(384, num_heads=6, base=100.0, dtype="fp32").eval()
    cos, sin = ref(torch.zeros(1, 3, hw[0] * 16, hw[1] * 16))
    s, c = ours(H=hw[0], W=hw[1])
    assert s.shape == sin.shape == (hw[0] * hw[1], 64)
    torch.testing.assert_close(s, sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(c, cos, atol=1e-6, rtol=0)
