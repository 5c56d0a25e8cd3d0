"""EoMT against an independent re-derivation (no reference implementation is installed): without masks its last
blocks must equal the ViT's own blocks run on ``[queries, cls, storage, patches]`` (so the queries get no RoPE);
with masks, one block is recomputed with an explicit softmax over the allowed keys. Also shapes, the key layout of
the official EoMT's own parameters, annealing (probability 0 = no mask) and a short training run."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinolab import hub
from dinolab.eomt import EoMT
from dinolab.set_loss import HungarianMatcher, SetCriterion


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    bb = hub.dinov3_vittiny16(**kw).eval()
    with torch.no_grad():  # LayerScale 1e-5 would hide every block: make the blocks matter
        for n, p in bb.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.5)
    return bb


def test_shapes_and_prefix_split():
    model = EoMT(_tiny(), num_classes=5, num_q=7, num_blocks=2).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        tokens, grid = model.prefix_tokens(x)
        ref = x
        ref_tokens, _ = model.backbone.prepare_tokens_with_masks(ref)
        for blk in model.backbone.blocks[:4]:
            ref_tokens = blk(ref_tokens, model.backbone.rope_for(*grid))
    assert grid == (4, 6) and torch.equal(tokens, ref_tokens)
    assert out["pred_logits"].shape == (2, 7, 6) and out["pred_masks"].shape == (2, 7, 16, 24)
    assert len(out["aux_outputs"]) == 2  # one prediction before each of the last 2 blocks


def test_unmasked_equals_vit_blocks_on_the_joint_sequence():
    model = EoMT(_tiny(1), num_classes=3, num_q=5, num_blocks=3, masked_attn_enabled=False).eval()
    x = torch.randn(2, 3, 48, 64)
    bb = model.backbone
    with torch.no_grad():
        out = model(x)
        tokens, grid = model.prefix_tokens(x)
        seq = torch.cat([model.q.weight[None].expand(2, -1, -1), tokens], 1)
        for blk in bb.blocks[3:]:
            seq = blk(seq, bb.rope_for(*grid))  # the ViT's own block: RoPE on the last h*w tokens only
        seq = bb.norm(seq)
        q, patches = seq[:, :5], seq[:, 5 + 1 + bb.n_storage_tokens:]
        fmap = patches.transpose(1, 2).reshape(2, -1, *grid)
        masks = torch.einsum("bqc,bchw->bqhw", model.mask_head(q), model.upscale(fmap))
    torch.testing.assert_close(out["pred_logits"], model.class_head(q))
    torch.testing.assert_close(out["pred_masks"], masks)
    assert out["aux_outputs"] == []


def test_masked_block_by_hand():
    """One masked block recomputed with an explicit softmax: query q sees the patches where its mask logit
    (bilinearly resized to the patch grid) is > 0, plus every query / cls / storage token; patches see all."""
    model = EoMT(_tiny(2), num_classes=3, num_q=4, num_blocks=1).eval()
    bb, blk = model.backbone, model.backbone.blocks[-1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, grid = model.prefix_tokens(x)
        seq = torch.cat([model.q.weight[None], tokens], 1)
        mask_logits, _ = model._predict(bb.norm(seq), grid)
        out = model.decode(tokens, grid)
        # by hand
        N, Q, P = seq.shape[1], 4, 1 + bb.n_storage_tokens
        allowed = torch.ones(N, N, dtype=torch.bool)
        inside = F.interpolate(mask_logits, grid, mode="bilinear", align_corners=False)[0].flatten(1) > 0
        allowed[:Q, Q + P:] = inside
        attn = blk.attn
        h = blk.norm1(seq)
        qkv = attn.qkv(h).reshape(1, N, 3, attn.num_heads, attn.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        q, k = attn.apply_rope(q, k, bb.rope_for(*grid))
        logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5
        logits = logits.masked_fill(~allowed, float("-inf"))
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, N, -1)
        y = seq + blk.ls1(attn.proj(o))
        y = bb.norm(y + blk.ls2(blk.mlp(blk.norm2(y))))
    assert 0 < inside.float().mean() < 1  # the mask is not trivial
    torch.testing.assert_close(out["pred_logits"], model.class_head(y[:, :Q]), atol=1e-5, rtol=1e-5)
    # and the mask changed something: the unmasked model differs
    model.masked_attn_enabled = False
    with torch.no_grad():
        assert not torch.allclose(model.decode(tokens, grid)["pred_logits"], out["pred_logits"], atol=1e-4)


def test_annealed_to_zero_equals_no_mask():
    model = EoMT(_tiny(3), num_classes=3, num_q=4, num_blocks=2).eval()
    x = torch.randn(1, 3, 32, 48)
    model.attn_mask_probs.zero_()
    with torch.no_grad():
        a = model(x)
        model.masked_attn_enabled = False
        b = model(x)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"])


def test_official_key_layout_of_eomt_parts():
    model = EoMT(hub.dinov3_vittiny16(), num_classes=5, num_q=10, num_blocks=2)
    D = 192
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    expect = {"attn_mask_probs": (2,), "q.weight": (10, D), "class_head.weight": (6, D), "class_head.bias": (6,)}
    for i in (0, 2, 4):
        expect.update({f"mask_head.{i}.weight": (D, D), f"mask_head.{i}.bias": (D,)})
    for i in range(2):  # patch 16 -> stride 4: two ScaleBlocks
        expect.update({f"upscale.{i}.conv1.weight": (D, D, 2, 2), f"upscale.{i}.conv1.bias": (D,),
                       f"upscale.{i}.conv2.weight": (D, 1, 3, 3), f"upscale.{i}.norm.weight": (D,),
                       f"upscale.{i}.norm.bias": (D,)})
    assert own == expect
    bb_keys = {k[len("backbone."):] for k in model.state_dict() if k.startswith("backbone.")}
    assert bb_keys == set(model.backbone.state_dict())


def test_eomt_trains():
    model = EoMT(_tiny(4), num_classes=2, num_q=3, num_blocks=2)
    crit = SetCriterion(2, HungarianMatcher(2.0, 5.0, 5.0, num_points=None), num_points=None)
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, 0, :, :16] = 1
    targets = [{"labels": torch.tensor([1]), "masks": m} for m in masks]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(20):
        model.attn_mask_probs.fill_(1 - step / 20)  # linear annealing
        loss = crit.total(crit(model(x), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert not model.backbone.rope_embed.training
