"""``colabkit demo``: the whole loop on local folders, in a temporary folder, in well under two minutes.

1. scaffold a project on the "laptop" (``colabkit init``) and commit it to a new git repository;
2. ``airlock export v01`` to the drive tier (a local folder: no credentials are configured);
3. ``airlock pull v01`` on the "cluster" and ``colabkit train v01`` there, with sync running to the drive
   tier (logs) and the hub tier (weights), both local folders;
4. a preemption: the whole training process group is killed with SIGKILL mid-run, and the cluster's disk is
   lost with it;
5. a new "cluster" pulls the same bundle, ``resume`` finds the newest verified checkpoint on the tiers,
   and training finishes from there;
6. back on the laptop, ``airlock import v01`` brings the logs home and writes the journal entry; the
   final weights are compared with an uninterrupted run (bit for bit) and the status is printed.

Every step goes through the same public API the magics and the CLI use.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import ColabkitError

EXPERIMENT = "v01"
#: one colabkit.yaml for the laptop and both clusters: every tier is a folder under the demo's own home
DEMO_CONFIG = """\
# colabkit demo: the drive and hub tiers fall back to local folders under `home`, since no credentials are set
project: demo
home: {home}
tiers:
  - name: drive          # logs, journal, airlock bundles
    every: 1s
  - name: hub            # weights only, the newest checkpoint due
    every: 1s
sync:
  settle: 1s
retention:
  keep_local: 2
  min_free: 50MB
train:
  max_restarts: 1
  restart_backoff: 1s
  min_free_disk: 50MB
"""


_SAVED = re.compile(r"saved checkpoint at iteration (\d+)")


class DemoError(ColabkitError):
    """A step of the demo did not do what it should (the message says which)."""


def _git(root: Path, *args: str) -> None:
    if shutil.which("git") is None:
        raise DemoError("colabkit demo needs git (the airlock exports committed code); install git and rerun")
    subprocess.run(["git", "-c", "user.name=colabkit demo", "-c", "user.email=demo@colabkit.invalid",
                    "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
                   cwd=root, check=True, capture_output=True, text=True, timeout=60)


def _new_site(path: Path, config_text: str):
    """A machine's project folder holding the shared colabkit.yaml; returns its loaded configuration."""
    from .config import load_config
    path.mkdir(parents=True, exist_ok=True)
    (path / "colabkit.yaml").write_text(config_text, encoding="utf-8")
    return load_config(path / "colabkit.yaml")


def _run_until_preempted(cfg, args: list[str], *, kill_at: int, say: Callable[[str], None],
                         timeout: float) -> dict[str, Any]:
    """``colabkit train`` as its own process group; SIGKILL the group once the run has saved step `kill_at`,
    the hub tier holds a checkpoint and the drive tier the run's log (as it would after a tick or two)."""
    from . import resume
    from .remotes import open_remote
    drive = open_remote(cfg, "drive")
    logs_prefix = cfg.remote_path(cfg.log_dir(EXPERIMENT))
    env = dict(os.environ, COLABKIT_CONFIG=str(cfg.source), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "colabkit", "train", EXPERIMENT, "--resume", "none", "--", *args]
    proc = subprocess.Popen(cmd, cwd=cfg.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="colabkit-demo-reader", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    hub_step: int | None = None
    saved = 0
    saved_at: dict[int, float] = {}
    eof = False
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.25)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
                break
            m = _SAVED.search(line)
            if m:
                saved = max(saved, int(m.group(1)))
                saved_at[int(m.group(1))] = time.time()
                say(f"    | {line}")
            if saved >= kill_at:
                # what resume would trust there: the newest checkpoint whose manifest agrees with it
                hub_step = resume.locate(config=cfg, experiment=EXPERIMENT, sources=["hub"]).source("hub").newest_step
                if hub_step is not None and any(f.path.endswith(".log") for f in drive.list(logs_prefix)):
                    break
        else:
            raise DemoError(f"the run did not reach step {kill_at}, or its first checkpoint and log did not reach the "
                            f"hub and drive tiers, within {timeout:.0f} s; see {cfg.state_dir / 'logs'} and "
                            f"{cfg.log_dir(EXPERIMENT)}")
        if eof:
            raise DemoError(f"colabkit train ended (exit {proc.wait(10)}) before the preemption; see "
                            f"{cfg.log_dir(EXPERIMENT)}")
    finally:
        killed_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the VM vanishes: the runner, train.py and its sync at once
        proc.wait(30)
        reader.join(30)  # the pipe closes when the last process of the group is gone
        if proc.stdout is not None:
            proc.stdout.close()
    # what the tier holds now (an upload may have completed between the check above and the kill)
    hub_step = resume.locate(config=cfg, experiment=EXPERIMENT, sources=["hub"]).source("hub").newest_step
    local = sorted(p.name for p in cfg.checkpoint_dir(EXPERIMENT).glob("*.pt"))
    return {"pid": proc.pid, "exit": proc.returncode, "hub_step": hub_step, "local_checkpoints": local,
            "lost": _not_synced(cfg, "hub", saved_at, hub_step, pid=proc.pid, killed_at=killed_at)}


