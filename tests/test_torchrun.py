"""%train --nproc-per-node N: a real torchrun group (gloo, CPU) of templates/train_ddp.py supervised as one job.

Real processes and real signals: a kill -9 of one rank restarts the whole group from the newest verified
checkpoint and ends bit-for-bit equal to an uninterrupted run (DDP with checkpoint files, and --sharded: FSDP2 on a
CPU mesh with checkpoint folders); SIGTERM leaves no rank running; two nodes on one
machine (a static rendezvous on 127.0.0.1) form one group, each node supervised by its own colabkit."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from colabkit import launch, runner
from colabkit.config import load_config
from colabkit.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "train_ddp.py"
ARGS = ["--steps", "60", "--save-every", "20", "--log-every", "10"]


def make_project(root: Path) -> Path:
    exp = root / "experiments" / "v01"
    exp.mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump(
        {"project": "t", "tiers": [], "train": {"max_restarts": 2, "restart_backoff": 0.01, "stall_after": 120,
                                                 "grace": 10, "min_free_disk": "1MB"}}))
    shutil.copy(TEMPLATE, exp / "train.py")
    return root


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.delenv("COLABKIT_FAKE_GPU", raising=False)
    from colabkit import runtime
    runtime.gpus.cache_clear()
    yield
    runtime.gpus.cache_clear()


def weights(path: Path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def wait_for(cond, timeout: float) -> None:
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.magic
def test_kill_of_one_rank_restarts_the_group_and_ends_bit_for_bit_equal(ip, tmp_path, monkeypatch, capsys):
    # the uninterrupted run, through the magic: progress from rank 0, a checkpoint every 20 steps
    ref = make_project(tmp_path / "ref")
    monkeypatch.chdir(ref)
    ip.run_line_magic("train", "v01 --nproc-per-node 2 --no-sync --resume none -- " + " ".join(ARGS))
    out = capsys.readouterr().out.splitlines()
    assert "training 577 parameters on 2 ranks (gloo) from step 0 to 60" in out
    # rank 0's lines only, each once, shown without torchrun's rank prefix
    assert [x.split(" loss ")[0] for x in out if x.startswith("step ")] == [f"step {s}" for s in range(10, 61, 10)]
    assert out[-3].startswith("v01: finished · step 60/60 · loss ") and " · 1 attempt · " in out[-3]
    ref_ck = ref / "experiments/v01/checkpoints"
    assert sorted(p.name for p in ref_ck.glob("*.pt")) == [f"v01_step_000000{s}.pt" for s in (20, 40, 60)]
    log = next((ref / "experiments/v01/logs").glob("*/*.attempt1.log")).read_text()
    assert "\n[rank0]:step 10 loss " in log and "--nproc-per-node 2 --max-restarts 0" in log.splitlines()[0]

    # the same run, one rank killed with SIGKILL once the first checkpoint is written
    proj = make_project(tmp_path / "proj")
    cfg = load_config(proj / "colabkit.yaml")
    job = runner.train("v01", config=cfg, background=True, sync=False, resume="none", nproc_per_node=2,
                       args=[*ARGS, "--step-delay", "0.1"])
    try:
        wait_for(lambda: job.progress.checkpoint_path is not None and len(job.ranks) == 2, 120)
        first_ck = job.progress.checkpoint_path
        victim = max(job.ranks)  # the second rank torchrun started
        os.kill(victim, signal.SIGKILL)
        res = job.wait(300)
    finally:
        job.stop(timeout=60)
    assert res is not None and res.ok, job.status()
    a1, a2 = res.attempts
    assert a1.outcome == "crashed" and a1.detail.startswith("rank ") and a1.detail.endswith(
        " killed by SIGKILL (torchrun exit code 1)"), a1.detail
    assert a2.resume_from is not None and Path(a2.resume_from).name in {"v01_step_00000020.pt",
                                                                         "v01_step_00000040.pt"}
    assert Path(first_ck).name == "v01_step_00000020.pt"
    got, want = weights(proj / "experiments/v01/checkpoints/v01_step_00000060.pt"), weights(ref_ck / "v01_step_00000060.pt")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and bool((got[k] == want[k]).all()) for k in got)
    assert launch.alive(job.ranks) == []


def folder_state(path: Path) -> dict:
    """A sharded checkpoint folder read whole into one process (DCP reads every rank's shards)."""
    from colabkit.checkpoints import Checkpointer
    return Checkpointer(path.parent, prefix="v01").load(path)


def flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
    return out


def same_bits(a: dict, b: dict) -> list[str]:
    """The keys whose values differ (tensors: dtype and every bit)."""
    import torch
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return [k for k in fa if not (fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k])
                                  else fa[k] == fb[k])]


