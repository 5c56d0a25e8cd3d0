"""The supervised control: a short run learns, saves a loadable backbone, and resumes exactly."""
import json

import torch

from dinolab import hub
from dinolab.supervised import SupervisedConfig, train

TINY = dict(steps=4, batch_size=4, warmup_steps=1, log_every=100, eval_every=0)


def test_run_saves_a_backbone_that_loads_strictly(tmp_path):
    out = tmp_path / "sup.pth"
    res = train(SupervisedConfig(**TINY), out=out, log=lambda *_: None)
    assert len(res["history"]) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["steps"] == 4 and len(meta["sha256"]) == 64
    hub.dinov3_vittiny16(weights=out)  # strict load into the named configuration


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = SupervisedConfig(**TINY)
    straight = train(cfg, log=lambda *_: None)
    state = tmp_path / "s.pt"
    train(cfg, log=lambda *_: None, state_path=state, stop_after=2)
    resumed = train(cfg, log=lambda *_: None, state_path=state, resume=state)
    a, b = straight["backbone"].state_dict(), resumed["backbone"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
