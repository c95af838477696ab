"""Resume through the real huggingface_hub client against the local Hub server (tests/hub_server.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colabkit.checkpoints import Checkpointer, discover, manifest_path, verify
from colabkit.config import load_config
from colabkit.remotes import open_remote
from colabkit.resume import fetch, locate

from .hub_server import HubServer, hub_server  # noqa: F401  (fixture)


def project(tmp_path: Path, srv: HubServer):
    root = tmp_path / "proj"
    (root / "experiments" / "v01").mkdir(parents=True, exist_ok=True)   # an experiment resume can name
    (root / "colabkit.yaml").write_text(
        "project: demo\n"
        f"hub:\n  repo_id: alice/ckpt\n  endpoint: {srv.endpoint}\n"
        "tiers:\n  - name: hub\n    remote: hub\n")
    return load_config(root / "colabkit.yaml")


def put_checkpoint(cfg, step: int, staging: Path) -> str:
    p = Checkpointer(staging, prefix="v01").save(step, {"step": step, "w": torch.full((1000,), float(step))})
    rel = cfg.remote_path(cfg.checkpoint_dir("v01") / p.name)
    with open_remote(cfg, "hub") as hub:
        hub.put_many([(p, rel), (manifest_path(p), rel + ".json")], message=f"step {step}")
    return rel


def test_a_newer_checkpoint_on_the_hub_is_fetched_and_verified(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = project(tmp_path, hub_server)
    Checkpointer(cfg.checkpoint_dir("v01"), prefix="v01").save(100, {"step": 100})
    rel = put_checkpoint(cfg, 300, tmp_path / "staging")
    plan = locate(config=cfg, experiment="v01")
    assert [(s.name, s.state, s.newest_step) for s in plan.sources] == [("local", "ok", 100), ("hub", "ok", 300)]
    assert (plan.choice.source, plan.choice.path) == ("hub", rel)
    path = fetch(plan, progress=False)
    assert path == cfg.checkpoint_dir("v01") / "v01_step_00000300.pt"
    (info,) = [i for i in discover(path.parent) if i.step == 300]
    verify(info)
    assert json.loads(manifest_path(path).read_text())["sha256"] == info.sha256
    assert torch.load(path, weights_only=True)["step"] == 300


def test_a_rejected_hub_token_is_reported_and_local_is_used(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = project(tmp_path, hub_server)
    put_checkpoint(cfg, 300, tmp_path / "staging")
    local = Checkpointer(cfg.checkpoint_dir("v01"), prefix="v01").save(100, {"step": 100})
    monkeypatch.setenv("HF_TOKEN", "hf_NotAValidTokenAtAll000000000000000")
    plan = locate(config=cfg, experiment="v01")
    hub = plan.source("hub")
    assert hub.state == "error" and hub.error.startswith("RemoteAuthError: hub: ")
    assert "hf_NotAValidToken" not in hub.error, "a token must never appear in a report"
    assert (plan.choice.source, plan.choice.step) == ("local", 100)
    assert plan.reason == "step 100 is the highest; skipped hub (unavailable)"
    assert fetch(plan, progress=False) == local


# -- resume under faults ---------------------------------------------------------------------------------
from colabkit.errors import ResumeError  # noqa: E402
from colabkit.remotes.hub import HubRemote  # noqa: E402


def faulty_hub(cfg, *, max_attempts: int = 2) -> HubRemote:
    """The configured hub tier, quick to give up (its own tries), so resume's retries are what is tested."""
    r = HubRemote.from_config(cfg, cfg.tier("hub"))
    r.max_attempts, r._sleep = max_attempts, (lambda s: None)
    return r


