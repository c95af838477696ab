"""%train and `colabkit train` through a real IPython shell and real CLI processes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "experiments" / "v01").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "project": "t", "tiers": [],
        "train": {"max_restarts": 1, "restart_backoff": 0.01, "grace": 5, "min_free_disk": "1MB"}}))
    shutil.copy(SCRIPTS / "report_env.py", root / "experiments" / "v01" / "train.py")
    monkeypatch.chdir(root)
    monkeypatch.delenv("COLABKIT_FAKE_GPU", raising=False)
    return root


def use(root: Path, script: str) -> None:
    shutil.copy(SCRIPTS / script, root / "experiments" / "v01" / "train.py")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colabkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _wait_for(cond, timeout=30.0) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return True
        ev.wait(0.05)
    return cond()


@pytest.mark.magic
def test_magic_streams_the_run_into_the_cell(project, ip, capsys):
    ip.run_line_magic("train", "v01 --resume none -- --lr 0.1")
    out = capsys.readouterr().out.splitlines()
    assert "argv ['--lr', '0.1']" in out
    i = out.index("step 1 loss 1.0000")
    assert out[i:i + 4] == ["step 1 loss 1.0000", "step 2 loss 0.5000", "step 3 loss 0.3333", "stderr line"]
    assert out[i + 4].startswith("v01: finished · step 3 · loss 0.3333 · 1 attempt · in ")
    (log_dir,) = (project / "experiments" / "v01" / "logs").iterdir()
    assert out[i + 5] == f"logs: {log_dir.resolve()}"


@pytest.mark.magic
def test_magic_errors_are_one_line_usage_errors(project, ip, capsys):
    from IPython.core.error import UsageError
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "v07")
    assert str(e.value) == (f"unknown experiment 'v07': {project.resolve()}/experiments/v07 does not exist "
                            "(experiments here: v01); create it with '%colabkit init --experiment v07' or pull it "
                            "with '%airlock pull v07'")
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "v01 --steps 3")
    assert str(e.value) == ("%train: unrecognized arguments: --steps 3 (arguments for train.py go after --: "
                            "v01 -- --steps 3)")
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "v01 v02")
    assert str(e.value) == "unexpected argument 'v02'; arguments for train.py go after --: %train v01 -- v02 ..."
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "v01 --max-vram lots")
    assert str(e.value) == "%train: argument --max-vram: 'lots' is not a size; use e.g. 500MB or 20GB"
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "logs")
    assert str(e.value) == "no training job found for this project; start one with '%train vXX' (or '%train vXX " \
                           "--background')"
    ip.run_line_magic("train", "stop")
    assert capsys.readouterr().out.strip() == "no training job is running; nothing to stop"


@pytest.mark.magic
def test_magic_out_of_memory(project, ip, capsys):
    from IPython.core.error import UsageError
    use(project, "oom_memoryerror.py")
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("train", "v01 --resume none")
    first = str(e.value).splitlines()[0]
    assert first == ("v01: the run ran out of memory (attempt 1: exit code 1, 'MemoryError' in its output); not "
                     "restarted: reduce the batch size or the data held in memory, or move the run to a machine "
                     "with more memory. Last lines of " + str(next((project / "experiments" / "v01" / "logs")
                                                                  .glob("*/*.attempt1.log")).resolve()) + ":")


@pytest.mark.magic
def test_magic_background_status_logs_stop(project, ip, capsys):
    from colabkit import runner
    use(project, "slow_steps.py")
    ip.run_line_magic("train", "v01 --background --resume none -- --steps 100000")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("v01: started in the background (run v01-")
    assert out[1] == "follow it with '%train status', '%train logs', stop it with '%train stop v01'"
    job = runner._jobs["v01"]
    try:
        assert _wait_for(lambda: (job.progress.step or 0) >= 3)
        ip.run_line_magic("train", "status")
        st = capsys.readouterr().out.splitlines()
        assert st[0].startswith("v01: running · attempt 1 · step ") and "/100000 · loss " in st[0]
        assert st[1] == f"  log: {job.attempts[0].log}"
        ip.run_line_magic("train", "status --json")
        (js,) = json.loads(capsys.readouterr().out)["jobs"]
        assert js["state"] == "running" and js["total_steps"] == 100000
        ip.run_line_magic("train", "logs -n 2")
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and all(x.startswith("step ") for x in lines)
    finally:
        ip.run_line_magic("train", "stop v01")
    assert capsys.readouterr().out.strip() == f"v01: stopped (run {job.run_id})"
    assert not job._thread.is_alive()


def test_cli_failure_shows_last_lines_and_exits_1(project):
    use(project, "fail_always.py")
    out = cli("train", "v01", "--resume", "none", cwd=project)
    assert out.returncode == 1
    err = out.stderr.splitlines()
    logs = sorted((project / "experiments" / "v01" / "logs").glob("*/*.attempt*.log"))
    assert len(logs) == 2
    assert ("Error: v01: train.py failed 2 times (last: exited with code 3); gave up after 1 restart "
            f"(--max-restarts). Last lines of {logs[-1].resolve()}:") in err
    assert err[-1] == "  ValueError: bad batch in attempt 2"
    # the warning about the restart reached the terminal too
    assert any(x.startswith("v01: attempt 1 exited with code 3; restarting in 0.01s (1/1 restarts)") for x in err)
    # the child's output streamed to stdout
    assert out.stdout.splitlines()[:3] == ["attempt 1 starting", "step 7 loss 0.5", "ValueError: bad batch in attempt 1"]


def test_cli_malformed_config(project):
    (project / "colabkit.yaml").write_text("train: [\n")
    out = cli("train", "v01", cwd=project)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"Error: {project.resolve() / 'colabkit.yaml'}: line 2, column 1: not valid YAML "
                                  "(expected the node content, but found '<stream end>'); fix the syntax there")
    (project / "colabkit.yaml").write_text("train:\n  max_restarts: many\n")
    out = cli("train", "v01", cwd=project)
    assert out.stderr.strip() == "Error: train.max_restarts: 'many' must be a whole number >= 0"
    assert not (project / "experiments" / "v01" / "logs").exists()


def test_cli_background_is_refused_in_a_terminal(project):
    out = cli("train", "v01", "--background", cwd=project)
    assert out.returncode == 1
    assert out.stderr.strip() == ("Error: 'colabkit train --background' would stop when this command exits; in a "
                                  "terminal run it in the foreground (under tmux or nohup), in a notebook use "
                                  "'%train vXX --background'")


def test_cli_prints_a_warning_once(project):
    """A warning the run gives reaches the terminal once, not once more through the logging handler."""
    use(project, "slow_steps.py")  # 150 steps of 20 ms: 3 s against an estimate of 1 s
    out = cli("train", "v01", "--estimate", "1s", "--no-sync", "--resume", "none", "--", "--steps", "150", cwd=project)
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    assert both.count("(off by more than 50%)") == 1
    assert "colabkit: WARNING:" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if "off by more than 50%" in x]
    assert line.startswith("v01: at the measured pace (")


@pytest.mark.magic
def test_what_train_py_prints_names_commands_as_the_user_types_them_there(project, ip, capsys):
    use(project, "next_step.py")
    ip.run_line_magic("train", "v01 --resume none --no-sync")
    assert "next step: %sync flush" in capsys.readouterr().out.splitlines()
    out = cli("train", "v01", "--resume", "none", "--no-sync", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "next step: colabkit sync flush" in out.stdout.splitlines()


def test_cli_json_result(project):
    out = cli("train", "v01", "--json", "--resume", "none", cwd=project)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # only the JSON document: no streamed lines mixed in
    assert data["state"] == "finished" and data["step"] == 3 and data["exit_code"] == 0
    assert data["attempts"][0]["outcome"] == "finished"


def test_cli_sigterm_stops_the_child_and_exits_130(project):
    """`kill PID` on a foreground `colabkit train` (a VM shutting down): the child is stopped, not orphaned."""
    import os
    import signal
    use(project, "slow_steps.py")
    p = subprocess.Popen([sys.executable, "-m", "colabkit.cli", "train", "v01", "--resume", "none", "--",
                          "--steps", "100000"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stdout:
            if line.startswith("step 5/"):
                p.send_signal(signal.SIGTERM)
                break
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 130, err
    assert "got SIGTERM, exiting" in rest  # the child was told, and its last words still streamed
    (log,) = (project / "experiments" / "v01" / "logs").glob("*/*.attempt1.log")
    meta = json.loads((log.parent / "run.json").read_text())
    assert meta["state"] == "stopped" and meta["attempts"][0]["exit_code"] == 143
    with pytest.raises(ProcessLookupError):
        os.kill(meta["attempts"][0]["pid"], 0)
