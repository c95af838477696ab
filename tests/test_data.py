"""`colabkit data` / `%data` / colabkit.data: fetch from the Hub test server's dataset repos, the Drive test
server, a local HTTP server with Range and a local path; verified, idempotent, resumed, safe, journaled."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from colabkit import data
from colabkit.cli import main
from colabkit.config import load_config
from colabkit.errors import DataError, DiskFullError, IntegrityError

from .drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from .file_server import FileServer
from .hub_server import HubServer, hub_server  # noqa: F401  (fixture)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def project(tmp_path: Path, *, sets=(), extra=None) -> Path:
    root = tmp_path / "proj"
    root.mkdir(exist_ok=True)
    cfg = {"data": {"cache": str(tmp_path / "ssd"), "min_free": 0, "sets": list(sets)}, **(extra or {})}
    (root / "colabkit.yaml").write_text(yaml.safe_dump(cfg))
    return root


def cfg_of(root: Path):
    return load_config(root / "colabkit.yaml")


def journal_entries(root: Path) -> list[str]:
    p = root / "journal.md"
    return [e for e in p.read_text().split("\n## ")[1:] if e.startswith("Data")] if p.exists() else []


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.name.startswith(".colabkit-tmp-") and p.is_file()
                  and not p.name.endswith(".state.json"))


# -- the Hub ---------------------------------------------------------------------------------------------
@pytest.fixture
def hub_dataset(hub_server: HubServer, tmp_path: Path):
    """A public dataset repo alice/pg19 with two LFS shards, a small regular file and an unrelated file."""
    from huggingface_hub import HfApi
    from colabkit.remotes.hub import HubRemote
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.WRITE_TOKEN)
    api.create_repo("alice/pg19", repo_type="dataset", private=False)
    files = {"train/part-0.parquet": os.urandom(3_000_000), "train/part-1.parquet": os.urandom(12 * 2**20),
             "train/README.txt": b"small regular file\n", "other/notes.bin": os.urandom(1000)}
    src = tmp_path / "upload"
    items = []
    for rel, b in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b)
        items.append((src / rel, rel))
    HubRemote("up", "alice/pg19", repo_type="dataset", endpoint=hub_server.endpoint,
              token=hub_server.WRITE_TOKEN).put_many(items, message="data v1")
    return files


def hub_downloads(srv: HubServer) -> int:
    return srv.count("GET", r"/resolve/") + srv.count("GET", r"/lfs/", port="cdn")


def test_hub_fetch_only_the_files_asked_for_verified_then_nothing_again(hub_server, hub_dataset, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)   # the Hub tier's endpoint rule; no token: public
    root = project(tmp_path, sets=[{"name": "pg19", "source": "hub:datasets/alice/pg19:train/*",
                                    "preprocessing": "Tokenized with GPT-2 BPE"}])
    res = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert res.files == 3 and res.verified == "source" and not res.up_to_date
    assert res.downloaded == sum(len(b) for r, b in hub_dataset.items() if r.startswith("train/"))
    for rel in ("train/part-0.parquet", "train/part-1.parquet", "train/README.txt"):
        assert (res.path / rel).read_bytes() == hub_dataset[rel]
    assert not (res.path / "other").exists()
    assert res.path.parent.parent == tmp_path / "ssd" and res.version.startswith("sha-")
    assert hub_server.count("GET", r"/resolve/.*other/") == 0
    # the journal entry, once
    [entry] = journal_entries(root)
    lines = entry.splitlines()
    assert lines[1] == f"- **Dataset**: pg19 {res.version} (commit {res.commit[:12]})"
    assert lines[2] == "- **Source**: hub:datasets/alice/pg19:train/*"
    assert lines[4] == "- **Preprocessing**: Tokenized with GPT-2 BPE"
    assert lines[5] == f"- **Files**: 3 files, 15.6 MB (file list sha256 {res.list_digest[:16]})"
    assert lines[6] == "- **Verified**: every file against the Hub's sha256 (git oid for small files)"
    # a second fetch: the listing, and not one byte
    before = hub_downloads(hub_server)
    again = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert again.up_to_date and again.downloaded == 0 and again.path == res.path
    assert hub_downloads(hub_server) == before
    assert len(journal_entries(root)) == 1


def test_declared_version_already_here_asks_the_source_nothing(hub_server, hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    root = project(tmp_path, sets=[{"name": "pg19", "source": "hub:datasets/alice/pg19@main:train/*.parquet",
                                    "version": "v1.0"}])
    first = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert first.path == tmp_path / "ssd" / "pg19" / "v1.0" and first.files == 2
    n = len(hub_server.requests)
    again = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert again.up_to_date and again.downloaded == 0
    assert len(hub_server.requests) == n       # not even a listing
    # a file changed on the local disk is noticed (size), and the version is fetched again
    (first.path / "train/part-0.parquet").write_bytes(b"garbage")
    third = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert not third.up_to_date and third.downloaded == 3_000_000 + 12 * 2**20
    assert (third.path / "train/part-0.parquet").read_bytes() == hub_dataset["train/part-0.parquet"]


def test_hub_download_cut_midway_resumes_and_verifies(hub_server, hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    root = project(tmp_path)
    hub_server.inject(method="GET", port="cdn", path=r"/lfs/", drop_after=11 * 2**20)
    res = data.fetch("big", source="hub:datasets/alice/pg19:train/part-1.parquet", config=cfg_of(root),
                     progress=False)
    assert (res.path / "train/part-1.parquet").read_bytes() == hub_dataset["train/part-1.parquet"]
    statuses = [s for (_p, m, path, s) in hub_server.requests if m == "GET" and path.startswith("/lfs/")]
    assert statuses in ([200, 206], [200, 200])   # resumed by Range, or (an older huggingface_hub) retried whole


def test_hub_corrupt_file_is_refused_and_nothing_is_under_the_final_name(hub_server, hub_dataset, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    root = project(tmp_path)
    hub_server.corrupt("alice/pg19", "train/part-0.parquet", repo_type="dataset")
    with pytest.raises(IntegrityError) as ei:
        data.fetch("pg19", source="hub:datasets/alice/pg19:train/part-0.parquet", version="v1",
                   config=cfg_of(root), progress=False)
    assert str(ei.value).startswith("hub: train/part-0.parquet does not match its recorded hash")
    assert not (tmp_path / "ssd" / "pg19" / "v1").exists()
    assert data.read_record("pg19", "v1", config=cfg_of(root)) is None
    assert journal_entries(root) == []


def test_private_repo_without_a_token_says_how_to_get_one(hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    hub_server.create_repo("alice/secret", repo_type="dataset", private=True)
    root = project(tmp_path)
    with pytest.raises(DataError) as ei:
        data.fetch("s", source="hub:datasets/alice/secret", config=cfg_of(root), progress=False)
    assert str(ei.value) == (f"hub:datasets/alice/secret: dataset repo 'alice/secret' was not found at "
                             f"{hub_server.endpoint}, or it is private and no token (anonymous) cannot read it; check "
                             "the name, or set HF_TOKEN to a token that can read it")


# -- Drive -----------------------------------------------------------------------------------------------
@pytest.fixture
def drive_project(drive_server: DriveServer, tmp_path: Path):
    from colabkit.remotes.drive import DriveRemote
    from colabkit.secrets import load_google_credentials
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = project(tmp_path, extra={"drive": {"folder_id": folder, "credentials": str(key),
                                              "endpoint": drive_server.endpoint}})
    cfg = cfg_of(root)
    creds, _ = load_google_credentials(cfg)
    up = DriveRemote("up", folder, credentials=creds, endpoint=drive_server.endpoint)
    files = {"data/raw/shard-0.bin": os.urandom(2_000_000), "data/raw/shard-1.bin": os.urandom(700_000),
             "data/raw/meta/info.json": b'{"rows": 3}'}
    for rel, b in files.items():
        p = tmp_path / "up" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
        up.put(p, rel)
    raw_id = drive_server.find("data/raw", root=folder).id
    up.close()
    return root, files, raw_id


def media_gets(srv: DriveServer) -> int:
    return sum(1 for m, p in srv.requests if m == "GET" and "alt=media" in p)


def test_drive_folder_by_path_and_by_id_verified_idempotent(drive_server, drive_project, tmp_path):
    root, files, raw_id = drive_project
    res = data.fetch("raw", source="drive:data/raw", config=cfg_of(root), progress=False)
    assert res.verified == "source" and res.verified_by == "Drive's md5"
    assert {p.relative_to(res.path).as_posix() for p in res.path.rglob("*") if p.is_file()} == \
        {"shard-0.bin", "shard-1.bin", "meta/info.json"}
    assert (res.path / "shard-0.bin").read_bytes() == files["data/raw/shard-0.bin"]
    n = media_gets(drive_server)
    again = data.fetch("raw", source="drive:data/raw", config=cfg_of(root), progress=False)
    assert again.up_to_date and again.downloaded == 0 and media_gets(drive_server) == n
    by_id = data.fetch("raw-id", source=f"drive:{raw_id}", config=cfg_of(root), progress=False)
    assert by_id.list_digest == res.list_digest and by_id.files == 3


def test_drive_file_by_id(drive_server, drive_project, tmp_path):
    root, files, raw_id = drive_project
    fid = drive_server.find("data/raw/shard-1.bin", root=cfg_of(root).drive.folder_id).id
    res = data.fetch("one", source=f"drive:{fid}", version="v1", config=cfg_of(root), progress=False)
    assert res.verified == "source" and res.files == 1
    assert (res.path / "shard-1.bin").read_bytes() == files["data/raw/shard-1.bin"]


def test_drive_download_truncated_midway_continues(drive_server, drive_project):
    root, files, _ = drive_project
    drive_server.faults.truncate(1)
    res = data.fetch("one", source="drive:data/raw/shard-0.bin", config=cfg_of(root), progress=False)
    assert (res.path / "shard-0.bin").read_bytes() == files["data/raw/shard-0.bin"]
    assert any(k == "truncate" for k, _m, _p in drive_server.faults.injected)


def test_drive_source_path_without_folder_id_is_a_clear_error(tmp_path):
    root = project(tmp_path)
    with pytest.raises(DataError) as ei:
        data.fetch("x", source="drive:data/raw", config=cfg_of(root))
    assert str(ei.value) == ("drive:data/raw: a path under the Drive folder needs drive.folder_id in colabkit.yaml "
                             "(see docs/drive.md); or give the file's or folder's id: drive:ID")


# -- a plain link ----------------------------------------------------------------------------------------
@pytest.fixture
def files_srv(tmp_path: Path):
    d = tmp_path / "www"
    d.mkdir()
    with FileServer(d) as srv:
        yield srv


def test_https_without_digest_is_recorded_unverified_loudly(files_srv, tmp_path, capsys, monkeypatch):
    payload = os.urandom(300_000)
    (files_srv.root / "pg19.bin").write_bytes(payload)
    root = project(tmp_path)
    monkeypatch.chdir(root)
    rc = main(["data", "fetch", "pg19", "--source", files_srv.url("pg19.bin")])
    out = capsys.readouterr()
    assert rc == 0
    assert "  UNVERIFIED: no digest to check against: a plain link without a declared sha256" in out.out
    assert ("Warning: pg19 unversioned is UNVERIFIED: no digest to check against: a plain link without a declared "
            "sha256; declare its sha256 in colabkit.yaml (data.sets[].sha256) so a damaged download is caught") \
        in out.err
    rec = data.read_record("pg19", "unversioned", config=cfg_of(root))
    assert rec["verified"] == "none" and rec["files"][0]["sha256"] == sha(payload)
    assert journal_entries(root)[0].splitlines()[-1] == "- **Verified**: UNVERIFIED"


def test_https_with_declared_sha256_dropped_midway_resumes_by_range(files_srv, tmp_path):
    payload = os.urandom(3_000_000)
    (files_srv.root / "c4.bin").write_bytes(payload)
    root = project(tmp_path, sets=[{"name": "c4", "source": files_srv.url("c4.bin"), "version": "2024-01",
                                    "sha256": sha(payload)}])
    files_srv.drop_after = 1_000_000
    res = data.fetch("c4", config=cfg_of(root), progress=False)
    assert res.verified == "declared" and (res.path / "c4.bin").read_bytes() == payload
    gets = files_srv.gets()
    assert [(g[2], g[3]) for g in gets] == [(200, None), (206, "bytes=1000000-")]
    assert sum(g[4] for g in gets) == len(payload)       # nothing was downloaded twice
    assert res.downloaded == len(payload)
    again = data.fetch("c4", config=cfg_of(root), progress=False)
    assert again.up_to_date and len(files_srv.gets()) == 2


def test_https_corrupt_file_is_refused_nothing_under_the_final_name(files_srv, tmp_path):
    (files_srv.root / "c4.bin").write_bytes(b"not what was published\n")
    want = sha(b"the published bytes\n")
    root = project(tmp_path, sets=[{"name": "c4", "source": files_srv.url("c4.bin"), "version": "v1",
                                    "sha256": want}])
    with pytest.raises(IntegrityError) as ei:
        data.fetch("c4", config=cfg_of(root), progress=False)
    got = sha(b"not what was published\n")
    assert str(ei.value) == (f"c4: c4.bin does not match the declared sha256 ({got[:16]}… vs {want[:16]}…); the copy "
                             f"was discarded and nothing is under {tmp_path / 'ssd' / 'c4' / 'v1'}. Check the sha256 "
                             "in the declaration, or the link")
    assert not (tmp_path / "ssd" / "c4" / "v1").exists()
    assert journal_entries(root) == []


def test_disk_too_small_is_refused_before_the_first_byte(files_srv, tmp_path, monkeypatch):
    (files_srv.root / "big.bin").write_bytes(os.urandom(500_000))
    root = project(tmp_path)
    monkeypatch.setattr(data, "free_bytes", lambda p: 100_000)   # our own interface to the disk's free space
    with pytest.raises(DiskFullError) as ei:
        data.fetch("big", source=files_srv.url("big.bin"), config=cfg_of(root), progress=False)
    assert str(ei.value) == (
        f"big unversioned (1 files) needs 500.0 KB but only 100.0 KB is free on the disk of {tmp_path / 'ssd'} "
        "(and data.min_free keeps 0 B free); nothing was downloaded. Free space ('colabkit data evict NAME' removes "
        "a data set), or point data.cache at a larger disk")
    assert files_srv.gets() == []


# -- archives --------------------------------------------------------------------------------------------
def _tar(members: dict[str, bytes], *, link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, b in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
        if link:
            ti = tarfile.TarInfo("evil-link")
            ti.type = tarfile.SYMTYPE
            ti.linkname = link
            tf.addfile(ti)
    return buf.getvalue()


def test_tar_is_unpacked_into_a_folder_that_appears_only_when_complete(files_srv, tmp_path):
    blob = _tar({"pg19/train.txt": b"a" * 1000, "pg19/valid.txt": b"b" * 10})
    (files_srv.root / "pg19.tar.gz").write_bytes(blob)
    root = project(tmp_path, sets=[{"name": "pg19", "source": files_srv.url("pg19.tar.gz"), "version": "v1.0",
                                    "unpack": "tar", "sha256": sha(blob)}])
    res = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert (res.path / "pg19/train.txt").read_bytes() == b"a" * 1000
    assert sorted(p.name for p in res.path.parent.iterdir()) == ["v1.0"]   # no archive, no staging left
    assert res.files == 2 and res.bytes == 1010 and res.verified == "declared"


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_with_a_path_escape_is_refused_nothing_written(files_srv, tmp_path, kind):
    if kind == "tar":
        blob = _tar({"ok.txt": b"fine", "../../escaped.txt": b"gotcha"}, link="/etc/passwd")
        name = "evil.tar.gz"
        expect = ("'../../escaped.txt' (a '..' component); 'evil-link' (a link)")
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("ok.txt", b"fine")
            zf.writestr("../../escaped.txt", b"gotcha")
        blob, name, expect = buf.getvalue(), "evil.zip", "'../../escaped.txt' (a '..' component)"
    (files_srv.root / name).write_bytes(blob)
    root = project(tmp_path)
    with pytest.raises(DataError) as ei:
        data.fetch("evil", source=files_srv.url(name), unpack=kind, config=cfg_of(root), progress=False)
    assert str(ei.value) == (f"evil: {name} is unsafe and was not unpacked: {expect}. Nothing was written; do not "
                             "use this archive")
    assert not (tmp_path / "ssd" / "evil" / "unversioned").exists()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "ssd" / "escaped.txt").exists()
    assert not list((tmp_path / "ssd").rglob("ok.txt"))


# -- local paths, the cache, list / verify / evict ---------------------------------------------------------
def test_local_path_on_a_network_mount_is_copied_and_said_so(tmp_path, monkeypatch):
    mounted = tmp_path / "drive" / "MyDrive" / "data"
    mounted.mkdir(parents=True)
    (mounted / "x.bin").write_bytes(b"x" * 100)
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", str(tmp_path / "drive"))
    root = project(tmp_path, sets=[{"name": "x", "source": str(mounted), "sha256": {"x.bin": sha(b"x" * 100)}}])
    res = data.fetch("x", config=cfg_of(root), progress=False)
    assert res.verified == "declared" and (res.path / "x.bin").read_bytes() == b"x" * 100
    assert f"copied from a network mount ({mounted})" in res.warnings


def test_cache_on_a_network_mount_is_refused(tmp_path, monkeypatch):
    root = project(tmp_path)
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", str(tmp_path / "ssd"))
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError) as ei:
        data.fetch("x", source=str(tmp_path / "src"), config=cfg_of(root))
    assert str(ei.value) == (
        f"data cache {tmp_path / 'ssd'} is on a network or FUSE mount: training from it is slow and stalls when the "
        "mount hiccups. Point data.cache (or --cache) at the local SSD, e.g. /content/data on Colab or /data on the VM")


def test_new_version_goes_beside_the_old_verify_and_evict(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    root = project(tmp_path, sets=[{"name": "toy", "source": str(src)}])
    monkeypatch.chdir(root)
    v1 = data.fetch("toy", config=cfg_of(root), progress=False)
    (src / "a.txt").write_text("two!\n")
    v2 = data.fetch("toy", config=cfg_of(root), progress=False)
    assert v1.version != v2.version and v1.path.is_dir() and v2.path.is_dir()
    assert len(journal_entries(root)) == 2
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert f"  toy              {v1.version:<14} 1 files, 4 B  ok  UNVERIFIED  {v1.path}" in out
    # bit rot with the same size and mtime: only verify can see it, and the next fetch repairs it
    p = v1.path / "a.txt"
    st = p.stat()
    p.write_text("ONE\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["data", "verify", "toy", "--version", v1.version]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [f"toy {v1.version}: 1 damaged file(s) in {v1.path}:",
                                "  a.txt does not match its recorded sha256 (size 4 vs 4)",
                                "  fetch it again: 'colabkit data fetch toy'"]
    assert main(["data", "evict", "toy", "--version", v1.version]) == 0
    assert capsys.readouterr().out.splitlines() == [f"Removed toy {v1.version} (4 B): {v1.path}", "Freed 4 B"]
    assert not v1.path.exists() and v2.path.is_dir()


def test_evict_never_removes_a_data_set_that_is_open(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    root = project(tmp_path, sets=[{"name": "toy", "source": str(src), "version": "v1"}])
    res = data.fetch("toy", config=cfg_of(root), progress=False)
    with open(res.path / "a.txt") as f:
        out = data.evict("toy", config=cfg_of(root))
        assert f.read() == "one\n"
    assert out["removed"] == [] and out["kept"] == [
        {"version": "v1", "path": str(res.path), "reason": f"this process has {res.path / 'a.txt'} open"}]
    assert res.path.is_dir()
    assert data.evict("toy", config=cfg_of(root))["freed"] == 4 and not res.path.exists()


def test_bad_input_gets_clear_errors(tmp_path):
    root = project(tmp_path)
    with pytest.raises(DataError) as ei:
        data.fetch("nope", config=cfg_of(root))
    assert str(ei.value) == ("data set 'nope' is not declared in colabkit.yaml (declared: none) and no --source was "
                             "given; run 'colabkit data fetch nope --source hub:datasets/USER/REPO' or declare it "
                             "under data.sets")
    with pytest.raises(DataError) as ei:
        data.fetch("x", source="s3://bucket/key", config=cfg_of(root))
    assert str(ei.value) == ("'s3://bucket/key': unknown kind of source; use hub:datasets/USER/REPO[@REV][:GLOB], "
                             "drive:ID_OR_PATH, gdown:ID_OR_URL, https://... or a local path")
    with pytest.raises(DataError) as ei:
        data.fetch("x", source="hub:alice", config=cfg_of(root))
    assert str(ei.value) == ("'hub:alice' is not a Hub source; write hub:datasets/USER/REPO[@REVISION][:GLOB], e.g. "
                             "hub:datasets/alice/pg19@v1.0:train/*.parquet")
    with pytest.raises(DataError) as ei:
        data.fetch("../x", source="/tmp", config=cfg_of(root))
    assert str(ei.value) == "data set name '../x': use letters, digits, '.', '_' or '-' (e.g. pg19)"
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(Exception) as ei:
        data.fetch("x", source=str(tmp_path / "f.txt"), sha256="abc", config=cfg_of(root))
    assert str(ei.value) == "sha256: 'abc' is not a sha256 hex digest (64 hex characters)"
    with pytest.raises(DataError) as ei:
        data.verify("x", config=cfg_of(root))
    assert str(ei.value) == f"x has not been fetched to {tmp_path / 'ssd'}; run 'colabkit data fetch x'"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(Exception) as ei:
        load_config(data={"data": {"sets": [{"name": "a", "source": "x", "unpack": "rar"}]}})
    assert str(ei.value) == "data.sets[0].unpack: 'rar' is not allowed; use one of tar, zip, none"
    with pytest.raises(Exception) as ei:
        load_config(data={"data": {"sets": [{"name": "a"}]}})
    assert str(ei.value).startswith("data.sets[0].source: missing; say where a comes from")
    with pytest.raises(Exception) as ei:
        load_config(data={"train": {"data": ["pg19"]}})
    assert str(ei.value) == "train.data[0]: 'pg19' is not a declared data set; declared: none (add it under data.sets)"
    c = load_config(data={"data": [{"name": "a", "source": "hub:datasets/u/r"}]})   # the short form: a list
    assert c.data.get("a").source == "hub:datasets/u/r"


@pytest.mark.magic
def test_data_magic_and_json(ip, tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    root = project(tmp_path, sets=[{"name": "toy", "source": str(src), "version": "v1",
                                    "sha256": {"a.txt": sha(b"one\n")}}])
    monkeypatch.chdir(root)
    ip.run_line_magic("data", "fetch toy --json")
    d = json.loads(capsys.readouterr().out)
    assert d["version"] == "v1" and d["verified"] == "declared" and d["downloaded"] == 4
    ip.run_line_magic("data", "fetch toy")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"toy v1: 1 files, 4 B in {tmp_path / 'ssd' / 'toy' / 'v1'} (already here, intact: nothing downloaded)"
    from IPython.core.error import UsageError
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("data", "fetch other")
    assert str(ei.value) == ("data set 'other' is not declared in colabkit.yaml (declared: toy) and no --source was "
                             "given; run '%data fetch other --source hub:datasets/USER/REPO' or declare it under "
                             "data.sets")   # the next step in the form of where the user is


def test_gdown_public_link_with_declared_sha256(drive_server, tmp_path):
    payload = os.urandom(200_000)
    fid = drive_server.add_public_file("pg19.bin", payload)
    root = project(tmp_path, extra={"drive": {"endpoint": drive_server.endpoint}},
                   sets=[{"name": "pg19", "source": f"gdown:{fid}", "version": "v1", "sha256": sha(payload)}])
    res = data.fetch("pg19", config=cfg_of(root), progress=False)
    assert res.verified == "declared" and (res.path / "pg19.bin").read_bytes() == payload
    n = len(drive_server.requests)
    assert data.fetch("pg19", config=cfg_of(root), progress=False).up_to_date and len(drive_server.requests) == n


def test_zip_is_unpacked_with_every_file_recorded(files_srv, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("c4/en/a.json", b'{"a": 1}\n')
        zf.writestr("c4/en/b.json", b'{"b": 2}\n')
    (files_srv.root / "c4.zip").write_bytes(buf.getvalue())
    root = project(tmp_path)
    res = data.fetch("c4", source=files_srv.url("c4.zip"), unpack="zip", sha256=sha(buf.getvalue()),
                     config=cfg_of(root), progress=False)
    rec = data.read_record("c4", res.version, config=cfg_of(root))
    assert [(f["path"], f["size"], f["sha256"]) for f in rec["files"]] == [
        ("c4/en/a.json", 9, sha(b'{"a": 1}\n')), ("c4/en/b.json", 9, sha(b'{"b": 2}\n'))]
    assert rec["source_files"] == {"c4.zip": {"size": len(buf.getvalue()), "sha256": sha(buf.getvalue())}}
    assert data.verify("c4", config=cfg_of(root))["ok"]


def test_a_fetch_that_gave_up_keeps_what_it_had_and_the_next_one_continues(files_srv, tmp_path, monkeypatch):
    payload = os.urandom(2_000_000)
    (files_srv.root / "c4.bin").write_bytes(payload)
    root = project(tmp_path, sets=[{"name": "c4", "source": files_srv.url("c4.bin"), "version": "v1",
                                    "sha256": sha(payload)}])
    monkeypatch.setattr(data, "ATTEMPTS", 1)    # give up at the first drop, as a crash would
    files_srv.drop_after = 1_500_000
    with pytest.raises(DataError) as ei:
        data.fetch("c4", config=cfg_of(root), progress=False)
    assert str(ei.value).startswith("downloading c4.bin failed 1 times (")
    assert str(ei.value).endswith("); what was downloaded is kept: run the same fetch again to continue")
    assert not (tmp_path / "ssd" / "c4" / "v1").exists()
    res = data.fetch("c4", config=cfg_of(root), progress=False)
    assert (res.path / "c4.bin").read_bytes() == payload and res.downloaded == 500_000
    assert [(g[2], g[3]) for g in files_srv.gets()] == [(200, None), (206, "bytes=1500000-")]


def test_evict_never_removes_a_data_set_a_running_job_uses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    root = project(tmp_path, sets=[{"name": "toy", "source": str(src), "version": "v1"}])
    res = data.fetch("toy", config=cfg_of(root), progress=False)
    jobs = root / ".colabkit" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "v01.json").write_text(json.dumps({"experiment": "v01", "run_id": "v01-run", "state": "running",
                                               "pid": os.getpid(), "data": {"toy": str(res.path)}}))
    out = data.evict("toy", config=cfg_of(root))
    assert out["kept"] == [{"version": "v1", "path": str(res.path),
                            "reason": "the running job v01-run (v01) uses it"}] and res.path.is_dir()
