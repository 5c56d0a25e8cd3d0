"""MultiScaleMaskedTransformerDecoder and Mask2FormerHead.

Parity: the decoder is compared with transformers' ``Mask2FormerTransformerModule`` (its masked-attention decoder,
``Mask2FormerMaskedAttentionDecoder``) with copied weights, in float64. The structures agree: learned query
features and positions, level embedding, sine positions, cross-attention (masked) → self-attention → FFN, post-norm,
round robin over 3 levels, shared heads after a final LayerNorm. transformers' decoder has ``decoder_layers − 1``
layers, splits the self-attention projections into q/k/v Linears (the official fuses them in
``nn.MultiheadAttention.in_proj_weight``) and keeps the class head outside the module, so we apply our
``class_embed`` to its normed intermediate states. Also: the official state-dict layout of the whole head
(key list written from the official files), the DINOv3 ViT-7B configuration's shapes on the meta device, the
masked-attention rule by hand, and semantic inference on a hand case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_pixel_decoder import official_pixel_decoder_keys
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

from dinolab.mask2former import (
    DINOV3_DECODER_CONFIG,
    Mask2FormerHead,
    MultiScaleMaskedTransformerDecoder,
    semantic_inference,
)


def _randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _hf_to_ours(sd: dict, layers: int) -> dict:
    """transformers' Mask2FormerTransformerModule state dict → official decoder names (class_embed excluded)."""
    out = {"query_embed.weight": sd["queries_embedder.weight"], "query_feat.weight": sd["queries_features.weight"],
           "level_embed.weight": sd["level_embed.weight"], "post_norm.weight": sd["decoder.layernorm.weight"],
           "post_norm.bias": sd["decoder.layernorm.bias"]}
    for k, v in sd.items():
        if k.startswith("input_projections."):
            out["input_proj." + k[len("input_projections."):]] = v
    for i in range(3):
        for wb in ("weight", "bias"):
            out[f"mask_embed.layers.{i}.{wb}"] = sd[f"decoder.mask_predictor.mask_embedder.{i}.0.{wb}"]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        sa, ca, ff = (f"transformer_{n}_layers.{i}." for n in ("self_attention", "cross_attention", "ffn"))
        for wb in ("weight", "bias"):
            out[sa + f"self_attn.in_proj_{wb}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{wb}"] for n in "qkv"])
            out[sa + f"self_attn.out_proj.{wb}"] = sd[p + f"self_attn.out_proj.{wb}"]
            out[sa + f"norm.{wb}"] = sd[p + f"self_attn_layer_norm.{wb}"]
            out[ca + f"norm.{wb}"] = sd[p + f"cross_attn_layer_norm.{wb}"]
            out[ff + f"linear1.{wb}"] = sd[p + f"fc1.{wb}"]
            out[ff + f"linear2.{wb}"] = sd[p + f"fc2.{wb}"]
            out[ff + f"norm.{wb}"] = sd[p + f"final_layer_norm.{wb}"]
        for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            out[ca + "multihead_attn." + n] = sd[p + "cross_attn." + n]
    return out


