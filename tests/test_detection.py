"""Detection: box conversions, IoU and GIoU on hand-computed cases, the box matcher against brute force, the DETR
losses on a hand case, hybrid (one-to-many) targets and query groups, the tiny detector's shapes and training, the
official windowed features' shapes, and our COCO AP against pycocotools' COCOeval on synthetic detections."""
from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import pytest
import torch

from dinolab import hub
from dinolab.detection import (
    HungarianMatcher,
    SetCriterion,
    TinyDETR,
    average_precision,
    batched_window_features,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    hybrid_loss,
    one2many_targets,
    post_process,
    scene_targets,
    window_features,
)


def test_box_conversions_round_trip():
    xyxy = torch.tensor([[0.0, 0.0, 2.0, 4.0], [1.0, 2.0, 3.0, 3.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[1.0, 2.0, 2.0, 4.0], [2.0, 2.5, 2.0, 1.0]]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_iou_and_giou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],  # overlap 1, union 7, enclosing 9
                      [0.0, 0.0, 2.0, 2.0],  # identical
                      [3.0, 0.0, 4.0, 1.0],  # disjoint: union 5, enclosing 4 x 2 = 8
                      [0.0, 0.0, 1.0, 2.0]])  # inside: 2 / 4
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0, 4.0]]))
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - 3 / 8, 0.5]]))
    with pytest.raises(ValueError):
        generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), a)


@pytest.mark.parametrize("seed", range(5))
def test_box_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, T, K = 6, 3, 4
    logits = torch.randn(1, Q, K + 1, generator=g)
    boxes = torch.cat([torch.rand(1, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(1, Q, 2, generator=g) * 0.3 + 0.05], -1)
    tgt = {"labels": torch.randint(0, K, (T,), generator=g),
           "boxes": torch.cat([torch.rand(T, 2, generator=g) * 0.6 + 0.2, torch.rand(T, 2, generator=g) * 0.3 + 0.05], -1)}
    (i, j), = HungarianMatcher(1.0, 5.0, 2.0)({"pred_logits": logits, "pred_boxes": boxes}, [tgt])

    def cost(q, t):  # written out pair by pair
        p = logits[0, q].softmax(-1)[tgt["labels"][t]]
        l1 = (boxes[0, q] - tgt["boxes"][t]).abs().sum()
        gi = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, q:q + 1]), box_cxcywh_to_xyxy(tgt["boxes"][t:t + 1]))[0, 0]
        return float(-p + 5 * l1 - 2 * gi)

    best = min(itertools.permutations(range(Q), T), key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    got = dict(zip(j.tolist(), i.tolist()))
    assert tuple(got[t] for t in range(T)) == best


def test_detr_losses_hand_case():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 20.0]]])  # 2 classes + no object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    crit = SetCriterion(2, HungarianMatcher(), eos_coef=0.1)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, tgt)
    ce_q1 = -torch.log_softmax(logits[0, 1], -1)[2]
    torch.testing.assert_close(losses["loss_ce"], (torch.log(torch.tensor(3.0)) + 0.1 * ce_q1) / 1.1)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.1))
    # boxes [0.4, 0.4, 0.6, 0.6] and [0.5, 0.4, 0.7, 0.6]: IoU 0.02 / 0.06 = 1/3, enclosing = union: GIoU = 1/3
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2 / 3))


def test_one2many_targets_and_query_groups():
    t = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4)}]
    m = one2many_targets(t, 3)[0]
    assert m["labels"].tolist() == [1, 2] * 3 and torch.equal(m["boxes"], t[0]["boxes"].repeat(3, 1))
    det = TinyDETR(32, 3, hidden_dim=32, num_queries_one2one=4, num_queries_one2many=6, dec_layers=2, nheads=2,
                   dim_feedforward=64)
    mask = det.self_attn_mask(10, "cpu")
    assert mask[:4, 4:].all() and mask[4:, :4].all() and not mask[:4, :4].any() and not mask[4:, 4:].any()
    feats = torch.randn(2, 32, 5, 6)
    det.train()
    out = det(feats)
    assert out["pred_logits"].shape == (2, 4, 4) and out["pred_boxes"].shape == (2, 4, 4)
    assert out["pred_logits_one2many"].shape == (2, 6, 4) and len(out["aux_outputs_one2many"]) == 1
    det.eval()
    with torch.no_grad():
        ev = det(feats)
    assert "pred_logits_one2many" not in ev
    # the one-to-many queries cannot change the one-to-one predictions
    with torch.no_grad():
        torch.testing.assert_close(det.train()(feats)["pred_boxes"], ev["pred_boxes"])
    res = post_process(ev, (80, 96))
    assert res[0]["boxes"].shape == (4, 4) and res[0]["scores"].shape == (4,)



