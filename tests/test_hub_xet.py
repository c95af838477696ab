"""The Hub tier on the Xet path: the real huggingface_hub + hf_xet against tests/hub_server.py with Xet on
(HubServer(xet=True): the CAS of tests/xet_server.py). The classic-LFS twin of each test is in
tests/test_remote_hub.py and tests/test_sync_remotes.py."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from colabkit.fsutil import hash_file
from colabkit.ledger import Ledger
from colabkit.remotes.hub import HubRemote

from .hub_server import QUOTA_MESSAGE, HubServer, _no_tqdm_monitor, isolate_hf_home
from .remote_contract import FaultContract, RemoteContract
from .test_sync import wait_for
from .test_sync_remotes import _added_per_path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "alice/ckpt"
MiB = 1024 * 1024
#: hf_xet's own retries, short for tests (read when the process's Xet session starts)
XET_ENV = {"HF_HUB_DISABLE_XET": "0", "HF_XET_TELEMETRY_ENABLED": "0", "HF_XET_CLIENT_RETRY_BASE_DELAY": "10ms",
           "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "3"}
for _k, _v in XET_ENV.items():
    if _k != "HF_HUB_DISABLE_XET":
        os.environ.setdefault(_k, _v)


@pytest.fixture
def xet_hub(tmp_path_factory, monkeypatch) -> HubServer:
    """A started Xet-enabled HubServer; huggingface_hub may use hf_xet for this test."""
    from huggingface_hub import constants
    isolate_hf_home(monkeypatch, tmp_path_factory.mktemp("hf_home"))
    _no_tqdm_monitor()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    with contextlib.suppress(ImportError):   # CAS tokens huggingface_hub cached for an earlier server on this port
        from huggingface_hub.utils import _xet
        _xet.XET_CONNECTION_INFO_CACHE.clear()
    srv = HubServer(tmp_path_factory.mktemp("hub_blobs"), xet=True).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def token_env(monkeypatch, xet_hub: HubServer) -> str:
    monkeypatch.setenv("HF_TOKEN", xet_hub.WRITE_TOKEN)
    return xet_hub.WRITE_TOKEN


def make_remote(srv: HubServer, **kw) -> HubRemote:
    kw.setdefault("endpoint", srv.endpoint)
    return HubRemote(kw.pop("name", "hub"), kw.pop("repo_id", REPO), **kw)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def random_checkpoint(root: Path, size: int, *, step: int = 1, data: bytes | None = None) -> Path:
    """A checkpoint of random bytes (no chunk repeats: what Xet cannot dedup within the file) and its manifest."""
    p = root / "checkpoints" / f"v01_step_{step:08d}.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(p, "wb") as f:
        if data is not None:
            f.write(data)
            h.update(data)
        else:
            for _ in range(size // MiB):
                b = os.urandom(MiB)
                f.write(b)
                h.update(b)
    (p.parent / (p.name + ".json")).write_text(json.dumps(
        {"format": 1, "step": step, "size": p.stat().st_size, "sha256": h.hexdigest(), "file": p.name}))
    return p


# -- the contract, on the Xet path ------------------------------------------------------------------------
class TestXetHubRemoteContract(RemoteContract):
    @pytest.fixture
    def remote(self, xet_hub: HubServer, token_env) -> HubRemote:
        return make_remote(xet_hub, path_prefix="runs")


def test_put_goes_through_the_cas_and_get_verifies_the_bytes(xet_hub: HubServer, token_env, tmp_path: Path):
    """An LFS-sized file goes to the CAS as xorbs + a shard (no LFS batch, no LFS PUT), the commit names its
    sha256, the tree lists it with its xetHash, and a download (the resolve redirect, rebuilt from the xorbs)
    is verified against the sha256."""
    data = os.urandom(3 * MiB) + bytes(2 * MiB)        # part of it compresses (LZ4 chunks)
    r = make_remote(xet_hub)
    rec = r.put(_write(tmp_path / "m.pt", data), "ck/m.pt")
    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    assert xet_hub.count("POST", r"/objects/batch") == 0 and xet_hub.lfs_uploads == []
    assert xet_hub.count("POST", r"^/v1/xorbs/", port="cas") >= 1
    assert len(xet_hub.cas.shard_uploads) == 1
    e = xet_hub.files(REPO)["ck/m.pt"]
    assert e.lfs == rec.sha256 and e.xet and xet_hub.cas.files[e.xet].size == len(data)
    assert xet_hub.cas.xorb_bytes_received < len(data), "the zero half was not compressed"
    got = r.get("ck/m.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == data and got.sha256 == rec.sha256


def test_hf_xet_downloads_a_xet_file_from_the_cas(xet_hub: HubServer, token_env, tmp_path: Path):
    """huggingface_hub's own download of a Xet-backed file (resolve HEAD → X-Xet-Hash, xet-read-token, CAS
    reconstruction, xorb range GETs) returns the bytes that were uploaded."""
    from huggingface_hub import hf_hub_download
    data = os.urandom(2 * MiB + 12345)
    make_remote(xet_hub).put(_write(tmp_path / "w.pt", data), "ck/w.pt")
    p = hf_hub_download(REPO, "ck/w.pt", endpoint=xet_hub.endpoint, token=xet_hub.WRITE_TOKEN,
                        cache_dir=str(tmp_path / "cache"))
    assert Path(p).read_bytes() == data
    assert xet_hub.count("GET", r"/xet-read-token/") >= 1
    assert xet_hub.count("GET", r"^/v1/reconstructions/", port="cas") == 1
    assert xet_hub.cas.served_bytes >= len(data)


def test_corrupt_cas_copy_is_refused_and_nothing_is_left(xet_hub: HubServer, token_env, tmp_path: Path):
    """sha256 verification still happens on the Xet path: bytes the CAS rebuilt wrong are refused."""
    from colabkit.errors import IntegrityError
    data = os.urandom(1 * MiB)
    make_remote(xet_hub).put(_write(tmp_path / "c.pt", data), "ck/c.pt")
    xet_hub.corrupt(REPO, "ck/c.pt")
    with pytest.raises(IntegrityError) as ei:
        make_remote(xet_hub).get("ck/c.pt", tmp_path / "out" / "c.pt")
    assert "does not match its recorded hash" in str(ei.value)
    assert not (tmp_path / "out" / "c.pt").exists()


def test_cas_refuses_a_shard_naming_a_xorb_it_does_not_hold(xet_hub: HubServer, token_env, tmp_path: Path):
    """The server checks what it is given: a shard whose file refers to a missing xorb is a 400."""
    import urllib.error
    import urllib.request
    from .xet_server import SHARD_TAG, xet_raw
    tok, _exp = xet_hub.cas.issue_token("write")
    xh = "ab" * 32
    body = (SHARD_TAG + (2).to_bytes(8, "little") + bytes(8)
            + xet_raw("cd" * 32) + (0).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(8)
            + xet_raw(xh) + bytes(4) + (10).to_bytes(4, "little") + (0).to_bytes(4, "little")
            + (1).to_bytes(4, "little") + b"\xff" * 32 + bytes(16) + b"\xff" * 32 + bytes(16))
    req = urllib.request.Request(f"{xet_hub.cas_url}/v1/shards", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {tok}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 400
    assert json.loads(ei.value.read())["error"] == f"shard refers to xorb {xh}, which was not uploaded"
    assert xet_hub.cas.files == {}


def test_cas_tokens_are_checked(xet_hub: HubServer, token_env):
    import urllib.error
    import urllib.request
    read, _ = xet_hub.cas.issue_token("read")
    for auth, code in ((None, 401), ("Bearer nope", 401), (f"Bearer {read}", 403)):
        req = urllib.request.Request(f"{xet_hub.cas_url}/v1/xorbs/default/{'00' * 32}", data=b"x", method="POST",
                                     headers={"Authorization": auth} if auth else {})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == code


# -- faults on the CAS endpoints -----------------------------------------------------------------------------
class _XetFaults:
    """The fault table on the Xet path: the upload's CAS calls (xorbs POST, shards POST) and the token the
    upload needs (put), the download's resolve lookup and the bridge GET (get), the tree listing (list). A 401 or
    403 comes from the token endpoint (hf_xet reports only the status); the storage-quota refusal from the commit
    (the Xet path sends no LFS batch, and hf_xet would drop the message)."""

    kinds = ("503", "500", "429", "drop", "auth", "permission", "quota")
    ROUTES = {"put": [("POST", r"^/v1/(xorbs|shards)", "cas"), ("GET", r"/xet-write-token/", "hub")],
              "get": [("HEAD", r"/resolve/", "hub"), ("GET", r"^/xet/", "cdn")],
              "list": [("GET", r"/tree/", "hub")]}

    def __init__(self, srv: HubServer) -> None:
        self.srv = srv

    def inject(self, kind: str, op: str, times: int) -> None:
        routes = self.ROUTES[op]
        if kind == "quota":
            self.srv.inject(method="POST", path=r"/commit/", status=403, message=QUOTA_MESSAGE, times=times)
            return
        if kind in ("auth", "permission"):   # what the Hub answers when the token cannot have a CAS token
            routes = [("GET", r"/xet-write-token/", "hub")] if op == "put" else [("HEAD", r"/resolve/", "hub")]
        for method, path, port in routes:
            if kind == "drop":
                self.srv.inject(method=method, path=path, port=port, drop=True, times=times)
            else:
                status, msg = {"503": (503, None), "500": (500, None), "429": (429, None),
                               "auth": (401, "Invalid credentials in Authorization header"),
                               "permission": (403, "You don't have the rights to write to this repo")}[kind]
                self.srv.inject(method=method, path=path, port=port, status=status, message=msg, times=times,
                                headers={"Retry-After": "0"} if status in (429, 500, 503) else None)

    def clear(self) -> None:
        self.srv.faults.clear()


class TestXetHubRemoteFaults(FaultContract):
    @pytest.fixture
    def remote(self, xet_hub: HubServer, token_env) -> HubRemote:
        xet_hub.create_repo(REPO)
        return make_remote(xet_hub, sleep=lambda s: None, max_attempts=2)

    @pytest.fixture
    def faults(self, xet_hub: HubServer) -> _XetFaults:
        return _XetFaults(xet_hub)


def test_cas_faults_under_a_ratio_are_retried_to_success(xet_hub: HubServer, token_env, tmp_path: Path):
    """30 % of CAS requests faulted (5xx, 429, dropped connections): the upload and the download get through,
    nothing is committed twice."""
    r = make_remote(xet_hub, max_attempts=8, sleep=lambda s: None)
    xet_hub.create_repo(REPO)
    data = os.urandom(2 * MiB)
    xet_hub.inject(method="POST", path=r"^/v1/xorbs/", port="cas", status=503, times=1)
    xet_hub.inject(method="POST", path=r"^/v1/shards", port="cas", drop=True, times=1)
    xet_hub.inject(method="POST", path=r"^/v1/xorb-grants/", port="cas", status=429, headers={"Retry-After": "0"})
    xet_hub.ratio(0.3, seed=5, path=r"^/v1/|^/xorb/")
    try:
        rec = r.put(_write(tmp_path / "f.pt", data), "ck/f.pt")
    finally:
        xet_hub.ratio(0)
    assert [k for k in xet_hub.injected if k[1] == "cas"], "no CAS fault was injected"
    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    assert r.get("ck/f.pt", tmp_path / "b.pt").sha256 == rec.sha256
    msgs = xet_hub.commit_messages(REPO)
    assert sum("ck/f.pt" in m or "f.pt" in m for m in msgs) <= 1


# -- kill -9 mid-upload, and a second checkpoint that differs a little ------------------------------------------
def _sync_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")]


def _project(root: Path, srv: HubServer) -> None:
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": srv.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1}}))


@pytest.mark.parametrize("machine", ["same", "new"])
def test_xet_upload_killed_mid_way_resends_only_the_xorb_in_flight(xet_hub: HubServer, tmp_path, monkeypatch,
                                                                   machine: str):
    """kill -9 of `sync once` while the second xorb of a 144 MiB checkpoint is on the wire, then a clean pass
    (on the same machine, or on a new one with an empty xet cache, the checkpoint folder carried over): the
    restart asks the CAS for an upload grant per xorb, the one already stored is not sent again, and only the
    xorbs that were cut or not yet sent go (classic LFS sends the whole file again: see test_sync_remotes.py).
    Nothing is lost or duplicated."""
    monkeypatch.setenv("HF_TOKEN", xet_hub.WRITE_TOKEN)
    root = tmp_path / "proj"
    _project(root, xet_hub)
    size = 144 * MiB
    src = random_checkpoint(root, size)
    env = {**os.environ, **XET_ENV, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")}
    xet_hub.cas.pause_after_stored, xet_hub.cas.pause_xorb_at = 1, 8 * MiB
    child = subprocess.Popen(_sync_cmd(root), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert xet_hub.cas.paused.wait(120), "the second xorb never got under way"
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
        xet_hub.cas.gate.set()
    wait_for(lambda: xet_hub.cas.xorbs_in_flight == 0 and any(not c for (_x, _n, c) in xet_hub.cas.xorb_uploads),
             timeout=30, what="the server to end the cut xorb uploads")
    stored_before = dict(xet_hub.cas.xorbs)
    first = xet_hub.cas.xorb_bytes_received
    grants_before = len(xet_hub.cas.grants)
    assert len(stored_before) >= 1 and first < size
    if machine == "new":
        env["HF_HOME"] = str(tmp_path / "hf-new-machine")
    again = subprocess.run(_sync_cmd(root), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resent = xet_hub.cas.xorb_bytes_received - first
    stored_size = sum(x.size for x in stored_before.values())
    # what the restart sent: everything but the xorbs already stored (their grants said so)
    assert resent <= size - stored_size + MiB, (resent, size, stored_size)
    restart_grants = xet_hub.cas.grants[grants_before:]
    assert {x for (x, have) in restart_grants if have} == set(stored_before), restart_grants
    total = xet_hub.cas.xorb_bytes_received
    print(f"xet restart: sent {total} for {size} bytes needed = {total / size:.3f}")
    sha = hash_file(src).sha256
    tree = xet_hub.files("alice/weights")
    assert tree["checkpoints/v01_step_00000001.pt"].lfs == sha
    assert xet_hub.cas.reconstruct(tree["checkpoints/v01_step_00000001.pt"].xet) == src.read_bytes()
    added = _added_per_path(xet_hub.repos[("model", "alice/weights")])
    assert added["checkpoints/v01_step_00000001.pt"] == 1 and added["checkpoints/v01_step_00000001.pt.json"] == 1
    led = Ledger.load(root / ".colabkit", "hub")
    assert led.inflight == {} and led.verified_copy("checkpoints/v01_step_00000001.pt", sha)


@pytest.mark.parametrize("machine", ["same", "new"])
def test_a_checkpoint_that_differs_a_little_uploads_only_the_changed_chunks(xet_hub: HubServer, tmp_path,
                                                                            monkeypatch, machine: str):
    """Two checkpoints of 24 MiB that differ in 256 KiB in the middle, synced one after the other: the second
    sends a small fraction of its size, from the same machine (the xet cache under HF_HOME kept) and from a new
    one (an empty HF_HOME: the CAS's global-dedup answer tells the client which xorbs it holds)."""
    monkeypatch.setenv("HF_TOKEN", xet_hub.WRITE_TOKEN)
    root = tmp_path / "proj"
    _project(root, xet_hub)
    base = bytearray(os.urandom(24 * MiB))
    random_checkpoint(root, len(base), step=1, data=bytes(base))
    env = {**os.environ, **XET_ENV, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")}
    one = subprocess.run(_sync_cmd(root), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    first = xet_hub.cas.xorb_bytes_received
    assert first >= len(base)
    base[12 * MiB:12 * MiB + 256 * 1024] = os.urandom(256 * 1024)
    random_checkpoint(root, len(base), step=2, data=bytes(base))
    if machine == "new":
        env["HF_HOME"] = str(tmp_path / "hf-new-machine")
    two = subprocess.run(_sync_cmd(root), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    second = xet_hub.cas.xorb_bytes_received - first
    print(f"xet dedup ({machine} machine): second checkpoint sent {second} of {len(base)} bytes = "
          f"{second / len(base):.4f}")
    assert second < len(base) // 20, second
    if machine == "new":
        assert [c for (c, found) in xet_hub.cas.dedup_queries if found], xet_hub.cas.dedup_queries
    tree = xet_hub.files("alice/weights")
    e = tree["checkpoints/v01_step_00000002.pt"]
    assert xet_hub.cas.reconstruct(e.xet) == bytes(base)


def test_hf_xet_errors_are_classified_by_their_status_with_a_clear_message(xet_hub: HubServer, token_env,
                                                                           tmp_path: Path):
    """hf_xet reports a failed CAS call as a ConnectionError carrying only the HTTP status: a persistent 503 on
    the xorb upload is transient and says so; a 401 on the CAS token is an auth error naming the token."""
    from colabkit.errors import RemoteAuthError, TransientRemoteError
    r = make_remote(xet_hub, sleep=lambda s: None, max_attempts=2)
    xet_hub.create_repo(REPO)
    xet_hub.inject(method="POST", path=r"^/v1/xorbs/", port="cas", status=503, times=10_000)
    with pytest.raises(TransientRemoteError) as ei:
        r.put(_write(tmp_path / "a.pt", os.urandom(200_000)), "ck/a.pt")
    assert str(ei.value) == ("hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the Hub answered HTTP 503 "
                             "(Xet storage); it will be retried")
    xet_hub.faults.clear()
    xet_hub.inject(method="GET", path=r"/xet-write-token/", status=401, times=10_000)
    with pytest.raises(RemoteAuthError) as ei:
        r.put(_write(tmp_path / "b.pt", os.urandom(200_000)), "ck/b.pt")
    assert str(ei.value) == ("hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the Hugging Face token from "
                             "the HF_TOKEN environment variable was rejected (HTTP 401 (Xet token endpoint)); create a "
                             "token with write access "
                             f"at {xet_hub.endpoint}/settings/tokens and set it as HF_TOKEN")
    assert "ck/a.pt" not in xet_hub.files(REPO) and "ck/b.pt" not in xet_hub.files(REPO)


def test_a_checkpoint_that_changed_after_its_digest_is_not_kept(xet_hub: HubServer, token_env, tmp_path: Path):
    """hf_xet writes a sha256 it is given into the shard unchecked (hf_xet 1.8), so colabkit does not hand its
    digest over on the Xet path: the sha256 hf_xet computes while chunking is what the commit names, and a file
    rewritten (same size) after its digest was taken does not verify; the copy is removed."""
    from colabkit.errors import IntegrityError
    from colabkit.fsutil import FileDigest
    src = _write(tmp_path / "m.pt", os.urandom(300_000))
    stale = hash_file(src)
    src.write_bytes(os.urandom(300_000))
    r = make_remote(xet_hub)
    with pytest.raises(IntegrityError) as ei:
        r.put(src, "ck/m.pt", digest=FileDigest(stale.size, stale.sha256, stale.md5))
    assert str(ei.value) == ("hub: ck/m.pt did not verify after upload: it changed while it was uploaded; "
                             "it will be retried")
    assert r.list() == []
    assert stale.sha256 not in xet_hub.cas.by_sha256, "the stale sha256 labels other bytes in the CAS"


@pytest.mark.parametrize("rng", ["bytes=0-", "bytes=100000-2999999", "bytes=-70000", "bytes=1048575-1048576"])
def test_cas_reconstruction_of_a_range_rebuilds_exactly_those_bytes(xet_hub: HubServer, token_env, tmp_path: Path,
                                                                    rng: str):
    """The reconstruction answer for a byte range (what hf_xet asks for a segment of a large file): the terms'
    chunks, fetched by their url_range and unpacked, minus offset_into_first_range, are exactly the range."""
    import urllib.request
    from .xet_server import decompress_chunk
    data = os.urandom(2 * MiB) + bytes(1 * MiB) + os.urandom(100_000)
    make_remote(xet_hub).put(_write(tmp_path / "r.pt", data), "ck/r.pt")
    fh = xet_hub.files(REPO)["ck/r.pt"].xet
    tok, _ = xet_hub.cas.issue_token("read")
    req = urllib.request.Request(f"{xet_hub.cas_url}/v1/reconstructions/{fh}",
                                 headers={"Authorization": f"Bearer {tok}", "Range": rng})
    with urllib.request.urlopen(req, timeout=10) as resp:
        rec = json.loads(resp.read())
    out = bytearray()
    for term in rec["terms"]:
        (fi,) = [f for f in rec["fetch_info"][term["hash"]] if f["range"] == term["range"]]
        r = urllib.request.Request(fi["url"], headers={"Range": f"bytes={fi['url_range']['start']}-"
                                                                f"{fi['url_range']['end']}"})
        with urllib.request.urlopen(r, timeout=10) as resp:
            raw = resp.read()
        part, off = bytearray(), 0
        while off < len(raw):
            clen, ulen = int.from_bytes(raw[off + 1:off + 4], "little"), int.from_bytes(raw[off + 5:off + 8], "little")
            part += decompress_chunk(raw[off + 4], raw[off + 8:off + 8 + clen], ulen)
            off += 8 + clen
        assert len(part) == term["unpacked_length"]
        out += part
    spec = rng.split("=", 1)[1]
    a, b = spec.split("-")
    start, end = (len(data) - int(b), len(data)) if not a else (int(a), int(b) + 1 if b else len(data))
    got = bytes(out[rec["offset_into_first_range"]:][:end - start])
    assert got == data[start:end]


def test_hf_xet_download_cut_midway_is_retried_and_still_right(xet_hub: HubServer, token_env, tmp_path: Path):
    """A xorb range download that breaks after 100 kB (and a 503 on the reconstruction query) is retried by
    hf_xet; the file comes out whole."""
    from huggingface_hub import hf_hub_download
    data = os.urandom(3 * MiB)
    make_remote(xet_hub).put(_write(tmp_path / "w.pt", data), "ck/w.pt")
    xet_hub.inject(method="GET", path=r"^/xorb/", port="cas", drop_after=100_000, times=1)
    xet_hub.inject(method="GET", path=r"^/v1/reconstructions/", port="cas", status=503, times=1)
    p = hf_hub_download(REPO, "ck/w.pt", endpoint=xet_hub.endpoint, token=xet_hub.WRITE_TOKEN,
                        cache_dir=str(tmp_path / "cache"))
    assert Path(p).read_bytes() == data
    assert all(f.hits == 1 for f in xet_hub.faults)


def test_sync_to_the_xet_hub_under_30_percent_faults_uploads_everything_once(xet_hub: HubServer, tmp_path,
                                                                              monkeypatch):
    """`sync once` of 10 checkpoints + manifests with 30 % of every request faulted on all three ports (the Hub
    API, the CDN, the CAS: tokens, grants, xorbs, shards included): everything lands, once, verified and recorded."""
    from colabkit import sync
    from colabkit.config import load_config

    from .test_sync import ckpt
    monkeypatch.setenv("HF_TOKEN", xet_hub.WRITE_TOKEN)
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": xet_hub.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1, "retry_initial": 0.01, "retry_max": 0.05}}))
    files = [ckpt(root, s, size=200_000 + s) for s in range(1, 11)]
    shas = {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in files for p in (f, f.with_name(f.name + ".json"))}
    xet_hub.create_repo("alice/weights")
    cfg = load_config(start=root)
    remote = HubRemote("hub", "alice/weights", endpoint=xet_hub.endpoint, max_attempts=4, retry_initial=0.01,
                       retry_max=0.05, project="proj")
    xet_hub.ratio(0.3, seed=11)
    try:
        res = sync.once(config=cfg, remotes={"hub": remote}, timeout=300)
    finally:
        xet_hub.ratio(0)
    assert res["ok"], res
    assert [k for k in xet_hub.injected if k[1] == "cas"], "no CAS request was faulted"
    repo = xet_hub.repos[("model", "alice/weights")]
    tree = repo.commits[repo.branches["main"]][2]
    added = _added_per_path(repo)
    led = Ledger.load(cfg.state_dir, "hub")
    for f in files:
        for p in (f, f.with_name(f.name + ".json")):
            rp = cfg.remote_path(p)
            assert rp in tree, f"{rp} was lost"
            assert added[rp] == 1, f"{rp} was committed {added[rp]} times"
            assert led.verified_copy(rp, shas[p]), f"{rp} is not recorded"
        assert tree[cfg.remote_path(f)].xet, "a checkpoint did not go through Xet"
    assert led.inflight == {}


def test_repeated_kills_of_a_multi_file_xet_upload_lose_and_duplicate_nothing(xet_hub: HubServer, tmp_path,
                                                                             monkeypatch):
    """Four 36 MiB checkpoints in one tick (xorbs span files), `sync once` killed with SIGKILL three times, each
    time once one more xorb is stored and the next is on the wire, then a clean pass: every file lands once,
    verified and recorded; no restart sends a stored xorb again (no xorb arrives whole twice), where classic LFS
    sends every file that was not whole again after each kill."""
    monkeypatch.setenv("HF_TOKEN", xet_hub.WRITE_TOKEN)
    root = tmp_path / "proj"
    _project(root, xet_hub)
    srcs = [random_checkpoint(root, 36 * MiB, step=s) for s in (1, 2, 3, 4)]
    size = sum(p.stat().st_size for p in srcs)
    shas = {p.name: hash_file(p).sha256 for p in srcs}
    env = {**os.environ, **XET_ENV, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")}
    kills = 0
    for _ in range(3):
        cas = xet_hub.cas
        cas.paused.clear()
        cas.gate.clear()
        cas.pause_after_stored, cas.pause_xorb_at = len(cas.xorbs) + 1, 4 * MiB
        grants_before = len(cas.grants)
        stored = set(cas.xorbs)
        child = subprocess.Popen(_sync_cmd(root), cwd=root, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            while not cas.paused.wait(0.1) and child.poll() is None:
                pass
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                assert child.wait(30) == -signal.SIGKILL
                kills += 1
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            cas.gate.set()
            cas.pause_xorb_at = None
        wait_for(lambda: cas.xorbs_in_flight == 0, timeout=30, what="the cut xorb uploads to end")
        assert not [x for (x, have) in cas.grants[grants_before:] if x in stored and not have], \
            "a restart was not told that a stored xorb was stored"
    assert kills >= 2, kills
    again = subprocess.run(_sync_cmd(root), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    total = xet_hub.cas.xorb_bytes_received
    print(f"xet: {kills} kills, sent {total} for {size} bytes needed = {total / size:.3f}")
    whole = [x for (x, _n, complete) in xet_hub.cas.xorb_uploads if complete]
    assert len(whole) == len(set(whole)) == len(xet_hub.cas.xorbs), "a xorb was sent whole twice"
    tree = xet_hub.files("alice/weights")
    added = _added_per_path(xet_hub.repos[("model", "alice/weights")])
    led = Ledger.load(root / ".colabkit", "hub")
    for p in srcs:
        rp = f"checkpoints/{p.name}"
        assert added[rp] == 1 and added[rp + ".json"] == 1, added
        assert tree[rp].lfs == shas[p.name]
        assert hashlib.sha256(xet_hub.cas.reconstruct(tree[rp].xet)).hexdigest() == shas[p.name]
        assert led.verified_copy(rp, shas[p.name])
    assert led.inflight == {}


def test_a_hub_without_xet_says_how_to_use_classic_lfs(xet_hub: HubServer, token_env, tmp_path: Path):
    """A Hub (or repo) that offers no Xet answers 404 at the Xet token endpoint; huggingface_hub with hf_xet
    still uploads through Xet, so the error says to turn it off, not that the repo does not exist."""
    from colabkit.errors import RemoteError, RemoteNotFoundError
    xet_hub.create_repo(REPO, xet=False)
    r = make_remote(xet_hub, sleep=lambda s: None, max_attempts=2)
    with pytest.raises(RemoteError) as ei:
        r.put(_write(tmp_path / "a.pt", os.urandom(100_000)), "ck/a.pt")
    assert not isinstance(ei.value, RemoteNotFoundError)
    assert str(ei.value) == (f"hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: {xet_hub.endpoint} offers "
                             "no Xet storage for model repo 'alice/ckpt' (HTTP 404 at its Xet token endpoint), and "
                             "huggingface_hub uploads through Xet when hf_xet is installed; set HF_HUB_DISABLE_XET=1 "
                             "in the environment (before Python starts) to use classic LFS")
    assert "ck/a.pt" not in xet_hub.files(REPO)
