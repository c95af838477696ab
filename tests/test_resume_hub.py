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
    root.mkdir(exist_ok=True)
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
