"""The status views: text for terminals and agents, JSON, and an ipywidgets dashboard in notebooks."""
from __future__ import annotations

import json

import pytest

from colabkit import dashboard
from colabkit.cli import main

SNAP = {
    "time": 10_000.0, "project": "rsm", "root": "/work/rsm",
    "runtime": {"host": "l4-vm", "platform": "vm", "frontend": "notebook", "python": "3.11.7",
                "gpus": [{"name": "NVIDIA L4", "memory_total": 23_034_000_000}], "tier": 1},
    "train": {"experiment": "v68", "state": "running", "step": 1200, "total_steps": 5000, "loss": 2.3456,
              "rate": 4.0, "eta": 950.0, "attempt": 2},
    "sync": {"tiers": {
        "drive": {"state": "idle", "last_upload": 9_400.0, "next_due": 14_800.0, "pending_files": 2,
                  "pending_bytes": 3_500_000, "last_error": None},
        "hub": {"state": "retrying", "last_upload": None, "next_due": 10_030.0, "pending_files": 1,
                "pending_bytes": 1_200_000_000, "last_error": "hub: 429 Too Many Requests; retrying in 30s"}}},
    "resume": {"sources": [{"name": "local", "state": "ok", "step": 1200}, {"name": "drive", "state": "empty"},
                           {"name": "hub", "state": "error", "error": "hub: token rejected"}],
               "choice": {"source": "local", "step": 1200}, "reason": "newest step"},
}


def test_text_view_shows_every_section():
    lines = dashboard.render_text(SNAP)
    assert lines[0] == "colabkit — project rsm at /work/rsm"
    assert lines[1] == "runtime: l4-vm · vm · notebook · NVIDIA L4 (23.0 GB) · Tier 1"
    assert "  v68: running · step 1200/5000 · loss 2.346 · 4.00 steps/s · ETA 15m 50s · attempt 2" in lines
    assert ("  drive: idle · last upload 10m ago · next due in 1h 20m · pending 2 files / 3.5 MB") in lines
    assert ("  hub: retrying · last upload never · next due in 30s · pending 1 files / 1.2 GB · "
            "error: hub: 429 Too Many Requests; retrying in 30s") in lines
    assert "  hub: error · hub: token rejected" in lines
    assert lines[-1] == "  → local step 1200 (newest step)"


@pytest.mark.magic
def test_widget_view_builds_with_installed_ipywidgets():
    import ipywidgets
    w = dashboard.widget(SNAP)
    assert isinstance(w, ipywidgets.VBox)
    progress = [c for c in w.children if isinstance(c, ipywidgets.IntProgress)]
    assert progress and progress[0].value == 1200 and progress[0].max == 5000
    html = "".join(c.value for c in w.children if isinstance(c, ipywidgets.HTML))
    assert "429 Too Many Requests" in html and "Tier 1" in html


def test_status_json_for_agents(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA A100-SXM4-80GB:85899345920")
    from colabkit import runtime
    runtime.gpus.cache_clear()
    try:
        assert main(["status", "--json"]) == 0
    finally:
        runtime.gpus.cache_clear()
    data = json.loads(capsys.readouterr().out)
    assert data["runtime"]["tier"] == 2
    assert data["runtime"]["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert data["project"] == tmp_path.name


@pytest.mark.magic
def test_status_magic_prints_text_without_widget_frontend(ip, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ip.run_line_magic("colabkit", "status")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"colabkit — project {tmp_path.name} at {tmp_path.resolve()}"
    assert "VBox" not in out
