"""The object-centric protocols of dinolab.evaluate (notebooks 05 and 12)."""
import torch

from dinolab import evaluate, hub


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
