"""python -m dinolab.finetune: every task and head runs, saves a small fp16 file that loads back, resumes exactly."""
import hashlib
import json

import pytest
import torch

from dinolab import finetune
from dinolab.finetune import FinetuneConfig, load, main, train, trained_state_dict

TINY = dict(steps=3, batch_size=2, n_train=4, n_val=3, image_size=32, eval_every=2, log_every=0)
QUIET = dict(device="cpu", log=lambda *_: None)
RUNS = [("segmentation", "linear", "ssl"), ("segmentation", "fpn", "random"), ("depth", "dpt", "random"),
        ("depth", "linear", "supervised"), ("classification", "linear", "random"), ("classification", "cls", "ssl"),
        ("lora", "lora", "ssl"), ("lora", "full", "random"), ("lora", "linear", "random")]
METRIC = {"segmentation": "miou", "depth": "absrel", "classification": "acc", "lora": "fg_iou"}


@pytest.mark.parametrize("task,head,backbone", RUNS)
def test_run_writes_a_small_fp16_file_that_loads_back(tmp_path, task, head, backbone):
    out = tmp_path / "w.pth"
    res = train(FinetuneConfig.for_task(task, backbone, head, **TINY), out=out, **QUIET)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (meta["task"], meta["head"], meta["backbone"]) == (task, head, backbone)
    assert METRIC[task] in meta["final"] and [c["step"] for c in meta["curves"]] == [2, 3]
    assert meta["trainable_params"] == res["trainable"] > 0 and len(meta["history"]) == 3
    if task == "depth":
        assert 0 < meta["final"]["row_prior_absrel"] < 1
    sd = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for k, v in sd.items() if v.is_floating_point() and "rope" not in k)
    assert head == "full" or not any(k.startswith("backbone.") and ".lora_" not in k for k in sd)  # frozen: not saved
    model = load(out)  # the named backbone + the saved tensors, strict on everything but the frozen backbone
    trained = trained_state_dict(res["model"])
    assert sd.keys() == trained.keys() == trained_state_dict(model).keys()
    for k, v in trained_state_dict(model).items():
        assert torch.equal(v, trained[k].to(sd[k].dtype).to(v.dtype)), k


@pytest.mark.parametrize("task,head", [("segmentation", "linear"), ("lora", "lora")])
def test_resume_equals_an_uninterrupted_run(tmp_path, task, head):
    cfg = FinetuneConfig.for_task(task, "random", head, **{**TINY, "steps": 6})  # the seg head has dropout and BN
    straight = train(cfg, **QUIET)
    state = tmp_path / "s.state.pt"
    first = train(cfg, state_path=state, stop_after=3, **QUIET)
    assert first["step"] == 3 and first["final"] is None and state.exists()
    resumed = train(cfg, state_path=state, resume=state, **QUIET)
    a, b = trained_state_dict(straight["model"]), trained_state_dict(resumed["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    assert straight["evals"] == resumed["evals"]


def test_resume_refuses_another_configuration(tmp_path):
    state = tmp_path / "s.state.pt"
    train(FinetuneConfig.for_task("classification", "random", **TINY), state_path=state, stop_after=1, **QUIET)
    with pytest.raises(ValueError, match="another configuration"):
        train(FinetuneConfig.for_task("classification", "random", **{**TINY, "lr": 0.5}), resume=state, **QUIET)


def test_the_loss_decreases():
    # 16 fixed scenes, batches of 16: the probe (recipe lr) must fit them; it starts near ln 6 = 1.79
    cfg = FinetuneConfig.for_task("classification", "ssl", steps=40, batch_size=16, n_train=16, n_val=4,
                                  image_size=64, eval_every=0)
    losses = [h["loss"] for h in train(cfg, **QUIET)["history"]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 1.0 and last < 0.3 * first, (first, last)


def test_class_weights_lift_the_rare_classes():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])  # background 90 %, class 3 absent
    w = finetune.class_weights(labels, 4)
    assert w[0] < w[1] < w[2] == w[3] and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.isclose(w[1] / w[0], torch.tensor(10.0).sqrt())  # 1 / sqrt(pixel share)


def test_bad_input_is_refused_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="detection"):
        FinetuneConfig.for_task("detection")
    with pytest.raises(ValueError, match="imagenet"):
        FinetuneConfig.for_task("depth", "imagenet")
    with pytest.raises(ValueError, match="'mlp' for task 'depth'"):
        FinetuneConfig.for_task("depth", "ssl", "mlp")
    with pytest.raises(ValueError, match="unknown FinetuneConfig field"):
        FinetuneConfig.for_task("depth", lr_head=1.0)
    missing = tmp_path / "nowhere.pth"
    monkeypatch.setitem(finetune.BACKBONES, "supervised", missing)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        train(FinetuneConfig.for_task("depth", "supervised", **TINY), out=tmp_path / "w.pth", **QUIET)
    assert not (tmp_path / "w.pth").exists()
    for argv in (["detection"], ["depth", "--backbone", "imagenet"], ["depth", "--backbone", "supervised"]):
        with pytest.raises(SystemExit):  # argparse reports the message and exits with status 2
            main(argv + ["--out", str(tmp_path / "w.pth")])


def test_command_line_stops_and_resumes(tmp_path, capsys):
    out, state = tmp_path / "cls.pth", tmp_path / "cls.state.pt"
    argv = ["classification", "--backbone", "random", "--config", json.dumps(TINY), "--device", "cpu", "--out",
            str(out), "--state", str(state), "--save-every", "1"]
    main(argv + ["--stop-after", "2"])
    assert state.exists() and not out.exists()
    res = main(argv + ["--resume", "auto"])
    assert res["step"] == 3 and out.exists() and "resumed from" in capsys.readouterr().out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["steps"] == 3 and meta["config"]["optimizer"] == "sgd"


SHIPPED = sorted(p for p in (finetune.DATA).glob("*.pth") if p.with_suffix(".json").exists()
                 and json.loads(p.with_suffix(".json").read_text()).get("task") in finetune.TASKS)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_heads_match_their_sidecar_and_load(path):
    """Every head in data/ is the file its sidecar describes (sha256, recipe) and loads onto its named backbone."""
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = FinetuneConfig(**meta["config"])
    assert (cfg.task, cfg.head, cfg.backbone) == (meta["task"], meta["head"], meta["backbone"])
    assert path.name.startswith(finetune.TASKS[cfg.task]) and path.stem.endswith(cfg.backbone)
    model = load(path)  # checks the sha256 and that every saved tensor fits
    assert sum(v.numel() for v in trained_state_dict(model).values()) >= meta["trainable_params"]
    steps = [c["step"] for c in meta["curves"]]
    assert steps == sorted(steps) and steps[-1] == cfg.steps and len(meta["history"]) == cfg.steps
    assert meta["final"] == {k: v for k, v in meta["curves"][-1].items() if k != "step"}


def test_predict_in_batches_equals_one_call_without_autograd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(7, 3, 8, 8)
    got = finetune.predict_in_batches(model, x, batch_size=3)
    torch.testing.assert_close(got, model(x).detach())
    assert not got.requires_grad and got.device.type == "cpu"
