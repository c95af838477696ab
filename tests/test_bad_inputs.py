"""issue 16 §6: bad inputs, as a table. Each row is one bad input (a configuration value, a command-line argument,
a remote's answer, a file on disk) with the exact error a user reads, and a check that nothing was lost: the
files that were there are still there, byte for byte. Errors other test files already assert are not repeated.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from colabkit import cli, sync
from colabkit.config import load_config
from colabkit.errors import ColabkitError, ConfigError, IntegrityError, NoCheckpointError
from tests.drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)
from tests.test_sync import ckpt, make_project, remote_files


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (symlinks as their target text), to show that nothing was lost or changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".colabkit/"):
                continue   # colabkit's own state and logs may change
            out[rel] = "-> " + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- configuration values: (id, colabkit.yaml content, the exact error) ---------------------------------------
CONFIG = [
    ("retention.min_free negative", {"retention": {"min_free": -5}},
     "retention.min_free: -5 is negative; use e.g. 500MB or 20GB"),
    ("drive.daily_upload_cap not a size", {"drive": {"daily_upload_cap": "huge"}},
     "drive.daily_upload_cap: 'huge' is not a size; use e.g. 500MB or 20GB"),
    ("data.min_free not a size", {"data": {"min_free": "x"}},
     "data.min_free: 'x' is not a size; use e.g. 500MB or 20GB"),
    ("resume.deadline not a duration", {"resume": {"deadline": "soon"}},
     "resume.deadline: 'soon' is not a duration; use e.g. 90m or 2h"),
    ("sync.settle negative", {"sync": {"settle": "-1s"}},
     "sync.settle: '-1s' is not a duration; use e.g. 90m or 2h"),
    ("sync.flush_timeout not a duration", {"sync": {"flush_timeout": "forever"}},
     "sync.flush_timeout: 'forever' is not a duration; use e.g. 90m or 2h"),
    ("sync.poll_interval zero", {"sync": {"poll_interval": 0}},
     "sync.poll_interval: 0 must be longer than 0; use e.g. 10s"),
    ("sync.retry_max zero", {"sync": {"retry_max": "0s"}},
     "sync.retry_max: '0s' must be longer than 0; use e.g. 10s"),
    ("sync.watch a number", {"sync": {"watch": 5}}, "sync.watch: 5 must be a list of strings"),
    ("project a list", {"project": [1, 2]}, "project: [1, 2] must be a string"),
    ("tier include a number", {"tiers": [{"name": "a", "remote": "hub", "include": 5}]},
     "tiers[0].include: 5 must be a list of strings"),
    ("tier every not a duration", {"tiers": [{"name": "a", "remote": "hub", "every": "often"}]},
     "tiers[0].every: 'often' is not a duration; use e.g. 90m or 2h"),
    ("tier every zero (a busy loop)", {"tiers": [{"name": "a", "remote": "hub", "every": 0}]},
     "tiers[0].every: 0s must be longer than 0 (with no pause between passes a sync keeps a CPU busy scanning); "
     "use e.g. 5m, or `colabkit sync flush` to upload now"),
    ("train.max_restarts negative", {"train": {"max_restarts": -1}},
     "train.max_restarts: -1 must be a whole number >= 0"),
    ("train.grace not a duration", {"train": {"grace": "a bit"}},
     "train.grace: 'a bit' is not a duration; use e.g. 90m or 2h"),
    ("train.step_regex without a group", {"train": {"step_regex": r"step \d+"}},
     r"train.step_regex: 'step \\d+' captures no step; name the group, e.g. 'step (?P<step>\d+)'"),
    ("train.loss_regex without a group", {"train": {"loss_regex": "loss [0-9.]+"}},
     "train.loss_regex: 'loss [0-9.]+' captures no loss; name the group, e.g. 'loss (?P<loss>[0-9.eE+-]+)'"),
    ("hub.repo_id without an owner", {"hub": {"repo_id": "not a repo"}},
     "hub.repo_id: 'not a repo' is not a Hub repository id; use OWNER/NAME, e.g. you/my-project-weights "
     "(letters, digits, '-', '_' and '.')"),
    ("sync.retry_initial zero", {"sync": {"retry_initial": 0}},
     "sync.retry_initial: 0 must be longer than 0; use e.g. 10s"),
    ("train.checkpoint_regex without a step", {"train": {"checkpoint_regex": r"saved to (?P<path>\S+)"}},
     r"train.checkpoint_regex: 'saved to (?P<path>\\S+)' captures no step; name the group, e.g. "
     r"'step (?P<step>\d+)'"),
    ("train.max_vram not a size", {"train": {"max_vram": "20 gigs"}},
     "train.max_vram: '20 gigs' is not a size; use e.g. 500MB or 20GB"),
    ("resume.on_unreachable unknown", {"resume": {"on_unreachable": "maybe"}},
     "resume.on_unreachable: 'maybe' is not allowed; use one of wait, older, fail"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in CONFIG], ids=[c[0] for c in CONFIG])
def test_bad_config_value(tmp_path, data, message):
    p = tmp_path / "colabkit.yaml"
    p.write_text(yaml.safe_dump(data))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == message
    assert snapshot(tmp_path) == before


# -- colabkit.yaml files that are not configurations ---------------------------------------------------------
YAML_FILES = [
    ("not UTF-8", b"project: \xff\xfe\n", "{p}: not UTF-8 text (byte 0xff at offset 9); save it as UTF-8"),
    ("a bare string", b"just words\n", "{p}: the top level must be a mapping of keys, got str"),
]


@pytest.mark.parametrize("raw, message", [c[1:] for c in YAML_FILES], ids=[c[0] for c in YAML_FILES])
def test_bad_config_file(tmp_path, raw, message, capsys):
    p = tmp_path / "colabkit.yaml"
    p.write_bytes(raw)
    assert cli.main(["config", "check", "--config", str(p)]) == 1
    assert capsys.readouterr().err == f"Error: {message.format(p=p)}\n"   # one line, no traceback
    assert p.read_bytes() == raw


# -- command-line arguments: (argv, exit code, the exact stderr) ---------------------------------------------
CLI = [
    (["sync", "watch", "--every", "lots"], 2,
     "Error: colabkit sync watch: argument --every: 'lots' is not a duration; use e.g. 90m or 2h\n"),
    (["sync", "once", "--timeout", "-5"], 2,
     "Error: colabkit sync once: argument --timeout: '-5' is not a duration; use e.g. 90m or 2h\n"),
    (["resume", "--policy", "bogus"], 2,
     "Error: colabkit resume: argument --policy: invalid choice: 'bogus' (choose from 'newest', 'first')\n"),
    (["sync", "once", "--config", "/nonexistent/colabkit.yaml"], 1,
     "Error: /nonexistent/colabkit.yaml: no such file; create it with 'colabkit init' or pass another path\n"),
    (["train", "v01", "--max-restarts", "-1"], 1, "Error: --max-restarts: -1 must be a whole number >= 0\n"),
    (["data", "fetch", "nothere"], 1,
     "Error: data set 'nothere' is not declared in colabkit.yaml (declared: none) and no --source was given; run "
     "'colabkit data fetch nothere --source hub:datasets/USER/REPO' or declare it under data.sets\n"),
    (["status", "--json", "extra"], 2, "Error: colabkit: unrecognized arguments: extra\n"),
    (["train", "v01", "--max-vram", "lots"], 2,
     "Error: colabkit train: argument --max-vram: 'lots' is not a size; use e.g. 500MB or 20GB\n"),
    (["resume", "--deadline", "never"], 2,
     "Error: colabkit resume: argument --deadline: 'never' is not a duration; use e.g. 90m or 2h\n"),
    (["train", "v09"], 1,
     "Error: unknown experiment 'v09': {root}/experiments/v09 does not exist (experiments here: v01); create it with "
     "'colabkit init --experiment v09' or pull it with 'colabkit airlock pull v09'\n"),
]


@pytest.mark.parametrize("argv, rc, err", CLI, ids=[" ".join(c[0]) for c in CLI])
def test_bad_command_line(tmp_path, monkeypatch, capsys, argv, rc, err):
    root = make_project(tmp_path)
    (root / "experiments" / "v01").mkdir(parents=True)
    (root / "experiments" / "v01" / "train.py").write_text("print('hi')\n")
    ckpt(root, 10)
    monkeypatch.chdir(root)
    before = snapshot(root)
    assert cli.main(argv) == rc
    assert capsys.readouterr().err == err.format(root=root.resolve())
    assert snapshot(root) == before


# -- files on disk -------------------------------------------------------------------------------------------
def _real_checkpoint(root: Path, step: int) -> Path:
    import torch
    from colabkit import Checkpointer
    with Checkpointer(root / "checkpoints", prefix="v01") as ck:
        return Path(ck.save(step, {"step": step, "w": torch.arange(4.0)}))


def test_a_truncated_manifest_is_refused_not_loaded_unverified(tmp_path):
    from colabkit.checkpoints import load
    root = make_project(tmp_path)
    p = _real_checkpoint(root, 10)
    m = p.with_name(p.name + ".json")
    m.write_text(m.read_text()[:25])
    before = snapshot(root)
    with pytest.raises(IntegrityError) as e:
        load(p)
    assert str(e.value) == (f"{p}: its manifest {m.name} is unreadable (truncated or not a colabkit manifest), so "
                            "the checkpoint cannot be verified; restore the manifest, or fetch a verified copy with "
                            "'colabkit resume'")
    from colabkit import resume
    plan = resume.locate(config=load_config(start=root))
    assert plan.choice is None
    assert plan.reason == "no source holds a valid checkpoint (1 rejected as corrupt or inconsistent): start fresh"
    assert snapshot(root) == before   # refused, not deleted


def test_an_empty_checkpoint_says_it_is_empty(tmp_path):
    from colabkit.checkpoints import load
    root = make_project(tmp_path)
    p = root / "checkpoints" / "v01_step_00000007.pt"
    p.write_bytes(b"")
    with pytest.raises(IntegrityError) as e:
        load(p)
    assert str(e.value) == (f"{p}: is empty (0 bytes), not a checkpoint (a save that never wrote it, or a copy "
                            "that failed)")
    assert p.exists()


def test_a_checkpoint_that_is_a_directory(tmp_path):
    from colabkit.checkpoints import load
    root = make_project(tmp_path)
    d = root / "checkpoints" / "v01_step_00000020.pt"
    d.mkdir()
    (d / "notes.txt").write_text("not a checkpoint")
    good = _real_checkpoint(root, 10)
    before = snapshot(root)
    with pytest.raises(NoCheckpointError) as e:
        load(d)
    assert str(e.value) == (f"{d}: is a folder, not a checkpoint file; a sharded checkpoint folder loads with "
                            "Checkpointer.load (check --resume-from / the path given)")
    from colabkit import resume
    plan = resume.locate(config=load_config(start=root))
    assert plan.choice.path == str(good) and plan.reason == "step 10 is the highest"
    assert snapshot(root) == before


def test_a_ledger_from_a_newer_colabkit_is_kept_and_nothing_is_uploaded_twice(tmp_path, caplog):
    """Before: read, then saved over in this colabkit's format, dropping what the newer one recorded."""
    root = make_project(tmp_path)
    for s in (1, 2):
        ckpt(root, s)
    cfg = load_config(start=root)
    assert sync.once(config=cfg)["ok"]
    ledger = root / ".colabkit" / "ledger" / "backup.json"
    newer = json.loads(ledger.read_text())
    newer.update({"format": 3, "future_field": {"kept": True}})
    ledger.write_text(json.dumps(newer))
    raw = ledger.read_bytes()
    tier = tmp_path / "remote_backup"
    sent = {p: p.stat().st_mtime_ns for p in tier.rglob("*") if p.is_file()}
    ckpt(root, 3)
    assert sync.once(config=cfg)["ok"]
    aside = ledger.with_name("backup.json.format-3")
    assert aside.read_bytes() == raw          # what the newer colabkit wrote is kept, byte for byte
    assert json.loads(ledger.read_text())["format"] == 2
    assert {p: p.stat().st_mtime_ns for p in sent} == sent   # what it recorded as uploaded is not sent again
    assert (f"ledger {ledger} has format 3, newer than this colabkit (2); reading what it can, a copy of it is "
            f"kept as {aside} for the newer colabkit") in caplog.messages
    assert set(remote_files(tier)) == {f"checkpoints/v01_step_0000000{s}.pt{x}" for s in (1, 2, 3) for x in ("", ".json")}