def _not_synced(cfg, tier: str, saved_at: dict[int, float], tier_step: int | None, *, pid: int,
                killed_at: float) -> list[dict[str, Any]]:
    """Each checkpoint saved locally but not held by `tier` when the machine vanished, and why: read from the
    tier's ledger (what it held, what was being uploaded) and the sync status the run persisted (next upload)."""
    from . import sync
    from .config import format_duration
    from .ledger import Ledger
    ledger = Ledger.load(cfg.state_dir, tier)
    snaps = [s for s in sync.persisted_status(config=cfg, pid=pid) if tier in (s.get("tiers") or {})]
    snap = snaps[-1]["tiers"][tier] if snaps else {}
    every = format_duration(cfg.tier(tier).every)

    def span(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms" if seconds < 1 else format_duration(seconds)

    out = []
    for step in sorted(s for s in saved_at if tier_step is None or s > tier_step):
        rel = cfg.remote_path(cfg.checkpoint_dir(EXPERIMENT) / f"{EXPERIMENT}_step_{step:08d}.pt")
        ago = max(0.0, killed_at - saved_at[step])
        due = snap.get("next_due")
        last = snap.get("last_upload")
        if rel in ledger.inflight:
            why = f"its upload to the {tier} tier had started but not finished (a cut-off upload is never trusted)"
        elif due and due > killed_at:
            why = (f"it was waiting for the {tier} tier's next upload, due {span(due - killed_at)} after the "
                   f"preemption (the tier uploads every {every})")
        else:
            why = (f"the {tier} tier (every {every}) had not picked it up yet"
                   + (f"; its last upload ended {span(max(0.0, killed_at - last))} before the preemption"
                      if last else ""))
        out.append({"step": step, "saved_before": ago, "why": why,
                    "text": f"step {step} is lost with the disk: saved {span(ago)} before the preemption, it had "
                            f"not been synced yet: {why}; the run resumes from step {tier_step}"})
    return out


def _final_weights_equal(a: Path, b: Path) -> bool:
    import torch
    sa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run(directory: str | os.PathLike | None = None, *, steps: int = 300, save_every: int = 50,
        step_delay: float | None = None, out: Callable[[str], None] = print, timeout: float = 90.0) -> dict[str, Any]:
    """Run the demo in `directory` (default: a new temporary folder, kept afterwards so you can look around).

    Args:
        directory: an empty or missing folder to work in.
        steps, save_every: the template's ``--steps`` and ``--save-every``.
        step_delay: seconds per step added by the template (``--step-delay``) so the toy run lasts long enough
            for the tiers to receive a checkpoint before the preemption (default: the run lasts ~8 s).
        out: where the narration goes (one line per call).
        timeout: the longest any one phase may take before the demo gives up, saying where to look.
    Returns:
        A summary: the folder, each phase's figures, ``weights_identical`` and ``seconds``.
    Raises:
        DemoError: `directory` is not empty, git is missing, or a phase did not do what it should.
    """
    from . import airlock, dashboard, resume, runner
    from .templates import scaffold

    t0 = time.monotonic()
    base = Path(directory).expanduser().resolve() if directory else Path(tempfile.mkdtemp(prefix="colabkit-demo-"))
    if base.exists() and any(base.iterdir()):
        raise DemoError(f"{base} is not empty; pass a new or empty folder (--dir) so nothing of yours is touched")
    base.mkdir(parents=True, exist_ok=True)
    if step_delay is None:
        step_delay = round(max(0.02, 8.0 / steps), 4)
    config_text = DEMO_CONFIG.format(home=json.dumps(str(base / "home")))
    args = ["--steps", str(steps), "--save-every", str(save_every), "--step-delay", str(step_delay)]
    summary: dict[str, Any] = {"directory": str(base), "experiment": EXPERIMENT, "steps": steps}

    def phase(title: str) -> None:
        out(f"[{time.monotonic() - t0:5.1f}s] {title}")

    out(f"colabkit demo in {base}  (every tier is a local folder under {base / 'home' / 'remotes'})")

    # 1. the laptop: a project under git
    phase("laptop: colabkit init, git commit")
    laptop = base / "laptop"
    scaffold(laptop, experiment=EXPERIMENT, project="demo")
    laptop_cfg = _new_site(laptop, config_text)
    _git(laptop, "init", "-q")
    _git(laptop, "add", "-A")
    _git(laptop, "commit", "-q", "-m", "v01: the template experiment")

    # 2. export
    phase(f"laptop: airlock export {EXPERIMENT}")
    exp = airlock.export(EXPERIMENT, config=laptop_cfg)
    again = airlock.export(EXPERIMENT, config=laptop_cfg)
    out(f"    bundle {exp['short']}: {exp['files']} files, {exp['bundle_size']} bytes -> {exp['remote_path']} "
        f"on the {exp['remote']} tier; an unchanged re-export uploaded {again['bytes_uploaded']} bytes")
    summary["export"] = {"bundle": exp["bundle"], "files": exp["files"], "reexport_bytes": again["bytes_uploaded"]}

    # 3. the first cluster: pull, train with sync, preempted
    phase(f"cluster A: airlock pull {EXPERIMENT}; colabkit train {EXPERIMENT} -- {' '.join(args)}")
    cluster_a = _new_site(base / "cluster-a", config_text)
    pulled = airlock.pull(EXPERIMENT, config=cluster_a)
    out(f"    pulled bundle {pulled['short']}, every file verified against its manifest")
    kill_at = max(save_every, (steps // 2 // save_every) * save_every)
    pre = _run_until_preempted(cluster_a, args, kill_at=kill_at, say=out, timeout=timeout)
    phase(f"cluster A: PREEMPTED (SIGKILL to the whole process group, pid {pre['pid']}); the hub tier holds "
          f"step {pre['hub_step']}; the VM's disk is gone")
    for lost in pre["lost"]:
        out(f"    {lost['text']}")
    shutil.rmtree(cluster_a.root)
    summary["preempted"] = pre

    # 4. a fresh cluster: pull, resume from the best source, finish
    phase(f"cluster B (empty disk): airlock pull {EXPERIMENT}; resume")
    cluster_b = _new_site(base / "cluster-b", config_text)
    airlock.pull(EXPERIMENT, config=cluster_b)
    plan = resume.locate(config=cluster_b, experiment=EXPERIMENT)
    for line in plan.lines():
        out(f"    {line}")
    if plan.choice is None:
        raise DemoError("resume found no checkpoint on any tier after the preemption; see "
                        f"{base / 'home' / 'remotes'}")
    phase(f"cluster B: colabkit train {EXPERIMENT} --resume auto")
    res = runner.train(EXPERIMENT, config=cluster_b, resume="auto", args=args,
                       on_line=lambda s: out(f"    | {s}") if "saved checkpoint" in s else None)
    if not res.ok:
        raise DemoError(f"the resumed run ended {res.state} (exit {res.exit_code}); last lines:\n  "
                        + "\n  ".join(res.last_lines))
    out(f"    finished at step {res.step}, loss {res.loss}, in {res.elapsed:.1f} s; sync flushed")
    summary["resumed"] = {"from_step": plan.choice.step, "from": plan.choice.source, "step": res.step,
                          "loss": res.loss, "attempts": len(res.attempts)}

    # 5. the laptop again: logs home, journal
    phase(f"laptop: airlock import {EXPERIMENT} (logs from the drive tier), journal.md")
    imp = airlock.import_logs(EXPERIMENT, config=laptop_cfg, from_="drive")
    out(f"    {len(imp['files'])} log files into {os.path.relpath(imp['logs'], base)}; journal entry:")
    for line in (imp.get("entry") or "").strip().splitlines():
        out(f"      {line}")
    summary["imported"] = len(imp["files"])

    # 6. proof: same weights as a run that was never interrupted
    phase("check: an uninterrupted run of the same script, for comparison")
    ref = base / "reference"
    env = dict(os.environ, COLABKIT_EXPERIMENT=EXPERIMENT)
    env.pop("COLABKIT_RESUME_FROM", None)
    subprocess.run([sys.executable, str(laptop / "experiments" / EXPERIMENT / "train.py"), "--steps", str(steps),
                    "--save-every", str(steps), "--checkpoint-dir", str(ref)], env=env, check=True,
                   capture_output=True, text=True, timeout=timeout)
    name = f"{EXPERIMENT}_step_{steps:08d}.pt"
    same = _final_weights_equal(ref / name, cluster_b.checkpoint_dir(EXPERIMENT) / name)
    out(f"    final weights after preemption + resume {'==' if same else '!='} uninterrupted run "
        f"({'bit for bit' if same else 'they differ'})")
    summary["weights_identical"] = same

    phase("status (laptop)")
    snap = dashboard.snapshot(config=laptop_cfg, experiment=EXPERIMENT, include_resume=True)
    for line in dashboard.render_text(snap):
        out(f"    {line}")
    summary["seconds"] = round(time.monotonic() - t0, 1)
    out(f"done in {summary['seconds']:.1f} s. Look around: {base}  (rm -rf it when done)")
    if not same:
        raise DemoError("the resumed run's weights differ from an uninterrupted run's; please report this")
    return summary
