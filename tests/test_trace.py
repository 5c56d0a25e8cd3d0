import torch

from dinolab import hub
from dinolab.trace import fmt_shape, trace


def test_trace_rows_follow_call_order_and_collapse():
    model = hub.dinov3_vittiny16().eval()
    t = trace(model, torch.randn(2, 3, 64, 48))
    names = [r.name for r in t]
    assert names == ["(model)", "patch_embed", "rope_embed", "blocks.0-5", "norm", "head"]
    assert t[1].output == "[2,4,3,192]"
    assert t[3].count == 6 and t[3].output == "[2,17,192]"
    assert t[0].output == "[2,192]"
    assert "blocks.0-5 (x6)" in str(t) and t.to_markdown().startswith("| module |")


def test_trace_on_meta_device_for_vit_l_at_512():
    model = hub.dinov3_vitl16(device="meta")
    t = trace(model, torch.empty(4, 3, 512, 512, device="meta"), max_depth=2)
    rows = {r.name: r for r in t}
    assert rows["patch_embed.proj"].output == "[4,1024,32,32]"
    assert rows["blocks.0-23"].input.startswith("([4,1029,1024]")
    assert rows["blocks.0-23.mlp"].count == 24
    # LayerScale is called as a module (x + ls1(attn(norm1(x)))), so it has rows; RoPE is computed once per block
    assert rows["blocks.0-23.ls1"].count == rows["blocks.0-23.ls2"].count == 24
    assert rows["rope_embed"].count == 24


def test_fmt_shape_nested():
    assert fmt_shape((torch.zeros(1, 2), {"a": torch.zeros(3)}, 5)) == "([1,2], a=[3], 5)"


def test_range_name_collapses_the_index_that_varies():
    from dinolab.trace import _range_name

    assert _range_name(["blocks.0", "blocks.1", "blocks.2"]) == "blocks.0-2"
    assert _range_name(["blocks.1", "blocks.3"]) == "blocks.1,3"
    # the varying index is not the first number in the name
    names = ["interactions.3.extra_extractors.0", "interactions.3.extra_extractors.1"]
    assert _range_name(names) == "interactions.3.extra_extractors.0-1"
    assert _range_name(["interactions.0.extractor", "interactions.1.extractor"]) == "interactions.0-1.extractor"
    assert _range_name(["stem", "head"]) == "stem"  # nothing numeric to range over
