"""The Google Drive tier against the Drive v3 server in tests/drive_server.py, through the real
google-api-python-client, google-auth and httplib2."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from colabkit.config import load_config
from colabkit.errors import (IntegrityError, RemoteNotFoundError, RemotePermissionError, RemoteQuotaError,
                             RemoteUploadCapError, TransientRemoteError)
from colabkit.fsutil import atomic_write_json, hash_file
from colabkit.remotes import open_remote
from colabkit.remotes.drive import DriveRemote

from .drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from .remote_contract import FaultContract, RemoteContract

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------
def make_remote(srv: DriveServer, tmp_path: Path, *, folder: str | None = None, user: bool = False,
                chunk_size: str = "1MiB", **kw: Any) -> DriveRemote:
    if folder is None:
        folder = srv.create_folder("colabkit", share_with={srv.SA_EMAIL: "writer"}, shared_drive=True)
    key = (srv.write_authorized_user(tmp_path / "keys" / "user.json") if user
           else srv.write_service_account(tmp_path / "keys" / "sa.json"))
    cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key), "endpoint": srv.endpoint,
                                      "chunk_size": chunk_size},
                            "tiers": [{"name": "drive", "remote": "drive"}]}, start=tmp_path)
    remote = open_remote(cfg, "drive")
    assert isinstance(remote, DriveRemote)
    remote.retry_initial, remote.retry_max = 0.001, 0.01
    for k, v in kw.items():
        setattr(remote, k, v)
    return remote


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def big_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


class JsonUploadState:
    """An UploadState persisted in a JSON file (the sync engine keeps its in the ledger)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saves = 0

    def load(self):
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def save(self, state):
        self.saves += 1
        atomic_write_json(self.path, state)

    def clear(self):
        self.path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def no_secret_anywhere(request, caplog, capfd, tmp_path):
    """After every test: nothing captured (logs, stdout/stderr, files written) holds a key or token."""
    caplog.set_level(logging.DEBUG)
    yield
    srv = request.node.funcargs.get("drive_server")
    if srv is None:
        return
    secrets = [srv.REFRESH_TOKEN, srv.CLIENT_SECRET, *srv.issued_tokens, *[a for a in srv.assertions if a]]
    body = "".join(srv.private_key_pem.splitlines()[1:-1])
    secrets += [body[i:i + 40] for i in range(0, len(body) - 40, 200)]
    out, err = capfd.readouterr()
    texts = {"logs": caplog.text, "stdout": out, "stderr": err}
    texts.update({f"exception {i}": t for i, t in enumerate(getattr(request.node, "_messages", []))})
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.parent.name != "keys":
            texts[str(p)] = p.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for s in secrets:
            assert s not in text, f"a secret leaked into {where}"


def seen(request, exc: BaseException) -> BaseException:
    """Record an exception's message for the secret scan."""
    msgs = getattr(request.node, "_messages", [])
    msgs.append(str(exc) + repr(exc.args))
    request.node._messages = msgs
    return exc


# -- the contract ----------------------------------------------------------------------------------
class TestDriveRemoteContract(RemoteContract):
    @pytest.fixture
    def remote(self, drive_server, tmp_path):
        r = make_remote(drive_server, tmp_path)
        yield r
        r.close()


class _DriveFaults:
    """The fault table as Drive produces it (tests/drive_server.py): 503/500 backendError, 429 with Retry-After,
    a connection dropped mid-body (uploads) or after the work was done (reads), 401 (after google-auth's own
    refresh-and-retry), 403 insufficientFilePermissions, a full storage quota."""

    kinds = ("503", "500", "429", "drop", "auth", "permission", "quota")

    def __init__(self, srv: DriveServer) -> None:
        self.srv = srv

    def inject(self, kind: str, op: str, times: int) -> None:
        f = self.srv.faults
        method, path = {"put": (None, None), "get": ("GET", "alt=media"), "list": ("GET", "/drive/v3/files?")}[op]
        if kind == "drop":
            if op == "put":
                f.drop(times, method=None, path="/upload/")
            else:
                f.lose_response(times, method=method, path=path)
        elif kind == "quota":
            self.srv.storage_full = True
        else:
            status, reason, ra = {"503": (503, None, None), "500": (500, None, None), "429": (429, None, 0),
                                  "auth": (401, "authError", None),
                                  "permission": (403, "insufficientFilePermissions", None)}[kind]
            f.fail(times, status, reason=reason, retry_after=ra, method=method, path=path)

    def clear(self) -> None:
        self.srv.faults.clear()
        self.srv.storage_full = False