def test_hybrid_loss_is_the_one_to_one_loss_plus_the_repeated_targets_loss():
    torch.manual_seed(0)
    det = TinyDETR(32, 3, hidden_dim=32, num_queries_one2one=4, num_queries_one2many=6, dec_layers=2, nheads=2,
                   dim_feedforward=64).train()
    crit = SetCriterion(3, HungarianMatcher(1.0, 5.0, 2.0), eos_coef=0.1)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.2, 0.3]])}]
    out = det(torch.randn(2, 32, 5, 6))
    many = {"pred_logits": out["pred_logits_one2many"], "pred_boxes": out["pred_boxes_one2many"],
            "aux_outputs": out["aux_outputs_one2many"]}
    by_hand = crit.total(crit(out, targets)) + crit.total(crit(many, one2many_targets(targets, 3)))
    torch.testing.assert_close(hybrid_loss(crit, out, targets, 3), by_hand)
    one2one = {k: v for k, v in out.items() if "one2many" not in k}  # no one-to-many group: the plain set loss
    torch.testing.assert_close(hybrid_loss(crit, one2one, targets, 3), crit.total(crit(out, targets)))

def test_tiny_detr_learns_one_box():
    torch.manual_seed(0)
    det = TinyDETR(16, 2, hidden_dim=32, num_queries_one2one=3, dec_layers=2, nheads=2, dim_feedforward=64)
    crit = SetCriterion(2, HungarianMatcher())
    feats = torch.randn(4, 16, 4, 4)
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.4]])}] * 4
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3)
    for _ in range(150):
        loss = crit.total(crit(det(feats), tgt))
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    res = post_process(det(feats), (1, 1))[0]
    best = res["scores"].argmax()
    assert res["labels"][best] == 1
    assert box_iou(res["boxes"][best:best + 1], box_cxcywh_to_xyxy(tgt[0]["boxes"]))[0].item() > 0.7


def test_window_features_shapes_on_meta():
    """ViT-7B, 3 x 3 windows (the official setting for 7B), 4 layers: [B, 2 * 4 * 4096, H/16, W/16]."""
    with torch.device("meta"):
        bb = hub.dinov3_vit7b16(device="meta")
        x = torch.empty(1, 3, 768, 1024)
    f = window_features(bb, x, [9, 19, 29, 39], 3)
    assert f.shape == (1, 32768, 48, 64)


# ------------------------------------------------------------------------------------------------ AP


def _synthetic(seed, n_images=12, num_classes=3):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        n = rng.integers(0, 5)
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        g = np.concatenate([xy, xy + wh], 1)
        gl = rng.integers(0, num_classes, n)
        # detections: jittered copies of some ground truth (sometimes with the wrong class) + random boxes
        keep = rng.random(n) < 0.8
        jit = g[keep] + rng.normal(0, 4, (int(keep.sum()), 4))
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 1)
        jl = np.where(rng.random(len(jit)) < 0.85, gl[keep], rng.integers(0, num_classes, len(jit)))
        m = rng.integers(0, 4)
        rxy = rng.uniform(0, 80, (m, 2))
        r = np.concatenate([rxy, rxy + rng.uniform(5, 40, (m, 2))], 1)
        d = np.concatenate([jit, r])
        preds.append({"boxes": torch.tensor(d, dtype=torch.float64),
                      "scores": torch.tensor(rng.uniform(0, 1, len(d))),
                      "labels": torch.tensor(np.concatenate([jl, rng.integers(0, num_classes, m)]), dtype=torch.int64)})
        gts.append({"boxes": torch.tensor(g, dtype=torch.float64), "labels": torch.tensor(gl, dtype=torch.int64)})
    return preds, gts


