"""Elected upload, the parts that need no worker processes: the election, sync.workers, the claims per tier."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from colabkit.config import _build, default_uploaders
from colabkit.elect import election_order, seeded_shuffle, waves
from colabkit.errors import ConfigError
from colabkit.remotes.local import LocalRemote
from tests.drive_server import drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


# -- the election -------------------------------------------------------------------------------------
def test_the_election_order_is_a_fixed_vector():
    """Golden values: any change to the seed, the stream or the shuffle changes who uploads on every machine
    of a running group (old and new colabkit would disagree), so it must be deliberate."""
    assert election_order("v01", 100, 6) == [4, 1, 0, 5, 2, 3]
    assert election_order("v01", 200, 6) == [0, 4, 1, 5, 3, 2]
    assert election_order("run", 1, 10) == [6, 1, 3, 8, 0, 7, 4, 5, 2, 9]
    assert seeded_shuffle("abcdef", b"seed") == seeded_shuffle(list("abcdef"), b"seed")
    assert sorted(election_order("x", 5, 40)) == list(range(40))


def test_the_election_is_the_same_in_other_processes_whatever_their_hash_seed():
    code = ("import json; from colabkit.elect import election_order; "
            "print(json.dumps([election_order(r, s, 7) for r in ('v01', 'ümlaut-run') for s in (0, 1, 10**12)]))")
    outs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout.strip())
    assert len(outs) == 1
    here = json.dumps([election_order(r, s, 7) for r in ("v01", "ümlaut-run") for s in (0, 1, 10**12)])
    assert outs == {here}


def test_the_uploaders_change_from_checkpoint_to_checkpoint():
    firsts = [tuple(election_order("v01", step, 6)[:2]) for step in range(100, 3100, 100)]
    assert len(set(firsts)) >= 10
    assert {w for pair in firsts for w in pair} == {0, 1, 2, 3, 4, 5}   # every worker takes its turn


def test_waves_skip_workers_that_cannot_write():
    order = [4, 1, 0, 5, 2, 3]
    assert waves(order, None, 2) == {4: 0, 1: 0, 0: 1, 5: 1, 2: 2, 3: 2}
    assert waves(order, {0, 1, 2, 3, 5}, 2) == {1: 0, 0: 0, 5: 1, 2: 1, 3: 2}


def test_default_uploaders_are_a_third_of_the_group_rounded_down_between_1_and_16():
    assert [default_uploaders(n) for n in (1, 2, 3, 5, 6, 8, 9, 48, 49, 100)] == [1, 1, 1, 1, 2, 2, 3, 16, 16, 16]


# -- sync.workers ---------------------------------------------------------------------------------------
def _workers(data, tmp_path, monkeypatch, **env):
    for k in ("COLABKIT_WORKER_ID", "COLABKIT_WORKER_GROUP", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
              "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return _build({"project": "proj", "sync": {"workers": data}}, root=tmp_path, source=None).sync.workers


def test_sync_workers_is_read_with_defaults_and_from_torchrun(tmp_path, monkeypatch):
    w = _workers({"id": 2, "group": 6, "takeover_after": "10m"}, tmp_path, monkeypatch)
    assert (w.id, w.group, w.uploaders, w.takeover_after, w.run) == (2, 6, 2, 600.0, "proj")
    w = _workers({}, tmp_path, monkeypatch, GROUP_RANK="3", WORLD_SIZE="32", LOCAL_WORLD_SIZE="8",
                 TORCHELASTIC_RUN_ID="job-7")
    assert (w.id, w.group, w.uploaders, w.run) == (3, 4, 1, "job-7")
    assert _build({"sync": {}}, root=tmp_path, source=None).sync.workers is None


@pytest.mark.parametrize("data, message", [
    ({"id": 6, "group": 6}, "sync.workers.id: 6 must be below sync.workers.group (6); workers are numbered 0 to 5"),
    ({"id": 0, "group": 0}, "sync.workers.group: 0 must be a whole number >= 1"),
    ({"id": -1, "group": 3}, "sync.workers.id: -1 must be a whole number >= 0"),
    ({"id": 0, "group": 6, "uploaders": 7}, "sync.workers.uploaders: 7 must be between 1 and sync.workers.group (6)"),
    ({"id": 0, "group": 6, "uploaders": 0}, "sync.workers.uploaders: 0 must be a whole number >= 1"),
    ({"id": 0, "group": 3, "takeover_after": 0},
     "sync.workers.takeover_after: 0 must be longer than 0; use e.g. 30m"),
    ({"id": 0, "group": 3, "takeover_after": "soon"},
     "sync.workers.takeover_after: 'soon' is not a duration; use e.g. 90m or 2h"),
    ({"id": 0, "group": 3, "takeovr_after": "1m"},
     "sync.workers.takeovr_after: unknown key (did you mean 'takeover_after'?); allowed here: group, id, run, "
     "takeover_after, uploaders"),
    ({"group": 3}, "sync.workers.id: missing; give this worker's number, 0 to group - 1 (torchrun's GROUP_RANK), "
                   "or set COLABKIT_WORKER_ID"),
    ({"id": 0}, "sync.workers.group: missing; give the number of workers (e.g. torchrun's --nnodes), or set "
                "COLABKIT_WORKER_GROUP"),
    ({"id": 0, "group": 2, "run": "a/b"}, "sync.workers.run: 'a/b' must be a plain name (no '/', not starting "
                                          "with '.')"),
    ("all", "sync.workers: 'all' must be a mapping of keys"),
])
def test_bad_sync_workers_say_what_is_wrong(data, message, tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        _workers(data, tmp_path, monkeypatch)
    assert str(e.value) == message


# -- the claim per tier ------------------------------------------------------------------------------
def test_a_local_claim_goes_to_exactly_one_of_many_racing_threads(tmp_path):
    remote = LocalRemote("shared", tmp_path / "tier")
    won: list[int] = []
    start = threading.Barrier(8)

    def race(i: int) -> None:
        start.wait()
        if remote.create_exclusive(".colabkit-workers/r/claims/c.claim", f"worker {i}\n".encode()):
            won.append(i)
    threads = [threading.Thread(target=race, args=(i,), name=f"race-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1
    assert remote.read_bytes(".colabkit-workers/r/claims/c.claim") == f"worker {won[0]}\n".encode()
    # records are not tier content, and no temporary is left beside the claim
    assert remote.list() == []
    assert os.listdir(tmp_path / "tier" / ".colabkit-workers" / "r" / "claims") == ["c.claim"]


def _ckpt(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_two_uploaders_racing_to_the_same_final_commit_one_wins_no_duplicate_files(hub_server, tmp_path):
    """Both read the same head and send the checkpoint; the Hub takes the first commit on that parent and
    answers 412 to the second, which then finds the other's claim and cancels."""
    from colabkit.remotes.hub import HubRemote
    hub_server.create_repo("alice/ckpt")
    a = HubRemote("hub", "alice/ckpt", endpoint=hub_server.endpoint, token=HubServer.WRITE_TOKEN, project="p")
    b = HubRemote("hub", "alice/ckpt", endpoint=hub_server.endpoint, token=HubServer.WRITE_TOKEN, project="p")
    data = os.urandom(3 * 1024 * 1024)
    fa = _ckpt(tmp_path / "a" / "v01_step_00000100.pt", data)
    fb = _ckpt(tmp_path / "b" / "v01_step_00000100.pt", data)
    claim = ".colabkit-workers/r/claims/checkpoints/v01_step_00000100/abcd.claim"
    hub_server.pause_lfs_at = 1024 * 1024       # A's upload is held once 1 MiB has arrived
    res: dict[str, object] = {}
    ta = threading.Thread(target=lambda: res.__setitem__("a", a.put_claimed(
        [(fa, "checkpoints/v01_step_00000100.pt")], claim=claim, record=b'{"worker": 0}\n')), name="uploader-a")
    ta.start()
    try:
        assert hub_server.paused.wait(30)
        # B reads the same head (A has not committed), sends its copy and commits first
        res["b"] = b.put_claimed([(fb, "checkpoints/v01_step_00000100.pt")], claim=claim, record=b'{"worker": 1}\n')
    finally:
        hub_server.gate.set()
        ta.join(60)
    assert res["b"] is not None and res["a"] is None
    refused = [r for r in hub_server.requests if r[1] == "POST" and "/commit/" in r[2] and r[3] == 412]
    assert len(refused) == 1
    files = hub_server.files("alice/ckpt")
    assert sorted(files) == [".colabkit-workers/r/claims/checkpoints/v01_step_00000100/abcd.claim",
                             ".gitattributes", "checkpoints/v01_step_00000100.pt"]
    assert b.read_bytes(claim) == b'{"worker": 1}\n'
    assert [r.path for r in a.list()] == ["checkpoints/v01_step_00000100.pt"]   # records are not tier content
    assert len(hub_server.commit_messages("alice/ckpt")) == 2   # the initial commit and B's: nothing from A