class TestDriveRemoteFaults(FaultContract):
    @pytest.fixture
    def remote(self, drive_server, tmp_path):
        r = make_remote(drive_server, tmp_path, max_attempts=2)
        yield r
        r.close()

    @pytest.fixture
    def faults(self, drive_server) -> _DriveFaults:
        return _DriveFaults(drive_server)


# -- behaviour ---------------------------------------------------------------------------------------
def test_growing_log_is_updated_in_place(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    log = write(tmp_path / "train.log", b"step 1\n")
    first = remote.put(log, "v68/logs/train.log")
    write(log, b"step 1\nstep 2\n")
    second = remote.put(log, "v68/logs/train.log")
    assert second.id == first.id, "the log must keep its Drive file id"
    assert drive_server.content(first.id) == b"step 1\nstep 2\n"
    assert len([f for f in drive_server.files.values() if f.name == "train.log"]) == 1
    remote.close()


@pytest.mark.parametrize("data", [b"ends with CR\r", b"\r\n\r\nblank lines first", b"\n\nLF too\n", b"\r"],
                         ids=["trailing-cr", "crlf-blank-line", "lf-blank-line", "only-cr"])
def test_multipart_upload_keeps_bytes_that_look_like_line_ends(drive_server, tmp_path, data):
    """googleapiclient writes multipart bodies with LF line ends; a file whose bytes end in CR, or hold a blank
    line, arrives byte for byte (1 upload in 256 of random data ends in CR: the test server once cut it)."""
    remote = make_remote(drive_server, tmp_path)
    rec = remote.put(write(tmp_path / "f.bin", data), "ck/f.bin")
    assert drive_server.content(rec.id) == data
    assert rec.size == len(data)
    remote.close()


def test_folders_are_created_once_and_cached(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    for i in range(3):
        remote.put(write(tmp_path / f"f{i}", b"x" * i), f"run/logs/f{i}.txt")
    names = [f.name for f in drive_server.files.values() if f.is_folder]
    assert sorted(names) == ["colabkit", "logs", "run"]
    remote.close()


def test_listing_pages_through_next_page_token(drive_server, tmp_path):
    drive_server.max_page_size = 2
    remote = make_remote(drive_server, tmp_path)
    for i in range(5):
        remote.put(write(tmp_path / f"f{i}", f"{i}".encode()), f"p/f{i}.txt")
    assert [f.path for f in remote.list("p")] == [f"p/f{i}.txt" for i in range(5)]
    assert any("pageToken=" in p for _, p in drive_server.requests)
    remote.close()


def test_upload_with_30_percent_faults_arrives_once_and_verified(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path, chunk_size="4MiB", max_attempts=12)
    src = big_file(tmp_path / "data" / "ckpt.bin", 100 * 1000 * 1000)
    drive_server.faults.ratio(0.3, seed=7)
    rec = remote.put(src, "v68/ckpt.bin")
    back = remote.get("v68/ckpt.bin", tmp_path / "back" / "ckpt.bin", expected=rec)  # sha256 checked
    drive_server.faults.clear()
    local = hash_file(src)
    copies = [f for f in drive_server.files.values() if f.name == "ckpt.bin"]
    assert len(copies) == 1, "a faulted upload must arrive exactly once"
    assert copies[0].md5 == local.md5 and copies[0].size == local.size
    assert rec.md5 == local.md5 and rec.sha256 == local.sha256
    assert back.sha256 == local.sha256 and hash_file(tmp_path / "back" / "ckpt.bin") == local
    kinds = {k for k, _, _ in drive_server.faults.injected}
    assert len(drive_server.faults.injected) >= 10 and {"drop", "503", "429"} <= kinds
    remote.close()


def test_connection_dropped_mid_chunk_resumes_from_server_offset(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path, chunk_size="2MiB")
    src = big_file(tmp_path / "d.bin", 9 * MiB)
    drive_server.faults.drop(2, method="PUT")   # httplib2 resends once by itself; the second drop reaches us
    remote.put(src, "d.bin")
    assert any(cr.startswith("bytes */") for cr in drive_server.content_ranges), "no status query was made"
    # the chunk cut off half-way kept its whole 256 KiB units: the next PUT starts at one of them, not at 0
    after_query = drive_server.content_ranges[[cr.startswith("bytes */") for cr in
                                               drive_server.content_ranges].index(True) + 1]
    start = int(after_query.split()[1].split("-")[0])
    assert start % (256 * 1024) == 0 and start > 0
    f = drive_server.find("d.bin", root=remote.folder_id)
    assert f.md5 == hash_file(src).md5
    remote.close()


def test_retry_after_is_honoured(drive_server, tmp_path):
    waits: list[float] = []
    remote = make_remote(drive_server, tmp_path, _sleep=waits.append)
    src = big_file(tmp_path / "r.bin", 3 * MiB)
    drive_server.faults.fail(1, 429, retry_after=7, method="PUT")
    remote.put(src, "r.bin")
    assert max(waits) >= 7
    waits.clear()
    drive_server.faults.fail(1, 503, retry_after=5, method="GET", path="alt=media")   # downloads too
    remote.get("r.bin", tmp_path / "back.bin")
    assert max(waits) >= 5 and hash_file(tmp_path / "back.bin") == hash_file(src)
    remote.close()


def test_retried_create_does_not_duplicate(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    remote.put(write(tmp_path / "x", b"warm-up"), "logs/warm.txt")   # folders exist now
    drive_server.faults.lose_response(1, method="POST", path="uploadType=multipart")
    remote.put(write(tmp_path / "m.txt", b"metrics 1\n"), "logs/metrics.txt")
    copies = [f for f in drive_server.files.values() if f.name == "metrics.txt"]
    assert len(copies) == 1
    assert ("lose", "POST") in {(k, m) for k, m, _ in drive_server.faults.injected}
    remote.close()


def test_lost_final_chunk_answer_does_not_duplicate(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path, chunk_size="1MiB")
    src = big_file(tmp_path / "l.bin", 3 * MiB)
    drive_server.faults.lose_response(1, method="PUT")  # the last chunk completes, its answer is lost
    remote.put(src, "l.bin")
    assert len([f for f in drive_server.files.values() if f.name == "l.bin"]) == 1
    remote.close()


def test_truncated_download_resumes_by_range(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    src = big_file(tmp_path / "t.bin", 5 * MiB)
    remote.put(src, "t.bin")
    drive_server.faults.truncate(2)
    got = remote.get("t.bin", tmp_path / "out" / "t.bin")
    assert (tmp_path / "out" / "t.bin").read_bytes() == src.read_bytes()
    assert got.sha256 == hash_file(src).sha256, "verified by the sha256 recorded beside Drive's md5"
    assert len([1 for k, _, _ in drive_server.faults.injected if k == "truncate"]) == 2
    ranges = [p for m, p in drive_server.requests if m == "GET" and "alt=media" in p]
    assert len(ranges) == 3, "one request, then two continuing where the truncated answers stopped"
    remote.close()


def test_records_carry_the_sha256_beside_drives_md5(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    src = big_file(tmp_path / "s.bin", 3 * MiB)
    d = hash_file(src)
    before = len(drive_server.requests)
    rec = remote.put(src, "known/s.bin", digest=d)
    assert rec.sha256 == d.sha256 and rec.md5 == d.md5
    assert not [m for m, _ in drive_server.requests[before:] if m == "PATCH"], "a known digest goes up with the file"
    assert drive_server.find("known/s.bin", root=remote.folder_id).app_properties == {
        "colabkitSha256": d.sha256, "colabkitMd5": d.md5}
    rec2 = remote.put(src, "hashed/s.bin")   # hashed in the upload's read pass: recorded just after
    assert rec2.sha256 == d.sha256
    assert [(f.path, f.sha256, f.md5) for f in remote.list()] == [("hashed/s.bin", d.sha256, d.md5),
                                                                  ("known/s.bin", d.sha256, d.md5)]
    remote.close()


def test_sha256_that_cannot_be_recorded_leaves_a_verified_upload(drive_server, tmp_path, caplog):
    remote = make_remote(drive_server, tmp_path)
    src = big_file(tmp_path / "p.bin", 2 * MiB)
    drive_server.faults.fail(1, 403, reason="insufficientFilePermissions", method="PATCH")
    with caplog.at_level(logging.WARNING, logger="colabkit.remotes.drive"):
        rec = remote.put(src, "p.bin")   # hashed in the read pass: the sha256 goes up after the upload
    assert rec.md5 == hash_file(src).md5
    assert "stays uploaded and verified by md5" in caplog.text
    assert remote.stat("p.bin").sha256 is None
    remote.get("p.bin", tmp_path / "back.bin")
    assert hash_file(tmp_path / "back.bin") == hash_file(src)
    remote.close()


def test_content_replaced_by_another_client_is_verified_by_md5(drive_server, tmp_path):
    """Drive keeps appProperties when another client uploads new content: the stale sha256 is not believed."""
    import hashlib
    remote = make_remote(drive_server, tmp_path)
    rec = remote.put(write(tmp_path / "n.txt", b"colabkit's notes\n"), "n.txt")
    f = drive_server.files[rec.id]
    new = b"edited in the Drive web UI\n"
    f.blob.write_bytes(new)
    f.size, f.md5 = len(new), hashlib.md5(new).hexdigest()
    assert f.app_properties["colabkitSha256"] == rec.sha256, "the old sha256 is still there"
    listed = remote.stat("n.txt")
    assert listed.sha256 is None and listed.md5 == f.md5
    got = remote.get("n.txt", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == new and got.md5 == f.md5
    remote.close()


def test_corrupt_remote_copy_is_rejected_on_download(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path)
    rec = remote.put(write(tmp_path / "c.bin", b"good bytes"), "c.bin")
    drive_server.files[rec.id].blob.write_bytes(b"evil bytes")   # same size, other content
    with pytest.raises(IntegrityError) as ei:
        remote.get("c.bin", tmp_path / "out.bin")
    seen(request, ei.value)
    assert "c.bin does not match its recorded hash" in str(ei.value)
    assert not (tmp_path / "out.bin").exists()
    remote.close()


def test_expired_access_token_is_refreshed(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    rec_a = remote.put(write(tmp_path / "a", b"1"), "a.txt")
    drive_server.expire_tokens()
    remote.put(write(tmp_path / "b", b"2"), "b.txt")
    assert [f.path for f in remote.list()] == ["a.txt", "b.txt"]
    drive_server.expire_tokens()   # a download (its own HTTP session, the same credentials) refreshes too
    before = len(drive_server.requests)
    remote.get("a.txt", tmp_path / "a.back", expected=rec_a)   # no listing first: only the download asks
    assert (tmp_path / "a.back").read_bytes() == b"1"
    assert [m for m, _ in drive_server.requests[before:]] == ["GET", "POST", "GET"], "401, refresh, retry"
    remote.close()


def test_user_credentials_work_in_a_personal_my_drive_folder(drive_server, tmp_path):
    folder = drive_server.create_folder("mine", owner=DriveServer.USER_EMAIL)
    remote = make_remote(drive_server, tmp_path, folder=folder, user=True)
    remote.check_access()
    remote.put(write(tmp_path / "j.md", b"# journal\n"), "journal.md")
    assert drive_server.find("journal.md", root=folder).owner == DriveServer.USER_EMAIL
    assert "as " not in remote.describe()
    remote.close()


# -- preflight errors ------------------------------------------------------------------------------------
def test_service_account_in_my_drive_folder_fails_preflight_with_the_fix(drive_server, tmp_path, request):
    folder = drive_server.create_folder("shared-from-my-drive", share_with={DriveServer.SA_EMAIL: "writer"})
    remote = make_remote(drive_server, tmp_path, folder=folder)
    with pytest.raises(RemoteQuotaError) as ei:
        remote.check_access()
    seen(request, ei.value)
    assert str(ei.value) == (
        "drive: upload .colabkit-access-check failed: storageQuotaExceeded: service accounts have no Drive storage "
        f"of their own, so {DriveServer.SA_EMAIL} cannot upload into a folder in a personal My Drive. Use a folder in "
        "a Shared Drive (add the service account as a Content manager) or user OAuth credentials (an authorized-user "
        "JSON) instead")
    remote.close()


def test_folder_not_shared_fails_preflight_with_the_fix(drive_server, tmp_path, request):
    folder = drive_server.create_folder("private")
    remote = make_remote(drive_server, tmp_path, folder=folder)
    with pytest.raises(RemoteNotFoundError) as ei:
        remote.check_access()
    seen(request, ei.value)
    assert str(ei.value) == (
        f"drive: Drive folder {folder!r} was not found: the folder id is wrong or the folder is not shared with "
        f"{DriveServer.SA_EMAIL}. Check drive.folder_id and share the folder with {DriveServer.SA_EMAIL} as Editor")
    remote.close()


def test_read_only_folder_fails_preflight_with_the_fix(drive_server, tmp_path, request):
    folder = drive_server.create_folder("ro", share_with={DriveServer.SA_EMAIL: "reader"}, shared_drive=True)
    remote = make_remote(drive_server, tmp_path, folder=folder)
    with pytest.raises(RemotePermissionError) as ei:
        remote.check_access()
    seen(request, ei.value)
    assert str(ei.value) == (
        f"drive: cannot write into Drive folder {folder!r} ('ro'): {DriveServer.SA_EMAIL} has read-only access. "
        f"Share the folder with {DriveServer.SA_EMAIL} as Editor")
    remote.close()


def test_daily_upload_cap_answer_pauses_not_stops(drive_server, tmp_path, request):
    """Drive's answer at the daily cap is asked once (no retries) and is an upload-cap error: sync pauses the
    tier (see tests/test_sync_daily_cap.py) instead of stopping it."""
    remote = make_remote(drive_server, tmp_path, max_attempts=3)
    src = big_file(tmp_path / "cap.bin", 2 * MiB)
    drive_server.upload_cap = 1 * MiB
    with pytest.raises(RemoteUploadCapError) as ei:
        remote.put(src, "cap.bin")
    seen(request, ei.value)
    assert str(ei.value) == (
        "drive: upload cap.bin failed: Drive's daily upload cap is reached (403 userRateLimitExceeded: User rate "
        "limit exceeded.); about 750 GB per account per day can be uploaded. The tier pauses and tries again later; "
        "nothing local was deleted")
    assert isinstance(ei.value, RemoteQuotaError)
    assert src.exists() and drive_server.find("cap.bin", root=remote.folder_id) is None
    remote.close()


def test_full_storage_quota_stops_the_tier(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path)
    drive_server.storage_full = True
    with pytest.raises(RemoteQuotaError) as ei:
        remote.put(write(tmp_path / "q", b"data"), "q.txt")
    seen(request, ei.value)
    assert str(ei.value) == ("drive: upload q.txt failed: storageQuotaExceeded: the Drive storage quota is full; "
                             "free space in Drive or use another account. Nothing local was deleted")
    remote.close()


def test_persistent_5xx_gives_a_transient_error(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path, max_attempts=3)
    drive_server.faults.fail(100, 503)
    with pytest.raises(TransientRemoteError) as ei:
        remote.list()
    seen(request, ei.value)
    assert str(ei.value) == "drive: list failed: backendError: Service Unavailable; it will be retried"
    assert ei.value.transient
    remote.close()


def test_endpoint_from_environment(drive_server, tmp_path, monkeypatch):
    monkeypatch.setenv("COLABKIT_DRIVE_ENDPOINT", drive_server.endpoint)
    folder = drive_server.create_folder("env", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key)},
                            "tiers": [{"name": "drive", "remote": "drive"}]}, start=tmp_path)
    remote = open_remote(cfg, "drive")
    remote.check_access()
    assert remote.describe().endswith(f"at {drive_server.endpoint}")
    assert all(not p.startswith("http") for _, p in drive_server.requests)
    batch = remote._service().new_batch_http_request()
    assert batch._batch_uri == f"{drive_server.endpoint}batch/drive/v3"
    remote.close()


def test_trashed_files_are_not_listed(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    a = remote.put(write(tmp_path / "a", b"a"), "t/a.txt")
    remote.put(write(tmp_path / "b", b"b"), "t/b.txt")
    drive_server.files[a.id].trashed = True
    assert [f.path for f in remote.list()] == ["t/b.txt"]
    assert remote.stat("t/a.txt") is None
    remote.close()


def test_close_interrupts_an_upload_in_flight(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path, chunk_size="1MiB")
    src = big_file(tmp_path / "c.bin", 8 * MiB)
    drive_server.pause_at = 2 * MiB
    done: dict = {}

    def upload():
        try:
            remote.put(src, "c.bin")
        except Exception as e:  # noqa: BLE001 - the outcome is asserted below
            done["error"] = e
    import threading
    t = threading.Thread(target=upload, name="test-upload")
    t.start()
    assert drive_server.paused.wait(30)
    remote.close()
    drive_server.gate.set()
    t.join(30)
    assert not t.is_alive()
    err = seen(request, done["error"])
    assert isinstance(err, TransientRemoteError)
    assert str(err) == "drive: upload of c.bin interrupted because the remote was closed"


# -- resumable state across a kill -9 -------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from colabkit.config import load_config
    from colabkit.remotes import open_remote
    from colabkit.fsutil import atomic_write_json

    class State:
        def __init__(self, p): self.p = Path(p)
        def load(self): return json.loads(self.p.read_text()) if self.p.exists() else None
        def save(self, s): atomic_write_json(self.p, s)
        def clear(self): self.p.unlink(missing_ok=True)

    cfg = load_config(data=json.loads({cfg!r}), start={tmp!r})
    remote = open_remote(cfg, "drive")
    rec = remote.put(Path({src!r}), "v68/checkpoints/big.pt", upload_state=State({state!r}))
    print("uploaded", rec.md5, flush=True)
""")


def test_kill_9_during_large_upload_then_restart_resumes_without_duplicate(drive_server, tmp_path, request):
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    size = 72 * MiB
    src = big_file(tmp_path / "big.pt", size)
    state = tmp_path / "upload-state.json"
    cfg = json.dumps({"drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint,
                                "chunk_size": "8MiB"}, "tiers": [{"name": "drive", "remote": "drive"}]})
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), cfg=cfg, tmp=str(tmp_path), src=str(src), state=str(state)))
    drive_server.pause_at = 40 * MiB
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert drive_server.paused.wait(60), "the upload never got going"
        saved = json.loads(state.read_text())
        assert saved["offset"] >= 32 * MiB and "upload_id=" in saved["uri"]
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        seen(request, Exception(child.stdout.read().decode() + child.stderr.read().decode()))
        child.stdout.close()
        child.stderr.close()
        drive_server.gate.set()
    ranges_before = len(drive_server.content_ranges)
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    seen(request, Exception(again.stdout + again.stderr))
    assert again.returncode == 0, again.stderr[-2000:]
    md5 = hash_file(src).md5
    assert again.stdout.strip() == f"uploaded {md5}"
    resumed = [cr for cr in drive_server.content_ranges[ranges_before:] if not cr.startswith("bytes */")]
    assert int(resumed[0].split()[1].split("-")[0]) >= 32 * MiB, "the restart began again from byte 0"
    copies = [f for f in drive_server.files.values() if f.name == "big.pt"]
    assert len(copies) == 1 and copies[0].md5 == md5
    assert not state.exists(), "the finished upload must clear its saved state"


# -- the OAuth token endpoint under faults ----------------------------------------------------------------
@pytest.mark.parametrize("status", [503, 500, 429])
def test_token_endpoint_outage_is_transient_and_recovers(drive_server, tmp_path, request, status):
    """google-auth tries the token endpoint 3 times, then raises RefreshError(retryable=True): that is Google
    being briefly down, not a bad key. The call is retried and succeeds once the endpoint answers again."""
    remote = make_remote(drive_server, tmp_path)
    remote.put(write(tmp_path / "a", b"1"), "a.txt")
    drive_server.expire_tokens()                         # the hourly refresh of a long run
    drive_server.faults.token(3, status, retry_after=1 if status == 429 else None)   # all of google-auth's tries
    rec = remote.put(write(tmp_path / "b", b"2"), "b.txt")
    assert rec.path == "b.txt"
    assert drive_server.token_faults == 3
    assert [f.path for f in remote.list()] == ["a.txt", "b.txt"]
    remote.close()


def test_token_endpoint_dropped_connection_is_transient(drive_server, tmp_path):
    remote = make_remote(drive_server, tmp_path)
    drive_server.faults.token(2, drop=True)
    remote.put(write(tmp_path / "a", b"1"), "a.txt")
    assert [k for k, m, p in drive_server.faults.injected if p == "/token"] == ["drop", "drop"]
    assert [f.path for f in remote.list()] == ["a.txt"]
    remote.close()


def test_token_endpoint_down_for_good_gives_a_transient_error_not_an_auth_error(drive_server, tmp_path, request):
    remote = make_remote(drive_server, tmp_path, max_attempts=2)
    drive_server.faults.token(100, 503)
    with pytest.raises(TransientRemoteError) as ei:
        remote.list()
    seen(request, ei.value)
    assert ei.value.kind == "transient"
    assert str(ei.value).startswith("drive: list failed: tokenEndpointUnavailable: the token endpoint did not "
                                    "answer: temporarily_unavailable: injected token endpoint fault (HTTP 503)")
    assert str(ei.value).endswith("; it will be retried")
    remote.close()


def test_rejected_key_is_an_auth_error(drive_server, tmp_path, request):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from colabkit.errors import RemoteAuthError
    remote = make_remote(drive_server, tmp_path)
    key = tmp_path / "keys" / "sa.json"
    info = json.loads(key.read_text())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
    key.write_text(json.dumps(info))
    cfg = load_config(data={"drive": {"folder_id": remote.folder_id, "credentials": str(key),
                                      "endpoint": drive_server.endpoint},
                            "tiers": [{"name": "drive", "remote": "drive"}]}, start=tmp_path)
    bad = open_remote(cfg, "drive")
    with pytest.raises(RemoteAuthError) as ei:
        bad.list()
    seen(request, ei.value)
    assert ei.value.kind == "auth"
    assert str(ei.value) == ("drive: list failed: the credentials were rejected (invalid_grant: Invalid grant.); "
                             f"check the key file ({bad.source}) and that the key is not revoked")
    bad.close()
    remote.close()
