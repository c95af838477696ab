"""The dashboard: snapshots of real projects, their text / JSON / HTML views for runs in every state, the live
widget (its thread, the post_run_cell refresh, --follow), and the CLI and magic around it."""
from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from colabkit import dashboard, runner
from colabkit.cli import main
from colabkit.config import load_config

SCRIPTS = Path(__file__).parent / "scripts"
NOW = 10_000.0


def snap(**over) -> dict:
    base = {
        "version": 1, "time": NOW, "project": "rsm", "root": "/work/rsm", "colabkit_version": "0.1.0",
        "experiment": "v68",
        "runtime": {"host": "l4-vm", "platform": "vm", "frontend": "notebook", "frontend_name": "VS Code Jupyter",
                    "python": "3.11.7", "gpus": [{"name": "NVIDIA L4", "memory_total": 23_034_000_000, "tier": 1}],
                    "tier": 1, "tier_label": "Tier 1 (L4-class, jobs capped at 20.0 GB)", "vram_cap": 20 * 10**9,
                    "disk_free": 50 * 10**9, "disk_path": "/work/rsm/experiments/v68/checkpoints"},
        "train": {"experiment": "v68", "state": "running", "step": 1200, "total_steps": 5000, "loss": 2.3456,
                  "rate": 4.0, "eta": 950.0, "estimate": 1800.0, "attempt": 2, "restarts": 1, "max_restarts": 3,
                  "checkpoint_step": 1000, "checkpoint": "/work/rsm/experiments/v68/checkpoints/v68_step_1000.pt",
                  "history": [[10 * i, 5.0 / (i + 1)] for i in range(120)]},
        "jobs": [],
        "sync": {"running": True, "tiers": {
            "drive": {"state": "idle", "last_upload": 9_400.0, "next_due": 14_800.0, "pending_files": 2,
                      "pending_bytes": 3_500_000, "ledger_files": 41, "last_error": None,
                      "last_uploaded": {"path": "experiments/v68/logs/run.log", "size": 12_000}},
            "hub": {"state": "retrying", "last_upload": None, "next_due": 10_030.0, "pending_files": 1,
                    "pending_bytes": 1_200_000_000, "ledger_files": 0,
                    "last_error": "hub: 429 Too Many Requests; retrying in 30s"}}},
        "triggers": {"version": 1, "configured": False, "step": 1200, "rules": [],
                     "queue": {s: 0 for s in dashboard._QUEUE_STATES}, "entries": []},
        "resume": {"state": "fresh", "checked": 9_990.0, "age": 10.0, "max_age": 600.0, "refreshing": False,
                   "policy": "newest",
                   "sources": [{"name": "local", "state": "ok", "step": 1200}, {"name": "drive", "state": "empty"},
                               {"name": "hub", "state": "error", "error": "hub: token rejected"}],
                   "choice": {"source": "local", "step": 1200}, "reason": "newest step", "error": None},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not v.pop("__replace__", False):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return base


TRIGGERS = {"version": 1, "configured": True, "step": 1200,
            "rules": [{"name": "cooldown-2k", "detector": "checkpoint", "action": "cooldown", "mode": "once",
                       "at": [1000, 2000], "every": None, "fired": [1000], "next": 2000},
                      {"name": "eval", "detector": "checkpoint", "action": "command", "mode": "each",
                       "at": None, "every": 500, "fired": [500, 1000], "next": 1500}],
            "queue": {"pending": 1, "waiting": 0, "running": 1, "done": 2, "failed": 1, "interrupted": 0,
                      "cancelled": 0},
            "entries": [{"id": "q-0001", "rule": "eval", "action": "command", "state": "done", "step": 500,
                         "attempts": 1, "updated": 9_000.0},
                        {"id": "q-0002", "rule": "cooldown-2k", "action": "cooldown", "state": "running",
                         "step": 1000, "attempts": 1, "updated": 9_500.0},
                        {"id": "q-0003", "rule": "eval", "action": "command", "state": "failed", "step": 1000,
                         "attempts": 3, "updated": 9_900.0}]}


# -- text -------------------------------------------------------------------------------------------------
def test_text_view_of_a_running_run_shows_every_section_in_order():
    lines = dashboard.render_text(snap())
    assert lines[0] == "colabkit — project rsm at /work/rsm"
    assert lines[1] == ("runtime: l4-vm · vm · notebook · NVIDIA L4 (23.0 GB) · Tier 1 · free disk 50.0 GB · "
                        "colabkit 0.1.0")
    heads = [x for x in lines if not x.startswith(" ")]
    assert heads[2:] == ["training:", "sync:", "triggers:", "resume sources (priority order):"]
    assert lines[lines.index("resume sources (priority order):") + 1] == "  checked 10s ago"
    assert ("  v68: running · step 1200/5000 · loss 2.346 · 4.00 steps/s · ETA 15m 50s · estimate 30m · "
            "attempt 2") in lines
    assert "    restarts 1 of 3" in lines
    assert "    last checkpoint: step 1000 (v68_step_1000.pt)" in lines
    assert "    loss curve: 120 points, step 0 → 1190, loss 5 → 0.04167" in lines
    assert ("  drive: idle · last upload 10m ago (experiments/v68/logs/run.log, 12.0 KB) · next due in 1h 20m · "
            "pending 2 files / 3.5 MB · holds 41 files") in lines
    assert ("  hub: retrying · last upload never · next due in 30s · pending 1 files / 1.2 GB · holds 0 files · "
            "error: hub: 429 Too Many Requests; retrying in 30s") in lines
    assert "  none configured" in lines
    assert "  hub: error · hub: token rejected" in lines
    assert lines[-1] == "  → local step 1200 (newest step)"


@pytest.mark.parametrize("state,train,expect", [
    ("no run", None, "  no run"),
    ("restarting", {"state": "waiting", "attempt": 2, "restarts": 1, "rate": None, "eta": None},
     "  v68: waiting · step 1200/5000 · loss 2.346 · estimate 30m · attempt 2"),
    ("failed", {"state": "failed", "rate": None, "eta": None, "error": "v68 failed 4 times; last lines: boom"},
     "    error: v68 failed 4 times; last lines: boom"),
    ("finished", {"state": "finished", "step": 5000, "eta": 0.0},
     "  v68: finished · step 5000/5000 · loss 2.346 · 4.00 steps/s · ETA 0s · estimate 30m · attempt 2"),
])
def test_text_view_for_each_run_state(state, train, expect):
    s = snap(train=None) if train is None else snap(train=train)
    lines = dashboard.render_text(s)
    assert expect in lines, (state, lines)


def test_sync_fields_added_by_the_sync_helper_show_when_present():
    s = snap(sync={"tiers": {"drive": {"state": "paused", "last_upload": 9_000.0, "next_due": None,
                                       "paused_until": 10_600.0, "paused": "paused until 03:10",
                                       "pause_reason": "700.0 GB uploaded to this tier in the last 24 h",
                                       "skipped": 1, "skipped_files": {"big.bin": "over max_file_size"},
                                       "pending_files": 0, "pending_bytes": 0}}})
    line = next(x for x in dashboard.render_text(s) if x.startswith("  drive:"))
    assert line == ("  drive: paused · last upload 16m 40s ago · next due — · pending 0 files / 0 B · "
                    "paused until 03:10: 700.0 GB uploaded to this tier in the last 24 h · "
                    "skipped 1 (over max_file_size: big.bin)")
    assert "paused until 03:10: 700.0 GB uploaded" in dashboard.html_sync(s)


def test_triggers_text_lists_rules_queue_and_entries():
    lines = dashboard.render_text(snap(triggers=TRIGGERS))
    i = lines.index("triggers:")
    assert lines[i + 1:i + 7] == [
        "  cooldown-2k: checkpoint → cooldown (once) · at 1000, 2000 · fired 1000 · next 2000",
        "  eval: checkpoint → command (each) · every 500 · fired 500, 1000 · next 1500",
        "  queue: 1 pending, 1 running, 2 done, 1 failed",
        "    q-0001: eval → command · done · step 500 · attempts 1",
        "    q-0002: cooldown-2k → cooldown · running · step 1000 · attempts 1",
        "    q-0003: eval → command · failed · step 1000 · attempts 3"]


@pytest.mark.parametrize("res,head,choice", [
    ({"state": "stale", "age": 900.0}, "  checked 15m ago (stale)",
     "  → local step 1200 (newest step)"),
    ({"state": "stale", "age": 900.0, "refreshing": True},
     "  checked 15m ago (stale), refreshing…", "  → local step 1200 (newest step)"),
    ({"__replace__": True, "state": "refreshing", "checked": None, "age": None, "refreshing": True, "sources": [],
      "choice": None, "reason": None, "error": None}, "  asking the sources…",
     "  → not asked yet"),
    ({"choice": None, "reason": "no source holds a checkpoint: start fresh", "sources": []},
     "  checked 10s ago", "  → fresh start (no source holds a checkpoint: start fresh)"),
])
def test_resume_section_fresh_stale_and_refreshing(res, head, choice):
    lines = dashboard.render_text(snap(resume=res))
    assert head in lines
    assert lines[-1] == choice


# -- HTML and SVG -------------------------------------------------------------------------------------------
def test_html_has_the_sections_in_order_and_the_facts_of_the_text():
    doc = dashboard.render_html(snap(triggers=TRIGGERS))
    assert re.findall(r"data-section='(\w+)'", doc) == ["runtime", "training", "sync", "triggers", "resume"]
    assert "Tier 1 (L4-class, jobs capped at 20.0 GB)" in doc and "VS Code Jupyter" in doc
    assert "data-step='1200'" in doc and "data-points='120'" in doc
    assert re.findall(r"data-tier='(\w+)'", doc) == ["drive", "hub"]
    assert "hub: 429 Too Many Requests; retrying in 30s" in doc
    assert re.findall(r"data-source='(\w+)'", doc)[:3] == ["local", "drive", "hub"]
    assert "→ local step 1200 (newest step)" in doc
    assert "<script" not in doc


def test_html_escapes_what_comes_from_logs_and_remotes():
    doc = dashboard.render_html(snap(train={"error": "<img src=x onerror=alert(1)>"}))
    assert "<img src=x" not in doc and "&lt;img src=x onerror=alert(1)&gt;" in doc


def test_trigger_axis_marks_thresholds_fired_and_the_current_step():
    doc = dashboard.html_triggers(snap(triggers=TRIGGERS))
    first = re.search(r"<svg class='ck-rule' data-rule='cooldown-2k'.*?</svg>", doc).group(0)
    marks = re.findall(r"data-at='(\d+)' cx='[\d.]+' cy='13' r='4' fill='(#[0-9a-f]+)'", first)
    assert marks == [("1000", "#137333"), ("2000", "#fff")]  # fired filled, pending hollow
    assert "class='ck-now' data-step='1200'" in first
    every = re.search(r"<svg class='ck-rule' data-rule='eval'.*?</svg>", doc).group(0)
    assert re.findall(r"data-at='(\d+)'", every) == [str(500 * i) for i in range(1, 11)]  # every 500 up to 5000
    assert re.findall(r"class='ck-entry' data-state='(\w+)'", doc) == ["done", "running", "failed"]
    assert "1 pending · 1 running · 2 done · 1 failed" in doc


def test_loss_curve_svg_thins_long_histories_and_handles_none():
    hist = [[i, 1.0 + 1 / (i + 1)] for i in range(1000)]
    svg = dashboard.loss_svg(hist, total=2000)
    n = int(re.search(r"data-points='(\d+)'", svg).group(1))
    assert n <= dashboard.CURVE_POINTS and "data-last-step='999'" in svg
    assert len(re.search(r"<polyline[^>]* points='([^']*)'", svg).group(1).split()) == n
    assert "no loss logged yet" in dashboard.loss_svg([])
    assert "(log)" in dashboard.loss_svg([[1, 100.0], [2, 0.5]])  # a loss spanning 200x: log scale


# -- the loss history kept by the runner ---------------------------------------------------------------
class _E:
    def __init__(self, kind, step=None, loss=None):
        self.kind, self.step, self.loss, self.time = kind, step, loss, 0.0
        self.values = {}


def _feed(p: runner.Progress, steps) -> None:
    for s in steps:
        p.observe([_E("step", step=s), _E("loss", loss=1.0 / s)])


def test_progress_history_covers_the_whole_run_evenly_within_its_cap():
    p = runner.Progress(history_points=300)
    _feed(p, range(1, 20_001))
    h = p.history
    assert len(h) <= 300
    assert h[0][0] == 1 and h[-1][0] == 20_000
    gaps = [b[0] - a[0] for a, b in zip(h[:-2], h[1:-1])]  # the newest point rides at the end
    assert max(gaps) <= 2 * min(gaps)  # evenly thinned over the whole run, not only the recent window


def test_progress_history_of_a_resumed_attempt_continues_the_same_curve():
    p = runner.Progress()
    _feed(p, range(1, 151))       # attempt 1 dies at step 150; its last checkpoint was at 100
    p.new_attempt()
    _feed(p, range(101, 201))     # attempt 2 resumes from 100 and repeats 101..150
    steps = [s for s, _ in p.history]
    assert steps == list(range(1, 201))


# -- real projects ---------------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("COLABKIT_FAKE_GPU", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["init", "proj"]) == 0
    root = tmp_path / "proj"
    data = yaml.safe_load((root / "colabkit.yaml").read_text())
    data["train"].update({"max_restarts": 1, "restart_backoff": 0.01, "min_free_disk": "1MB", "grace": 5})
    data["dashboard"] = {"refresh": 0.05}
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(root)
    dashboard.clear_resume_cache()
    yield root
    dashboard.close_all()
    dashboard.wait_resume(30)
    dashboard.clear_resume_cache()


def test_snapshot_of_a_new_project_has_every_tier_no_run_no_triggers_and_fills_the_resume_cache(project, capsys):
    cfg = load_config()
    s = dashboard.snapshot(config=cfg)
    assert s["version"] == 1 and s["train"] is None
    assert list(s["sync"]["tiers"]) == ["drive", "hub"]
    assert s["sync"]["tiers"]["drive"]["state"] == "off" and s["sync"]["tiers"]["drive"]["ledger_files"] == 0
    assert s["triggers"]["configured"] is False and s["triggers"]["rules"] == []
    assert s["resume"]["state"] in ("refreshing", "fresh")  # the first look starts a refresh and never waits
    assert dashboard.wait_resume(30)
    s = dashboard.snapshot(config=cfg)
    assert s["resume"]["state"] == "fresh" and s["resume"]["choice"] is None
    assert [x["name"] for x in s["resume"]["sources"]] == ["local", "drive", "hub"]
    assert s["resume"]["reason"]
    json.dumps(s)  # plain data
    # a later kernel (or the CLI) reads the persisted answer, with its age
    dashboard.clear_resume_cache()
    s2 = dashboard.snapshot(config=cfg, refresh_resume=False)
    assert s2["resume"]["checked"] == s["resume"]["checked"] and s2["resume"]["state"] == "fresh"
    assert capsys.readouterr().out == ""  # nothing printed by the refresh thread


def test_stale_resume_cache_is_shown_with_its_age_and_refreshed_in_the_background(project):
    cfg = load_config()
    dashboard.refresh_resume_cache(config=cfg, wait=True)
    cache = json.loads((project / ".colabkit" / "dashboard" / "resume-_.json").read_text())
    cache["checked"] -= 3600
    (project / ".colabkit" / "dashboard" / "resume-_.json").write_text(json.dumps(cache))
    dashboard.clear_resume_cache()
    s = dashboard.snapshot(config=cfg)
    assert s["resume"]["state"] == "stale" and s["resume"]["age"] >= 3600
    assert "checked 1h ago (stale)" in "\n".join(dashboard.render_text(s))
    assert dashboard.wait_resume(30)
    assert dashboard.snapshot(config=cfg)["resume"]["state"] == "fresh"


def test_a_training_run_fills_step_loss_history_and_a_restart_keeps_the_curve(project):
    shutil.copy(SCRIPTS / "crash_then_resume.py", project / "experiments" / "v01" / "train.py")
    cfg = load_config()
    res = runner.train("v01", config=cfg, resume="none", sync=False, args=["--steps", "40"])
    s = dashboard.snapshot(config=cfg, refresh_resume=False)
    t = s["train"]
    assert t["state"] == "finished" and t["attempt"] == res.attempts[-1].number
    steps = [p[0] for p in t["history"]]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == res.step
    lines = dashboard.render_text(s)
    assert any(x.startswith("  v01: finished · step ") for x in lines)


def test_status_json_for_agents_names_the_gpu_and_its_tier(project, monkeypatch, capsys):
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA A100-SXM4-80GB:85899345920")
    from colabkit import runtime
    runtime.gpus.cache_clear()
    try:
        assert main(["status", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA L4:23034000000")
        runtime.gpus.cache_clear()
        l4 = dashboard.snapshot(refresh_resume=False)["runtime"]
    finally:
        runtime.gpus.cache_clear()
    assert data["runtime"]["tier"] == 2 and data["runtime"]["tier_label"] == "Tier 2 (A100-class)"
    assert data["runtime"]["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert data["project"] == "proj" and data["version"] == 1
    assert l4["tier"] == 1 and l4["tier_label"] == "Tier 1 (L4-class, jobs capped at 20.0 GB)"


def test_release_guard_facts_follow_the_five_sections():
    s = snap(release={"idle": 60.0, "idle_after": None, "last": None})
    lines = dashboard.render_text(s)
    assert lines[-2:] == ["release:", "  idle: 1m · idle guard off (release.idle_after)"]
    assert re.findall(r"data-section='(\w+)'", dashboard.render_html(s))[-1] == "release"