@pytest.mark.parametrize("in_channels", [32, 24])  # 24: input projections (in_channels != hidden_dim)
def test_decoder_matches_transformers_float64(in_channels):
    C, Q, heads, ffn, L, M, K = 32, 7, 4, 48, 4, 32, 5
    cfg = Mask2FormerConfig(hidden_dim=C, num_queries=Q, num_attention_heads=heads, dim_feedforward=ffn,
                            decoder_layers=L + 1, pre_norm=False, mask_feature_size=M, feature_size=in_channels,
                            enforce_input_projection=False, dropout=0.0, num_labels=K)
    hf = _randomize(Mask2FormerTransformerModule(in_channels, cfg)).double().eval()
    ours = MultiScaleMaskedTransformerDecoder(in_channels, num_classes=K, hidden_dim=C, num_queries=Q, nheads=heads,
                                              dim_feedforward=ffn, dec_layers=L, pre_norm=False, mask_dim=M,
                                              enforce_input_project=False).double().eval()
    sd = _hf_to_ours(hf.state_dict(), L)
    sd.update({k: v for k, v in ours.state_dict().items() if k.startswith("class_embed.")})
    ours.load_state_dict(sd, strict=True)

    x = [torch.randn(2, in_channels, h, w, dtype=torch.float64) for h, w in [(2, 3), (4, 6), (8, 12)]]
    mask_features = torch.randn(2, M, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(x, mask_features)
        out = ours(x, mask_features)
    preds = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    assert len(preds) == L + 1 == len(ref.masks_queries_logits)
    for p, m_ref, h_ref in zip(preds, ref.masks_queries_logits, ref.intermediate_hidden_states):
        torch.testing.assert_close(p["pred_masks"], m_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(p["pred_logits"], ours.class_embed(h_ref.transpose(0, 1)), atol=1e-10, rtol=1e-10)
    assert out["pred_logits"].shape == (2, Q, K + 1) and out["pred_masks"].shape == (2, Q, 16, 24)
    # the masks were not trivial: masked attention did mask something (and not everything)
    frac = torch.stack([(p["pred_masks"].sigmoid() < 0.5).double().mean() for p in preds[:-1]])
    assert ((frac > 0.05) & (frac < 0.95)).all(), frac


def test_masked_attention_rule_by_hand():
    """The mask layer i's cross-attention receives = its previous prediction resized to level i % 3, sigmoid < 0.5,
    all-masked rows cleared — checked with a hook."""
    torch.manual_seed(0)
    dec = _randomize(MultiScaleMaskedTransformerDecoder(16, num_classes=3, hidden_dim=16, num_queries=5, nheads=2,
                                                        dim_feedforward=32, dec_layers=4, pre_norm=False, mask_dim=16,
                                                        enforce_input_project=False)).eval()
    seen = []
    for layer in dec.transformer_cross_attention_layers:
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["memory_mask"]), with_kwargs=True)
    x = [torch.randn(1, 16, h, h) for h in (2, 4, 8)]
    out = dec(x, torch.randn(1, 16, 16, 16))
    preds = out["aux_outputs"]
    for i, got in enumerate(seen):
        size = x[i % 3].shape[-2:]
        m = F.interpolate(preds[i]["pred_masks"], size=size, mode="bilinear", align_corners=False).sigmoid() < 0.5
        m = m.flatten(2).repeat_interleave(2, 0)  # [B*heads, Q, hw]: heads of one image are consecutive
        m[m.all(-1)] = False
        assert torch.equal(got, m)


def official_head_keys(D: int, hidden: int, num_classes: int, queries: int, ffn: int, dec_layers: int,
                       enc_layers: int, heads: int) -> dict:
    """The official Mask2FormerHead state dict (names → shapes), written from mask2former_head.py and
    mask2former_transformer_decoder.py: in_channels == hidden_dim, so input_proj is 3 empty Sequentials."""
    keys = {"pixel_decoder." + k: v for k, v in
            official_pixel_decoder_keys([D] * 4, hidden, hidden, ffn, enc_layers, heads).items()}
    C, p = hidden, "predictor."
    for i in range(dec_layers):
        for name, attn in (("self_attention", "self_attn"), ("cross_attention", "multihead_attn")):
            q = f"{p}transformer_{name}_layers.{i}."
            keys.update({q + f"{attn}.in_proj_weight": (3 * C, C), q + f"{attn}.in_proj_bias": (3 * C,),
                         q + f"{attn}.out_proj.weight": (C, C), q + f"{attn}.out_proj.bias": (C,),
                         q + "norm.weight": (C,), q + "norm.bias": (C,)})
        q = f"{p}transformer_ffn_layers.{i}."
        keys.update({q + "linear1.weight": (ffn, C), q + "linear1.bias": (ffn,), q + "linear2.weight": (C, ffn),
                     q + "linear2.bias": (C,), q + "norm.weight": (C,), q + "norm.bias": (C,)})
    keys.update({p + "post_norm.weight": (C,), p + "post_norm.bias": (C,), p + "query_feat.weight": (queries, C),
                 p + "query_embed.weight": (queries, C), p + "level_embed.weight": (3, C),
                 p + "class_embed.weight": (num_classes + 1, C), p + "class_embed.bias": (num_classes + 1,)})
    for i in range(3):
        keys.update({p + f"mask_embed.layers.{i}.weight": (C, C), p + f"mask_embed.layers.{i}.bias": (C,)})
    return keys


