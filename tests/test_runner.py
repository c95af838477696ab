"""colabkit.runner: real child processes (small scripts under tests/scripts/), real signals, real files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import yaml

from colabkit import runner
from colabkit.config import load_config
from colabkit.errors import ConfigError, OutOfMemoryError, PreflightError, TrainError, UnknownExperimentError

SCRIPTS = Path(__file__).parent / "scripts"
FAST = {"max_restarts": 2, "restart_backoff": 0.01, "stall_after": 30, "grace": 5, "min_free_disk": "1MB"}


def make_project(root: Path, script: str | None = "report_env.py", *, train: dict | None = None,
                 extra: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"project": "t", "tiers": [], "train": {**FAST, **(train or {})}, **(extra or {})}
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data))
    exp = root / "experiments" / "v01"
    exp.mkdir(parents=True, exist_ok=True)
    if script:
        shutil.copy(SCRIPTS / script, exp / "train.py")
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("COLABKIT_FAKE_GPU", raising=False)
    from colabkit import runtime
    runtime.gpus.cache_clear()
    yield make_project(tmp_path / "proj")
    runtime.gpus.cache_clear()


def cfg_of(root: Path):
    return load_config(root / "colabkit.yaml")


def env_lines(lines: list[str]) -> dict[str, str]:
    return dict(x[4:].split("=", 1) for x in lines if x.startswith("env "))


# -- a run that works --------------------------------------------------------------------------------------
def test_run_streams_lines_writes_logs_freeze_and_run_json(project):
    lines: list[str] = []
    res = runner.train("v01", config=cfg_of(project), args=["--lr", "0.1"], on_line=lines.append, resume="none")
    assert res.ok and res.state == "finished" and res.exit_code == 0
    assert lines[-4:] == ["step 1 loss 1.0000", "step 2 loss 0.5000", "step 3 loss 0.3333", "stderr line"]
    env = env_lines(lines)
    exp = project / "experiments" / "v01"
    assert env["COLABKIT_EXPERIMENT"] == "v01"
    assert env["COLABKIT_RUN_ID"] == res.run_id
    assert env["COLABKIT_PROJECT_ROOT"] == str(project.resolve())
    assert env["COLABKIT_CHECKPOINT_DIR"] == str(exp.resolve() / "checkpoints")
    assert env["COLABKIT_LOG_DIR"] == str(res.log_dir)
    assert env["COLABKIT_RESUME_FROM"] == "" and env["COLABKIT_MAX_VRAM"] == "" and env["COLABKIT_ATTEMPT"] == "1"
    assert "argv ['--lr', '0.1']" in lines
    assert f"cwd {exp.resolve()}" in lines  # relative paths in train.py work as with `python train.py`
    assert f"script {exp.resolve() / 'train.py'}" in lines
    # progress read from the lines
    assert (res.step, res.loss) == (3, pytest.approx(0.3333))
    # the log folder: one log per attempt, pip freeze, run.json
    assert res.log_dir.parent == exp.resolve() / "logs" and res.log_dir.name == res.run_id
    assert res.run_id.startswith("v01-")
    log_text = res.log.read_text()
    assert "step 3 loss 0.3333\nstderr line\n" in log_text
    assert res.log.name == f"{res.run_id}.attempt1.log"
    frozen = (res.log_dir / "frozen_requirements.txt").read_text()
    assert "torch==" in frozen and "PyYAML==" in frozen
    meta = json.loads((res.log_dir / "run.json").read_text())
    assert meta["host"] and meta["state"] == "finished" and meta["last_step"] == 3
    assert meta["exit_codes"] == [0] and len(meta["attempts"]) == 1 and meta["attempts"][0]["outcome"] == "finished"
    assert meta["gpu"] is None and meta["args"] == ["--lr", "0.1"]
    # the job file a CLI in another terminal reads
    job = json.loads((project / ".colabkit" / "jobs" / "v01.json").read_text())
    assert job["state"] == "finished" and job["run_id"] == res.run_id


def test_a_run_sweeps_what_a_killed_runner_left_in_the_log_folder(project):
    """kill -9 of the runner while `pip freeze` wrote its temporary left `.colabkit-tmp-frozen_requirements.txt`
    in that run's log folder for good. The next run removes temporaries of writers that are gone (never one a
    live process is writing) and names its own by its writer."""
    import subprocess
    import sys
    from colabkit.fsutil import TMP_PREFIX, owner_tag
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old_run = project / "experiments" / "v01" / "logs" / "v01-20261201-000000"
    old_run.mkdir(parents=True)
    stale = old_run / f"{TMP_PREFIX}frozen_requirements.txt.{owner_tag(int(dead.stdout))}.abc"
    stale.write_text("torch==2.13.0\n")
    live = old_run / f"{TMP_PREFIX}run.json.{owner_tag()}.abc"
    live.write_text("{}")
    res = runner.train("v01", config=cfg_of(project), resume="none")
    assert res.ok
    assert not stale.exists(), "a dead writer's temporary was left in the log folder"
    assert live.exists(), "a live writer's temporary was removed"
    assert [p.name for p in res.log_dir.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_airlock_import_reads_run_json(project):
    """The airlock engineer's log import summarises host and attempts from the run.json this writes."""
    from colabkit.airlock import summarize_run
    cfg = cfg_of(project)
    res = runner.train("v01", config=cfg, resume="none")
    s = summarize_run(cfg, "v01", [p for p in res.log_dir.iterdir()])
    assert s["attempts"] == 1 and s["host"] and s["steps"] == 3