SYMLINKS = [
    ("a symlink loop", lambda d: os.symlink("loop", d / "loop"), "checkpoints/loop is a symlink loop; not uploaded"),
    ("a link to its own folder", lambda d: os.symlink(d, d / "again"),
     "checkpoints/again is a symlink to a folder (links are not walked); not uploaded"),
    ("a broken symlink", lambda d: os.symlink(d / "gone.pt", d / "dangling.pt"),
     "checkpoints/dangling.pt is a broken symlink (No such file or directory); not uploaded"),
]


@pytest.mark.parametrize("make, note", [c[1:] for c in SYMLINKS], ids=[c[0] for c in SYMLINKS])
def test_a_bad_symlink_in_a_watched_folder_is_said_once_and_never_blocks_the_flush(tmp_path, make, note):
    """Before: the link was listed as a file and its upload failed on every retry; `sync once` never finished."""
    root = make_project(tmp_path)
    good = ckpt(root, 5)
    make(root / "checkpoints")
    before = snapshot(root)
    res = sync.once(config=load_config(start=root), timeout=60)
    assert res["ok"], res
    assert remote_files(tmp_path / "remote_backup") == {
        f"checkpoints/{good.name}": hashlib.sha256(good.read_bytes()).hexdigest(),
        f"checkpoints/{good.name}.json": hashlib.sha256(good.with_name(good.name + ".json").read_bytes()).hexdigest()}
    log = (root / ".colabkit" / "logs" / "sync.log").read_text()
    assert f"backup: {note}" in log or note in log
    assert log.count(note) == 1
    assert snapshot(root) == before