def test_head_state_dict_matches_official_layout_and_loads_strict():
    D, C, K = 48, 64, 7
    spec = {str(i + 1): [D, 64 // 2 ** i, 64 // 2 ** i, 4] for i in range(4)}
    head = Mask2FormerHead(spec, hidden_dim=C, num_classes=K, num_queries=10, nheads=4, dim_feedforward=96,
                           dec_layers=3, enc_layers=2)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == official_head_keys(D, C, K, 10, 96, 3, 2, 4)
    head.load_state_dict({k: torch.randn(s) for k, s in got.items()}, strict=True)
    feats = {str(i + 1): torch.randn(2, D, 32 // 2 ** i, 32 // 2 ** i) for i in range(4)}
    out = head.predict(feats, rescale_to=(128, 128))
    assert out["pred_logits"].shape == (2, 10, K + 1) and out["pred_masks"].shape == (2, 10, 128, 128)
    assert len(out["aux_outputs"]) == 3 and out["aux_outputs"][0]["pred_masks"].shape == (2, 10, 32, 32)


def test_dinov3_vit7b_head_on_meta():
    """DINOv3's ADE20k head on ViT-7B features (D = 4096) at 512²: the official defaults give 100 queries,
    151 logits, masks at 128², 9 aux outputs; the official key layout at full size."""
    spec = {str(i + 1): [4096, 512 // 2 ** (i + 2), 512 // 2 ** (i + 2), 4] for i in range(4)}
    with torch.device("meta"):
        head = Mask2FormerHead(spec, hidden_dim=2048, num_classes=150)
        feats = {str(i + 1): torch.empty(1, 4096, 128 // 2 ** i, 128 // 2 ** i) for i in range(4)}
    assert head.predictor.num_queries == DINOV3_DECODER_CONFIG["num_queries"] == 100
    out = head(feats)
    assert out["pred_logits"].shape == (1, 100, 151)
    assert out["pred_masks"].shape == (1, 100, 128, 128)
    assert len(out["aux_outputs"]) == 9
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == official_head_keys(4096, 2048, 150, 100, 4096, 9, 6, 16)
    n_dec = sum(p.numel() for p in head.predictor.parameters())
    n_pix = sum(p.numel() for p in head.pixel_decoder.parameters())
    assert round(n_dec / 1e6, 1) == 466.6 and round(n_pix / 1e6, 1) == 233.7  # see the shape table of notebook 14


def test_semantic_inference_hand_case():
    # two queries, two classes (+ no object); query 0 is class 0 for sure, query 1 is half class 1, half no-object
    big = 30.0
    logits = torch.tensor([[[big, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # softmax: [1, 0, 0], [1/3, 1/3, 1/3]
    logits[0, 1] = torch.tensor([-big, 0.0, 0.0])  # -> [0, 1/2, 1/2]
    masks = torch.tensor([[[[big, -big]], [[-big, big]]]])  # query 0 covers pixel 0, query 1 pixel 1
    sem = semantic_inference(logits, masks)
    assert sem.shape == (1, 2, 1, 2)
    torch.testing.assert_close(sem[0, :, 0], torch.tensor([[1.0, 0.0], [0.0, 0.5]]), atol=1e-6, rtol=0)
    assert sem.argmax(1).tolist() == [[[0, 1]]]


def test_head_trains_on_cpu():
    torch.manual_seed(0)
    D = 32
    head = Mask2FormerHead(D, hidden_dim=32, num_classes=2, num_queries=4, nheads=2, dim_feedforward=32,
                           dec_layers=3, enc_layers=1)
    feats = {str(i + 1): torch.randn(2, D, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)}
    target = torch.zeros(2, 4, 16, 16)
    target[:, 0, :8] = 1
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = head(feats)
        loss = F.binary_cross_entropy_with_logits(out["pred_masks"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
