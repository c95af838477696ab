"""Resume: sources in priority order, both policies, corrupt copies refused, failing sources skipped; the
``colabkit resume`` command through the CLI, a subprocess and the ``%resume`` magic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colabkit.checkpoints import Checkpointer, discover, load_latest, manifest_path, verify
from colabkit.cli import main
from colabkit.config import load_config
from colabkit.errors import ConfigError, IntegrityError, RemoteAuthError, ResumeError, UnknownExperimentError
from colabkit.remotes import open_remote
from colabkit.remotes.base import Remote
from colabkit.resume import fetch, locate

YAML = """\
project: demo
tiers:
  - name: drive
    remote: drive
    path: {root}/tier-drive
  - name: hub
    remote: hub
    path: {root}/tier-hub
"""


@pytest.fixture
def project(tmp_path: Path):
    root = tmp_path / "proj"
    (root / "experiments" / "v01").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(YAML.format(root=tmp_path))
    return load_config(root / "colabkit.yaml")


def ckdir(cfg):
    return cfg.checkpoint_dir("v01")


def save_local(cfg, step: int) -> Path:
    return Checkpointer(ckdir(cfg), prefix="v01").save(step, {"step": step, "w": torch.full((256,), float(step))})


def save_remote(cfg, tier: str, step: int, *, manifest: bool = True, tmp: Path | None = None) -> str:
    """Put a checkpoint (and its manifest) on `tier` under the path sync would use."""
    staging = (tmp or cfg.root.parent) / f"staging-{tier}-{step}"
    p = Checkpointer(staging, prefix="v01").save(step, {"step": step, "w": torch.full((256,), float(step))})
    rel = cfg.remote_path(ckdir(cfg) / p.name)
    with open_remote(cfg, tier) as r:
        r.put(p, rel)
        if manifest:
            r.put(manifest_path(p), rel + ".json")
    return rel


def tier_file(cfg, tier: str, rel: str) -> Path:
    return open_remote(cfg, tier).root / rel


class FailingRemote(Remote):
    """A tier that rejects its credentials: a fault injected at our own Remote interface."""

    kind = "drive"

    def list(self, prefix=""):
        raise RemoteAuthError(f"{self.name}: the service account was rejected (invalid_grant); "
                              "check drive.credentials", remote=self.name)

    def put(self, *a, **k):
        raise AssertionError("not used")

    get = delete = check_access = put


def test_newest_policy_prefers_a_remote_newer_than_local_and_fetches_it(project):
    save_local(project, 100)
    rel = save_remote(project, "hub", 300)
    plan = locate(config=project, experiment="v01")
    assert [(s.name, s.state, s.newest_step) for s in plan.sources] == [
        ("local", "ok", 100), ("drive", "empty", None), ("hub", "ok", 300)]
    assert (plan.choice.source, plan.choice.step, plan.choice.path) == ("hub", 300, rel)
    assert plan.reason == "step 300 is the highest (local has 100)"
    path = fetch(plan, progress=False)
    assert path == ckdir(project) / "v01_step_00000300.pt"
    (info,) = [i for i in discover(ckdir(project)) if i.step == 300]
    verify(info)  # its manifest came with it
    assert json.loads((ckdir(project) / "latest").read_text())["step"] == 300
    assert Checkpointer(ckdir(project), prefix="v01").load_latest()["step"] == 300


def test_local_wins_a_tie(project):
    local = save_local(project, 200)
    save_remote(project, "drive", 200)
    save_remote(project, "hub", 200)
    plan = locate(config=project, experiment="v01")
    assert plan.choice.source == "local"
    assert plan.reason == "step 200 is the highest; it is held by local, drive and hub, and local comes first in priority order"
    assert fetch(plan, progress=False) == local


def test_first_policy_takes_the_first_source_holding_one(project):
    save_remote(project, "drive", 100)
    save_remote(project, "hub", 900)
    plan = locate(config=project, experiment="v01", policy="first")
    assert (plan.choice.source, plan.choice.step) == ("drive", 100)
    assert plan.reason == "drive is the first source in priority order holding a verified checkpoint (local holds none)"
    save_local(project, 50)
    plan = locate(config=project, experiment="v01", policy="first")
    assert (plan.choice.source, plan.choice.step) == ("local", 50)


def test_policy_from_config_and_priority_order(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "colabkit.yaml").write_text(YAML.format(root=tmp_path) + "resume:\n  priority: [hub, local]\n  policy: first\n")
    cfg = load_config(root / "colabkit.yaml")
    save_local(cfg, 500)
    save_remote(cfg, "hub", 10)
    plan = locate(config=cfg, experiment="v01")
    assert [s.name for s in plan.sources] == ["hub", "local"]
    assert (plan.policy, plan.choice.source, plan.choice.step) == ("first", "hub", 10)


def test_corrupt_local_newest_falls_back(project):
    save_local(project, 100)
    p = save_local(project, 200)
    data = bytearray(p.read_bytes())
    data[-50] ^= 0xFF
    p.write_bytes(bytes(data))
    plan = locate(config=project, experiment="v01")
    local = plan.source("local")
    assert local.newest_step == 100
    assert [(r["step"], r["path"]) for r in local.rejected] == [(200, str(p))]
    assert "does not match its manifest" in local.rejected[0]["reason"]
    assert fetch(plan, progress=False) == ckdir(project) / "v01_step_00000100.pt"


def test_a_remote_record_disagreeing_with_its_manifest_is_not_verified(project, tmp_path):
    save_remote(project, "hub", 100)
    rel = save_remote(project, "hub", 200)
    # the tier now holds other bytes under the newest name, with the old manifest beside it
    other = tmp_path / "other.pt"
    torch.save({"step": 999}, other)
    open_remote(project, "hub").put(other, rel)
    plan = locate(config=project, experiment="v01")
    hub = plan.source("hub")
    assert hub.newest_step == 100
    assert hub.rejected[0]["path"] == rel
    assert hub.rejected[0]["reason"].startswith(f"{other.stat().st_size} bytes, its manifest says ")
    assert plan.choice.step == 100


def test_a_corrupt_download_is_refused_and_fetch_falls_back(project):
    save_local(project, 100)
    save_remote(project, "drive", 250)
    rel = save_remote(project, "hub", 300)
    plan = locate(config=project, experiment="v01")
    assert (plan.choice.source, plan.choice.step) == ("hub", 300)
    # bit rot on the tier after it was listed: same size and mtime, other bytes
    f = tier_file(project, "hub", rel)
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-50] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    path = fetch(plan, progress=False)
    assert path == ckdir(project) / "v01_step_00000250.pt"
    assert (plan.choice.source, plan.choice.step) == ("drive", 250)
    assert "fell back to drive step 250" in plan.reason
    assert not (ckdir(project) / "v01_step_00000300.pt").exists(), "the corrupt copy must not be kept"
    assert not [p for p in ckdir(project).iterdir() if p.name.startswith(".colabkit-tmp")]
    verify([i for i in discover(ckdir(project)) if i.step == 250][0])


def test_plain_torch_save_file_on_a_tier_is_fetched_and_checked(project, tmp_path):
    rel = save_remote(project, "hub", 400, manifest=False)
    plan = locate(config=project, experiment="v01")
    assert plan.choice.step == 400 and not plan.choice.verified
    path = fetch(plan, progress=False)
    assert torch.load(path, weights_only=True)["step"] == 400
    assert not manifest_path(path).exists()
    # the same, truncated on the tier: refused after the download, nothing left behind
    f = tier_file(project, "hub", rel)
    path.unlink()
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    plan = locate(config=project, experiment="v01")
    with pytest.raises(ResumeError) as ei:
        fetch(plan, progress=False)
    assert str(ei.value).startswith("no candidate checkpoint could be fetched and verified: hub step 400: ")
    assert str(ei.value).endswith("; check the sources with 'colabkit resume --no-fetch'")
    assert not path.exists()


def test_a_failing_source_is_reported_and_skipped(project):
    save_local(project, 100)
    save_remote(project, "hub", 200)
    plan = locate(config=project, experiment="v01", sources=["local", FailingRemote("drive"), "hub"])
    drive = plan.source("drive")
    assert drive.state == "error"
    assert drive.error == ("RemoteAuthError: drive: the service account was rejected (invalid_grant); "
                           "check drive.credentials")
    assert (plan.choice.source, plan.choice.step) == ("hub", 200)
    assert plan.reason == "step 200 is the highest (local has 100); skipped drive (unavailable)"
    assert fetch(plan, progress=False) == ckdir(project) / "v01_step_00000200.pt"


def test_nothing_found_while_a_source_failed_is_an_error(project):
    with pytest.raises(ResumeError) as ei:
        locate(config=project, experiment="v01", sources=["local", FailingRemote("drive"), "hub"])
    assert str(ei.value) == (
        "no checkpoint to resume from, and not every source could be asked (local: no checkpoint; drive: "
        "RemoteAuthError: drive: the service account was rejected (invalid_grant); check drive.credentials; "
        "hub: no checkpoint); fix the failing source and retry, or pass --source local to start without it")


def test_nothing_anywhere_is_a_fresh_start(project):
    plan = locate(config=project, experiment="v01")
    assert plan.choice is None
    assert plan.reason == "no source holds a checkpoint: start fresh"
    assert fetch(plan) is None


@pytest.mark.parametrize("kwargs,message", [
    ({"policy": "oldest"}, "resume policy 'oldest' is not allowed; use one of newest, first"),
    ({"sources": ["local", "gcs"]}, "no tier named 'gcs'; configured tiers: drive, hub"),
])
def test_bad_policy_or_source_is_refused(project, kwargs, message):
    with pytest.raises(ConfigError) as ei:
        locate(config=project, experiment="v01", **kwargs)
    assert str(ei.value) == message


# -- the command ------------------------------------------------------------------------------------
def test_cli_resume_json(project, capsys):
    save_local(project, 100)
    save_remote(project, "hub", 300)
    assert main(["resume", "--json", "--experiment", "v01", "--config", str(project.source)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["state"], s["newest_step"]) for s in data["sources"]] == [
        ("local", "ok", 100), ("drive", "empty", None), ("hub", "ok", 300)]
    assert data["choice"]["source"] == "hub" and data["choice"]["step"] == 300
    assert data["reason"] == "step 300 is the highest (local has 100)"
    assert data["path"] == str(ckdir(project) / "v01_step_00000300.pt")
    assert Path(data["path"]).is_file()


def test_cli_resume_no_fetch_text(project, capsys):
    save_local(project, 100)
    assert main(["resume", "--no-fetch", "-e", "v01", "--config", str(project.source)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"Resume sources (newest policy), checkpoint folder {ckdir(project)}:",
        "  local  step 100        v01_step_00000100.pt",
        "  drive  no checkpoint",
        "  hub    no checkpoint",
        "Choice: local step 100 — step 100 is the highest",
        "Not fetched (--no-fetch).",
    ]


def test_cli_resume_error_exits_1(project, capsys):
    assert main(["resume", "--policy", "oldest", "--config", str(project.source)]) == 2
    assert "argument --policy: invalid choice: 'oldest'" in capsys.readouterr().err
    assert main(["resume", "--source", "gcs", "--config", str(project.source)]) == 1
    assert capsys.readouterr().err.strip() == "Error: no tier named 'gcs'; configured tiers: drive, hub"


def test_cli_resume_in_a_subprocess(project):
    save_remote(project, "drive", 700)
    out = subprocess.run([sys.executable, "-m", "colabkit", "resume", "--json", "-e", "v01"], cwd=project.root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["choice"]["source"] == "drive" and data["choice"]["step"] == 700
    assert Path(data["path"]) == ckdir(project) / "v01_step_00000700.pt"
    assert torch.load(data["path"], weights_only=True)["step"] == 700


@pytest.mark.magic
def test_magic_resume_shows_sources_and_fetches(ip, project, monkeypatch, capsys):
    try:
        _magic_resume(ip, project, monkeypatch, capsys)
    finally:
        ip.run_line_magic("unload_ext", "colabkit")  # the shared shell is left as other tests expect it


def _magic_resume(ip, project, monkeypatch, capsys):
    from IPython.core.error import UsageError
    monkeypatch.chdir(project.root)
    save_local(project, 100)
    save_remote(project, "hub", 300)
    capsys.readouterr()
    ip.run_line_magic("resume", "-e v01")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Resume sources (newest policy), checkpoint folder {ckdir(project)}:"
    assert out[3] == "  hub    step 300        v01_step_00000300.pt"
    assert out[4] == "Choice: hub step 300 — step 300 is the highest (local has 100)"
    assert out[5] == f"Resume from: {ckdir(project) / 'v01_step_00000300.pt'}"
    assert (ckdir(project) / "v01_step_00000300.pt").is_file()
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("resume", "--source gcs")
    assert str(ei.value) == "no tier named 'gcs'; configured tiers: drive, hub"


def test_only_corrupt_checkpoints_say_so(project):
    p = save_local(project, 100)
    with open(p, "r+b") as f:
        f.truncate(100)
    plan = locate(config=project, experiment="v01")
    assert plan.choice is None
    assert plan.reason == "no source holds a valid checkpoint (1 rejected as corrupt or inconsistent): start fresh"
    assert plan.as_dict()["sources"][0]["rejected"][0]["step"] == 100


# -- each byte hashed once -------------------------------------------------------------------------------
def test_a_fetched_checkpoint_is_not_hashed_again_by_the_loader(project, monkeypatch):
    """The fetch hashes while it copies and records that with the file's identity; load_latest trusts the
    record while the file is unchanged."""
    import colabkit.fsutil as fsutil
    from colabkit.checkpoints import load_latest
    save_remote(project, "drive", 200)
    path = fetch(locate(config=project, experiment="v01"), progress=False)
    assert fsutil.verified_sha256(path) == json.loads(manifest_path(path).read_text())["sha256"]
    hashed = []
    real = fsutil.hash_file
    monkeypatch.setattr(fsutil, "hash_file", lambda p, **kw: hashed.append(Path(p).name) or real(p, **kw))
    info, state = load_latest(ckdir(project))
    assert info.step == 200 and state["step"] == 200
    assert hashed == [], "load_latest hashed a checkpoint the fetch had just verified"
    assert Checkpointer(ckdir(project), prefix="v01").load(path)["step"] == 200
    assert hashed == []


def test_a_checkpoint_changed_after_its_verification_is_verified_again(project):
    from colabkit.checkpoints import load_latest
    from colabkit.errors import NoCheckpointError
    save_remote(project, "drive", 200)
    path = fetch(locate(config=project, experiment="v01"), progress=False)
    with open(path, "r+b") as f:      # same size, new bytes: the mtime moves on, the record no longer applies
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    from colabkit.fsutil import verified_sha256
    assert verified_sha256(path) is None
    with pytest.raises(NoCheckpointError) as ei:
        load_latest(ckdir(project))
    assert "does not match its manifest's" in str(ei.value) and "(corrupt)" in str(ei.value)


def test_a_copy_of_a_verified_file_does_not_inherit_its_record(project, tmp_path):
    import shutil
    from colabkit.fsutil import verified_sha256
    save_remote(project, "drive", 200)
    path = fetch(locate(config=project, experiment="v01"), progress=False)
    twin = tmp_path / "twin.pt"
    shutil.copy2(path, twin)          # copies the extended attributes and the mtime, not the inode
    assert verified_sha256(path) is not None and verified_sha256(twin) is None


def test_a_verify_that_hashed_leaves_a_record(project, monkeypatch):
    import colabkit.fsutil as fsutil
    p = save_local(project, 100)
    (info,) = discover(p.parent)
    verify(info)
    calls = []
    real = fsutil.hash_file
    monkeypatch.setattr(fsutil, "hash_file", lambda q, **kw: calls.append(q) or real(q, **kw))
    verify(info)
    assert calls == [], "the second verify read the file again"


# -- which experiment, when none is named ------------------------------------------------------------
def test_without_experiment_the_only_one_is_used_and_named(project, capsys, monkeypatch):
    """First contact: v01 holds step 300 locally and on the hub; 'colabkit resume' must not say 'start fresh'."""
    save_local(project, 300)
    save_remote(project, "hub", 300)
    monkeypatch.chdir(project.root)
    assert main(["resume", "--no-fetch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Experiment: v01 (the only experiment here)",
                       f"Resume sources (newest policy), checkpoint folder {ckdir(project)}:"]
    assert out[-2:] == [("Choice: local step 300 — step 300 is the highest; it is held by local and hub, and local comes "
                         "first in priority order"),
                        "Not fetched (--no-fetch)."]
    assert main(["status", "--resume", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["resume"]
    assert (res["experiment"], res["selected"]) == ("v01", "the only experiment here")
    assert [(s["name"], s["step"]) for s in res["sources"]] == [("local", 300), ("drive", None), ("hub", 300)]
    assert main(["status", "--resume"]) == 0
    assert "resume sources (priority order) for v01 — the only experiment here:" in capsys.readouterr().out


def test_without_experiment_the_newest_of_several_is_used_and_the_others_named(project, capsys, monkeypatch):
    (project.root / "experiments" / "v02").mkdir()
    (project.root / "experiments" / "v03").mkdir()
    old = save_local(project, 100)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(old.parent, (1_000_000, 1_000_000))
    Checkpointer(project.checkpoint_dir("v02"), prefix="v02").save(50, {"step": 50})
    monkeypatch.chdir(project.root)
    assert main(["resume", "--no-fetch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("Experiment: v02 (the newest checkpoint or run of 3 experiments; the others: v01, v03 "
                      "(name one with -e))")
    assert out[1] == f"Resume sources (newest policy), checkpoint folder {project.checkpoint_dir('v02')}:"
    assert main(["resume", "--json", "--no-fetch"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["experiment"] == "v02" and data["choice"]["step"] == 50


def test_several_experiments_without_any_checkpoint_or_run_is_an_error_listing_them(project, capsys, monkeypatch):
    (project.root / "experiments" / "v02").mkdir()
    save_remote(project, "hub", 300)  # on a tier only: nothing local says which experiment is meant
    monkeypatch.chdir(project.root)
    assert main(["resume"]) == 1
    assert capsys.readouterr().err == ("Error: 2 experiments here (v01, v02) and none has a checkpoint or a run "
                                       "yet; name one with --experiment (-e), e.g. -e v02\n")
    assert not (project.root / "checkpoints").exists()
    assert main(["resume", "-e", "v01", "--no-fetch"]) == 0
    assert "Choice: hub step 300 — step 300 is the highest" in capsys.readouterr().out


def test_an_unknown_experiment_is_an_error_for_every_command_that_takes_one(project, capsys, monkeypatch):
    save_local(project, 300)
    monkeypatch.chdir(project.root)
    msg = (f"unknown experiment 'v99': {project.root / 'experiments' / 'v99'} does not exist (experiments here: "
           "v01); create it with 'colabkit init --experiment v99' or pull it with 'colabkit airlock pull v99'")
    for argv in (["resume", "-e", "v99"], ["resume", "-e", "v99", "--no-fetch"], ["status", "-e", "v99"],
                 ["status", "--experiment", "v99", "--resume"], ["train", "v99"], ["train", "status", "v99"],
                 ["train", "logs", "v99"], ["train", "stop", "v99"], ["airlock", "export", "v99"],
                 ["airlock", "import", "v99"], ["airlock", "status", "v99"], ["triggers", "check", "--experiment", "v99"],
                 ["triggers", "list", "--experiment", "v99"], ["triggers", "test", "train.log", "--experiment", "v99"],
                 ["release", "-e", "v99", "--dry-run"]):
        assert main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert err == f"Error: {msg}\n", argv
        assert "start fresh" not in out
    with pytest.raises(UnknownExperimentError) as ei:
        locate(config=project, experiment="v99")
    assert ei.value.known == ("v01",)


@pytest.mark.magic
def test_magic_resume_without_experiment_and_the_magic_form_of_next_steps(ip, project, monkeypatch, capsys):
    from IPython.core.error import UsageError
    monkeypatch.chdir(project.root)
    save_local(project, 300)
    try:
        capsys.readouterr()
        ip.run_line_magic("resume", "--no-fetch")
        assert capsys.readouterr().out.splitlines()[0] == "Experiment: v01 (the only experiment here)"
        with pytest.raises(UsageError) as ei:
            ip.run_line_magic("resume", "-e v99")
        assert str(ei.value).endswith("create it with '%colabkit init --experiment v99' or pull it with "
                                      "'%airlock pull v99'")
    finally:
        ip.run_line_magic("unload_ext", "colabkit")


# -- block digests: a checkpoint verified on several cores at once ---------------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    """1 MiB blocks (16 MiB in use) and two hashing threads, so a few-MB checkpoint is verified block by block
    in parallel on any machine."""
    import colabkit.fsutil as fsutil
    monkeypatch.setattr(fsutil, "BLOCK", 1024 * 1024)
    monkeypatch.setenv("COLABKIT_HASH_WORKERS", "2")
    return 1024 * 1024


def _big(step: float) -> dict:
    return {"step": int(step), "w": torch.full((3 * 262144 + 1000,), float(step))}   # ~3.0 MiB: 4 blocks


def _flip(path: Path, offset: int) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # bit rot: same size and mtime


def _forget_verification(path: Path) -> None:
    from colabkit.fsutil import VERIFIED_XATTR
    if VERIFIED_XATTR in os.listxattr(path):
        os.removexattr(path, VERIFIED_XATTR)


def test_the_manifest_records_each_block_sha256(tmp_path, small_blocks):
    import hashlib
    p = Checkpointer(tmp_path, prefix="v01").save(1, _big(1))
    m = json.loads(manifest_path(p).read_text())
    data = p.read_bytes()
    assert m["blocks"]["size"] == small_blocks
    assert m["blocks"]["sha256"] == [hashlib.sha256(data[i:i + small_blocks]).hexdigest()
                                     for i in range(0, len(data), small_blocks)]
    assert len(m["blocks"]["sha256"]) == 4 and m["sha256"] == hashlib.sha256(data).hexdigest()


def test_verify_checks_the_blocks_in_parallel_and_names_the_bad_one(tmp_path, small_blocks, monkeypatch):
    import colabkit.fsutil as fsutil
    p = Checkpointer(tmp_path, prefix="v01").save(1, _big(1))
    Checkpointer(tmp_path, prefix="v01").save(2, _big(2))
    threads = []
    real = fsutil.first_bad_block
    monkeypatch.setattr(fsutil, "first_bad_block",
                        lambda *a, **kw: threads.append(kw.get("workers")) or real(*a, **kw))
    monkeypatch.setattr(fsutil, "hash_file", lambda *a, **kw: pytest.fail("hashed as one sha256 stream"))
    (info1, info2) = discover(tmp_path)
    verify(info1)
    assert threads == [2] and fsutil.verified_sha256(p) == info1.sha256   # a record, as after a whole hash
    _flip(info2.path, 2 * small_blocks + 10)
    with pytest.raises(IntegrityError) as ei:
        verify(info2)
    assert str(ei.value) == (f"{info2.path}: block 3 of 4 (bytes {2 * small_blocks}-{3 * small_blocks}) does not "
                             "match its manifest's sha256 (corrupt)")
    info, state = load_latest(tmp_path)   # falls back to the intact one
    assert info.step == 1 and torch.equal(state["w"], _big(1)["w"])


def test_a_manifest_whose_blocks_cannot_describe_the_file_is_verified_by_its_sha256(tmp_path, small_blocks):
    p = Checkpointer(tmp_path, prefix="v01").save(1, _big(1))
    m = json.loads(manifest_path(p).read_text())
    for bad in ({"size": small_blocks, "sha256": m["blocks"]["sha256"][:2]},      # too few for the size
                {"size": 12, "sha256": m["blocks"]["sha256"]},                       # not a block size
                {"size": small_blocks, "sha256": ["zz"] * 4}, "blocks"):             # not digests, not a record
        manifest_path(p).write_text(json.dumps({**m, "blocks": bad}))
        _forget_verification(p)
        (info,) = discover(tmp_path)
        verify(info)   # the file is intact: its sha256 says so
    _flip(p, 100)
    _forget_verification(p)
    (info,) = discover(tmp_path)
    with pytest.raises(IntegrityError, match=r"sha256 .* does not match its manifest's .* \(corrupt\)"):
        verify(info)


def test_a_fetch_from_a_folder_tier_checks_blocks_in_parallel_and_refuses_a_bad_one(project, small_blocks,
                                                                                    monkeypatch):
    import colabkit.fsutil as fsutil
    staging = project.root.parent / "staging"
    for step in (100, 200):
        p = Checkpointer(staging, prefix="v01").save(step, _big(step))
        rel = project.remote_path(ckdir(project) / p.name)
        with open_remote(project, "drive") as r:
            r.put(p, rel)
            r.put(manifest_path(p), rel + ".json")
    _flip(tier_file(project, "drive", rel), 3 * small_blocks + 5)   # step 200's last block, on the tier
    workers = []
    real = fsutil.pipe_hashed
    monkeypatch.setattr(fsutil, "pipe_hashed", lambda *a, **kw: workers.append(kw["workers"]) or real(*a, **kw))
    plan = locate(config=project, experiment="v01")
    path = fetch(plan, progress=False)
    assert workers == [2, 2]
    assert path == ckdir(project) / "v01_step_00000100.pt" and plan.choice.step == 100
    assert "block 4 of 4 differs" in plan.reason and "fell back to drive step 100" in plan.reason
    assert not (ckdir(project) / "v01_step_00000200.pt").exists()
    assert not [q for q in ckdir(project).iterdir() if q.name.startswith(".colabkit-tmp")]
    assert fsutil.verified_sha256(path) == json.loads(manifest_path(path).read_text())["sha256"]
    info, state = load_latest(ckdir(project))
    assert info.step == 100 and torch.equal(state["w"], _big(100)["w"])


def test_load_reads_into_memory_of_its_own_keeping_shared_storages(tmp_path):
    from colabkit.checkpoints import load
    w = torch.arange(1000.0)
    p = Checkpointer(tmp_path, prefix="v01").save(1, {"w": w, "view": w[10:20], "p": torch.nn.Parameter(w[:3]),
                                                     "step": 1})
    got = load(p)
    assert torch.equal(got["w"], w) and torch.equal(got["view"], w[10:20]) and type(got["p"]) is torch.nn.Parameter
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()   # still one storage
    p.unlink()
    got["w"][10] = -5.0      # ordinary memory: writable, the file gone, the view follows
    assert float(got["view"][0]) == -5.0 and float(got["w"].sum()) == float(w.sum()) - 15.0
    old = tmp_path / "old_step_2.pt"   # the older pickle format cannot be mapped: read the plain way
    torch.save({"w": w}, old, _use_new_zipfile_serialization=False)
    assert torch.equal(load(old)["w"], w)


def test_a_checkpoint_on_a_network_mount_is_read_not_mapped(tmp_path, monkeypatch):
    # a mapped page that a mounted Drive cannot fetch kills the process (SIGBUS); a read raises an error instead
    from colabkit.checkpoints import load
    w = torch.arange(100.0)
    p = Checkpointer(tmp_path / "local", prefix="v01").save(1, {"w": w, "step": 1})
    q = Checkpointer(tmp_path / "drive", prefix="v01").save(1, {"w": w, "step": 1})
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", str(tmp_path / "drive"))
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap", False)) or real(*a, **kw))
    assert torch.equal(load(p)["w"], w) and torch.equal(load(q)["w"], w)
    assert calls == [True, False]
