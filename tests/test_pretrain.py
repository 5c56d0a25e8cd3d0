"""The pretraining entry point: one process, and two processes under torchrun (DDP, gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinolab import hub
from dinolab.pretrain import PretrainConfig, train

TINY = dict(batch_size=4, steps=3, gram_steps=2, global_size=32, local_size=16, n_local=2, image_size=48,
            head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, warmup_steps=1, log_every=100)


def test_single_process_run_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny.pth"
    res = train(PretrainConfig(**TINY), out=out, log=lambda *_: None)
    hist = res["history"]
    assert len(hist) == 5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[0]["gram"] == 0 and hist[-1]["gram"] > 0  # the Gram phase adds its loss
    meta = json.loads(out.with_suffix(".json").read_text())
    import hashlib
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    model = hub.dinov3_vittiny16(weights=out).eval()  # strict load into the named config
    teacher_sd = res["teacher"].state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, teacher_sd[k].to(v.dtype), atol=2e-3, rtol=2e-3)  # fp16 storage


def test_teacher_is_an_ema_of_the_student():
    res = train(PretrainConfig(**{**TINY, "gram_steps": 0, "steps": 2}), log=lambda *_: None)
    t, s = res["teacher"].state_dict(), res["student"].state_dict()
    diff = sum((t[k] - s[k]).abs().sum() for k in t if t[k].is_floating_point())
    assert diff > 0  # moved toward the student, not copied


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp.pth"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "dinolab.pretrain",
           "--steps", "2", "--gram-steps", "1", "--batch-size", "4", "--global-size", "32", "--local-size", "16",
           "--n-local", "2", "--threads", "1", "--out", str(out), "--log-every", "1", "--image-size", "48",
           "--head-out-dim", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["world_size"] == 2 and len(meta["history"]) == 3
    hub.dinov3_vittiny16(weights=out)


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("split_at", [2, 3, 4])  # before, at and after the start of the Gram phase
def test_resume_equals_an_uninterrupted_run(tmp_path, split_at):
    cfg = PretrainConfig(**{**TINY, "steps": 3, "gram_steps": 3, "appearance_p": 0.5, "appearance_warmup": 2})
    straight = train(cfg, log=lambda *_: None)
    state = tmp_path / "run.state.pt"
    first = train(cfg, log=lambda *_: None, state_path=state, stop_after=split_at)
    assert first["step"] == split_at and state.exists()
    second = train(cfg, log=lambda *_: None, state_path=state, resume=state)
    assert second["step"] == 6 and len(second["history"]) == 6
    _same_state(second["teacher"].state_dict(), straight["teacher"].state_dict())
    _same_state(second["student"].state_dict(), straight["student"].state_dict())
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in straight["history"]]


def test_resume_refuses_another_configuration(tmp_path):
    state = tmp_path / "run.state.pt"
    train(PretrainConfig(**TINY), log=lambda *_: None, state_path=state, stop_after=1)
    with pytest.raises(ValueError, match="another configuration"):
        train(PretrainConfig(**{**TINY, "lr": 5e-4}), log=lambda *_: None, resume=state)


def test_sigterm_saves_the_state_and_stops(tmp_path):
    import signal

    state = tmp_path / "run.state.pt"
    calls = []

    def log(msg):  # send ourselves SIGTERM during the run, as `kill` or a scheduler would
        calls.append(msg)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train(PretrainConfig(**{**TINY, "log_every": 1}), log=log, state_path=state)
    assert res["step"] == 1 and state.exists()
    st = torch.load(state, weights_only=False)
    assert st["step"] == 1 and len(st["history"]) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        train(PretrainConfig(**TINY), log=lambda *_: None, device="tpu")


def test_student_appearance_views_train_and_resume(tmp_path):
    cfg = PretrainConfig(**{**TINY, "steps": 2, "gram_steps": 1, "appearance_p": 1.0, "student_appearance": True})
    straight = train(cfg, log=lambda *_: None)
    state = tmp_path / "s.pt"
    train(cfg, log=lambda *_: None, state_path=state, stop_after=1)
    resumed = train(cfg, log=lambda *_: None, resume=state)
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]


def test_init_warm_starts_student_and_teacher_from_a_checkpoint(tmp_path):
    first = train(PretrainConfig(**{**TINY, "gram_steps": 0}), out=tmp_path / "a.pth", log=lambda *_: None)
    res = train(PretrainConfig(**{**TINY, "gram_steps": 0, "steps": 1, "lr": 0.0, "momentum": (1.0, 1.0)}),
                init=tmp_path / "a.pth", log=lambda *_: None)
    saved = hub.dinov3_vittiny16(weights=tmp_path / "a.pth").state_dict()
    for k, v in res["teacher"].state_dict().items():  # lr 0 and momentum 1: the teacher is the loaded backbone
        torch.testing.assert_close(v, saved[k].to(v.dtype))
    assert first["step"] == 3


def test_canonical_look_keeps_the_layout_and_has_one_colour_per_surface():
    from dinolab.data import ShapesWorld
    from dinolab.pretrain import CANONICAL_LOOK

    kw = dict(size=48, n_objects=(1, 2), num_samples=64)
    own, plain = ShapesWorld("train", **kw).batch(range(16)), ShapesWorld("train", **kw, **CANONICAL_LOOK).batch(range(16))
    assert torch.equal(own["mask"], plain["mask"]) and torch.equal(own["label"], plain["label"])
    rgb = plain["image"].permute(0, 2, 3, 1)
    assert (rgb.amax(-1) - rgb.amin(-1)).max() < 1e-5  # grey everywhere: no colour left to share between views
    obj = plain["mask"] > 0
    # every object pixel is the same grey up to shading (the dome) and grain, whatever the scene
    assert rgb[..., 0][obj].std() < 0.1


def test_teacher_canonical_run(tmp_path):
    cfg = PretrainConfig(**{**TINY, "steps": 2, "gram_steps": 1, "appearance_p": 1.0, "student_appearance": True,
                            "teacher_canonical": True})
    res = train(cfg, log=lambda *_: None)
    assert res["step"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])


def _prototypes_after(tmp_path, freeze: int, stop_after: int):
    cfg = PretrainConfig(**{**TINY, "gram_steps": 0, "freeze_last_layer_steps": freeze})
    state = tmp_path / f"f{freeze}_{stop_after}.state.pt"
    train(cfg, log=lambda *_: None, state_path=state, stop_after=stop_after)
    sd = torch.load(state, weights_only=False)["student"]
    return {k: sd[f"{k}.last_layer.weight"] for k in ("dino_head", "ibot_head")}


def test_freeze_last_layer_keeps_the_prototypes_fixed_for_the_first_steps(tmp_path):
    from dinolab.pretrain import Student, normalize_prototypes

    cfg = PretrainConfig(**TINY)
    torch.manual_seed(cfg.seed)  # train() builds the student the same way
    init = Student(cfg)
    normalize_prototypes(init)
    start = {k: getattr(init, k).last_layer.weight for k in ("dino_head", "ibot_head")}
    for freeze, stop_after, moved in ((-1, 3, False), (2, 2, False), (2, 3, True), (0, 1, True)):
        after = _prototypes_after(tmp_path, freeze, stop_after)
        for k in start:
            assert torch.equal(after[k], start[k]) is not moved, (freeze, stop_after, k)


def test_centering_run_resumes_bit_for_bit_and_differs_from_sinkhorn_knopp(tmp_path):
    cfg = PretrainConfig(**{**TINY, "steps": 3, "gram_steps": 0, "centering": "centering", "freeze_last_layer_steps": -1})
    straight = train(cfg, log=lambda *_: None)
    state = tmp_path / "c.state.pt"
    train(cfg, log=lambda *_: None, state_path=state, stop_after=2)
    assert torch.load(state, weights_only=False)["centers"]["cls"].abs().sum() > 0  # the EMA center is saved
    second = train(cfg, log=lambda *_: None, state_path=state, resume=state)
    _same_state(second["teacher"].state_dict(), straight["teacher"].state_dict())
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in straight["history"]]
    sk = train(PretrainConfig(**{**TINY, "steps": 3, "gram_steps": 0, "freeze_last_layer_steps": -1}),
               log=lambda *_: None)
    assert [h["loss"] for h in sk["history"]] != [h["loss"] for h in straight["history"]]


def test_unknown_centering_is_refused():
    with pytest.raises(ValueError, match="centering"):
        train(PretrainConfig(**{**TINY, "centering": "softmax"}), log=lambda *_: None)


def test_export_writes_the_teacher_of_a_paused_run(tmp_path):
    cfg = PretrainConfig(**TINY)
    state, out = tmp_path / "run.state.pt", tmp_path / "paused.pth"
    res = train(cfg, log=lambda *_: None, state_path=state, stop_after=2)
    from dinolab.pretrain import export_state

    sha = export_state(state, out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha and meta["steps_done"] == 2 and len(meta["history"]) == 2
    model = hub.dinov3_vittiny16(weights=out).eval()
    teacher_sd = res["teacher"].state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, teacher_sd[k].to(v.dtype), atol=2e-3, rtol=2e-3)  # fp16 storage


def test_export_of_a_missing_state_is_a_clear_error(tmp_path):
    from dinolab.pretrain import export_state

    with pytest.raises(FileNotFoundError, match="no training state"):
        export_state(tmp_path / "absent.state.pt", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def _center_rank(rank: int, world: int, port: int, logits: torch.Tensor, center: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from dinolab.ssl_meta_arch import _update_center_global

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        new = _update_center_global(center, logits.chunk(world)[rank], 0.9)
        torch.save(new, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_centre_over_two_processes_equals_the_centre_of_the_whole_batch(tmp_path):
    """The DINO centre under DDP is the EMA of the mean over every rank's logits (losses.update_center on the
    concatenated batch), on every rank."""
    import torch.multiprocessing as mp

    from dinolab import losses

    g = torch.Generator().manual_seed(0)
    logits, center = torch.randn(8, 16, generator=g), torch.randn(1, 16, generator=g)
    out = str(tmp_path / "centre")
    mp.spawn(_center_rank, args=(2, 29531, logits, center, out), nprocs=2)
    want = losses.update_center(center, logits, 0.9)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}", weights_only=True), want)


def test_gram_phase_as_its_own_run_starts_from_a_phase1_state(tmp_path):
    """steps=0 + init_state: the Gram teacher is the earlier run's teacher (saved as the _phase1 twin), the curves
    go on from the earlier run's, and the sidecar says what the weights stand on."""
    state1, out = tmp_path / "p1.state.pt", tmp_path / "gram.pth"
    first = train(PretrainConfig(**{**TINY, "gram_steps": 0}), log=lambda *_: None, state_path=state1)
    cfg2 = PretrainConfig(**{**TINY, "steps": 0, "gram_steps": 2, "lr": 1e-4})
    res = train(cfg2, out=out, log=lambda *_: None, init_state=state1)
    twin = hub.dinov3_vittiny16(weights=tmp_path / "gram_phase1.pth").state_dict()
    for k, v in first["teacher"].state_dict().items():
        torch.testing.assert_close(twin[k], v.to(twin[k].dtype), atol=2e-3, rtol=2e-3)
    hist = res["history"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4]
    assert all(h["gram"] == 0 for h in hist[:3]) and all(h["gram"] > 0 for h in hist[3:])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["steps_done"] == 5 and meta["started_from"]["step"] == 3 and meta["started_from"]["config"]["steps"] == 3
    assert json.loads((tmp_path / "gram_phase1.json").read_text())["steps_done"] == 3


