"""%train's data preflight (train.data, COLABKIT_DATA_<NAME>, --allow-network-data) and --release-when-done,
with real child processes and an injected releaser."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from colabkit import data, runner
from colabkit.commands import ArgumentError, parse
from colabkit.config import load_config
from colabkit.errors import PreflightError

SCRIPTS = Path(__file__).parent / "scripts"
FAST = {"max_restarts": 0, "restart_backoff": 0.01, "stall_after": 30, "grace": 5, "min_free_disk": "1MB"}


def make(tmp_path: Path, *, train=None, extra=None, tiers=()) -> Path:
    root = tmp_path / "proj"
    exp = root / "experiments" / "v01"
    exp.mkdir(parents=True)
    shutil.copy(SCRIPTS / "data_and_checkpoint.py", exp / "train.py")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    cfg = {"project": "t", "tiers": list(tiers), "train": {**FAST, **(train or {})},
           "data": {"cache": str(tmp_path / "ssd"), "min_free": 0,
                    "sets": [{"name": "toy-set", "source": str(src), "version": "v1"}]},
           "sync": {"settle": 0.05}, **(extra or {})}
    (root / "colabkit.yaml").write_text(yaml.safe_dump(cfg))
    return root


def cfg(root: Path):
    return load_config(root / "colabkit.yaml")


def test_missing_data_set_refuses_the_run_with_the_fetch_command(tmp_path):
    root = make(tmp_path, train={"data": ["toy-set"]})
    with pytest.raises(PreflightError) as ei:
        runner.train("v01", config=cfg(root), resume="none")
    assert str(ei.value) == "v01: train.data: toy-set v1 is not on the local disk: run 'colabkit data fetch toy-set'"
    assert not (root / "experiments" / "v01" / "logs").exists()


def test_damaged_data_set_refuses_and_a_fetched_one_reaches_train_py(tmp_path):
    root = make(tmp_path, train={"data": ["toy-set"]})
    res = data.fetch("toy-set", config=cfg(root), progress=False)
    (res.path / "a.txt").write_text("tampered, longer\n")
    with pytest.raises(PreflightError) as ei:
        runner.train("v01", config=cfg(root), resume="none")
    assert str(ei.value) == ("v01: train.data: toy-set v1 fails its check (a.txt has 17 bytes, not 6): run "
                             "'colabkit data fetch toy-set'")
    data.fetch("toy-set", config=cfg(root), progress=False)
    lines: list[str] = []
    out = runner.train("v01", config=cfg(root), resume="none", on_line=lines.append)
    assert out.ok
    assert f"data COLABKIT_DATA_TOY_SET={res.path}" in lines
    assert "file a.txt: alpha" in lines


def test_data_path_on_a_network_mount_is_refused_unless_allowed(tmp_path, monkeypatch):
    root = make(tmp_path, train={"data_paths": ["/content/drive/MyDrive/data"]})
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", "/content/drive")
    with pytest.raises(PreflightError) as ei:
        runner.train("v01", config=cfg(root), resume="none")
    assert str(ei.value) == (
        "v01: data path /content/drive/MyDrive/data is on a network/FUSE mount: training from it is slow and stalls "
        "when the mount hiccups. Pre-fetch it to the local SSD ('colabkit data fetch NAME --source PATH', and list "
        "NAME in train.data), or pass --allow-network-data to train from the mount anyway")
    assert parse(["train", "v01", "--allow-network-data"]).allow_network_data is True


class Releaser:
    def __init__(self) -> None:
        self.calls = []

    def __call__(self, action) -> None:
        self.calls.append(action)


def test_release_when_done_releases_after_the_final_flush(tmp_path):
    root = make(tmp_path, tiers=[{"name": "backup", "remote": "local", "path": str(tmp_path / "backup")}],
                extra={"release": {"command": "shutdown -h +2"}})
    said: list[str] = []
    r = Releaser()
    res = runner.train("v01", config=cfg(root), resume="none", on_warning=said.append, release_when_done=True,
                       releaser=r)
    assert res.ok and [a.command for a in r.calls] == [["shutdown", "-h", "+2"]]
    assert said[-1] == "Releasing: run the release command 'shutdown -h +2'"
    assert any(x.startswith("  ok    tiers     every tier holds a verified copy") for x in said)
    assert (tmp_path / "backup" / "experiments/v01/checkpoints/v01_step_00000010.pt").is_file()


def test_release_when_done_refuses_while_an_action_is_queued_and_force_releases(tmp_path):
    root = make(tmp_path, tiers=[{"name": "backup", "remote": "local", "path": str(tmp_path / "backup")}],
                extra={"release": {"command": "shutdown -h +2"}})
    q = root / ".colabkit" / "actions" / "v01"
    q.mkdir(parents=True)
    (q / "cooldown-10.json").write_text(json.dumps({"id": "cooldown-10", "state": "waiting", "created": 1.0}))
    said: list[str] = []
    r = Releaser()
    runner.train("v01", config=cfg(root), resume="none", on_warning=said.append, release_when_done=True, releaser=r)
    assert r.calls == []
    assert said[-1] == ("NOT RELEASED (triggers failed): did not run the release command 'shutdown -h +2'. Fix the "
                        "above, or pass --release-when-done=force / colabkit release --force to release anyway")
    job = runner.train("v01", config=cfg(root), resume="none", background=True, release_when_done="force",
                       releaser=r)
    job.wait(60)
    job._release_thread.join(60)
    assert len(r.calls) == 1 and job.release_decision.forced


def test_release_when_done_argument():
    assert parse(["train", "v01", "--release-when-done"]).release_when_done is True
    assert parse(["train", "v01", "--release-when-done=force"]).release_when_done == "force"
    with pytest.raises(ArgumentError) as ei:
        parse(["train", "v01", "--release-when-done=yes"])
    assert str(ei.value) == ("colabkit train: argument --release-when-done: 'yes': use --release-when-done, or "
                             "--release-when-done=force")
