"""Image classification on frozen features: the evaluations of the DINO papers.

* ``knn_predict`` / ``knn_accuracy``: the weighted k-NN classifier (DINO's ``knn.py``; ``dinov3/eval/knn.py``);
* ``LinearClassifier`` on [CLS ‖ mean patch] and ``create_linear_input``: the official linear probe
  (``dinov3/eval/linear.py``), with the official parameter names, so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["knn_predict", "knn_accuracy", "create_linear_input", "LinearClassifier"]


# =================================================================================================================
# Weighted k-NN (DINO's eval)
# =================================================================================================================


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 20, T: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Weighted k-NN on cosine similarity (DINO's eval): each of the k nearest training samples votes
    for its label with weight exp(sim / T). Returns the predicted labels (N_test,)."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if train_labels.shape != train_feats.shape[:1]:
        raise ValueError(f"train_labels must have shape ({train_feats.shape[0]},), got {tuple(train_labels.shape)}")
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(f"k must be in [1, {train_feats.shape[0]}], got {k}")
    C = num_classes or int(train_labels.max()) + 1
    tr = F.normalize(train_feats.float(), dim=1)
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        te = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (te @ tr.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(te.shape[0], C).scatter_add_(1, train_labels[idx], (sim / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 20, T: float = 0.07) -> float:
    pred = knn_predict(train_feats, train_labels, test_feats, k=k, T=T)
    return (pred == test_labels).float().mean().item()


# =================================================================================================================
# Classification: the official linear eval (dinov3/eval/linear.py)
# =================================================================================================================


def create_linear_input(x_tokens_list, use_n_blocks: int = 1, use_avgpool: bool = True, use_cls: bool = True) -> Tensor:
    """Official linear-eval features from ``get_intermediate_layers(x, n=..., return_class_token=True)``.

    ``x_tokens_list``: sequence of (patch tokens, cls) pairs, one per block; patch tokens [B, N, D] or maps
    [B, D, h, w]. Output: ``cat(cls of the last use_n_blocks blocks, mean of the last block's patch tokens)``
    → [B, D·(use_n_blocks + use_avgpool)], float32. Storage tokens are not patch tokens, so they never enter the
    mean. ``use_cls=False`` (not official) keeps only the mean.
    """
    blocks = list(x_tokens_list)[-use_n_blocks:]
    parts = [cls for _, cls in blocks] if use_cls else []
    if use_avgpool:
        patches = blocks[-1][0]
        parts.append(patches.mean(dim=1) if patches.dim() == 3 else patches.mean(dim=(2, 3)))
    if not parts:
        raise ValueError("nothing to classify: use_cls and use_avgpool are both False")
    return torch.cat(parts, dim=-1).reshape(parts[0].shape[0], -1).float()


class LinearClassifier(nn.Module):
    """Linear probe on ``[CLS ‖ mean patch]`` (the official recipe: cls of the last ``use_n_blocks`` blocks, plus
    the average of the last block's patch tokens; ``nn.Linear`` named ``linear``, weight N(0, 0.01), bias 0).

    Args:
        in_dim: the backbone width D (the linear layer sees D·(use_n_blocks·use_cls + use_mean_patch)).
        num_classes: outputs.
        use_cls / use_mean_patch: which features (official: both; ``use_mean_patch`` is the official
            ``use_avgpool``).
        use_n_blocks: cls tokens of this many last blocks (official default 1).

    ``forward`` takes either the feature vector [B, out_dim] or the (patch, cls) pairs of
    ``get_intermediate_layers(..., return_class_token=True)``. The hub's ViT-7B classifier is this with
    D = 4096 (``Linear(8192, 1000)``).
    """

    def __init__(self, in_dim: int, num_classes: int, use_cls: bool = True, use_mean_patch: bool = True,
                 use_n_blocks: int = 1):
        super().__init__()
        if not (use_cls or use_mean_patch):
            raise ValueError("use_cls and use_mean_patch cannot both be False")
        self.in_dim = in_dim
        self.use_cls = use_cls
        self.use_avgpool = use_mean_patch
        self.use_n_blocks = use_n_blocks
        self.num_classes = num_classes
        self.out_dim = in_dim * (use_n_blocks * int(use_cls) + int(use_mean_patch))
        self.linear = nn.Linear(self.out_dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def features(self, x_tokens_list) -> Tensor:
        return create_linear_input(x_tokens_list, self.use_n_blocks, self.use_avgpool, self.use_cls)

    def forward(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            x = self.features(x)
        if x.dim() != 2 or x.shape[1] != self.out_dim:
            raise ValueError(f"features must be [B, {self.out_dim}], got {tuple(x.shape)}")
        return self.linear(x)