def test_a_hub_claim_is_exclusive_and_survives_an_unrelated_commit_in_between(hub_server, tmp_path):
    from colabkit.remotes.hub import HubRemote
    hub_server.create_repo("alice/ckpt")
    r = HubRemote("hub", "alice/ckpt", endpoint=hub_server.endpoint, token=HubServer.WRITE_TOKEN)
    # the branch moved between reading the head and committing (another checkpoint's commit): look again
    hub_server.inject(method="POST", path=r"/commit/", status=412,
                      message="A commit has happened since. Please refresh and try again.")
    assert r.create_exclusive(".colabkit-workers/r/leases/x/t.lease-0", b"0\n") is True
    assert len([x for x in hub_server.injected if x[0] == "412"]) == 1
    assert r.create_exclusive(".colabkit-workers/r/leases/x/t.lease-0", b"1\n") is False
    assert r.read_bytes(".colabkit-workers/r/leases/x/t.lease-0") == b"0\n"
    assert r.read_bytes(".colabkit-workers/r/leases/x/t.lease-1") is None


def test_train_preflight_of_a_worker_that_cannot_write_excludes_it_instead_of_stopping(hub_server, tmp_path,
                                                                                      monkeypatch):
    """%train's preflight with sync.workers: the write proof is the membership record; a read-only token is
    a warning that says the worker is excluded from that tier's elections, and the run still starts."""
    import yaml

    from colabkit.config import load_config
    from colabkit.preflight import preflight
    hub_server.create_repo("alice/ckpt")
    root = tmp_path / "proj"
    (root / "experiments" / "v01").mkdir(parents=True)
    (root / "experiments" / "v01" / "train.py").write_text("print('hi')\n")
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "project": "p", "hub": {"repo_id": "alice/ckpt", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub"}, {"name": "shared", "remote": "local", "path": str(tmp_path / "t")}],
        "train": {"min_free_disk": 0},
        "sync": {"workers": {"id": 4, "group": 6}}}))
    monkeypatch.setenv("HF_TOKEN", HubServer.READ_TOKEN)
    pre = preflight("v01", config=load_config(start=root), check_tiers=True)
    assert pre.tiers_checked == ["shared"]
    assert ("worker 4 cannot write to tier 'hub' (hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the "
            "token from the HF_TOKEN environment variable may not write to model repo 'alice/ckpt' (HTTP 403 (This "
            "token does not have write access)); use a token with write access to it): it is excluded from the "
            "upload elections of run 'p' on that tier; the other workers upload its checkpoints there") in pre.warnings
    assert (tmp_path / "t" / ".colabkit-workers" / "p" / "members" / "worker-00004.member").is_file()
    assert not [p for p in hub_server.files("alice/ckpt") if p.startswith(".colabkit-workers/")]