@pytest.mark.magic
def test_sharded_template_kill_of_one_rank_resumes_the_group_from_its_newest_folder(ip, tmp_path, monkeypatch,
                                                                                     capsys):
    sharded = [*ARGS, "--sharded"]
    # the uninterrupted run, through the magic: FSDP2 over a CPU mesh of 2 ranks, a checkpoint folder every 20 steps
    ref = make_project(tmp_path / "ref")
    monkeypatch.chdir(ref)
    ip.run_line_magic("train", "v01 --nproc-per-node 2 --no-sync --resume none -- " + " ".join(sharded))
    out = capsys.readouterr().out.splitlines()
    assert "training 577 parameters on 2 ranks (gloo, sharded with FSDP2) from step 0 to 60" in out
    assert [x.split(" loss ")[0] for x in out if x.startswith("step ")] == [f"step {s}" for s in range(10, 61, 10)]
    assert out[-3].startswith("v01: finished · step 60/60 · loss ") and " · 1 attempt · " in out[-3]
    ref_ck = ref / "experiments/v01/checkpoints"
    names = [f"v01_step_000000{s}" for s in (20, 40, 60)]
    assert sorted(p.name for p in ref_ck.iterdir() if p.name != "latest") == names
    for n in names:  # one folder per checkpoint: each rank's shards, DCP's metadata, colabkit's manifest
        assert sorted(os.listdir(ref_ck / n)) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                  "colabkit-manifest.json"]

    # the same run, one rank killed with SIGKILL once the first folder is in place
    proj = make_project(tmp_path / "proj")
    cfg = load_config(proj / "colabkit.yaml")
    job = runner.train("v01", config=cfg, background=True, sync=False, resume="none", nproc_per_node=2,
                       args=[*sharded, "--step-delay", "0.1"])
    try:
        wait_for(lambda: job.progress.checkpoint_path is not None and len(job.ranks) == 2, 120)
        first_ck = job.progress.checkpoint_path
        os.kill(max(job.ranks), signal.SIGKILL)
        res = job.wait(300)
    finally:
        job.stop(timeout=60)
    assert res is not None and res.ok, job.status()
    a1, a2 = res.attempts
    assert a1.outcome == "crashed" and a1.detail.endswith(" killed by SIGKILL (torchrun exit code 1)"), a1.detail
    assert Path(first_ck).name == "v01_step_00000020"
    assert a2.resume_from is not None and Path(a2.resume_from).name in names[:2] and Path(a2.resume_from).is_dir()
    log2 = next((proj / "experiments/v01/logs").glob("*/*.attempt2.log")).read_text()
    assert f"[rank0]:resumed from {a2.resume_from} at step {Path(a2.resume_from).name[-2:]}" in log2
    ck = proj / "experiments/v01/checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name != "latest") == names  # no temporary folder left
    assert same_bits(folder_state(ck / names[-1]), folder_state(ref_ck / names[-1])) == []
    assert launch.alive(job.ranks) == []

    # the 2 ranks' folder resumes in one process (no torchrun: a group of one): DCP reshards it onto its mesh
    one = make_project(tmp_path / "one")
    res = runner.train("v01", config=load_config(one / "colabkit.yaml"), sync=False, nproc_per_node=1,
                       resume=str(ref_ck / names[1]), args=[*sharded, "--steps", "50"])
    assert res.ok and res.attempts[0].resume_from == str(ref_ck / names[1])
    log1 = next((one / "experiments/v01/logs").glob("*/*.attempt1.log")).read_text()
    assert "training 577 parameters on 1 ranks (gloo, sharded with FSDP2) from step 40 to 50" in log1
    assert sorted(os.listdir(one / "experiments/v01/checkpoints/v01_step_00000050")) == [
        ".metadata", "__0_0.distcp", "colabkit-manifest.json"]


def test_sigterm_to_train_reaches_every_rank_and_leaves_no_process(tmp_path):
    proj = make_project(tmp_path / "proj")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "colabkit", "train", "v01", "--nproc-per-node", "2", "--no-sync",
                             "--resume", "none", "--", "--steps", "100000", "--step-delay", "0.05"],
                            cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("step 10 loss"):
                break
        torchrun = launch.child_pids(proc.pid)
        ranks = [r for t in torchrun for r in launch.child_pids(t)]
        assert len(torchrun) == 1 and len(ranks) == 2, lines
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0].splitlines()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert rest[-1] == "Interrupted.", rest[-6:]
    log = next((proj / "experiments/v01/logs").glob("*/*.attempt1.log")).read_text().splitlines()
    assert log[-1].startswith("# colabkit: attempt 1 interrupted (exit code "), log[-3:]
    assert launch.alive(torchrun + ranks) == []