def test_journal_entry_counts_the_preempted_run_and_its_resume_and_lists_logs_one_per_line(project):
    """A run preempted on one machine and resumed by another %train is one run: both attempts, and where each ran."""
    import socket
    import subprocess
    import sys

    from colabkit import journal
    from colabkit.airlock import summarize_run
    make_project(project, "preempted_then_resumed.py")
    cfg = cfg_of(project)
    proc = subprocess.Popen([sys.executable, "-m", "colabkit.cli", "train", "v01", "--resume", "none"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # the machine goes away once the run has saved step 5 and trained on
            if line.startswith("step 7"):
                break
        os.killpg(proc.pid, signal.SIGKILL)  # the runner, train.py and all: nothing records the end
    finally:
        proc.wait(30)
        proc.stdout.close()
    res = runner.train("v01", config=cfg, resume="auto")
    assert res.ok and res.step == 10
    logs = cfg.log_dir("v01")
    paths = sorted(p for p in logs.rglob("*") if p.is_file())
    summary = summarize_run(cfg, "v01", paths)
    text = journal.add_run("v01", config=cfg, **summary)
    lines = text.splitlines()
    host = socket.gethostname()
    # run ids carry seconds and a random suffix: two runs started in the same second do not sort by name
    runs = {p.name for p in logs.iterdir() if p.is_dir()}
    assert res.run_id in runs and len(runs) == 2
    second = res.run_id
    (first,) = runs - {second}
    i = lines.index("- **Attempts**: 2")
    assert lines[i + 1:i + 3] == [
        f"  1. {host}: run {first} attempt 1, fresh start; no end recorded (the machine was preempted or the run "
        "killed); reached step 7",
        f"  2. {host}: run {second} attempt 1, resumed from v01_step_00000005.pt; finished (exit code 0); reached "
        "step 10"]
    j = lines.index("- **Logs**:")
    assert lines[j + 1:] == [f"  - {p.relative_to(project.resolve()).as_posix()}" for p in paths]
    assert all(not x[4:].startswith("/") for x in lines[j + 1:])


# -- bad inputs ----------------------------------------------------------------------------------------------
def test_unknown_experiment(project):
    with pytest.raises(UnknownExperimentError) as e:
        runner.train("v09", config=cfg_of(project))
    assert str(e.value) == (
        f"unknown experiment 'v09': {project.resolve()}/experiments/v09 does not exist (experiments here: v01); "
        "create it with 'colabkit init --experiment v09' or pull it with 'colabkit airlock pull v09'")


def test_missing_train_py(project):
    (project / "experiments" / "v01" / "train.py").unlink()
    with pytest.raises(PreflightError) as e:
        runner.train("v01", config=cfg_of(project))
    assert str(e.value) == (
        f"v01: no train.py in {project.resolve()}/experiments/v01; put the training script there "
        "('colabkit init' writes a template) or pull the experiment's bundle with 'colabkit airlock pull v01'")
    assert not (project / "experiments" / "v01" / "logs").exists()  # nothing started


def test_bad_experiment_name(project):
    with pytest.raises(ConfigError, match=r"^'\.\./x' is not an experiment name; use the folder name under "
                                             r"experiments/, e.g. v01$"):
        runner.train("../x", config=cfg_of(project))


def test_malformed_config(project):
    (project / "colabkit.yaml").write_text("train:\n  max_restarts: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(project / "colabkit.yaml")
    assert str(e.value) == (f"{project / 'colabkit.yaml'}: line 3, column 1: not valid YAML (expected ',' or ']', "
                            "but got '<stream end>'); fix the syntax there")
    (project / "colabkit.yaml").write_text("train:\n  stall_after: soon\n")
    with pytest.raises(ConfigError, match=r"^train\.stall_after: 'soon' is not a duration; use e\.g\. 90m or 2h$"):
        load_config(project / "colabkit.yaml")


def test_resume_path_missing(project):
    with pytest.raises(PreflightError) as e:
        runner.train("v01", config=cfg_of(project), resume="nope.pt")
    assert str(e.value) == ("--resume nope.pt: no such checkpoint file; pass an existing checkpoint path, auto "
                            "(the newest verified one from any source) or none (a fresh start)")


def test_bad_option_values(project):
    cfg = cfg_of(project)
    with pytest.raises(ConfigError, match=r"^--max-restarts: -1 must be a whole number >= 0$"):
        runner.train("v01", config=cfg, max_restarts=-1)
    with pytest.raises(ConfigError, match=r"^--estimate: 'soonish' is not a duration; use e\.g\. 90m or 2h$"):
        runner.train("v01", config=cfg, estimate="soonish")
    with pytest.raises(ConfigError, match=r"^--max-vram: 'lots' is not a size; use e\.g\. 500MB or 20GB$"):
        runner.train("v01", config=cfg, max_vram="lots")


# -- failures, restarts, OOM, stalls ------------------------------------------------------------------------
def test_fails_every_time_gives_up_with_last_lines(project):
    make_project(project, "fail_always.py", train={"max_restarts": 2})
    warnings: list[str] = []
    with pytest.raises(TrainError) as e:
        runner.train("v01", config=cfg_of(project), on_warning=warnings.append, resume="none")
    msg = str(e.value)
    logs = sorted((project / "experiments" / "v01" / "logs").glob("*/*.attempt*.log"))
    assert [p.name.rsplit(".", 2)[1] for p in logs] == ["attempt1", "attempt2", "attempt3"]
    assert msg == ("v01: train.py failed 3 times (last: exited with code 3); gave up after 2 restarts "
                   f"(--max-restarts). Last lines of {logs[-1]}:\n"
                   "  attempt 1 starting\n  step 7 loss 0.5\n  ValueError: bad batch in attempt 1\n"
                   "  attempt 2 starting\n  step 7 loss 0.5\n  ValueError: bad batch in attempt 2\n"
                   "  attempt 3 starting\n  step 7 loss 0.5\n  ValueError: bad batch in attempt 3")
    assert warnings == [
        "v01: attempt 1 exited with code 3; restarting in 0.01s (1/2 restarts) from scratch (no checkpoint yet)",
        "v01: attempt 2 exited with code 3; restarting in 0.02s (2/2 restarts) from scratch (no checkpoint yet)"]
    meta = json.loads((logs[-1].parent / "run.json").read_text())
    assert meta["state"] == "failed" and meta["exit_codes"] == [3, 3, 3]
    assert "attempt 3 starting" in logs[-1].read_text()  # nothing lost: every attempt has its own log


def test_restart_resumes_from_newest_checkpoint(project):
    make_project(project, "crash_then_resume.py")
    lines: list[str] = []
    res = runner.train("v01", config=cfg_of(project), on_line=lines.append, on_warning=lambda w: None,
                       resume="none")
    ck = project.resolve() / "experiments" / "v01" / "checkpoints" / "v01_step_00000005.pt"
    assert res.ok and [a.outcome for a in res.attempts] == ["crashed", "finished"]
    assert "attempt 1 resume-from None" in lines
    assert f"attempt 2 resume-from {ck}" in lines
    assert res.attempts[1].resume_from == str(ck)
    assert res.step == 10


def test_resume_auto_uses_the_newest_checkpoint_found(project):
    make_project(project, "crash_then_resume.py")
    cfg = cfg_of(project)
    runner.train("v01", config=cfg, on_warning=lambda w: None, resume="none")  # leaves step 5 behind
    lines: list[str] = []
    res = runner.train("v01", config=cfg, on_line=lines.append, resume="auto", max_restarts=0)
    ck = project.resolve() / "experiments" / "v01" / "checkpoints" / "v01_step_00000005.pt"
    assert lines[0] == f"attempt 1 resume-from {ck}"
    assert res.ok and res.attempts[0].resume_from == str(ck)
    assert json.loads((res.log_dir / "run.json").read_text())["attempts"][0]["resume_from"] == str(ck)


@pytest.mark.parametrize("script, detail", [
    ("oom_memoryerror.py", "exit code 1, 'MemoryError' in its output"),
    ("oom_cuda.py", "exit code 1, 'CUDA out of memory' in its output"),
])
def test_out_of_memory_is_not_restarted(project, script, detail):
    make_project(project, script, train={"max_restarts": 3})
    with pytest.raises(OutOfMemoryError) as e:
        runner.train("v01", config=cfg_of(project), resume="none")
    logs = sorted((project / "experiments" / "v01" / "logs").glob("*/*.attempt*.log"))
    assert len(logs) == 1  # no restart
    msg = str(e.value)
    assert msg.startswith(f"v01: the run ran out of memory (attempt 1: {detail}); not restarted: reduce the batch "
                          "size or the data held in memory, or move the run to a machine with more memory. "
                          f"Last lines of {logs[0]}:\n  step 1 loss 1.0\n")
    assert isinstance(e.value, MemoryError) and isinstance(e.value, TrainError)
    assert json.loads((logs[0].parent / "run.json").read_text())["state"] == "oom"


def test_out_of_memory_on_tier1_gpu_advises_tier2(project, monkeypatch):
    from colabkit import runtime
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA L4:23034167296")
    runtime.gpus.cache_clear()
    make_project(project, "oom_cuda.py")
    with pytest.raises(OutOfMemoryError) as e:
        runner.train("v01", config=cfg_of(project), resume="none")
    assert ("not restarted: this is a Tier 1 GPU (NVIDIA L4, jobs capped at 20 GB): reduce the batch size or the "
            "model, or move the run to Tier 2 (an A100 80 GB: 'colabkit airlock export v01', then pull and train it on "
            "the cluster).") in str(e.value)


def test_stalled_run_is_killed_and_restarted(project):
    make_project(project, "stall_once.py", train={"stall_after": 0.5, "grace": 2})
    warnings: list[str] = []
    res = runner.train("v01", config=cfg_of(project), on_warning=warnings.append, resume="none")
    assert res.ok and [a.outcome for a in res.attempts] == ["stalled", "finished"]
    assert res.attempts[0].exit_code == -signal.SIGTERM
    assert warnings[0] == "v01: no output and no checkpoint for 0.5s (train.stall_after); killing attempt 1"
    assert warnings[1].startswith("v01: attempt 1 stalled (no output for 0.5s; killed, exit code -15); restarting")


# -- preflight --------------------------------------------------------------------------------------------
def test_tier1_gpu_caps_memory_in_the_child(project, monkeypatch):
    from colabkit import runtime
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA L4:23034167296")
    runtime.gpus.cache_clear()
    lines: list[str] = []
    res = runner.train("v01", config=cfg_of(project), on_line=lines.append, resume="none")
    assert env_lines(lines)["COLABKIT_MAX_VRAM"] == str(20 * 10**9)
    meta = json.loads((res.log_dir / "run.json").read_text())
    assert (meta["gpu"], meta["tier"], meta["max_vram"]) == ("NVIDIA L4", 1, 20 * 10**9)
    with pytest.raises(PreflightError) as e:
        runner.train("v01", config=cfg_of(project), max_vram="40GB")
    assert str(e.value) == ("v01: --max-vram 40.0 GB is more than a Tier 1 job may use (NVIDIA L4, 23.0 GB: jobs are "
                            "capped at 20.0 GB); move this run to Tier 2 (an A100 80 GB: 'colabkit airlock export v01', then "
                            "pull and train it on the cluster), or lower --max-vram")


def test_tier2_gpu_has_no_default_cap_but_refuses_more_than_it_has(project, monkeypatch):
    from colabkit import runtime
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA A100-SXM4-80GB:85899345920")
    runtime.gpus.cache_clear()
    pre = runner.preflight("v01", config=cfg_of(project), check_tiers=False)
    assert (pre.tier, pre.max_vram) == (2, None)
    with pytest.raises(PreflightError, match=r"^v01: --max-vram 100\.0 GB is more than this NVIDIA A100-SXM4-80GB has "
                                             r"\(85\.9 GB\); lower --max-vram or move the run to a larger GPU$"):
        runner.preflight("v01", config=cfg_of(project), max_vram="100GB", check_tiers=False)


def test_not_enough_free_disk(project):
    make_project(project, train={"min_free_disk": "1PB"})
    with pytest.raises(PreflightError) as e:
        runner.train("v01", config=cfg_of(project))
    msg = str(e.value)
    assert msg.startswith(f"v01: only ")
    assert msg.endswith(f" free on the disk of {project.resolve()}/experiments/v01/checkpoints (train.min_free_disk "
                        "is 1000.0 TB); free space first (old checkpoints are pruned once a remote holds them: "
                        "'colabkit sync flush'), or lower train.min_free_disk in colabkit.yaml")


def test_data_on_a_network_mount_is_warned_when_allowed(project, monkeypatch):
    data = project / "data"
    data.mkdir()
    make_project(project, train={"data_paths": ["data", "missing"]})
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", str(data))
    warnings: list[str] = []
    res = runner.train("v01", config=cfg_of(project), on_warning=warnings.append, resume="none",
                       allow_network_data=True)
    assert warnings == [
        f"data path {data.resolve()} is on a network/FUSE mount: training from it is slow and stalls when the mount "
        "hiccups; pre-fetch it to local SSD (/content/ or /mnt/) before train.py starts and point train.data_paths "
        "there",
        f"data path {project.resolve()}/missing does not exist (train.data_paths); pre-fetch the data there first"]
    assert res.warnings == warnings


def test_unwritable_sync_tier_fails_before_the_start(project):
    blocker = project / "not-a-folder"
    blocker.write_text("x")
    make_project(project, extra={"tiers": [{"name": "backup", "remote": "local", "path": str(blocker / "sub")}]})
    with pytest.raises(PreflightError) as e:
        runner.train("v01", config=cfg_of(project))
    assert str(e.value).startswith("v01: cannot write to sync tier 'backup': ")
    assert str(e.value).endswith("; fix its access ('colabkit config show' shows what is configured) or run with "
                                 "--no-sync")
    assert not (project / "experiments" / "v01" / "logs").exists()
    # --no-sync skips the tier check: the run itself does not need the tier
    assert runner.train("v01", config=cfg_of(project), sync=False, resume="none").ok


def test_sync_runs_with_the_run_and_is_flushed_at_its_end(tmp_path):
    root = make_project(tmp_path / "p", extra={"tiers": [{"name": "backup", "remote": "local",
                                                             "path": str(tmp_path / "backup"), "every": "1h"}]})
    res = runner.train("v01", config=cfg_of(root), resume="none")
    assert res.ok
    rel = res.log.relative_to(root.resolve())
    # uploaded by the final flush although the tier is due only every hour
    assert (tmp_path / "backup" / rel).read_bytes() == res.log.read_bytes()
    assert (tmp_path / "backup" / rel.parent / "run.json").exists()


# -- estimate ------------------------------------------------------------------------------------------------
def test_estimate_far_off_is_warned_once_the_pace_was_measured_long_enough(project):
    make_project(project, "slow_steps.py")  # 20 ms a step: 150 steps take 3 s, against an estimate of 1 s
    warnings: list[str] = []
    res = runner.train("v01", config=cfg_of(project), estimate="1s", args=["--steps", "150"],
                       on_warning=warnings.append, resume="none")
    assert res.total_steps == 150 and res.ok
    assert len(warnings) == 1
    assert warnings[0].startswith("v01: at the measured pace (")
    assert warnings[0].endswith(", against an estimate of 1s (off by more than 50%); update the estimate and "
                                "tell whoever is waiting for it")


def test_a_toy_run_is_not_warned_about_a_pace_measured_over_a_fraction_of_a_second(project):
    """--estimate 10m on a run of under a second: its pace, read off a few hundred ms, says nothing."""
    make_project(project, "slow_steps.py")
    warnings: list[str] = []
    res = runner.train("v01", config=cfg_of(project), estimate="10m", args=["--steps", "40"],
                       on_warning=warnings.append, resume="none")
    assert res.ok and res.step == 40
    assert warnings == [] and res.as_dict()["warnings"] == []


def test_estimate_without_total_steps_says_so(project):
    warnings: list[str] = []
    runner.train("v01", config=cfg_of(project), estimate="1h", on_warning=warnings.append, resume="none")
    assert warnings == ["v01: --estimate needs the total number of steps to compare the pace (pass --total-steps N "
                        "or set train.total_steps)"]


# -- background jobs, stop, interrupt -------------------------------------------------------------------------
def _wait_for(cond, timeout=30.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return True
        ev.wait(0.05)
    return cond()


def test_background_job_status_logs_stop(project):
    make_project(project, "slow_steps.py")
    cfg = cfg_of(project)
    job = runner.train("v01", config=cfg, background=True, resume="none", args=["--steps", "100000"])
    try:
        assert isinstance(job, runner.Job)
        assert _wait_for(lambda: (job.progress.step or 0) >= 5)
        st = runner.status(config=cfg)["jobs"][0]
        assert st["experiment"] == "v01" and st["state"] == "running" and st["total_steps"] == 100000
        assert st["step"] >= 5 and st["attempt"] == 1
        assert any(x.startswith("step ") for x in runner.logs(5, config=cfg))
        with pytest.raises(TrainError, match=r"^v01 is already running in this kernel \(run v01-.*, state running\); "
                                             r"stop it with 'colabkit train stop v01' or wait for it$"):
            runner.train("v01", config=cfg)
    finally:
        out = runner.stop(config=cfg, experiment="v01")
    assert out["stopped"][0]["state"] == "stopped"
    res = job.wait()
    assert res.state == "stopped" and res.attempts[-1].outcome == "stopped" and len(res.attempts) == 1
    assert "got SIGTERM, exiting" in res.log.read_text()  # the script had its chance to clean up
    assert runner.stop(config=cfg)["stopped"] == []  # twice is fine
    assert runner.status(config=cfg)["jobs"][0]["state"] == "stopped"  # from the job file now


def test_stop_escalates_to_sigkill_after_grace(project):
    make_project(project, "ignore_sigterm.py")
    job = runner.train("v01", config=cfg_of(project), background=True, resume="none")
    assert _wait_for(lambda: (job.progress.step or 0) >= 2)
    res = job.stop(grace=0.3, timeout=30)
    assert res.state == "stopped" and res.exit_code == -signal.SIGKILL


def test_keyboard_interrupt_stops_the_child(project):
    """Ctrl-C / interrupting the kernel: a real SIGINT to this (main) thread while the child runs."""
    make_project(project, "slow_steps.py")
    pids: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("step 3/") and not pids:
            pids.append(1)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        runner.train("v01", config=cfg_of(project), on_line=on_line, resume="none", args=["--steps", "100000"])
    (log,) = (project / "experiments" / "v01" / "logs").glob("*/*.attempt1.log")
    meta = json.loads((log.parent / "run.json").read_text())
    assert meta["state"] == "stopped" and meta["attempts"][0]["outcome"] == "stopped"
    child = meta["attempts"][0]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, not orphaned
    assert "got SIGTERM, exiting" in log.read_text()


def test_cli_in_another_process_sees_and_stops_a_background_job(project):
    import subprocess
    import sys
    make_project(project, "slow_steps.py")
    cfg = cfg_of(project)
    job = runner.train("v01", config=cfg, background=True, resume="none", args=["--steps", "100000"])
    try:
        assert _wait_for(lambda: (job.progress.step or 0) >= 3)
        job._write_job_file(force=True)
        out = subprocess.run([sys.executable, "-m", "colabkit.cli", "train", "status", "--json"], cwd=project,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        (st,) = json.loads(out.stdout)["jobs"]
        assert st["state"] == "running" and st["live"] and st["pid"] == os.getpid() and st["step"] >= 3
        out = subprocess.run([sys.executable, "-m", "colabkit.cli", "train", "stop"], cwd=project,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("v01: stopping (run v01-"), out.stderr
        res = job.wait(60)
    finally:
        job.stop(timeout=30)
    assert res is not None and res.state == "stopped" and len(res.attempts) == 1


def test_sigkill_is_out_of_memory_only_when_the_oom_killer_counted_it(project):
    """A SIGKILL nobody in colabkit sent: the cgroup's oom_kill counter tells whether the OOM killer did it."""
    make_project(project, "sigkill_self.py")
    from colabkit.launch import oom_kills
    if oom_kills() is None:  # no cgroup counter to ask: every such SIGKILL counts as out of memory
        with pytest.raises(OutOfMemoryError, match=r"^v01: the run ran out of memory \(attempt 1: killed by SIGKILL "
                                                   r"\(exit code -9\), which is what the kernel's OOM killer does\)"):
            runner.train("v01", config=cfg_of(project), resume="none")
        return
    warnings: list[str] = []
    res = runner.train("v01", config=cfg_of(project), resume="none", on_warning=warnings.append)
    assert res.ok and [a.outcome for a in res.attempts] == ["crashed", "finished"]
    assert warnings[0].startswith("v01: attempt 1 killed by SIGKILL (exit code -9); restarting in ")


def test_resume_auto_fetches_from_a_tier_when_the_local_disk_is_empty(tmp_path):
    """A fresh machine: nothing local, the backup tier holds step 5 (file + manifest): fetched, verified, used."""
    import hashlib
    tier = tmp_path / "backup"
    root = make_project(tmp_path / "p", "crash_then_resume.py",
                        extra={"tiers": [{"name": "backup", "remote": "local", "path": str(tier)}]})
    data = b"weights" * 100
    remote_dir = tier / "experiments" / "v01" / "checkpoints"
    remote_dir.mkdir(parents=True)
    (remote_dir / "v01_step_00000005.pt").write_bytes(data)
    (remote_dir / "v01_step_00000005.pt.json").write_text(json.dumps(
        {"format": 1, "step": 5, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "file": "v01_step_00000005.pt", "created": "2026-11-22T00:00:00Z", "run_id": "x", "colabkit_version": "0"}))
    lines: list[str] = []
    res = runner.train("v01", config=cfg_of(root), on_line=lines.append, sync=False)
    local = root.resolve() / "experiments" / "v01" / "checkpoints" / "v01_step_00000005.pt"
    assert lines[0] == f"attempt 1 resume-from {local}"
    assert local.read_bytes() == data and res.ok and res.attempts[0].resume_from == str(local)
