import json

import pytest
import torch

from dinolab import hub, vit, weights
from dinolab.weights import CheckpointError
from hf_models import our_tokens, tiny_hf_model


@pytest.mark.parametrize("gated", [False, True])
def test_round_trips_are_exact(gated):
    hf_sd = tiny_hf_model(gated=gated).state_dict()
    back = weights.official_to_hf(weights.hf_to_official(hf_sd))
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    off = weights.hf_to_official(hf_sd)
    again = weights.hf_to_official(weights.official_to_hf(off, prefix=""))  # save_pretrained layout
    assert set(again) == set(off) and all(torch.equal(again[k], off[k]) for k in off)


def test_official_state_dict_keys_match_our_model():
    hf_sd = tiny_hf_model(gated=True).state_dict()
    off = weights.hf_to_official(hf_sd)
    model = weights.load_backbone(off, num_heads=4)
    assert set(model.state_dict()) == set(off) | {"rope_embed.periods"}


@pytest.mark.parametrize("name", hub.RELEASED)
def test_config_inference_for_every_released_model(name):
    model = hub.build(name, device="meta")
    cfg = weights.infer_config(model.state_dict())
    ref = {"qkv_bias": True, "untie_global_and_local_cls_norm": False, **hub.HUB_COMMON, **hub.CONFIGS[name]}
    ref["mask_k_bias"] = ref["mask_k_bias"] and ref["qkv_bias"]  # no bias (7B): nothing to mask
    for key in ("embed_dim", "depth", "num_heads", "ffn_layer", "n_storage_tokens", "mask_k_bias", "qkv_bias",
                "untie_global_and_local_cls_norm", "patch_size"):
        assert cfg[key] == ref[key], key
    rebuilt = vit.DinoVisionTransformer(device="meta", **cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_load_from_pth_safetensors_and_transformers_folder(tmp_path):
    hf = tiny_hf_model(registers=4)
    x = torch.randn(1, 3, 32, 48)
    ref = our_tokens(weights.load_backbone(hf.state_dict(), num_heads=4), x)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_attention_heads"] == 4
    from_folder = weights.load_backbone(tmp_path / "hf")  # heads read from config.json
    torch.testing.assert_close(our_tokens(from_folder, x), ref)
    official = weights.hf_to_official(hf.state_dict())
    torch.save(official, tmp_path / "official.pth")
    torch.testing.assert_close(our_tokens(weights.load_backbone(tmp_path / "official.pth", num_heads=4), x), ref)
    from safetensors.torch import save_file
    save_file(official, str(tmp_path / "official.safetensors"))
    torch.testing.assert_close(our_tokens(weights.load_backbone(tmp_path / "official.safetensors", num_heads=4), x), ref)


def test_factory_weights_argument(tmp_path):
    src = hub.dinov3_vittiny16()
    torch.save(src.state_dict(), tmp_path / "tiny.pth")
    dst = hub.dinov3_vittiny16(weights=tmp_path / "tiny.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"cls_token": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        weights.load_backbone(tmp_path / "evil.pth")


def test_errors_list_the_keys_and_change_nothing():
    model = hub.dinov3_vittiny16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    del sd["blocks.2.mlp.fc1.weight"]
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    sd["norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        weights.load_into(model, sd)
    msg = str(err.value)
    assert "missing key(s):\n  blocks.2.mlp.fc1.weight" in msg
    assert "unexpected key(s):\n  blocks.9.attn.qkv.weight" in msg
    assert "norm.weight: checkpoint (7,) vs model (192,)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_size_checkpoint_for_factory():
    small = hub.dinov3_vittiny16().state_dict()
    with pytest.raises(CheckpointError, match="mismatched shape"):
        hub.dinov3_vits16(weights=small)


def test_not_a_dinov3_checkpoint():
    with pytest.raises(CheckpointError, match="not a DINOv3 ViT state dict"):
        weights.load_backbone({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected key in a transformers"):
        weights.hf_to_official({"embeddings.cls_token": torch.zeros(1, 1, 4), "pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        weights.load_backbone("/nonexistent/dinov3.pth")


def test_official_to_hf_uses_the_effective_masked_bias():
    """transformers has no bias_mask: the converted biases must be the ones the official forward adds."""
    from dinolab.attention import LinearKMaskedBias

    model = vit.DinoVisionTransformer(embed_dim=64, depth=1, num_heads=4, n_storage_tokens=4, mask_k_bias=True,
                                      layerscale_init=1e-5, norm_layer="layernormbf16")
    assert isinstance(model.blocks[0].attn.qkv, LinearKMaskedBias)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_()
        model.blocks[0].attn.qkv.bias_mask[:64] = 0.0  # e.g. a checkpoint whose mask also zeroes q
    hf = weights.official_to_hf(model.state_dict())
    assert torch.equal(hf["model.layer.0.attention.q_proj.bias"], torch.zeros(64))
    assert "model.layer.0.attention.k_proj.bias" not in hf
    back = weights.load_backbone(weights.hf_to_official(hf), num_heads=4)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


def test_tiny_checkpoint_finds_the_shipped_file_or_names_the_missing_one(tmp_path, monkeypatch):
    from dinolab.weights import TINY_CHECKPOINT, tiny_checkpoint

    monkeypatch.delenv("DINOLAB_CKPT", raising=False)
    assert tiny_checkpoint() == TINY_CHECKPOINT and TINY_CHECKPOINT.exists()
    other = tmp_path / "mine.pth"
    other.write_bytes(b"")
    monkeypatch.setenv("DINOLAB_CKPT", str(other))
    assert tiny_checkpoint() == other
    monkeypatch.setenv("DINOLAB_CKPT", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth is missing.*DINOLAB_CKPT"):
        tiny_checkpoint()