def test_launch_options_are_checked_before_anything_starts(tmp_path):
    cfg = load_config(make_project(tmp_path / "p") / "colabkit.yaml")
    with pytest.raises(ConfigError) as ei:
        runner.train("v01", config=cfg, nproc_per_node=0, sync=False)
    assert str(ei.value) == "--nproc-per-node: 0 must be a whole number >= 1 or 'auto' (one rank per visible GPU)"
    with pytest.raises(ConfigError) as ei:
        runner.train("v01", config=cfg, nnodes=2, sync=False)
    assert str(ei.value) == ("--nnodes 2 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every "
                             "node) and --node-rank R")
    pre = runner.preflight("v01", config=cfg, nproc_per_node="auto", check_tiers=False)
    assert pre.nproc_per_node == 1 and pre.gpus == []
    pre = runner.preflight("v01", config=cfg, nproc_per_node=2, check_tiers=False)
    assert pre.warnings == ["no GPU found: the 2 ranks run on the CPU (use the gloo backend in train.py)"]
    cmd = launch.Launch(nproc_per_node=2, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29511").command(
        "py", ["py", "-u", "-c", "B", "train.py"], log_dir=Path("L"))
    assert cmd == ["py", "-u", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend",
                   "static", "--rdzv-endpoint", "127.0.0.1:29511", "--nproc-per-node", "2", "--max-restarts", "0",
                   "--tee", "3", "--log-dir", "L", "--no-python", "py", "-u", "-c", "B", "train.py"]


def test_preflight_checks_each_gpu_the_ranks_use(tmp_path, monkeypatch):
    from colabkit import runtime
    from colabkit.errors import PreflightError
    cfg = load_config(make_project(tmp_path / "p") / "colabkit.yaml")
    monkeypatch.setenv("COLABKIT_FAKE_GPU", "NVIDIA L4:24000000000")
    runtime.gpus.cache_clear()
    pre = runner.preflight("v01", config=cfg, nproc_per_node="auto", check_tiers=False)
    assert pre.nproc_per_node == 1 and pre.gpus == [{"index": 0, "name": "NVIDIA L4", "memory": 24000000000,
                                                    "tier": 1}]
    with pytest.raises(PreflightError) as ei:
        runner.preflight("v01", config=cfg, nproc_per_node=2, check_tiers=False)
    assert str(ei.value) == ("v01: --nproc-per-node 2 but this machine has 1 GPU (NVIDIA L4); one rank per GPU: "
                             "lower --nproc-per-node, or use --nproc-per-node auto")


def test_two_nodes_on_one_machine_are_one_group_each_node_supervised(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node0, node1 = make_project(tmp_path / "node0"), make_project(tmp_path / "node1")  # each its own folders
    opts = ["--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    # node 1: its own colabkit process, as on a second machine
    other = subprocess.Popen([sys.executable, "-m", "colabkit", "train", "v01", *opts, "--node-rank", "1",
                              "--no-sync", "--resume", "none", "--", *ARGS], cwd=node1, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        res = runner.train("v01", config=load_config(node0 / "colabkit.yaml"), sync=False, resume="none",
                           nproc_per_node=1, nnodes=2, node_rank=0, rdzv_endpoint=f"127.0.0.1:{port}", args=ARGS)
        out1 = other.communicate(timeout=300)[0].splitlines()
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait()
    assert res.state == "finished" and res.step == 60  # progress comes from global rank 0, on node 0
    assert other.returncode == 0 and out1[-2].startswith("v01: finished · 1 attempt · in "), out1[-5:]
    assert sorted(p.name for p in (node0 / "experiments/v01/checkpoints").glob("*.pt")) == [
        f"v01_step_000000{s}.pt" for s in (20, 40, 60)]
    assert not list((node1 / "experiments/v01/checkpoints").glob("*.pt"))  # DDP: global rank 0 saves
    log1 = next((node1 / "experiments/v01/logs").glob("*/*.attempt1.log")).read_text().splitlines()
    assert "--nnodes 2 --node-rank 1 --rdzv-backend static" in log1[0]
    assert log1[-1].startswith("# colabkit: attempt 1 finished (exit code 0) at ")


def test_out_of_memory_on_any_rank_is_never_restarted(tmp_path):
    from colabkit.errors import OutOfMemoryError
    proj = make_project(tmp_path / "proj")
    shutil.copy(Path(__file__).parent / "scripts" / "oom_one_rank.py", proj / "experiments/v01/train.py")
    with pytest.raises(OutOfMemoryError) as e:
        runner.train("v01", config=load_config(proj / "colabkit.yaml"), sync=False, resume="none", nproc_per_node=2)
    logs = sorted((proj / "experiments/v01/logs").glob("*/*.attempt*.log"))
    assert len(logs) == 1  # no restart
    assert str(e.value).startswith("v01: the run ran out of memory (attempt 1: exit code 1, 'CUDA out of memory' "
                                   "in its output); not restarted: "), str(e.value)
