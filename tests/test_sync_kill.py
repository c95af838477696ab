"""Real child processes: kill -9 mid-upload then restart; SIGTERM to `colabkit sync watch` flushes first."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colabkit.config import load_config
from colabkit.ledger import Ledger
from tests.test_sync import age, ckpt, make_project, remote_files, sha, wait_for

REPO = Path(__file__).resolve().parents[1]


def child(root: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tests.sync_child", str(root), mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["block-before", "block-after"])
def test_kill_9_mid_upload_then_restart_delivers_each_checkpoint_once(tmp_path, mode):
    root = make_project(tmp_path)
    files = [ckpt(root, s, size=50_000 + s) for s in (10, 20, 30)]
    p = child(root, mode)
    try:
        wait_for(lambda: (root / "blocked").exists() or p.poll() is not None, timeout=30, what="the child to block")
        assert p.poll() is None, p.communicate()
        blocked = (root / "blocked").read_text()
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    cfg = load_config(start=root)
    led = Ledger.load(cfg.state_dir, "backup")
    assert blocked in {r["remote_path"] for r in led.inflight.values()}  # the interruption was recorded
    # restart: a fresh process finishes what was interrupted
    p2 = child(root, "once")
    out, err = p2.communicate(timeout=60)
    assert p2.returncode == 0, err
    remote = remote_files(tmp_path / "remote_backup")
    expected = {f"checkpoints/{f.name}": sha(f) for f in files}
    expected.update({f"checkpoints/{f.name}.json": sha(f.with_name(f.name + ".json")) for f in files})
    assert remote == expected
    puts = (root / "puts.log").read_text().split("\n")[:-1]
    assert sorted(line.split()[0] for line in puts) == sorted(expected)  # every file put exactly once
    for line in puts:
        path, digest = line.split()
        assert digest == expected[path]
    led = Ledger.load(cfg.state_dir, "backup")
    assert led.inflight == {}
    assert {k: v["sha256"] for k, v in led.entries.items()} == expected
    # and a third start uploads nothing at all
    p3 = child(root, "once")
    p3.communicate(timeout=60)
    assert (root / "puts.log").read_text().split("\n")[:-1] == puts


def test_sigterm_to_sync_watch_flushes_before_exit(tmp_path):
    root = make_project(tmp_path)
    first = ckpt(root, 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "colabkit", "sync", "watch", "--every", "1h",
                          "--config", str(root / "colabkit.yaml")], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dst = tmp_path / "remote_backup" / "checkpoints"
        wait_for(lambda: (dst / (first.name + ".json")).exists() or p.poll() is not None, timeout=30,
                 what="the first tick")
        assert p.poll() is None, p.communicate()

        def elsewhere():  # `colabkit sync status` in another process sees the watcher's snapshot
            r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "status", "--json"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=60)
            return json.loads(r.stdout).get("elsewhere")
        seen = wait_for(lambda: (e := elsewhere()) and e[0]["tiers"]["backup"]["uploaded"] == 2 and e,
                        what="the watcher's persisted status")
        assert [e["pid"] for e in seen] == [p.pid]
        late = ckpt(root, 2)  # not due for an hour
        log_file = root / "logs" / "train.log"
        log_file.write_text("final line\n")
        age(log_file, 5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert (dst / late.name).read_bytes() == late.read_bytes()
    assert (tmp_path / "remote_backup" / "logs" / "train.log").read_text() == "final line\n"
    assert "stopped: everything due is uploaded" in out
    assert "watching " in out


def test_sigterm_handler_of_the_library_flushes_and_chains(tmp_path):
    """A plain script that called sync.start() and is sent SIGTERM flushes, then dies of SIGTERM as before."""
    root = make_project(tmp_path)
    script = tmp_path / "train_like.py"
    script.write_text(f"""
import sys, threading
from colabkit import sync
from colabkit.config import load_config
cfg = load_config(start={str(root)!r})
sync.start(config=cfg, every=3600)
g = list(sync._registry.values())[0]
ev = threading.Event()
while not g.status()["tiers"]["backup"]["last_tick"]:
    ev.wait(0.02)
open({str(root / 'checkpoints' / 'late.log')!r}, 'w').write('x\\n')
print('ready', flush=True)
ev.wait()
""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == -signal.SIGTERM
    assert (tmp_path / "remote_backup" / "checkpoints" / "late.log").read_text() == "x\n"


def test_interpreter_exit_flushes(tmp_path):
    """A script that started sync and simply ends: the atexit hook uploads what it wrote last."""
    root = make_project(tmp_path)
    script = tmp_path / "ends.py"
    script.write_text(f"""
import threading
from colabkit import sync
from colabkit.config import load_config
g = sync.start(config=load_config(start={str(root)!r}), every=3600)
ev = threading.Event()
while not g.status()["tiers"]["backup"]["last_tick"]:
    ev.wait(0.02)
open({str(root / 'logs' / 'final.log')!r}, 'w').write('done\\n')
""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "remote_backup" / "logs" / "final.log").read_text() == "done\n"
    assert r.stdout == "" and r.stderr == ""


def test_stale_temporaries_of_killed_writers_are_swept_when_a_syncer_starts(tmp_path):
    """issue 16 §5: a kill -9 mid-copy left partial `.colabkit-tmp-*` files in the tier folder (and ledger
    temporaries) that nothing removed; on a mounted Drive they are synced and count against its quota."""
    from colabkit.fsutil import TMP_PREFIX, owner_tag, temp_prefix
    root = make_project(tmp_path)
    files = [ckpt(root, s, size=50_000 + s) for s in (10, 20)]
    tier = tmp_path / "remote_backup"
    p = child(root, "block-mid")
    try:
        wait_for(lambda: (root / "blocked").exists() or p.poll() is not None, timeout=30, what="the child to block")
        assert p.poll() is None, p.communicate()
        dead_tag = owner_tag(p.pid)   # read while it is alive: pid + start time
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    partial = [q for q in tier.rglob(TMP_PREFIX + "*")]
    assert len(partial) == 1 and f".{dead_tag}." in partial[0].name   # the copy it was writing
    ledger_dir = root / ".colabkit" / "ledger"
    stale_ledger = ledger_dir / f"{TMP_PREFIX}backup.json.{dead_tag}.abc123"
    stale_ledger.write_text("{")
    live = tier / "checkpoints" / (temp_prefix("v01_step_00000099.pt") + "live01")   # this process: alive
    live.write_bytes(b"being written")
    unknown_new = tier / f"{TMP_PREFIX}notes.txt.x1y2z3"          # no owner in the name, just written
    unknown_new.write_bytes(b"?")
    unknown_old = tier / f"{TMP_PREFIX}old.bin.q9w8e7"            # no owner, untouched for two hours
    unknown_old.write_bytes(b"old")
    age(unknown_old, 7200)
    p2 = child(root, "once")
    out, err = p2.communicate(timeout=60)
    assert p2.returncode == 0, err
    assert not partial[0].exists() and not stale_ledger.exists() and not unknown_old.exists()
    assert live.exists() and unknown_new.exists()
    expected = {f"checkpoints/{f.name}" for f in files} | {f"checkpoints/{f.name}.json" for f in files}
    assert set(remote_files(tier)) - {str(q.relative_to(tier)) for q in (live, unknown_new)} == expected
    log = (root / ".colabkit" / "logs" / "sync.log").read_text()
    assert f"backup: removed 2 stale temporary file(s) (" in log and f"left by interrupted writers in {tier}" in log
    assert f"backup: removed 1 stale temporary file(s) (1 B) left by interrupted writers in {ledger_dir}" in log
