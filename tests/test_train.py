"""dinolab.train: the fit loop (schedule, batch sources, modes, errors) and the feature cache. CPU, seconds.
The metrics are tested in test_metrics.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dinolab.train import cosine_lr_factor, extract_features, fit
from dinolab.vit import DinoVisionTransformer

# ------------------------------------------------------------------------------------------------------ fit


def test_cosine_lr_factor_values():
    assert [cosine_lr_factor(s, 10, warmup=2) for s in (0, 1)] == [0.5, 1.0]
    assert cosine_lr_factor(2, 10, warmup=2) == 1.0
    assert cosine_lr_factor(6, 10, warmup=2) == pytest.approx(0.5)  # halfway through the cosine
    assert cosine_lr_factor(10, 10, warmup=2) == pytest.approx(0.0)
    assert cosine_lr_factor(10, 10, warmup=0, min_factor=0.1) == pytest.approx(0.1)


def _regression():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    model = nn.Linear(4, 1)

    def loss_fn(m, batch):
        xb, yb = batch
        return ((m(xb).squeeze(1) - yb) ** 2).mean()

    return model, loss_fn, x, y


def test_fit_reduces_loss_and_returns_history(capsys):
    model, loss_fn, x, y = _regression()
    model.eval()
    hist = fit(model, None, loss_fn, [(x, y)], steps=60, lr=0.1, weight_decay=0.0, warmup=5, progress=False)
    assert len(hist) == 60 and all(isinstance(h, float) for h in hist)
    assert hist[-1] < 0.05 * hist[0]
    assert not model.training  # previous mode restored
    assert capsys.readouterr().out == ""  # no bar, no logs


def test_fit_batch_sources_and_logging(capsys):
    model, loss_fn, x, y = _regression()
    # a list is cycled
    assert len(fit(model, model.parameters(), loss_fn, [(x[:32], y[:32]), (x[32:], y[32:])], steps=5,
                   progress=False)) == 5
    # a callable step -> batch
    seen = []

    def get(step):
        seen.append(step)
        return x, y

    fit(model, None, loss_fn, get, steps=4, progress=False, log_every=2)
    assert seen == [0, 1, 2, 3]
    out = capsys.readouterr()
    assert "step     2/4" in out.out + out.err and "step     4/4" in out.out + out.err
    # an iterator that runs out ends training early
    gen = ((x, y) for _ in range(3))
    assert len(fit(model, None, loss_fn, gen, steps=10, progress=False)) == 3


def test_fit_only_given_params_move_and_lr_decays():
    model, loss_fn, x, y = _regression()
    bias0 = model.bias.detach().clone()
    opt_params = [model.weight]
    fit(model, opt_params, loss_fn, [(x, y)], steps=3, lr=0.1, progress=False)
    assert torch.equal(model.bias, bias0)


def test_fit_errors():
    model, loss_fn, x, y = _regression()
    with pytest.raises(FloatingPointError, match="step 0"):
        fit(model, None, lambda m, b: torch.tensor(float("nan"), requires_grad=True), [(x, y)], steps=2,
            progress=False)
    with pytest.raises(ValueError, match="steps"):
        fit(model, None, loss_fn, [(x, y)], steps=0, progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        fit(model, [], loss_fn, [(x, y)], steps=1, progress=False)


def test_fit_progress_bar_can_run():
    model, loss_fn, x, y = _regression()
    assert len(fit(model, None, loss_fn, [(x, y)], steps=3, progress=True)) == 3


# ------------------------------------------------------------------------------------------- feature cache


def _tiny_vit():
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, n_storage_tokens=2)
    m.init_weights()
    return m


def test_extract_features_matches_one_big_batch():
    vit = _tiny_vit().train()
    imgs = torch.rand(5, 3, 32, 48)
    feats = extract_features(vit, imgs, layers=[0, 2], batch_size=2)
    assert vit.training  # mode restored
    vit.eval()
    with torch.no_grad():
        ref = vit.get_intermediate_layers(imgs, n=[0, 2], reshape=True, return_class_token=True)
    assert len(feats) == 2
    for (p, c), (pr, cr) in zip(feats, ref):
        assert p.shape == (5, 32, 2, 3) and c.shape == (5, 32) and not p.requires_grad
        torch.testing.assert_close(p, pr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, cr, atol=1e-5, rtol=1e-5)
    # patch tokens only, last block; ImageNet normalisation applied first when asked
    only = extract_features(vit, imgs, layers=1, return_class_token=False, batch_size=4)
    assert len(only) == 1 and only[0].shape == (5, 32, 2, 3)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    normed = extract_features(vit, imgs, normalize=True)
    plain = extract_features(vit, (imgs - mean) / std)
    torch.testing.assert_close(normed[0][0], plain[0][0], atol=1e-5, rtol=1e-5)


def test_extract_features_from_a_dataset():
    class DS:
        def __init__(self, imgs):
            self.imgs = imgs

        def __len__(self):
            return len(self.imgs)

        def batch(self, idx):
            return {"image": self.imgs[idx]}

    vit = _tiny_vit()
    imgs = torch.rand(3, 3, 32, 32)
    a = extract_features(vit, DS(imgs), batch_size=2)
    b = extract_features(vit, imgs, batch_size=3)
    torch.testing.assert_close(a[0][0], b[0][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        extract_features(vit, [imgs])
