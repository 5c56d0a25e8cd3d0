"""The object-centric protocols of dinolab.evaluate (notebooks 05 and 12)."""
import pytest
import torch
import torch.nn.functional as F

from dinolab import evaluate, hub
from dinolab.data import NUM_CLASSES


def test_object_protocol_is_knn_on_cls_and_the_probe_on_cls_and_mean_patch():
    torch.manual_seed(0)
    backbone = hub.dinov3_vittiny16().eval()
    split = evaluate.ObjectKNN(n_train=48, n_val=24, size=64)
    got = evaluate.object_protocol(backbone, split)
    (c_tr, m_tr), (c_va, m_va) = evaluate.cls_features(backbone, split.x_train), evaluate.cls_features(backbone, split.x_val)
    knn = evaluate.knn_accuracies(c_tr, split.y_train, c_va, split.y_val)
    lin = evaluate.linear_probe(torch.cat([c_tr, m_tr], 1), split.y_train, torch.cat([c_va, m_va], 1), split.y_val)
    assert got == {"k-NN k=10": knn[10], "k-NN k=20": knn[20], "linear probe": lin}
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_map_probe_reads_separable_maps_and_not_noise():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, NUM_CLASSES, (12, 8, 8), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    cells = masks[:, ::4, ::4]  # the label of each 4 x 4 cell
    onehot = F.one_hot(cells, NUM_CLASSES).permute(0, 3, 1, 2).float()
    maps = torch.cat([onehot, torch.randn(12, 10, 8, 8, generator=g)], 1)  # the class in 6 channels + noise
    assert evaluate.map_probe_miou(maps[:8], masks[:8], maps[8:], masks[8:]) == 1.0
    noise = torch.randn(12, 16, 8, 8, generator=g)
    assert evaluate.map_probe_miou(noise[:8], masks[:8], noise[8:], masks[8:]) < 0.4


def test_map_probe_refuses_maps_that_do_not_tile_the_masks():
    maps, masks = torch.zeros(2, 4, 6, 6), torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="do not tile"):
        evaluate.map_probe_miou(maps, masks, maps, masks)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        evaluate.map_probe_miou(maps[0], masks, maps, masks)