def two_on_the_hub(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = project(tmp_path, hub_server)
    put_checkpoint(cfg, 100, tmp_path / "staging")
    rel = put_checkpoint(cfg, 200, tmp_path / "staging")
    return cfg, rel


def local_steps(cfg) -> list[int]:
    d = cfg.checkpoint_dir("v01")
    return sorted(i.step for i in discover(d)) if d.exists() else []


def test_a_503_while_downloading_the_newest_is_retried_not_fallen_back(tmp_path, hub_server, monkeypatch):
    """One 503 on the newest checkpoint's download used to make resume 'fall back to hub step 100' and exit 0."""
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    hub_server.inject(method="GET", port="cdn", path=r"/lfs/", status=503, times=3)   # more than the remote's tries
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg)], deadline=60)
    assert (plan.choice.source, plan.choice.step) == ("hub", 200)
    path = fetch(plan, progress=False)
    assert path.name == "v01_step_00000200.pt" and torch.load(path, weights_only=True)["step"] == 200
    assert "fell back" not in plan.reason and plan.unreachable == []
    assert local_steps(cfg) == [200]
    assert [k for k, *_ in hub_server.injected] == ["503", "503", "503"]


def test_a_429_on_a_lookup_or_a_manifest_is_retried_after_retry_after(tmp_path, hub_server, monkeypatch):
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    hub_server.inject(path=r"/tree/", status=502, times=2)
    hub_server.inject(path=r"/resolve/.*\.json$", status=429, headers={"Retry-After": "1"}, times=2)
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg)], deadline=60)
    assert plan.source("hub").state == "ok" and (plan.choice.source, plan.choice.step) == ("hub", 200)
    assert fetch(plan, progress=False).name == "v01_step_00000200.pt"


def _unreachable_newest(hub_server):
    hub_server.inject(method="GET", port="cdn", path=r"/lfs/", status=503, times=10_000)


def test_newest_unreachable_waits_until_the_deadline_then_fails_and_uses_nothing_older(tmp_path, hub_server,
                                                                                      monkeypatch):
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg)], deadline=1)
    assert plan.on_unreachable == "wait"
    _unreachable_newest(hub_server)
    with pytest.raises(ResumeError) as ei:
        fetch(plan, progress=False)
    assert str(ei.value) == (
        f"hub step 200 could not be fetched (retried for 1s): hub: downloading {rel} from model repo 'alice/ckpt' "
        "failed: the Hub answered HTTP 503 (injected 503); it will be retried; no older checkpoint was used in its "
        "place. Retry when hub answers again, or set resume.on_unreachable: older (--on-unreachable older) to "
        "resume from the best checkpoint that can be fetched")
    assert len(hub_server.injected) > 2, "resume did not retry before giving up"
    assert local_steps(cfg) == [], "an older checkpoint was fetched"


def test_newest_unreachable_with_fail_fails_at_once(tmp_path, hub_server, monkeypatch):
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg)], on_unreachable="fail")
    _unreachable_newest(hub_server)
    with pytest.raises(ResumeError) as ei:
        fetch(plan, progress=False)
    assert str(ei.value).startswith(f"hub step 200 could not be fetched: hub: downloading {rel} ")
    assert len(hub_server.injected) == 2, "fail: only the remote's own tries"
    assert local_steps(cfg) == []


def test_newest_unreachable_with_older_resumes_older_and_says_so(tmp_path, hub_server, monkeypatch, caplog):
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg)], on_unreachable="older",
                  deadline=0)
    sha200 = hub_server.files("alice/ckpt")[rel].lfs
    hub_server.inject(method="GET", port="cdn", path=f"/lfs/{sha200}", status=503, times=10_000)
    path = fetch(plan, progress=False)
    assert path.name == "v01_step_00000100.pt" and (plan.choice.source, plan.choice.step) == ("hub", 100)
    assert plan.reason.endswith("could not be fetched: resumed from the older hub step 100 "
                                "(resume.on_unreachable: older)")
    assert plan.unreachable and plan.unreachable[0].startswith("hub step 200 (hub: downloading ")
    assert plan.as_dict()["unreachable"] == plan.unreachable
    assert "trying an older checkpoint (resume.on_unreachable: older)" in caplog.text


