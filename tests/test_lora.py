import math

import pytest
import torch
from torch import nn

from dinolab import lora, vit, weights
from dinolab.attention import LinearKMaskedBias
from hf_models import our_tokens, tiny_hf_model

D, HEADS = 64, 4


def _tiny():
    """A tiny random dinolab backbone from a random transformers model (k-masked qkv bias)."""
    return weights.load_backbone(tiny_hf_model().state_dict(), num_heads=HEADS)


def _randomise_lora(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_state_dict(model):
            param = model.get_parameter(p)
            param.copy_(torch.randn(param.shape, generator=g) * std)


def _x(seed=2):
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


def test_parity_with_peft_on_split_q_v():
    peft = pytest.importorskip("peft")
    hf = tiny_hf_model()
    ours = weights.load_backbone(hf.state_dict(), num_heads=HEADS)
    assert isinstance(ours.blocks[0].attn.qkv, LinearKMaskedBias)
    lora.apply_lora(ours, r=4, alpha=8)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    ref.eval()
    g = torch.Generator().manual_seed(3)
    n_set = 0
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not name.endswith(("attention.q_proj", "attention.v_proj")):
                continue
            i = int(name.split(".layer.")[1].split(".")[0])
            t = name[-6]  # "q" or "v"
            A, B = torch.randn(4, D, generator=g) * 0.3, torch.randn(D, 4, generator=g) * 0.3
            assert mod.lora_A["default"].weight.shape == A.shape and mod.lora_B["default"].weight.shape == B.shape
            mod.lora_A["default"].weight.copy_(A)
            mod.lora_B["default"].weight.copy_(B)
            getattr(ours.blocks[i].attn.qkv, f"lora_A_{t}").copy_(A)
            getattr(ours.blocks[i].attn.qkv, f"lora_B_{t}").copy_(B)
            n_set += 1
    assert n_set == 2 * len(ours.blocks)
    x = _x()
    with torch.no_grad():
        y_ref = ref(pixel_values=x).last_hidden_state
    y = our_tokens(ours, x)
    base = our_tokens(weights.load_backbone(tiny_hf_model().state_dict(), num_heads=HEADS), x)
    assert (y_ref - base).abs().max() > 1e-2  # the adapters do change the output
    assert (y - y_ref).abs().max() < 1e-4

    lora.merge_lora(ours)
    ref.merge_adapter()
    with torch.no_grad():
        y_ref_m = ref(pixel_values=x).last_hidden_state
    assert (our_tokens(ours, x) - y_ref_m).abs().max() < 1e-4
    ref.unmerge_adapter()
    plain = ref.merge_and_unload()
    with torch.no_grad():
        y_plain = plain(pixel_values=x).last_hidden_state
    assert (our_tokens(ours, x) - y_plain).abs().max() < 1e-4
    # the merged backbone exported with the original keys loads strictly into a plain model
    exported = weights.load_backbone(lora.merged_state_dict(ours), num_heads=HEADS)
    assert (our_tokens(exported, x) - y_plain).abs().max() < 1e-4


def test_init_is_identity_and_shapes_and_keys():
    model = _tiny()
    x = _x()
    y0 = our_tokens(model, x)
    lora.apply_lora(model, r=4, alpha=8)
    torch.testing.assert_close(our_tokens(model, x), y0, rtol=0, atol=0)
    qkv = model.blocks[1].attn.qkv
    assert isinstance(qkv, lora.LoRAQKV) and isinstance(qkv.base, LinearKMaskedBias)
    assert qkv.lora_A_q.shape == (4, D) and qkv.lora_B_v.shape == (D, 4) and not hasattr(qkv, "lora_A_k")
    assert qkv.weight is qkv.base.weight and qkv.bias_mask is qkv.base.bias_mask  # original names reachable
    assert torch.all(qkv.lora_B_q == 0) and qkv.lora_A_q.abs().max() <= 1 / math.sqrt(D)
    assert qkv.scaling == 2.0
    sd = lora.lora_state_dict(model)
    assert sorted(sd) == sorted(f"blocks.{i}.attn.qkv.lora_{ab}_{t}" for i in range(2) for ab in "AB" for t in "qv")
    assert "blocks.0.attn.qkv.base.weight" in model.state_dict()
    assert lora.count_lora_params(model) == lora.lora_param_count(D, 2, 4, ("q", "v")) == 2 * 2 * 2 * 4 * D
    assert lora.lora_config(model) == {"r": 4, "alpha": 8.0, "targets": ("q", "v"), "dropout": 0.0}


def test_plain_backbone_checkpoint_loads_into_lora_model():
    src = _tiny()
    model = lora.apply_lora(vit.DinoVisionTransformer(**{**weights.infer_config(src.state_dict()), "num_heads": HEADS}),
                            r=2, alpha=2)
    res = model.load_state_dict(src.state_dict(), strict=False)
    assert not res.unexpected_keys and all(".lora_" in k for k in res.missing_keys)
    model.eval()
    torch.testing.assert_close(our_tokens(model, _x()), our_tokens(src, _x()))


def test_k_slice_untouched_and_bias_mask_respected():
    model = lora.apply_lora(_tiny(), r=4, alpha=8)
    _randomise_lora(model)
    qkv = model.blocks[0].attn.qkv
    w0, b0 = qkv.base.weight.detach().clone(), qkv.base.bias.detach().clone()
    lora.merge_lora(model)
    dw = qkv.base.weight.detach() - w0
    assert torch.all(dw[D:2 * D] == 0)
    assert dw[:D].abs().max() > 0 and dw[2 * D:].abs().max() > 0
    torch.testing.assert_close(dw[:D], qkv.delta_weight("q"))
    assert torch.equal(qkv.base.bias, b0)
    lora.unmerge_lora(model)
    # the k third of the output is the base's, whose (non-zero) k bias is masked out
    with torch.no_grad():
        qkv.base.bias[D:2 * D] = 5.0
    h = torch.randn(3, 7, D)
    out = qkv(h)
    torch.testing.assert_close(out[..., D:2 * D], h @ qkv.base.weight[D:2 * D].T)
    torch.testing.assert_close(out[..., :D], h @ (qkv.base.weight[:D] + qkv.delta_weight("q")).T + qkv.base.bias[:D])


def test_merge_unmerge_round_trip():
    model = lora.apply_lora(_tiny(), r=4, alpha=8, targets=("q", "k", "v"))
    _randomise_lora(model)
    x = _x()
    w0 = {i: b.attn.qkv.base.weight.detach().clone() for i, b in enumerate(model.blocks)}
    y = our_tokens(model, x)
    lora.merge_lora(model)
    assert all(b.attn.qkv.merged for b in model.blocks)
    assert (our_tokens(model, x) - y).abs().max() < 1e-4
    lora.merge_lora(model)  # idempotent
    lora.unmerge_lora(model)
    for i, b in enumerate(model.blocks):
        torch.testing.assert_close(b.attn.qkv.base.weight, w0[i], rtol=0, atol=1e-6)
    assert (our_tokens(model, x) - y).abs().max() < 1e-5


def test_merged_forward_skips_lora_path():
    model = lora.apply_lora(_tiny(), r=4, alpha=8)
    _randomise_lora(model)
    lora.merge_lora(model)
    qkv = model.blocks[0].attn.qkv
    h = torch.randn(2, 5, D)
    with torch.no_grad():
        qkv.lora_B_q.fill_(100.0)  # would change the output if the LoRA path still ran
        torch.testing.assert_close(qkv(h), qkv.base(h))
        qkv.lora_B_q.zero_()


def test_lora_state_dict_round_trip(tmp_path):
    model = lora.apply_lora(_tiny(), r=4, alpha=8)
    _randomise_lora(model)
    x = _x()
    y = our_tokens(model, x)
    torch.save(lora.lora_state_dict(model), tmp_path / "lora.pt")
    fresh = lora.apply_lora(_tiny(), r=4, alpha=8)
    lora.load_lora(fresh, torch.load(tmp_path / "lora.pt"))
    torch.testing.assert_close(our_tokens(fresh, x), y, rtol=0, atol=0)
    lora.merge_lora(fresh)  # loading into a merged model re-merges the new tensors
    _randomise_lora(model, seed=5)
    lora.load_lora(fresh, lora.lora_state_dict(model))
    assert fresh.blocks[0].attn.qkv.merged
    assert (our_tokens(fresh, x) - our_tokens(model, x)).abs().max() < 1e-4


def test_load_lora_errors_leave_model_unchanged():
    model = lora.apply_lora(_tiny(), r=4, alpha=8)
    before = lora.lora_state_dict(model)
    sd = {k: torch.ones_like(v) for k, v in before.items()}
    del sd["blocks.1.attn.qkv.lora_B_v"]
    sd["blocks.0.attn.qkv.lora_A_k"] = torch.zeros(4, D)
    sd["blocks.0.attn.qkv.lora_A_q"] = torch.zeros(8, D)
    with pytest.raises(ValueError) as e:
        lora.load_lora(model, sd)
    msg = str(e.value)
    assert "missing" in msg and "blocks.1.attn.qkv.lora_B_v" in msg
    assert "unexpected" in msg and "blocks.0.attn.qkv.lora_A_k" in msg
    assert "mis-shaped" in msg and "blocks.0.attn.qkv.lora_A_q" in msg and "(8, 64)" in msg
    after = lora.lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no LoRA"):
        lora.load_lora(_tiny(), before)


def test_only_lora_gets_gradients_and_head_added_after_trains():
    model = lora.apply_lora(_tiny(), r=4, alpha=8)
    head = nn.Linear(D, 3)
    model.head = head  # attached after apply_lora: stays trainable
    model.train()
    _randomise_lora(model)
    model(_x()).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if ".lora_" in n} | {"head.weight", "head.bias"}
    for n, p in model.named_parameters():
        if ".lora_" in n or n.startswith("head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    assert lora.count_lora_params(model, trainable_only=True) == lora.lora_param_count(D, 2, 4)


def test_training_smoke_reduces_loss():
    # Target: the same backbone with a random (reachable) LoRA update; the student starts at B = 0.
    teacher = lora.apply_lora(_tiny(), r=4, alpha=8)
    _randomise_lora(teacher, std=0.3)
    x = _x()
    target = our_tokens(teacher, x)
    torch.manual_seed(0)
    model = lora.apply_lora(_tiny(), r=4, alpha=8, dropout=0.1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        o = model.forward_features(x)
        y = torch.cat([o["x_norm_clstoken"][:, None], o["x_storage_tokens"], o["x_norm_patchtokens"]], 1)
        loss = (y - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_remove_lora_restores_plain_module_and_flags():
    model = _tiny()
    model.cls_token.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    x = _x()
    y0 = our_tokens(model, x)
    lora.apply_lora(model, r=2, alpha=4)
    _randomise_lora(model)
    y = our_tokens(model, x)
    lora.remove_lora(model, merge=False)
    assert set(model.state_dict()) == keys and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert type(model.blocks[0].attn.qkv) is LinearKMaskedBias
    torch.testing.assert_close(our_tokens(model, x), y0, rtol=0, atol=0)
    lora.apply_lora(model, r=2, alpha=4)  # can be applied again after removal
    _randomise_lora(model)
    lora.remove_lora(model, merge=True)
    assert (our_tokens(model, x) - y).abs().max() < 1e-4


def test_bad_arguments():
    model = _tiny()
    for kwargs, match in [
        (dict(r=0, alpha=1), "rank"), (dict(r=-2, alpha=1), "rank"), (dict(r=D + 1, alpha=1), "rank"),
        (dict(r=2.5, alpha=1), "integer"), (dict(r=4, alpha=0), "alpha"), (dict(r=4, alpha=-1), "alpha"),
        (dict(r=4, alpha=float("nan")), "alpha"), (dict(r=4, alpha=8, targets=()), "empty"),
        (dict(r=4, alpha=8, targets=("q", "o")), "unknown"), (dict(r=4, alpha=8, targets=("q", "q")), "duplicate"),
        (dict(r=4, alpha=8, dropout=1.0), "dropout"), (dict(r=4, alpha=8, dropout=-0.1), "dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            lora.apply_lora(model, **kwargs)
    assert not lora.lora_modules(model) and all(p.requires_grad for p in model.parameters())  # untouched
    lora.apply_lora(model, r=4, alpha=8, targets="k")
    assert model.blocks[0].attn.qkv.targets == ("k",)
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match="blocks"):
        lora.apply_lora(nn.Linear(4, 12), r=1, alpha=1)
    with pytest.raises(ValueError, match="no LoRA"):
        lora.merge_lora(_tiny())
    with pytest.raises(ValueError, match="rank"):
        lora.lora_param_count(D, 2, 0)
    assert lora.lora_param_count(4096, 40, 8, ("q", "v")) == 40 * 2 * 2 * 8 * 4096
