"""colabkit.triggers: rules on the training log, the exactly-once action queue, and the worker — with real runs of the
template train.py, real child processes, real SIGKILLs and two workers in two processes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from colabkit import runner, triggers
from colabkit.config import load_config
from colabkit.errors import ConfigError, TriggerError
from colabkit.templates import template_path

SCRIPTS = Path(__file__).parent / "scripts"
FAST = {"max_restarts": 0, "restart_backoff": 0.01, "stall_after": 120, "grace": 5, "min_free_disk": "1MB"}
ROOT = Path(__file__).resolve().parent.parent


def make_project(root: Path, rules: list | None, *, template: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"project": "t", "tiers": [], "train": dict(FAST)}
    if rules is not None:
        data["triggers"] = rules
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    exp = root / "experiments" / "v01"
    exp.mkdir(parents=True, exist_ok=True)
    if template:
        (exp / "train.py").write_text(template_path("train.py").read_text())
    return root


def cfg_of(root: Path):
    return load_config(root / "colabkit.yaml")


def cli(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLABKIT_CONFIG")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "colabkit", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env=env)


def popen_cli(root: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "colabkit", *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(cond, timeout: float = 60.0, what: str = "condition"):
    ev = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        ev.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ckpt_lines(steps, prefix="saved checkpoint at iteration {s} to ck/v01_step_{s:08d}.pt") -> str:
    return "".join(prefix.format(s=s) + "\n" for s in steps)


# -- 1. a real run: cooldown, conversion, eval --------------------------------------------------------------
def test_run_with_rules_at_100_and_200_cooldown_conversion_and_eval(tmp_path):
    evals = tmp_path / "evals.txt"
    rules = [
        {"name": "cooldown", "event": "checkpoint", "conditions": {"at": [200]},
         "action": {"type": "cooldown", "args": ["--lr", "1e-3", "--steps", "240", "--log-every", "1"]}},
        {"name": "convert", "event": "checkpoint",
         "action": {"type": "command", "command": [sys.executable, str(SCRIPTS / "convert_safetensors.py"), "{path}",
                                                   "{output_dir}/hf/step_{step}.safetensors"]}},
        {"name": "eval", "event": "step", "conditions": {"every": 100},
         "action": {"type": "command", "command": ["sh", "-c", f"echo eval {{step}} >> {evals}"]}},
        {"name": "note", "event": "checkpoint", "conditions": {"at": [100, 200]},
         "action": {"type": "log", "message": "checkpoint {step} at {path}"}},
    ]
    root = make_project(tmp_path / "p", rules, template=True)
    cfg = cfg_of(root)
    exp = root / "experiments" / "v01"
    try:
        res = runner.train("v01", config=cfg, resume="none", args=["--steps", "300"])
        assert res.ok
        assert triggers.join(timeout=240), "the worker did not drain the queue"
    finally:
        triggers.stop_workers()
    entries = {e["rule"] + "@" + str(e["step"]): e for e in triggers.list_entries(config=cfg)}
    assert sorted(entries) == ["convert@100", "convert@200", "convert@300", "cooldown@200", "eval@100",
                               "eval@200", "eval@300", "note@100", "note@200"]
    assert {e["state"] for e in entries.values()} == {"done"}

    # the cooldown run: its own folder, resumed from the step-200 checkpoint, --lr overridden, first step 201
    cd = exp / "cooldown_200"
    logs = list((cd / "logs").glob("*/*.attempt1.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "--lr 1e-3 --steps 240 --log-every 1 --resume-from " + str(exp / "checkpoints" / "v01_step_00000200.pt") \
        in text.splitlines()[0]
    steps = [int(x.split()[1]) for x in text.splitlines() if x.startswith("step ")]
    assert steps[0] == 201 and steps[-1] == 240
    assert (cd / "checkpoints" / "v01_step_00000240.pt").is_file()
    assert json.loads(next((cd / "logs").glob("*/run.json")).read_text())["state"] == "finished"
    # ... and nothing of it in the main run's folders; the main run's checkpoints end at 300
    assert sorted(p.name for p in (exp / "checkpoints").glob("*.pt")) == [
        "v01_step_00000100.pt", "v01_step_00000200.pt", "v01_step_00000300.pt"]
    assert [p.name for p in (exp / "logs").iterdir()] == [res.run_id]
    # conversions exist and load; evals fired every 100
    from safetensors.torch import load_file
    for s in (100, 200, 300):
        assert set(load_file(str(exp / "hf" / f"step_{s}.safetensors"))) == {"0.weight", "0.bias", "2.weight",
                                                                            "2.bias"}
    assert evals.read_text().splitlines() == ["eval 100", "eval 200", "eval 300"]
    assert (root / ".colabkit" / "actions" / "v01" / "triggers.log").read_text().count("note: checkpoint") == 2

    # a second %train of the same experiment that prints the same lines again enqueues nothing new
    again = runner.train("v01", config=cfg, resume="none", args=["--steps", "200"], triggers=True)
    assert again.ok
    assert triggers.join(timeout=60)
    assert len(triggers.list_entries(config=cfg)) == 9
    assert evals.read_text().splitlines() == ["eval 100", "eval 200", "eval 300"]

    st = triggers.status(config=cfg, experiment="v01", step=250)
    assert st["version"] == 1 and st["configured"] and st["step"] == 250
    by = {r["name"]: r for r in st["rules"]}
    assert by["cooldown"] == {"name": "cooldown", "detector": "checkpoint", "action": "cooldown", "mode": "queue",
                              "at": [200], "every": None, "fired": [200], "next": None}
    assert by["eval"]["fired"] == [100, 200, 300] and by["eval"]["next"] == 400
    assert by["note"]["mode"] == "inline" and by["note"]["fired"] == [100, 200]
    assert st["queue"] == {"pending": 0, "waiting": 0, "running": 0, "done": 9, "failed": 0, "interrupted": 0,
                           "cancelled": 0}
    assert len(st["entries"]) == 9 and set(st["entries"][0]) == {"id", "rule", "action", "state", "step",
                                                                  "attempts", "updated"}


# -- 4. the seed's Megatron line, as written, with a file_exists wait ------------------------------------------
def test_seed_megatron_pattern_works_as_written_and_waits_for_the_file(tmp_path):
    ck = tmp_path / "megatron" / "iter_0050000"
    ck.mkdir(parents=True)
    out = tmp_path / "converted.txt"
    rules = [{
        "name": "checkpoint_saved",
        "pattern": r"successfully saved checkpoint from iteration\s+(?P<iteration>\d+) to (?P<path>\S+)",
        "pattern_type": "regex",
        "metadata": {"kind": "checkpoint", "trigger": "hf_conversion"},
        "extract": {"checkpoint_iteration": "iteration", "checkpoint_path": "path"},
        "conditions": {"at": [50000], "file_exists": "{checkpoint_path}/latest_checkpointed_iteration.txt",
                       "wait": "10m"},
        "action": {"type": "command", "command": ["sh", "-c", f"echo {{checkpoint_iteration}} {{checkpoint_path}} "
                                                              f"{{kind}} >> {out}"]},
    }]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "slurm-1234.out"
    log.write_text(" [2026-12-01 10:00:00] iteration    49990/  100000 | lm loss: 2.1E+00 |\n"
                   f"successfully saved checkpoint from iteration   50000 to {ck}\n")
    done = {}
    t = threading.Thread(target=lambda: done.update(triggers.watch(log, config=cfg, experiment="v01", once=True,
                                                                   poll=0.05)), name="test-watch")
    t.start()
    try:
        e = wait_for(lambda: [x for x in triggers.list_entries(config=cfg) if x["state"] == "waiting"],
                     what="the entry to wait for its file")[0]
        assert not out.exists()  # it waits for latest_checkpointed_iteration.txt
        (ck / "latest_checkpointed_iteration.txt").write_text("50000\n")
        t.join(60)
    finally:
        t.join(60)
    assert not t.is_alive()
    assert out.read_text() == f"50000 {ck} checkpoint\n"
    assert done["ran"] == [e["id"]] and e["id"].startswith("checkpoint_saved-50000-")
    assert triggers.show(e["id"], config=cfg)["state"] == "done"


def test_file_exists_wait_that_runs_out_fails_the_entry_with_the_reason(tmp_path):
    rules = [{"name": "conv", "event": "checkpoint",
              "conditions": {"file_exists": "{path}.done", "wait": "0.3s"},
              "action": {"type": "command", "command": ["true"]}}]
    root = make_project(tmp_path / "p", rules)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100]))
    triggers.watch(log, config=cfg_of(root), experiment="v01", once=True, poll=0.05)
    [e] = triggers.list_entries(config=cfg_of(root))
    assert e["state"] == "failed"
    path = root / "experiments" / "v01" / "ck" / "v01_step_00000100.pt"
    assert e["error"] == f"{path}.done did not appear within the wait (conv: conditions.wait)"


# -- thresholds: fire once, on the first event at or past them ------------------------------------------------
def test_threshold_fires_on_the_first_event_past_it_once_across_resumes_and_watchers(tmp_path):
    rules = [{"name": "cool", "event": "checkpoint", "conditions": {"at": [10000, 50000]},
              "action": {"type": "log", "message": "cooldown point {step}"}, "mode": "queue"}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log1 = tmp_path / "a.log"
    log1.write_text(ckpt_lines([5001, 10001, 45001, 50001, 55001]))
    r1 = triggers.watch(log1, config=cfg, experiment="v01", once=True, poll=0.05)
    assert sorted(r1["fired"]) == sorted(r1["ran"]) and len(r1["fired"]) == 2
    steps = sorted((e["step"], e["id"].split("-")[1]) for e in triggers.list_entries(config=cfg))
    assert steps == [(10001, "10000"), (50001, "50000")]
    # a resumed run (another log file) that saves 50001 again and goes on: nothing new
    log2 = tmp_path / "b.log"
    log2.write_text(ckpt_lines([50001, 55001, 60001]))
    assert triggers.watch(log2, config=cfg, experiment="v01", once=True, poll=0.05)["fired"] == []
    # a second watcher reading the first log from the start again: nothing new
    (root / ".colabkit" / "actions" / "v01" / "watch").rename(tmp_path / "old-positions")
    assert triggers.watch(log1, config=cfg, experiment="v01", once=True, poll=0.05)["fired"] == []
    assert (root / ".colabkit" / "actions" / "v01" / "triggers.log").read_text().count("cooldown point") == 2


def test_watch_keeps_its_position_and_a_partial_last_line_is_not_an_event(tmp_path):
    rules = [{"name": "conv", "event": "checkpoint", "action": {"type": "log", "message": "{step}"}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100, 200]) + "saved checkpoint at iteration 300 to ck/v01_step_0")
    r = triggers.watch(log, config=cfg, experiment="v01", once=True, worker=False)
    assert r["lines"] == 2 and len(r["fired"]) == 2
    with open(log, "a") as f:
        f.write("0000300.pt\n")
    r = triggers.watch(log, config=cfg, experiment="v01", once=True, worker=False)
    assert r["lines"] == 1 and len(r["fired"]) == 1  # only the new line, and the completed one is whole
    [e] = [x for x in triggers.list_entries(config=cfg) if x["step"] == 300]
    assert triggers.show(e["id"], config=cfg)["event"]["values"]["path"].endswith("ck/v01_step_00000300.pt")
    assert triggers.watch(log, config=cfg, experiment="v01", once=True, worker=False)["lines"] == 0


def test_metadata_and_command_conditions(tmp_path):
    rules = [
        {"name": "late", "pattern": r"eval acc (?P<acc>[\d.]+) at (?P<step>\d+)",
         "conditions": {"metadata": {"acc": {"gte": 0.5}, "step": {"not_equals": 300}}},
         "action": {"type": "log", "message": "good {acc}"}},
        {"name": "tens", "event": "checkpoint",
         "conditions": {"command": [sys.executable, "-c", "import sys; sys.exit(0 if {step} % 1000 == 0 else 1)"]},
         "action": {"type": "command", "command": ["true"]}},
    ]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "x.log"
    log.write_text("eval acc 0.4 at 100\neval acc 0.75 at 200\neval acc 0.9 at 300\n" + ckpt_lines([500, 1000]))
    triggers.watch(log, config=cfg, experiment="v01", once=True, poll=0.05)
    got = {(e["rule"], e["step"]): e["state"] for e in triggers.list_entries(config=cfg)}
    assert got == {("late", 200): "done", ("tens", 500): "cancelled", ("tens", 1000): "done"}
    [c] = triggers.list_entries(config=cfg, state="cancelled")
    assert c["error"].startswith("condition ") and c["error"].endswith(" did not exit 0")


def test_inactivity_fires_once_per_silence(tmp_path):
    rules = [{"name": "quiet", "inactivity": "0.3s", "action": {"type": "log", "message": "silent {idle}s"}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "x.log"
    log.write_text("step 1 loss 1.0\n")
    stop = threading.Event()
    t = threading.Thread(target=triggers.watch, args=(log,), kwargs=dict(config=cfg, experiment="v01", poll=0.05,
                                                                         stop_event=stop, worker=False),
                         name="test-watch")
    t.start()
    try:
        wait_for(lambda: triggers.list_entries(config=cfg), what="an inactivity entry")
        with open(log, "a") as f:
            f.write("step 2 loss 0.5\n")
        wait_for(lambda: len(triggers.list_entries(config=cfg)) == 2, what="a second silence")
    finally:
        stop.set()
        t.join(30)
    assert len(triggers.list_entries(config=cfg)) == 2


# -- 2. kill -9 at 20 random moments ---------------------------------------------------------------------------
def test_kill9_of_the_watcher_and_worker_at_random_moments_runs_nothing_twice(tmp_path):
    side = tmp_path / "side.txt"
    rules = [{"name": "conv", "event": "checkpoint",
              "action": {"type": "command", "command": ["sh", "-c", f"echo {{step}} >> {side}; sleep 0.1"]}}]
    root = make_project(tmp_path / "p", rules)
    steps = list(range(10, 810, 10))
    log = tmp_path / "train.log"
    log.write_text("".join(f"step {s - 5} loss 0.5\n" for s in steps) + ckpt_lines(steps))
    rng = random.Random(1234)
    killed = 0
    for _ in range(20):
        p = popen_cli(root, "triggers", "watch", str(log), "--experiment", "v01", "--once", "--poll", "0.05")
        try:
            p.wait(timeout=rng.uniform(0.2, 1.5))  # a random moment: while starting, reading, or running an action
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.communicate(timeout=60)
    assert killed >= 10
    final = cli(root, "triggers", "watch", str(log), "--experiment", "v01", "--once", "--poll", "0.05", "--json")
    assert final.returncode == 0, final.stderr
    entries = triggers.list_entries(config=cfg_of(root))
    wait_for(lambda: len(side.read_text().splitlines()) >= sum(e["state"] == "done" for e in entries),
             what="orphaned commands to finish")
    counts = Counter(int(x) for x in side.read_text().split())
    assert len(entries) == len(steps)  # every checkpoint has its one entry
    assert max(counts.values()) == 1, f"ran twice: {[s for s, n in counts.items() if n > 1]}"
    by_state = Counter(e["state"] for e in entries)
    assert set(by_state) <= {"done", "interrupted"}, by_state
    for e in entries:
        if e["state"] == "done":
            assert counts[e["step"]] == 1
    listed = cli(root, "triggers", "list", "--state", "interrupted", "--json")
    assert len(json.loads(listed.stdout)["entries"]) == by_state["interrupted"]
    # an interrupted entry, retried by hand, runs once more (the user's decision) and is done
    if by_state["interrupted"]:
        eid = next(e["id"] for e in entries if e["state"] == "interrupted")
        assert cli(root, "triggers", "retry", eid).returncode == 0
        assert cli(root, "triggers", "worker", "--once").returncode == 0
        assert triggers.show(eid, config=cfg_of(root))["state"] == "done"


def test_two_workers_in_two_processes_never_run_one_entry_twice(tmp_path):
    side = tmp_path / "side.txt"
    rules = [{"name": "conv", "event": "checkpoint",
              "action": {"type": "command", "command": ["sh", "-c", f"echo {{step}} >> {side}"]}}]
    root = make_project(tmp_path / "p", rules)
    steps = list(range(1, 41))
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines(steps))
    r = cli(root, "triggers", "watch", str(log), "--experiment", "v01", "--once", "--no-worker")
    assert r.returncode == 0, r.stderr
    assert len(triggers.list_entries(config=cfg_of(root), state="pending")) == 40
    ps = [popen_cli(root, "triggers", "worker", "--once", "--json", "--poll", "0.05") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], [o[1] for o in outs]
    ran = [json.loads(o[0])["ran"] for o in outs]
    assert not set(ran[0]) & set(ran[1]) and len(ran[0]) + len(ran[1]) == 40
    assert sorted(int(x) for x in side.read_text().split()) == steps
    assert {e["state"] for e in triggers.list_entries(config=cfg_of(root))} == {"done"}


# -- retry, cancel, show, list; commands ---------------------------------------------------------------------------
def test_failed_entry_is_kept_retried_and_cancelled(tmp_path):
    flag = tmp_path / "ok"
    rules = [{"name": "conv", "event": "checkpoint",
              "action": {"type": "command", "command": ["sh", "-c", f"echo trying {{step}}; test -e {flag}"]}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100, 200]))
    triggers.watch(log, config=cfg, experiment="v01", once=True, poll=0.05)
    failed = triggers.list_entries(config=cfg, state="failed")
    assert len(failed) == 2 and failed[0]["error"] == "exited with code 1: trying 200"
    shown = triggers.show(failed[0]["id"], config=cfg)
    assert shown["output_tail"][-1] == "trying 200" and shown["attempts"] == 1
    with pytest.raises(TriggerError) as ei:
        triggers.retry("nope", config=cfg)
    assert str(ei.value) == "no queue entry 'nope'; 'colabkit triggers list' shows the entries"
    flag.write_text("")
    triggers.retry(failed[0]["id"], config=cfg)
    triggers.cancel(failed[1]["id"], config=cfg)
    with pytest.raises(TriggerError) as ei:
        triggers.retry(failed[0]["id"], config=cfg)
    assert str(ei.value) == f"{failed[0]['id']} is pending already; a worker will run it ('colabkit triggers " \
                            "worker' runs the queue in a terminal)"
    assert triggers.worker(config=cfg, once=True, poll=0.05)["ran"] == [failed[0]["id"]]
    got = triggers.show(failed[0]["id"], config=cfg)
    assert got["state"] == "done" and got["attempts"] == 2
    assert triggers.show(failed[1]["id"], config=cfg)["state"] == "cancelled"
    with pytest.raises(TriggerError) as ei:
        triggers.retry(failed[0]["id"][:14], config=cfg)
    assert str(ei.value).endswith("is done; it ran once as it should. To run the action again, run its command by "
                                  f"hand ('colabkit triggers show {failed[0]['id']}' prints it)")


def test_retry_true_reruns_an_interrupted_idempotent_entry_up_to_max_attempts(tmp_path):
    rules = [{"name": "conv", "event": "checkpoint", "retry": True, "conditions": {"max_attempts": 2},
              "action": {"type": "command", "command": ["false"]}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100]))
    triggers.watch(log, config=cfg, experiment="v01", once=True, poll=0.05)
    [e] = triggers.list_entries(config=cfg)
    assert e["state"] == "failed" and e["attempts"] == 2


def test_cli_and_magic_check_test_list_show(tmp_path, ip, capsys, monkeypatch):
    rules = [{"name": "cool", "event": "checkpoint", "conditions": {"at": [200]},
              "action": {"type": "cooldown", "args": "--lr 1e-4 --steps 300"}},
             {"name": "conv", "event": "checkpoint",
              "action": {"type": "command", "command": "python convert.py {path} {output_dir}/hf/{step}"}}]
    root = make_project(tmp_path / "p", rules)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100, 200]))
    r = cli(root, "triggers", "check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "2 rules, all valid:",
        "  cool: on checkpoint [at 200] -> cooldown --lr 1e-4 --steps 300 (after_main) (queue)",
        "  conv: on checkpoint -> command python convert.py {path} {output_dir}/hf/{step} (queue)"]
    r = cli(root, "triggers", "test", str(log), "--json")
    data = json.loads(r.stdout)
    exp = root / "experiments" / "v01"
    assert [(f["rule"], f["step"]) for f in data["fired"]] == [("conv", 100), ("cool", 200), ("conv", 200)]
    assert data["fired"][2]["action"]["command"] == ["python", "convert.py", f"{exp}/ck/v01_step_00000200.pt",
                                                     f"{exp}/hf/200"]
    cool = data["fired"][1]["action"]
    assert cool["output_dir"] == str(exp / "cooldown_200") and cool["args"] == ["--lr", "1e-4", "--steps", "300"]
    assert not (root / ".colabkit" / "actions").exists()  # test ran nothing and queued nothing
    monkeypatch.chdir(root)
    ip.run_line_magic("triggers", "check")
    assert "2 rules, all valid:" in capsys.readouterr().out
    ip.run_line_magic("triggers", "list")
    assert capsys.readouterr().out.strip() == "no queue entries"
    from IPython.core.error import UsageError
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("triggers", "show abc")
    assert str(ei.value) == "no queue entry 'abc'; '%triggers list' shows the entries"
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("triggers", "list --state lost")
    assert "argument --state: invalid choice: 'lost'" in str(ei.value)


def test_status_of_a_project_without_rules_never_raises(tmp_path):
    root = make_project(tmp_path / "p", None)
    assert triggers.status(config=cfg_of(root)) == {
        "version": 1, "configured": False, "step": None, "rules": [],
        "queue": {"pending": 0, "waiting": 0, "running": 0, "done": 0, "failed": 0, "interrupted": 0,
                  "cancelled": 0}, "entries": []}


def test_package_names_triggers_not_cooldown():
    import colabkit
    assert "triggers" in colabkit.__all__ and "cooldown" not in colabkit.__all__
    assert colabkit.triggers is triggers
    ns: dict = {}
    exec("from colabkit import *", ns)
    assert ns["triggers"] is triggers


# -- 5. bad rules: exact errors ------------------------------------------------------------------------------------
CK = {"event": "checkpoint", "action": {"type": "log", "message": "m"}}


@pytest.mark.parametrize("rule, message", [
    ({"name": "a", **CK, "conditions": {"when_done": 1}},
     "triggers[0].conditions.when_done: unknown condition; allowed: at, command, every, file_exists, max_attempts, "
     "metadata, wait"),
    ({"name": "a", "event": "checkpoint", "action": {"type": "restart"}},
     "triggers[0].action.type: 'restart' is not an action; use one of cooldown, command, log, sync"),
    ({"name": "a", "pattern": "saved (?P<path>\\S+", "action": {"type": "log", "message": "m"}},
     "triggers[0].pattern: 'saved (?P<path>\\\\S+' is not a valid regular expression (missing ), unterminated "
     "subpattern at position 6)"),
    ({"name": "a", "pattern": "saved checkpoint (?P<path>\\S+)",
      "action": {"type": "command", "command": ["convert", "{checkpoint_path}"]}},
     "triggers[0].action.command[1]: '{checkpoint_path}' uses {checkpoint_path}, which is neither a group of the "
     "pattern (path), an extract or metadata key, nor part of the run's context (attempt, experiment, output_dir, "
     "path, rule, run, run_id, step); name the group in the pattern (?P<checkpoint_path>...) or map it with "
     "extract: {checkpoint_path: GROUP}"),
    ({"name": "a", **CK, "conditions": {"at": [10000, "50k"]}},
     "triggers[0].conditions.at: [10000, '50k'] must be a list of whole numbers (steps), e.g. [10000, 50000]"),
    ({"name": "a", "pattern": "saved (?P<path>\\S+)", "conditions": {"at": [100]},
      "action": {"type": "log", "message": "m"}},
     "triggers[0].conditions.at: needs the event's step, and the pattern captures none; name a group (?P<step>...) "
     "or (?P<iteration>...), or map one with extract: {step: GROUP}"),
    ({"name": "a", "event": "checkpoint", "action": {"type": "cooldown"}, "mode": "inline"},
     "triggers[0].mode: 'inline' runs in the log watcher; a cooldown run must be queued (mode: queue)"),
    ({"name": "a", "action": {"type": "log", "message": "m"}},
     "triggers[0]: no detector; give one of pattern: (a regex with named groups), event: (checkpoint, step, loss), "
     "state: (finished, failed, oom, stalled, restarted, stopped) or inactivity: (a duration such as 30m)"),
    ({"name": "a", "event": "saved", "action": {"type": "log", "message": "m"}},
     "triggers[0].event: 'saved' is not allowed; use one of checkpoint, step, loss"),
    ({"name": "a", **CK, "conditions": {"wait": "10m"}},
     "triggers[0].conditions.wait: waits for file_exists, which is not given; add file_exists: PATH"),
    ({"name": "a", "event": "checkpoint", "action": {"type": "log", "message": "at {stepp}"}},
     "triggers[0].action.message: 'at {stepp}' uses {stepp}, which is neither a value of the event, an extract or "
     "metadata key, nor part of the run's context (attempt, experiment, output_dir, path, rule, run, run_id, "
     "step); name the group in the pattern (?P<stepp>...) or map it with extract: {stepp: GROUP}"),
])
def test_bad_rules_fail_at_load_with_key_value_and_what_is_allowed(tmp_path, rule, message):
    p = tmp_path / "colabkit.yaml"
    p.write_text(yaml.safe_dump({"triggers": [rule]}))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == message


def test_yaml_on_read_as_true_is_named(tmp_path):
    p = tmp_path / "colabkit.yaml"
    p.write_text("triggers:\n  - name: a\n    on: checkpoint\n    action: {type: log, message: m}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == ("triggers[0]: a key was read as True (YAML reads an unquoted on:, yes: or off: as "
                             "true/false); quote it ('on':), or name the detector with event:, state:, pattern: or "
                             "inactivity:")


def test_bad_rule_in_an_experiments_triggers_yaml_names_the_file_and_stops_train(tmp_path):
    root = make_project(tmp_path / "p", None, template=True)
    (root / "experiments" / "v01" / "triggers.yaml").write_text(
        "triggers:\n  - name: c\n    event: checkpoint\n    conditions: {every: 0}\n    action: {type: log, message: m}\n")
    with pytest.raises(ConfigError) as ei:
        runner.train("v01", config=cfg_of(root), resume="none")
    assert str(ei.value) == ("experiments/v01/triggers.yaml: triggers[0].conditions.every: 0 must be a whole "
                             "number >= 1")
    assert not (root / "experiments" / "v01" / "logs").exists()  # nothing started


# -- runner integration: line listeners and run states -----------------------------------------------------------
def test_runner_feeds_listeners_every_line_once_and_reports_run_states(tmp_path):
    out = tmp_path / "final.txt"
    rules = [{"name": "again", "state": "restarted",
              "action": {"type": "log", "message": "attempt {attempt} {detail}; resuming"}},
             {"name": "final", "state": "finished",
              "action": {"type": "command", "command": ["sh", "-c", f"echo {{state}} {{step}} {{path}} > {out}"]}}]
    root = make_project(tmp_path / "p", rules)
    (root / "experiments" / "v01" / "train.py").write_text((SCRIPTS / "crash_then_resume.py").read_text())
    seen: list[tuple[list[str], str, int | None]] = []
    try:
        res = runner.train("v01", config=cfg_of(root), resume="none", max_restarts=1,
                           listeners=[lambda evs, line, att: seen.append(([e.kind for e in evs], line,
                                                                           att.number if att else None))])
        assert res.ok and len(res.attempts) == 2
        assert triggers.join(timeout=60)
    finally:
        triggers.stop_workers()
    lines = [(k, line, n) for k, line, n in seen if line]
    assert (["step", "loss"], "step 5 loss 0.25", 1) in lines and (["step", "loss"], "step 10 loss 0.125", 2) in lines
    assert [line for _, line, _ in lines].count("step 5 loss 0.25") == 1
    states = [(k, n) for k, line, n in seen if not line]
    assert states == [(["state"], 1), (["state"], 2)]
    ck = root / "experiments" / "v01" / "checkpoints" / "v01_step_00000005.pt"
    assert out.read_text() == f"finished 10 {ck}\n"
    log = (root / ".colabkit" / "actions" / "v01" / "triggers.log").read_text()
    assert "again: attempt 1 exited with code 1; resuming" in log
    assert {e["state"] for e in triggers.list_entries(config=cfg_of(root))} == {"done"}


def test_the_documented_recipes_and_the_readme_block_load(tmp_path):
    import re
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "triggers.md").read_text(), re.S)
    assert len(blocks) == 4
    names = []
    for b in blocks:
        cfg = load_config(data=yaml.safe_load(b), start=tmp_path)
        names.append([r.name for r in cfg.triggers])
    assert names[1:] == [["cooldown"], ["eval_10k", "cooldown_50k", "finetune_100k"],
                         ["checkpoint_saved", "convert_hf", "eval_hf", "full_eval_every_10k", "benchmarks_final"]]
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Configuration \(`colabkit.yaml`\).*?```yaml\n(.*?)```", readme, re.S).group(1)
    cfg = load_config(data=yaml.safe_load(block), start=tmp_path)
    assert [(r.name, r.at, r.action.type, r.action.when) for r in cfg.triggers] == [
        ("cooldown_50k", (50000,), "cooldown", "after_main")]


def test_sync_action_flushes_the_tiers_now(tmp_path):
    root = make_project(tmp_path / "p", [{"name": "push", "event": "checkpoint", "action": {"type": "sync"}}])
    data = yaml.safe_load((root / "colabkit.yaml").read_text())
    data["tiers"] = [{"name": "backup", "remote": "local", "path": str(tmp_path / "backup"), "every": "1h"}]
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data))
    logs = root / "experiments" / "v01" / "logs"
    logs.mkdir(parents=True)
    (logs / "run.log").write_text("saved checkpoint at iteration 100 to ck.pt\n")
    os.utime(logs / "run.log", (time.time() - 60, time.time() - 60))  # older than sync.settle
    triggers.watch(logs / "run.log", config=cfg_of(root), experiment="v01", once=True, poll=0.05)
    [e] = triggers.list_entries(config=cfg_of(root))
    assert e["state"] == "done" and e["action"] == "sync"
    assert (tmp_path / "backup" / "experiments" / "v01" / "logs" / "run.log").read_text() == \
        "saved checkpoint at iteration 100 to ck.pt\n"


def test_file_exists_without_wait_is_checked_when_the_event_comes(tmp_path):
    rules = [{"name": "conv", "event": "checkpoint", "conditions": {"file_exists": "{path}.ok"},
              "action": {"type": "log", "message": "{step}"}}]
    root = make_project(tmp_path / "p", rules)
    ck = root / "experiments" / "v01" / "ck"
    ck.mkdir(parents=True)
    (ck / "v01_step_00000200.pt.ok").write_text("")
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100, 200]))
    triggers.watch(log, config=cfg_of(root), experiment="v01", once=True, worker=False)
    assert [(e["step"], e["state"]) for e in triggers.list_entries(config=cfg_of(root))] == [(200, "done")]


def test_an_entry_a_live_worker_holds_cannot_be_cancelled_or_retried_and_is_not_interrupted(tmp_path):
    rules = [{"name": "conv", "event": "checkpoint", "action": {"type": "command", "command": ["true"]}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100]))
    triggers.watch(log, config=cfg, experiment="v01", once=True, worker=False)
    [e] = triggers.list_entries(config=cfg)
    q = triggers.Queue(cfg, "v01")
    rec = q.read(e["id"])
    with q.lock(e["id"]) as got:  # what a worker holds while the action runs
        assert got
        q.transition(rec, "running", worker={"pid": os.getpid(), "host": "here"})
        assert triggers.list_entries(config=cfg)[0]["state"] == "running"
        with pytest.raises(TriggerError) as ei:
            triggers.cancel(e["id"], config=cfg)
        assert str(ei.value) == f"{e['id']} is running (worker pid {os.getpid()}); it cannot be cancelled while it runs"
        with pytest.raises(TriggerError) as ei:
            triggers.retry(e["id"], config=cfg)
        assert str(ei.value) == f"{e['id']} is running (worker pid {os.getpid()}); wait for it, or cancel it"
        assert triggers.worker(config=cfg, once=True, poll=0.05)["ran"] == []  # another worker leaves it alone
    # the lock is gone and the record still says running: its worker died
    assert triggers.list_entries(config=cfg)[0]["state"] == "interrupted"
    assert triggers.status(config=cfg)["queue"]["interrupted"] == 1
    triggers.worker(config=cfg, once=True, poll=0.05)
    shown = triggers.show(e["id"], config=cfg)
    assert shown["state"] == "interrupted"
    assert shown["error"] == (f"its worker (pid {os.getpid()} on here) stopped while it ran; run it again with "
                              f"'colabkit triggers retry {e['id']}' if that is safe")


def test_status_with_a_bad_triggers_yaml_reports_instead_of_raising(tmp_path):
    root = make_project(tmp_path / "p", None)
    (root / "experiments" / "v01" / "triggers.yaml").write_text("- name: x\n  action: {type: log, message: m}\n")
    st = triggers.status(config=cfg_of(root))
    assert st["configured"] is False and st["rules"] == []
    assert st["error"].startswith("experiments/v01/triggers.yaml: triggers[0]: no detector; ")


def test_a_worker_sweeps_temporaries_a_killed_writer_left_in_the_queue(tmp_path):
    root = make_project(tmp_path / "p", [{"name": "n", "event": "checkpoint", "action": {"type": "log",
                                                                                      "message": "m"}}])
    cfg = cfg_of(root)
    q = triggers.Queue(cfg, "v01")
    q.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from colabkit.fsutil import TMP_PREFIX, owner_tag
    stale = q.dir / f"{TMP_PREFIX}n-100-abc.{owner_tag(int(dead.stdout))}.t1"
    stale.write_text("{}")
    mine = q.dir / f"{TMP_PREFIX}n-200-abc.{owner_tag()}.t1"
    mine.write_text("{}")
    triggers.worker(config=cfg, experiment="v01", once=True, poll=0.05)
    assert not stale.exists() and mine.exists()


def test_show_and_test_never_print_a_secret_of_a_commands_env(tmp_path):
    rules = [{"name": "up", "event": "checkpoint",
              "action": {"type": "command", "command": ["sh", "-c", "echo token is $HF_TOKEN"],
                         "env": {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz0123456789"}}}]
    root = make_project(tmp_path / "p", rules)
    cfg = cfg_of(root)
    log = tmp_path / "train.log"
    log.write_text(ckpt_lines([100]))
    dry = triggers.test(log, config=cfg, experiment="v01")
    assert dry["fired"][0]["action"]["env"] == {"HF_TOKEN": "***"}
    triggers.watch(log, config=cfg, experiment="v01", once=True, poll=0.05)
    [e] = triggers.list_entries(config=cfg)
    shown = triggers.show(e["id"], config=cfg)
    assert "hf_abcdefghijklmnopqrstuvwxyz0123456789" not in json.dumps(shown)
    assert shown["action"]["env"] == {"HF_TOKEN": "***"} and shown["output_tail"][-1].startswith("token is ")