def _cocoeval(preds, gts, num_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        images.append({"id": i + 1, "width": 128, "height": 128})
        for b, l in zip(g["boxes"].tolist(), g["labels"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": l + 1, "bbox": [b[0], b[1], w, h],
                         "area": w * h, "iscrowd": 0})
        for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            dets.append({"image_id": i + 1, "category_id": l + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    preds, gts = _synthetic(seed)
    stats = _cocoeval(preds, gts, 3)
    ours = average_precision(preds, gts, num_classes=3)
    assert abs(ours["ap"] - stats[0]) < 1e-9 and abs(ours["ap50"] - stats[1]) < 1e-9 and abs(ours["ap75"] - stats[2]) < 1e-9
    assert 0.05 < ours["ap"] < 0.95  # a non-trivial case


def test_average_precision_hand_case():
    """One class, 2 ground truths, 3 detections: TP (0.9), FP (0.8), TP (0.7). Precision after each: 1, 1/2, 2/3
    → envelope 1, 2/3, 2/3; recall 1/2, 1/2, 1. AP = (51 · 1 + 50 · 2/3) / 101."""
    g = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([0, 0])}
    p = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 30.0, 30.0]]),
         "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 0, 0])}
    r = average_precision([p], [g], iou_thresholds=[0.5])
    assert abs(r["ap50"] - (51 + 50 * 2 / 3) / 101) < 1e-12


def test_two_stage_token_queries():
    """two_stage=True: one query per feature token, starting at a box of two cells around its cell; the
    one-to-many group is a second copy of the token queries, in training only."""
    det = TinyDETR(16, 3, hidden_dim=32, num_queries_one2many=1, dec_layers=2, nheads=2, dim_feedforward=32,
                   two_stage=True)
    feats = torch.randn(2, 16, 3, 4)
    det.eval()
    with torch.no_grad():
        out = det(feats)
    ref = TinyDETR.reference_boxes(3, 4)
    assert out["pred_boxes"].shape == (2, 12, 4) and "pred_boxes_one2many" not in out
    torch.testing.assert_close(out["pred_boxes"], ref.expand(2, -1, -1))  # zero-initialised correction
    torch.testing.assert_close(ref[5], torch.tensor([1.5 / 4, 1.5 / 3, 0.5, 2 / 3]))  # row 1, column 1
    det.train()
    out = det(feats)
    assert out["pred_logits"].shape == (2, 12, 4) and out["pred_logits_one2many"].shape == (2, 12, 4)
    # the groups do not see each other: the one-to-one predictions are those of eval mode
    with torch.no_grad():
        torch.testing.assert_close(det(feats)["pred_logits"], det.eval()(feats)["pred_logits"])


def test_batched_window_features_equal_one_call_on_normalised_images():
    torch.manual_seed(0)
    bb = hub.dinov3_vittiny16().eval()
    images = torch.rand(5, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        want = window_features(bb, (images - mean) / std, [1, 5], 2)
    got = batched_window_features(bb, images, [1, 5], 2, batch_size=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scene_targets_drop_padding_and_shift_classes():
    scenes = {"image": torch.zeros(2, 3, 128, 128),
              "boxes": torch.tensor([[[0.0, 0.0, 64.0, 32.0], [0.0, 0.0, 0.0, 0.0]],
                                     [[32.0, 64.0, 96.0, 128.0], [10.0, 20.0, 30.0, 40.0]]]),
              "box_labels": torch.tensor([[2, 0], [5, 1]])}
    norm, pixel = scene_targets(scenes), scene_targets(scenes, normalized=False)
    assert [t["labels"].tolist() for t in norm] == [[1], [4, 0]]
    torch.testing.assert_close(norm[0]["boxes"], torch.tensor([[0.25, 0.125, 0.5, 0.25]]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(norm[1]["boxes"]) * 128, pixel[1]["boxes"])
    torch.testing.assert_close(pixel[1]["boxes"], scenes["boxes"][1])
    with pytest.raises(ValueError, match="need the scenes' 'image'"):
        scene_targets({k: v for k, v in scenes.items() if k != "image"})