def test_gram_run_from_a_state_resumes_bit_for_bit(tmp_path):
    state1 = tmp_path / "p1.state.pt"
    train(PretrainConfig(**{**TINY, "gram_steps": 0}), log=lambda *_: None, state_path=state1)
    cfg2 = PretrainConfig(**{**TINY, "steps": 0, "gram_steps": 3})
    straight = train(cfg2, log=lambda *_: None, init_state=state1)
    state2 = tmp_path / "g.state.pt"
    part = train(cfg2, log=lambda *_: None, init_state=state1, state_path=state2, stop_after=1)
    assert part["step"] == 1
    rest = train(cfg2, log=lambda *_: None, resume=state2, state_path=state2)
    _same_state(rest["teacher"].state_dict(), straight["teacher"].state_dict())
    assert [h["step"] for h in rest["history"]] == [h["step"] for h in straight["history"]] == list(range(6))


def test_init_state_is_refused_with_resume_or_another_architecture(tmp_path):
    state1 = tmp_path / "p1.state.pt"
    train(PretrainConfig(**{**TINY, "gram_steps": 0, "steps": 1}), log=lambda *_: None, state_path=state1)
    with pytest.raises(ValueError, match="only one of them"):
        train(PretrainConfig(**TINY), log=lambda *_: None, init_state=state1, resume=state1)
    with pytest.raises(ValueError, match="K = 64"):
        train(PretrainConfig(**{**TINY, "head_out_dim": 32}), log=lambda *_: None, init_state=state1)


def test_long_histories_are_stored_as_window_means():
    from dinolab.run_state import compact_history

    hist = [{"step": i, "loss": float(i), "dino": 2.0 * i, "note": "x"} for i in range(2500)]
    recs, every = compact_history(hist, max_records=1000)
    assert every == 3 and len(recs) == 834
    assert recs[0] == {"step": 0, "loss": 1.0, "dino": 2.0} and recs[-1] == {"step": 2499, "loss": 2499.0, "dino": 4998.0}
    short = hist[:1000]
    assert compact_history(short, max_records=1000) == (short, 1)


def test_config_from_a_json_object_equals_the_config_that_wrote_it():
    from dataclasses import asdict

    cfg = PretrainConfig(**{**TINY, "teacher_temp": (0.02, 0.04), "augment": {"color_jitter_p": 0.0}})
    again = PretrainConfig.from_dict(json.loads(json.dumps(asdict(cfg))))
    assert again == cfg and isinstance(again.momentum, tuple)
