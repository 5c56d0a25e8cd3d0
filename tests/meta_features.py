"""Intermediate features of released ViT configurations on the meta device, shared by the head tests."""
import torch

# The official FOUR_EVEN_INTERVALS block indices for 12- and 24-block backbones.
LAYERS = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23]}


def meta_pairs(build, B=2, S=512):
    """(patch map, cls) pairs of 4 layers of a ViT on the meta device, the official FOUR_EVEN_INTERVALS."""
    backbone = build(device="meta")
    D, n = backbone.embed_dim, len(backbone.blocks)
    x = torch.empty(B, 3, S, S, device="meta")
    pairs = backbone.get_intermediate_layers(x, n=LAYERS[n], reshape=True, return_class_token=True)
    assert [tuple(p.shape) for p, _ in pairs] == [(B, D, 32, 32)] * 4
    return D, pairs