def test_an_unreachable_source_is_not_skipped_for_an_older_local_checkpoint(tmp_path, hub_server, monkeypatch):
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    Checkpointer(cfg.checkpoint_dir("v01"), prefix="v01").save(50, {"step": 50})
    # Retry-After: 0 keeps huggingface_hub's own back-off (5 tries inside each listing) to ~1 s a try
    hub_server.inject(path=r"/tree/", status=503, headers={"Retry-After": "0"}, times=10_000)
    with pytest.raises(ResumeError) as ei:
        locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg, max_attempts=1)], deadline=1)
    msg = str(ei.value)
    assert msg.startswith("hub could not be reached for 1s and may hold a newer checkpoint than local step 50 "
                          "(hub: TransientRemoteError: hub: listing model repo 'alice/ckpt' failed: the Hub answered "
                          "HTTP 503 (injected 503); it will be retried); nothing was resumed.")
    assert msg.endswith("Retry when hub answers again, or set resume.on_unreachable: older (--on-unreachable older) "
                        "to resume from local step 50 anyway")
    plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg, max_attempts=1)],
                  on_unreachable="older", deadline=0)
    assert (plan.choice.source, plan.choice.step) == ("local", 50)
    assert plan.reason.endswith("; hub could not be reached and may hold a newer checkpoint "
                                "(resume.on_unreachable: older)")
    assert plan.source("hub").as_dict()["unreachable"] is True


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_resume_under_random_faults_picks_the_newest_or_fails_clearly(tmp_path, hub_server, monkeypatch, ratio):
    """At 30 % faults the old code resumed the newest 1 time in 10 (3 silently older, 6 failed)."""
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = project(tmp_path, hub_server)
    for step in (100, 200, 300):
        put_checkpoint(cfg, step, tmp_path / "staging")
    outcomes = []
    for i in range(10):
        hub_server.ratio(ratio, seed=100 + i)
        try:
            plan = locate(config=cfg, experiment="v01", sources=["local", faulty_hub(cfg, max_attempts=3)],
                          deadline=30)
            path = fetch(plan, progress=False)
            outcomes.append(plan.choice.step)
            assert path.name == "v01_step_00000300.pt"
            assert torch.load(path, weights_only=True)["step"] == 300
        except ResumeError as e:
            outcomes.append(str(e))
        finally:
            hub_server.ratio(0)
        for p in cfg.checkpoint_dir("v01").glob("*"):
            p.unlink()
    assert all(o == 300 or (isinstance(o, str) and "no older checkpoint was used" in o or "nothing was resumed" in o)
               for o in outcomes), outcomes
    assert outcomes.count(300) >= 8, outcomes
    assert len(hub_server.injected) >= (2 if ratio < 0.2 else 10), hub_server.injected


def test_train_resume_auto_does_not_start_from_an_older_checkpoint(tmp_path, hub_server, monkeypatch):
    """What `%train vXX --resume auto` asks: with the newest unreachable it fails, or warns under `older`."""
    from colabkit import runner
    cfg, rel = two_on_the_hub(tmp_path, hub_server, monkeypatch)
    sha200 = hub_server.files("alice/ckpt")[rel].lfs
    hub_server.inject(method="GET", port="cdn", path=f"/lfs/{sha200}", status=503, headers={"Retry-After": "0"},
                      times=10_000)
    import dataclasses
    quick = dataclasses.replace(cfg, resume=dataclasses.replace(cfg.resume, deadline=0))
    with pytest.raises(ResumeError) as ei:
        runner._resume_source(quick, "v01", "auto")
    assert str(ei.value).startswith("hub step 200 could not be fetched (retried for 0s): hub: downloading ")
    assert local_steps(cfg) == []
    warnings: list[str] = []
    path = runner._resume_source(quick, "v01", "auto", on_unreachable="older", warn=warnings.append)
    assert Path(path).name == "v01_step_00000100.pt"
    assert len(warnings) == 1 and warnings[0].startswith(f"v01: resuming from an older checkpoint, {path}: ")
    assert warnings[0].endswith("resumed from the older hub step 100 (resume.on_unreachable: older)")