# -- Drive: no exclusive create, so a claim file per worker and the first created wins ------------------------
def test_a_drive_claim_goes_to_exactly_one_of_many_racing_workers_and_the_losers_delete_theirs(drive_server,
                                                                                               tmp_path):
    from tests.test_remote_drive import make_remote
    remote = make_remote(drive_server, tmp_path, claim_settle=0.2)
    won: list[int] = []
    start = threading.Barrier(6)

    def race(i: int) -> None:
        start.wait()
        if remote.create_exclusive(".colabkit-workers/r/claims/ckpt/t.claim", f"worker {i}\n".encode()):
            won.append(i)
    threads = [threading.Thread(target=race, args=(i,), name=f"drive-race-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(won) == 1
        copies = [f for f in drive_server.files.values() if f.name == "t.claim" and not f.trashed]
        assert len(copies) == 1
        assert remote.read_bytes(".colabkit-workers/r/claims/ckpt/t.claim") == f"worker {won[0]}\n".encode()
        assert remote.list() == []   # records are not tier content
    finally:
        remote.close()


def test_a_cancelled_drive_upload_ends_its_resumable_session_and_leaves_no_file(drive_server, tmp_path):
    from colabkit.errors import UploadCancelled
    from tests.test_remote_drive import big_file, make_remote
    remote = make_remote(drive_server, tmp_path, claim_settle=0.05)
    src = big_file(tmp_path / "v01_step_00000100.pt", 6 * 1024 * 1024)
    claim = ".colabkit-workers/r/claims/checkpoints/v01_step_00000100.pt/t.claim"
    calls = []

    def progress(n: int) -> None:   # another worker's copy wins while this one is uploading
        calls.append(n)
        if len(calls) == 2:
            assert remote.create_exclusive(claim, b'{"worker": 1}\n')
        if remote.stat(claim) is not None:
            raise UploadCancelled("another worker's copy won")
    try:
        with pytest.raises(UploadCancelled):
            remote.put_claimed([(src, "checkpoints/v01_step_00000100.pt")], claim=claim, record=b'{"worker": 0}\n',
                               progress=progress)
        assert len(drive_server.aborted_sessions) == 1 and not drive_server.sessions
        assert remote.stat("checkpoints/v01_step_00000100.pt") is None
        assert 0 < sum(calls) < 6 * 1024 * 1024
    finally:
        remote.close()


def test_an_elected_hub_upload_keeps_the_tiers_keep_in_the_same_commit(hub_server, tmp_path):
    from colabkit.remotes.hub import HubRemote
    hub_server.create_repo("alice/ckpt")
    r = HubRemote("hub", "alice/ckpt", endpoint=hub_server.endpoint, token=HubServer.WRITE_TOKEN, keep=2)
    for step in (1, 2, 3):
        f = _ckpt(tmp_path / f"v01_step_{step:08d}.pt", os.urandom(1000))
        assert r.put_claimed([(f, f"checkpoints/{f.name}")], claim=f".colabkit-workers/r/claims/{step}.claim",
                             record=b"0\n") is not None
    assert [x.path for x in r.list()] == ["checkpoints/v01_step_00000002.pt", "checkpoints/v01_step_00000003.pt"]
    assert hub_server.commit_messages("alice/ckpt")[0].endswith("(1 file, 1 old removed)")


def test_a_cancelled_local_copy_stops_at_a_chunk_boundary_and_leaves_nothing(tmp_path):
    from colabkit.errors import UploadCancelled
    remote = LocalRemote("shared", tmp_path / "tier")
    src = _ckpt(tmp_path / "v01_step_00000100.pt", os.urandom(24 * 1024 * 1024))
    claim = ".colabkit-workers/r/claims/checkpoints/v01_step_00000100.pt/t.claim"
    sent = []

    def progress(n: int) -> None:   # another worker's claim appears once the copy has begun
        sent.append(n)
        if len(sent) == 2:
            assert remote.create_exclusive(claim, b'{"worker": 1}\n')
        if remote.stat(claim) is not None:
            raise UploadCancelled("another worker's copy won")
    with pytest.raises(UploadCancelled):
        remote.put_claimed([(src, "checkpoints/v01_step_00000100.pt")], claim=claim, record=b'{"worker": 0}\n',
                           progress=progress)
    assert 0 < sum(sent) < src.stat().st_size
    assert remote.list() == []
    left = [p.relative_to(tmp_path / "tier").as_posix() for p in (tmp_path / "tier").rglob("*") if p.is_file()]
    assert [p for p in left if not p.startswith(".colabkit-digests/")] == [claim]   # no temporary, no copy