def test_a_symlink_to_a_file_is_uploaded_as_the_file(tmp_path):
    root = make_project(tmp_path)
    outside = tmp_path / "elsewhere.log"
    outside.write_text("kept outside\n")
    os.symlink(outside, root / "logs" / "train.log")
    assert sync.once(config=load_config(start=root), timeout=60)["ok"]
    assert (tmp_path / "remote_backup" / "logs" / "train.log").read_text() == "kept outside\n"
    assert outside.read_text() == "kept outside\n"


# -- remote answers ------------------------------------------------------------------------------------------
def test_drive_credentials_of_an_unknown_type(drive_server: DriveServer, tmp_path):
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "banana"}))
    key.chmod(0o600)
    from colabkit.remotes import open_remote
    cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint},
                            "tiers": [{"name": "drive", "remote": "drive"}]})
    with pytest.raises(ColabkitError) as e:
        open_remote(cfg, "drive").check_access()
    assert str(e.value) == (f"{key}: credentials of type 'banana' are not supported; use a service-account key "
                            "(type service_account) or user credentials (type authorized_user)")
    assert json.loads(key.read_text()) == {"type": "banana"}


def test_a_read_only_hub_token(hub_server: HubServer, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", hub_server.READ_TOKEN)
    from colabkit.remotes import open_remote
    cfg = load_config(data={"hub": {"repo_id": "alice/w", "endpoint": hub_server.endpoint},
                            "tiers": [{"name": "hub", "remote": "hub"}]})
    with pytest.raises(ColabkitError) as e:
        open_remote(cfg, "hub").check_access()
    assert str(e.value) == ("hub: the Hugging Face token from the HF_TOKEN environment variable (user 'alice') is "
                            "read-only, so checkpoints cannot be uploaded to alice/w; create a token with write access "
                            f"at {hub_server.endpoint}/settings/tokens")
    assert hub_server.repo("alice/w") is None   # nothing was created with a token that cannot write
