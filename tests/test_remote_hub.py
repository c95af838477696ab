"""The Hub tier against tests/hub_server.py, through the real huggingface_hub over HTTP."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from colabkit.config import Config, HubConfig, TierConfig
from colabkit.errors import (ConfigError, IntegrityError, RemoteAuthError, RemoteNotFoundError, RemotePermissionError,
                             RemoteQuotaError, TransientRemoteError)
from colabkit.fsutil import hash_file
from colabkit.remotes import open_remote
from colabkit.remotes.hub import HubRemote, describe_hub_token, prune_plan

from .hub_server import QUOTA_MESSAGE, HubServer, hub_server  # noqa: F401  (fixture)
from .remote_contract import FaultContract, RemoteContract

REPO = "alice/ckpt"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def token_env(monkeypatch, hub_server: HubServer) -> str:
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    return hub_server.WRITE_TOKEN


def make_remote(srv: HubServer, **kw) -> HubRemote:
    kw.setdefault("endpoint", srv.endpoint)
    return HubRemote(kw.pop("name", "hub"), kw.pop("repo_id", REPO), **kw)


class TestHubRemoteContract(RemoteContract):
    @pytest.fixture
    def remote(self, hub_server: HubServer, token_env) -> HubRemote:
        return make_remote(hub_server, path_prefix="runs")


class TestHubRemoteContractNoPrefixPagedTree(RemoteContract):
    """The repo root as the tier root (the Hub's own .gitattributes is hidden), with 2-entry tree pages."""

    @pytest.fixture
    def remote(self, hub_server: HubServer, token_env) -> HubRemote:
        hub_server.page_size = 2
        hub_server.create_repo(REPO)
        return make_remote(hub_server)


class _HubFaults:
    """The fault table as the Hub produces it (tests/hub_server.py), on the request each operation depends on:
    the commit (put), the resolve lookup before a download (get), the tree listing (list). 5xx and 429 carry
    ``Retry-After: 0`` so that huggingface_hub's own back-off (it retries some calls itself) stays short."""

    kinds = ("503", "500", "429", "drop", "auth", "permission", "quota")
    ROUTES = {"put": ("POST", r"/commit/"), "get": ("HEAD", r"/resolve/"), "list": ("GET", r"/tree/")}

    def __init__(self, srv: HubServer) -> None:
        self.srv = srv

    def inject(self, kind: str, op: str, times: int) -> None:
        method, path = self.ROUTES[op]
        if kind == "drop":
            self.srv.inject(method=method, path=path, drop=True, times=times)
        elif kind == "quota":
            self.srv.inject(method="POST", path=r"/objects/batch", status=403, message=QUOTA_MESSAGE, times=times)
        else:
            status, msg = {"503": (503, None), "500": (500, None), "429": (429, None),
                           "auth": (401, "Invalid credentials in Authorization header"),
                           "permission": (403, "You don't have the rights to write to this repo")}[kind]
            self.srv.inject(method=method, path=path, status=status, message=msg, times=times,
                            headers={"Retry-After": "0"} if status in (429, 500, 503) else None)

    def clear(self) -> None:
        self.srv.faults.clear()


class TestHubRemoteFaults(FaultContract):
    @pytest.fixture
    def remote(self, hub_server: HubServer, token_env) -> HubRemote:
        hub_server.create_repo(REPO)
        return make_remote(hub_server, sleep=lambda s: None, max_attempts=2)

    @pytest.fixture
    def faults(self, hub_server: HubServer) -> _HubFaults:
        return _HubFaults(hub_server)


# -- configuration and token ---------------------------------------------------------------------------
def test_from_config_uses_hub_section_and_tier_keep(hub_server: HubServer, tmp_path: Path):
    cfg = Config(root=tmp_path, project="proj", hub=HubConfig(repo_id="acme/weights", repo_type="dataset",
                                                                 endpoint=hub_server.endpoint + "/",
                                                                 path_prefix="{project}/ck", keep=5),
                 tiers=(TierConfig(name="hub", remote="hub", keep=2),))
    r = open_remote(cfg, "hub")
    assert isinstance(r, HubRemote)
    assert (r.repo_id, r.repo_type, r.path_prefix, r.keep, r.endpoint) == (
        "acme/weights", "dataset", "proj/ck", 2, hub_server.endpoint)
    assert r.describe() == f"Hugging Face Hub dataset repo acme/weights@main/proj/ck at {hub_server.endpoint}"


def test_endpoint_falls_back_to_hf_endpoint_variable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080/")
    assert HubRemote("hub", REPO).endpoint == "http://mirror.example:8080"
    monkeypatch.delenv("HF_ENDPOINT")
    assert HubRemote("hub", REPO).endpoint == "https://huggingface.co"


def test_bad_repo_id_is_a_config_error():
    with pytest.raises(ConfigError) as ei:
        HubRemote("hub", "just-a-name")
    assert str(ei.value) == "hub.repo_id: 'just-a-name' must be owner/name, e.g. alice/v68-checkpoints"


def test_describe_hub_token_names_the_source_never_the_token(monkeypatch, hub_server: HubServer):
    from huggingface_hub import constants
    assert describe_hub_token() is None
    Path(constants.HF_TOKEN_PATH).write_text(hub_server.WRITE_TOKEN + "\n")
    d = describe_hub_token()
    assert d == {"source": "stored_login", "path": constants.HF_TOKEN_PATH,
                 "description": f"the stored login ({constants.HF_TOKEN_PATH})"}
    monkeypatch.setenv("HF_TOKEN", hub_server.READ_TOKEN)
    d = describe_hub_token()
    assert d == {"source": "env", "variable": "HF_TOKEN", "description": "the HF_TOKEN environment variable"}
    assert hub_server.READ_TOKEN not in repr(d) and hub_server.WRITE_TOKEN not in repr(d)


def test_stored_login_token_is_used(hub_server: HubServer, tmp_path: Path):
    from huggingface_hub import constants
    Path(constants.HF_TOKEN_PATH).write_text(hub_server.WRITE_TOKEN)
    r = make_remote(hub_server)
    r.check_access()
    assert hub_server.repo(REPO) is not None


def test_colab_secret_is_the_last_resort(hub_server: HubServer, monkeypatch):
    """Inside the Colab UI the token comes from Colab Secrets (our own lookup, colabkit.secrets.colab_secret)."""
    import colabkit.secrets
    asked = []
    monkeypatch.setattr(colabkit.secrets, "colab_secret",
                        lambda name, **kw: asked.append(name) or hub_server.WRITE_TOKEN)
    assert describe_hub_token() == {"source": "colab_secrets", "name": "HF_TOKEN",
                                    "description": "Colab Secrets (HF_TOKEN)"}
    make_remote(hub_server).check_access()
    assert asked == ["HF_TOKEN", "HF_TOKEN"]
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    assert describe_hub_token()["source"] == "env" and asked == ["HF_TOKEN", "HF_TOKEN"]  # not asked again


def test_server_stop_joins_its_threads_with_idle_keepalive_connections(tmp_path: Path):
    import threading

    from huggingface_hub import HfApi
    srv = HubServer(tmp_path / "srv").start()
    HfApi(endpoint=srv.endpoint, token=srv.WRITE_TOKEN).whoami()  # leaves a pooled keep-alive connection open
    assert any(t.name.startswith("hub-server-hub-conn-") for t in threading.enumerate())
    srv.stop()
    srv.stop()  # twice is fine
    assert not [t.name for t in threading.enumerate() if t.name.startswith("hub-server-")]


def test_library_settings_from_conftest_took_effect(hub_server: HubServer):
    """huggingface_hub reads these once at import: they must have been set before it was imported."""
    from huggingface_hub import constants
    assert getattr(constants, "HF_HUB_DISABLE_XET", True) is True  # absent before Xet existed
    assert constants.HF_HUB_DISABLE_TELEMETRY is True
    assert constants.ENDPOINT == "https://huggingface.co"  # HF_ENDPOINT was cleared: we pass endpoint= ourselves
    assert os.environ["HF_HOME"] == constants.HF_HOME


# -- check_access --------------------------------------------------------------------------------------
def test_check_access_creates_a_private_repo_and_leaves_no_marker(hub_server: HubServer, token_env):
    r = make_remote(hub_server, path_prefix="v68")
    r.check_access()
    repo = hub_server.repo(REPO)
    assert repo is not None and repo.private is True
    assert set(hub_server.files(REPO)) == {".gitattributes"}
    assert r.list() == []


def test_check_access_with_an_existing_repo_gets_the_409_path(hub_server: HubServer, token_env):
    hub_server.create_repo(REPO)
    r = make_remote(hub_server)
    r.put(_write(hub_server.root / "x.pt", b"\0" * 100), "x.pt")  # repo exists: no create call needed
    assert hub_server.count("POST", r"/api/repos/create") == 0
    r._create_repo()  # the library's exist_ok path: a 409 answer is fine
    assert hub_server.count("POST", r"/api/repos/create") == 1


def test_check_access_invalid_token(hub_server: HubServer, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenAtAll0123456789abcdef")
    with pytest.raises(RemoteAuthError) as ei:
        make_remote(hub_server).check_access()
    assert str(ei.value) == (
        f"hub: the Hugging Face token from the HF_TOKEN environment variable was rejected by {hub_server.endpoint} "
        f"(invalid or expired); create a token with write access at {hub_server.endpoint}/settings/tokens and set "
        "it as HF_TOKEN")
    assert "hf_NotARealToken" not in str(ei.value)


def test_check_access_read_only_token(hub_server: HubServer, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.READ_TOKEN)
    with pytest.raises(RemotePermissionError) as ei:
        make_remote(hub_server).check_access()
    assert str(ei.value) == (
        "hub: the Hugging Face token from the HF_TOKEN environment variable (user 'alice') is read-only, so "
        f"checkpoints cannot be uploaded to alice/ckpt; create a token with write access at "
        f"{hub_server.endpoint}/settings/tokens")


def test_check_access_repo_owned_by_someone_else(hub_server: HubServer, token_env):
    hub_server.create_repo("bob/private-model")
    with pytest.raises(RemotePermissionError) as ei:
        make_remote(hub_server, repo_id="bob/private-model").check_access()
    assert str(ei.value) == (
        "hub: 'bob/private-model' belongs to 'bob', but the token from the HF_TOKEN environment variable is for "
        "user 'alice', who can write only under: alice, acme; use a repo such as alice/private-model or a token "
        "that may write to 'bob'")


def test_check_access_org_repo_is_allowed(hub_server: HubServer, token_env):
    make_remote(hub_server, repo_id="acme/shared").check_access()
    assert hub_server.repo("acme/shared").private is True


def test_no_token_at_all(hub_server: HubServer):
    with pytest.raises(RemoteAuthError) as ei:
        make_remote(hub_server).check_access()
    assert str(ei.value) == (
        f"hub: no Hugging Face token found; create one with write access at {hub_server.endpoint}/settings/tokens "
        "and set it as HF_TOKEN (or run `hf auth login`, or add HF_TOKEN to Colab Secrets)")


def test_write_refused_with_403_on_commit_is_a_permission_error(hub_server: HubServer, token_env, tmp_path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/commit/", status=403, message="Forbidden: write access disabled")
    with pytest.raises(RemotePermissionError) as ei:
        make_remote(hub_server).put(_write(tmp_path / "a.txt", b"x"), "a.txt")
    assert "may not write to model repo 'alice/ckpt' (HTTP 403 (Forbidden: write access disabled))" in str(ei.value)


# -- uploads ---------------------------------------------------------------------------------------------
def test_put_many_is_one_commit_with_a_message_naming_experiment_and_steps(hub_server: HubServer, token_env,
                                                                           tmp_path: Path):
    r = make_remote(hub_server)
    r.project = "proj"
    items = [(_write(tmp_path / f"s{s}.pt", os.urandom(2000)), f"v68/checkpoints/v68_step_{s:08d}.pt")
             for s in (1200, 1400)]
    items.append((_write(tmp_path / "m.json", b'{"step": 1400}'), "v68/checkpoints/v68_step_00001400.pt.json"))
    recs = r.put_many(items)
    assert [x.path for x in recs] == [p for _, p in items]
    assert hub_server.count("POST", r"/commit/") == 1
    assert hub_server.commit_messages(REPO)[0] == "colabkit proj v68: steps 1200, 1400 (3 files)"
    for (local, _), rec in zip(items, recs):
        assert rec.matches(hash_file(local))
    # the small json is a regular git blob: verified through its git oid, listed with sha256 in this process
    listed = {f.path: f for f in r.list("v68")}
    assert listed["v68/checkpoints/v68_step_00001400.pt.json"].matches(hash_file(items[2][0]))


def test_content_already_held_is_not_uploaded_again(hub_server: HubServer, token_env, tmp_path: Path):
    r = make_remote(hub_server)
    src = _write(tmp_path / "w.pt", os.urandom(50_000))
    r.put(src, "a/w.pt")
    commits, puts = hub_server.count("POST", r"/commit/"), hub_server.count("PUT", r"/lfs-upload/")
    rec = r.put(src, "a/w.pt")
    assert rec.matches(hash_file(src))
    assert (hub_server.count("POST", r"/commit/"), hub_server.count("PUT", r"/lfs-upload/")) == (commits, puts)
    # the same bytes under another name: a commit, but the LFS object is not sent again
    r.put(src, "b/w.pt")
    assert hub_server.count("PUT", r"/lfs-upload/") == puts
    assert hub_server.count("POST", r"/commit/") == commits + 1


def test_list_reports_lfs_sha256_and_regular_files_by_git_oid_in_a_fresh_process(hub_server: HubServer, token_env,
                                                                                 tmp_path: Path, monkeypatch):
    from colabkit.remotes import hub as hubmod
    big, small = os.urandom(30_000), b"plain text log\n"
    r = make_remote(hub_server)
    r.put_many([(_write(tmp_path / "b.pt", big), "x/b.pt"), (_write(tmp_path / "s.log", small), "x/s.log")])
    monkeypatch.setattr(hubmod, "_BLOB_DIGESTS", type(hubmod._BLOB_DIGESTS)())  # as a new process would see it
    files = {f.path: f for f in make_remote(hub_server).list()}
    assert files["x/b.pt"].sha256 == hash_file(tmp_path / "b.pt").sha256
    assert files["x/s.log"].sha256 is None and files["x/s.log"].id == hub_server.files(REPO)["x/s.log"].oid
    got = make_remote(hub_server).get("x/s.log", tmp_path / "back.log", expected=files["x/s.log"])
    assert (tmp_path / "back.log").read_bytes() == small
    assert got.sha256 == hash_file(tmp_path / "back.log").sha256


def test_keep_removes_old_checkpoints_from_the_tip_in_the_same_commit(hub_server: HubServer, token_env,
                                                                      tmp_path: Path):
    r = make_remote(hub_server, path_prefix="runs", keep=2)
    for s in (100, 200, 300):
        p = f"v1/checkpoints/v1_step_{s:06d}.pt"
        r.put_many([(_write(tmp_path / f"{s}.pt", os.urandom(1000)), p),
                    (_write(tmp_path / f"{s}.json", b"{}"), p + ".json")])
    assert [f.path for f in r.list()] == [
        "v1/checkpoints/v1_step_000200.pt", "v1/checkpoints/v1_step_000200.pt.json",
        "v1/checkpoints/v1_step_000300.pt", "v1/checkpoints/v1_step_000300.pt.json"]
    assert hub_server.commit_messages(REPO)[0] == "colabkit v1: step 300 (2 files, 2 old removed)"
    assert hub_server.count("POST", r"/commit/") == 3  # the deletions rode along with the upload


def _folder(tmp: Path, name: str, files: dict[str, bytes], remote_dir: str) -> list[tuple[Path, str]]:
    """A checkpoint folder's files as put_many items, the manifest (or marker) last, as sync sends them."""
    last = [n for n in files if n in ("colabkit-manifest.json", ".metadata")]
    return [(_write(tmp / name / n, files[n]), f"{remote_dir}/{name}/{n}") for n in
            [n for n in files if n not in last] + last]


def test_keep_counts_checkpoint_folders_as_units_and_removes_them_whole(hub_server: HubServer, token_env,
                                                                        tmp_path: Path):
    r = make_remote(hub_server, path_prefix="runs", keep=2)
    ck = "v1/checkpoints"
    # a folder that never got its manifest (an old tool's partial upload): not a checkpoint, never removed
    r.put_many(_folder(tmp_path, "v1_step_000050", {"__0_0.distcp": b"x" * 10}, ck))
    for s in (100, 200, 300):
        files = {"__0_0.distcp": os.urandom(700), "__1_0.distcp": os.urandom(900), ".metadata": b"meta%d" % s,
                 "colabkit-manifest.json": b'{"step": %d}' % s}
        r.put_many(_folder(tmp_path, f"v1_step_{s:06d}", files, ck))
    names = sorted({f.path.split("/")[2] for f in r.list()})
    assert names == ["v1_step_000050", "v1_step_000200", "v1_step_000300"]
    assert len([f for f in r.list() if "/v1_step_000200/" in f.path]) == 4  # every file of a kept folder
    # the whole folder 100 left in the commit that added 300
    assert hub_server.commit_messages(REPO)[0] == "colabkit v1: step 300 (4 files, 4 old removed)"
    assert hub_server.count("POST", r"/commit/") == 4

    # an old folder sent again (a retry after the newer ones got up) is beyond keep but being written: it stays
    # whole in that commit rather than losing the files not sent again
    again = _folder(tmp_path, "v1_step_000100", {"__0_0.distcp": b"a" * 700, "colabkit-manifest.json": b"{}"}, ck)
    r.put_many(again[:1] + again[-1:])
    assert sorted({f.path.split("/")[2] for f in r.list()}) == ["v1_step_000050", "v1_step_000100",
                                                                "v1_step_000200", "v1_step_000300"]
    assert r.prune() == [f"{ck}/v1_step_000100/__0_0.distcp", f"{ck}/v1_step_000100/colabkit-manifest.json"]
    assert sorted({f.path.split("/")[2] for f in r.list()}) == ["v1_step_000050", "v1_step_000200",
                                                                "v1_step_000300"]


def test_prune_plan_counts_folders_other_tools_wrote_by_their_markers():
    paths = ["c/checkpoint-100/model.safetensors", "c/checkpoint-100/config.json",
             "c/checkpoint-200/model-00001-of-00002.safetensors", "c/checkpoint-200/model-00002-of-00002.safetensors",
             "c/checkpoint-200/model.safetensors.index.json", "c/checkpoint-300/model-00001-of-00002.safetensors",
             "c/checkpoint-400/.metadata", "c/checkpoint-400/__0_0.distcp",
             "m/iter_0000100/mp_rank_00/model_optim_rng.pt", "m/iter_0000200/mp_rank_00/model_optim_rng.pt",
             "m/latest_checkpointed_iteration.txt", "n/iter_0000100/mp_rank_00/model_optim_rng.pt",
             "n/iter_0000200/mp_rank_00/model_optim_rng.pt",
             "c/v1_step_1.pt", "c/v1_step_2.pt", "c/v1_step_3/colabkit-manifest.json", "c/v1_step_3/__0_0.distcp"]
    # checkpoint-300 has no index (partial): not counted, not removed; n/ has no tracker: not Megatron's folders;
    # a shard's digits are not a step; files and folders are separate series
    assert prune_plan(paths, keep=1) == ["c/checkpoint-100/config.json", "c/checkpoint-100/model.safetensors",
                                         "c/checkpoint-200/model-00001-of-00002.safetensors",
                                         "c/checkpoint-200/model-00002-of-00002.safetensors",
                                         "c/checkpoint-200/model.safetensors.index.json", "c/v1_step_1.pt",
                                         "m/iter_0000100/mp_rank_00/model_optim_rng.pt"]


def test_a_file_that_changed_after_its_digest_is_not_kept(hub_server: HubServer, token_env, tmp_path: Path):
    src = _write(tmp_path / "notes.txt", b"version 1\n")
    stale = hash_file(src)
    src.write_bytes(b"version 2, longer\n")
    r = make_remote(hub_server)
    with pytest.raises(IntegrityError) as ei:
        r.put(src, "notes.txt", digest=hash_file(src).__class__(len(b"version 2, longer\n"), stale.sha256, stale.md5))
    assert str(ei.value) == "hub: notes.txt did not verify after upload: it changed while it was uploaded; it will be retried"
    assert r.list() == []


def test_prune_plan_keeps_each_series_separately():
    paths = ["c/a_step_1.pt", "c/a_step_2.pt", "c/a_step_3.pt", "c/b_step_1.pt", "c/latest.pt", "d/a_step_1.pt",
             "c/a_step_1.pt.json"]
    assert prune_plan(paths, keep=2) == ["c/a_step_1.pt", "c/a_step_1.pt.json"]


def test_delete_of_missing_file_and_missing_repo_is_quiet(hub_server: HubServer, token_env):
    r = make_remote(hub_server)
    r.delete("nothing/here.pt")  # no repo yet
    hub_server.create_repo(REPO)
    r.delete("nothing/here.pt")
    assert r.list() == []


def test_revision_branch_is_created(hub_server: HubServer, token_env, tmp_path: Path):
    r = make_remote(hub_server, revision="runs")
    r.check_access()
    r.put(_write(tmp_path / "a.pt", b"\0abc"), "a.pt")
    assert "a.pt" in hub_server.files(REPO, revision="runs")
    assert "a.pt" not in hub_server.files(REPO)


# -- downloads -------------------------------------------------------------------------------------------
def test_get_does_not_grow_the_hf_cache_and_redirects_lfs_to_the_cdn(hub_server: HubServer, token_env,
                                                                      tmp_path: Path):
    from huggingface_hub import constants
    data = os.urandom(2_000_000)
    r = make_remote(hub_server)
    r.put(_write(tmp_path / "w.pt", data), "w.pt")
    dst = tmp_path / "out" / "w.pt"
    r.get("w.pt", dst)
    assert dst.read_bytes() == data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["w.pt"]
    assert not Path(constants.HF_HUB_CACHE).exists() or not any(Path(constants.HF_HUB_CACHE).rglob("*"))
    assert hub_server.count("HEAD", r"/resolve/main/w.pt") == 1
    assert hub_server.count("GET", r"/lfs/", port="cdn") == 1


def test_corrupt_hub_copy_is_refused_and_nothing_is_left(hub_server: HubServer, token_env, tmp_path: Path):
    r = make_remote(hub_server)
    r.put(_write(tmp_path / "w.pt", os.urandom(100_000)), "w.pt")
    hub_server.corrupt(REPO, "w.pt")
    dst = tmp_path / "out" / "w.pt"
    dst.parent.mkdir()
    with pytest.raises(IntegrityError) as ei:
        r.get("w.pt", dst)
    assert str(ei.value).startswith("hub: w.pt does not match its recorded hash (size 100000 vs 100000, hash ")
    assert str(ei.value).endswith("; the copy was discarded")
    assert list(dst.parent.iterdir()) == []


def _get_retrying_once(r: HubRemote, path: str, dst: Path) -> bool:
    """get(), retried once after a TransientRemoteError as the sync engine and resume do. True if it was needed.

    huggingface_hub 2.x resumes a broken download itself; 0.2x/0.3x (Colab) gives up at once, which the remote
    reports as transient, leaving nothing behind.
    """
    try:
        r.get(path, dst)
        return False
    except TransientRemoteError as e:
        assert "the connection to" in str(e) and "it will be retried" in str(e)
        assert not dst.exists() and list(dst.parent.iterdir()) == []
        r.get(path, dst)
        return True


def test_dropped_connection_before_download_is_retried(hub_server: HubServer, token_env, tmp_path: Path):
    data = os.urandom(300_000)
    r = make_remote(hub_server)
    r.put(_write(tmp_path / "w.pt", data), "w.pt")
    hub_server.inject(method="GET", port="cdn", path=r"/lfs/", drop=True)
    (tmp_path / "out").mkdir()
    _get_retrying_once(r, "w.pt", tmp_path / "out" / "back.pt")
    assert (tmp_path / "out" / "back.pt").read_bytes() == data
    assert hub_server.count("GET", r"/lfs/", port="cdn") == 2


def test_connection_cut_midway_resumes_with_range_and_still_verifies(hub_server: HubServer, token_env,
                                                                     tmp_path: Path):
    data = os.urandom(12 * 1024 * 1024)  # big enough to be hashed in the helper thread while streaming
    r = make_remote(hub_server)
    rec = r.put(_write(tmp_path / "w.pt", data), "w.pt")
    hub_server.inject(method="GET", port="cdn", path=r"/lfs/", drop_after=11 * 1024 * 1024)  # past the first 10 MB chunk
    (tmp_path / "out").mkdir()
    retried = _get_retrying_once(r, "w.pt", tmp_path / "out" / "back.pt")
    assert (tmp_path / "out" / "back.pt").read_bytes() == data
    assert r.stat("w.pt").sha256 == rec.sha256 == hash_file(tmp_path / "out" / "back.pt").sha256
    statuses = [s for (_p, m, path, s) in hub_server.requests if m == "GET" and path.startswith("/lfs/")]
    assert statuses == ([200, 200] if retried else [200, 206])


def test_get_missing_repo_is_not_found(hub_server: HubServer, token_env, tmp_path: Path):
    with pytest.raises(RemoteNotFoundError) as ei:
        make_remote(hub_server).get("a/b.pt", tmp_path / "b.pt")
    assert str(ei.value) == "hub: a/b.pt does not exist in model repo 'alice/ckpt'"


# -- faults ----------------------------------------------------------------------------------------------
def test_429_on_commit_is_retried_after_retry_after(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/commit/", status=429, headers={"Retry-After": "37"})
    waits: list[float] = []
    r = make_remote(hub_server, sleep=waits.append)
    assert r.put(_write(tmp_path / "a.pt", b"\0" * 10), "a.pt").size == 10
    assert waits == [37.0], "the Hub's Retry-After was not honoured"
    assert hub_server.count("POST", r"/commit/") == 2
    assert len(hub_server.commit_messages(REPO)) == 2, "one commit, not two"


def test_persistent_429_on_commit_is_transient_with_retry_after(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/commit/", status=429, headers={"Retry-After": "37"}, times=100)
    waits: list[float] = []
    r = make_remote(hub_server, sleep=waits.append, max_attempts=3)
    with pytest.raises(TransientRemoteError) as ei:
        r.put(_write(tmp_path / "a.pt", b"\0" * 10), "a.pt")
    assert ei.value.retry_after == 37.0 and ei.value.kind == "transient"
    assert str(ei.value) == ("hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the Hub is rate-limiting "
                             "requests (HTTP 429) (injected 429); retrying after 37s")
    assert waits == [37.0, 37.0] and hub_server.count("POST", r"/commit/") == 3
    hub_server.faults.clear()
    assert r.put(tmp_path / "a.pt", "a.pt").size == 10  # the next tick succeeds


def test_429_on_preupload_is_backed_off(hub_server: HubServer, token_env, tmp_path: Path):
    """huggingface_hub 2.x waits Retry-After and retries itself; 0.2x/0.3x does not: then the remote says when."""
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/preupload/", status=429, headers={"Retry-After": "0"})
    r = make_remote(hub_server)
    try:
        r.put(_write(tmp_path / "a.pt", b"\0" * 10), "a.pt")
    except TransientRemoteError as e:
        assert e.retry_after == 0.0
        r.put(tmp_path / "a.pt", "a.pt")
    assert hub_server.count("POST", r"/preupload/") == 2
    assert [f.path for f in r.list()] == ["a.pt"]


def test_5xx_on_lfs_put_is_retried(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.inject(method="PUT", port="cdn", path=r"/lfs-upload/", status=503)
    data = os.urandom(200_000)
    rec = make_remote(hub_server).put(_write(tmp_path / "a.pt", data), "a.pt")
    assert rec.sha256 == hash_file(tmp_path / "a.pt").sha256
    assert hub_server.count("PUT", r"/lfs-upload/") == 2


def test_persistent_5xx_on_commit_is_transient(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/commit/", status=502, times=100)
    with pytest.raises(TransientRemoteError) as ei:
        make_remote(hub_server, sleep=lambda s: None).put(_write(tmp_path / "a.txt", b"x"), "a.txt")
    assert "the Hub answered HTTP 502" in str(ei.value) and "it will be retried" in str(ei.value)
    assert hub_server.count("POST", r"/commit/") == 6, "max_attempts tries"


def test_dropped_connection_on_commit_is_transient(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/commit/", drop=True, times=100)
    with pytest.raises(TransientRemoteError) as ei:
        make_remote(hub_server, sleep=lambda s: None, max_attempts=2).put(_write(tmp_path / "a.txt", b"x"), "a.txt")
    assert str(ei.value).startswith(f"hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the connection "
                                    f"to {hub_server.endpoint} broke (")


def test_commit_whose_answer_was_lost_is_not_made_twice(hub_server: HubServer, token_env, tmp_path: Path):
    """A dropped connection after the Hub took the commit: the retry looks first and finds it done."""
    hub_server.create_repo(REPO)
    r = make_remote(hub_server, sleep=lambda s: None)
    hub_server.inject(method="POST", path=r"/commit/", lose=True)
    rec = r.put(_write(tmp_path / "a.pt", os.urandom(3000)), "a.pt")
    assert rec.sha256 == hash_file(tmp_path / "a.pt").sha256
    assert [k for k, *_ in hub_server.injected] == ["lose"]
    assert hub_server.count("POST", r"/commit/") == 1, "the commit was sent again"
    assert len(hub_server.commit_messages(REPO)) == 2


@pytest.mark.parametrize("route", [r"/paths-info/", r"/tree/", r"/resolve/"])
def test_lookups_and_downloads_are_retried(hub_server: HubServer, token_env, tmp_path: Path, route):
    """Every Hub call is retried on 5xx, 429 and dropped connections: lookups and downloads too."""
    r = make_remote(hub_server, sleep=lambda s: None)
    data = os.urandom(30_000)
    r.put(_write(tmp_path / "a.pt", data), "a.pt")
    hub_server.inject(path=route, status=503)
    hub_server.inject(path=route, status=429, headers={"Retry-After": "0"})
    hub_server.inject(path=route, drop=True)
    assert r.stat("a.pt").sha256 == hash_file(tmp_path / "a.pt").sha256
    assert [f.path for f in r.list()] == ["a.pt"]
    r.get("a.pt", tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == data
    assert len([1 for k, *_ in hub_server.injected]) == 3


def test_storage_quota_stops_the_tier(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/objects/batch", status=403, message=QUOTA_MESSAGE, times=100)
    with pytest.raises(RemoteQuotaError) as ei:
        make_remote(hub_server).put(_write(tmp_path / "a.pt", os.urandom(1000)), "a.pt")
    assert str(ei.value) == (
        f"hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: the Hub refused to store more data (HTTP 403) "
        f"({QUOTA_MESSAGE}); the hub tier stops until space is freed: delete old checkpoints from alice/ckpt and "
        "squash its history, or upgrade the plan")
    assert hub_server.count("POST", r"/objects/batch") == 1  # refused once, not retried


def test_401_mid_run_is_an_auth_error(hub_server: HubServer, token_env, tmp_path: Path):
    hub_server.create_repo(REPO)
    hub_server.inject(method="POST", path=r"/preupload/", status=401,
                      message="Invalid credentials in Authorization header")
    with pytest.raises(RemoteAuthError) as ei:
        make_remote(hub_server).put(_write(tmp_path / "a.pt", b"\0"), "a.pt")
    assert "the Hugging Face token from the HF_TOKEN environment variable was rejected (HTTP 401 " in str(ei.value)


def test_no_token_in_anything_captured(hub_server: HubServer, token_env, tmp_path: Path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    r = make_remote(hub_server)
    texts = []
    r.check_access()
    r.put(_write(tmp_path / "a.pt", os.urandom(5000)), "a.pt")
    r.get("a.pt", tmp_path / "b.pt")
    for fault in ({"status": 429, "headers": {"Retry-After": "5"}}, {"status": 401}, {"status": 403},
                  {"drop": True}):
        hub_server.inject(method="POST", path=r"/commit/", times=100, **fault)
        r.max_attempts, r._sleep = 2, (lambda s: None)
        with pytest.raises(Exception) as ei:
            r.put(_write(tmp_path / "c.txt", os.urandom(8).hex().encode()), "c.txt")
        texts += [str(ei.value), repr(ei.value), str(ei.value.__cause__)]
        hub_server.faults.clear()
    out, err = capfd.readouterr()
    texts += [out, err, caplog.text, repr(r), r.describe()]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for t in (hub_server.WRITE_TOKEN,):
        assert not any(t in x for x in texts)


def test_hf_endpoint_set_after_import_is_honoured_for_every_call(hub_server: HubServer, token_env,
                                                                  monkeypatch, tmp_path: Path):
    """huggingface_hub froze HF_ENDPOINT (unset) at import; the remote passes endpoint= itself."""
    import huggingface_hub
    assert huggingface_hub.constants.ENDPOINT == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    r = HubRemote("hub", REPO)
    r.check_access()
    data = os.urandom(40_000)
    r.put(_write(tmp_path / "a.pt", data), "a.pt")
    r.get("a.pt", tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == data
    assert hub_server.count("HEAD", r"/resolve/") == 1


@pytest.mark.parametrize("fault", ["503", "drop"])
@pytest.mark.parametrize("op", ["put", "check_access"])
def test_faulted_repo_creation_is_transient_not_missing(hub_server: HubServer, token_env, tmp_path: Path, op, fault):
    """A repo that does not exist yet is created on first use; a 503 on that creation is the Hub failing for a
    moment (retried on the next tick), never 'the repo does not exist' (which reads as a wrong repo id)."""
    if fault == "drop":
        hub_server.inject(method="POST", path=r"/api/repos/create", drop=True, times=100)
    else:
        hub_server.inject(method="POST", path=r"/api/repos/create", status=503, times=100,
                          headers={"Retry-After": "0"})
    r = make_remote(hub_server, sleep=lambda s: None, max_attempts=2)
    with pytest.raises(TransientRemoteError) as ei:
        if op == "put":
            r.put(_write(tmp_path / "a.pt", b"\0" * 10), "a.pt")
        else:
            r.check_access()
    assert ei.value.kind == "transient"
    assert str(ei.value).startswith(f"hub: creating model repo '{REPO}' failed: "
                                    + ("the Hub answered HTTP 503" if fault == "503" else "the connection to")), \
        str(ei.value)
    hub_server.faults.clear()
    if op == "put":
        assert r.put(tmp_path / "a.pt", "a.pt").size == 10   # the next tick creates the repo and uploads
    else:
        r.check_access()


@pytest.mark.parametrize("fault", ["503", "drop", "lost answer"])
def test_a_single_fault_at_repo_creation_is_retried_at_once(hub_server: HubServer, token_env, tmp_path: Path,
                                                            fault):
    """check_access() on a first run creates the repo; one 503, dropped connection or lost answer there is
    retried like every other call (it failed the preflight), and the repo is made once, private."""
    hub_server.inject(method="POST", path=r"/api/repos/create", status=503 if fault == "503" else None,
                      drop=fault == "drop", lose=fault == "lost answer")
    make_remote(hub_server, sleep=lambda s: None).check_access()
    assert hub_server.count("POST", r"/api/repos/create") == 2
    repo = hub_server.repo(REPO)
    assert repo is not None and repo.private is True


def test_huggingface_hub_retry_warnings_do_not_print_from_a_sync_thread(hub_server: HubServer, token_env,
                                                                        tmp_path: Path, caplog):
    """huggingface_hub retries some calls itself and warns through its own stderr handler; from colabkit's
    background sync that text landed in whatever notebook cell was running (training output). It goes to
    colabkit's log instead, at debug level, and a warning the user's own code gets from huggingface_hub still
    prints as before."""
    import io
    import logging
    import threading
    from huggingface_hub.utils import logging as hf_logging
    hf_root = hf_logging.get_logger("huggingface_hub")
    assert hf_root.handlers, "huggingface_hub has no handler of its own any more: re-check what prints its warnings"
    printed = io.StringIO()   # what huggingface_hub's own handler would print to stderr
    old = [h.setStream(printed) for h in hf_root.handlers if isinstance(h, logging.StreamHandler)]
    try:
        hub_server.create_repo(REPO)
        hub_server.inject(method="PUT", port="cdn", path=r"/lfs-upload/", status=503, headers={"Retry-After": "0"})
        r = make_remote(hub_server)
        caplog.set_level(logging.DEBUG, logger="colabkit")
        t = threading.Thread(target=r.put, args=(_write(tmp_path / "a.pt", os.urandom(200_000)), "a.pt"),
                             name="colabkit-sync-hub")
        t.start()
        t.join(60)
        assert not t.is_alive()
        assert hub_server.count("PUT", r"/lfs-upload/") == 2, "huggingface_hub did not retry: the test proves nothing"
        assert "Retry" not in printed.getvalue(), printed.getvalue()
        assert any("[Retry 1/" in rec.getMessage() and rec.levelno == logging.DEBUG
                   and rec.name.startswith("colabkit") for rec in caplog.records), \
            [rec.getMessage() for rec in caplog.records]
        hf_logging.get_logger("huggingface_hub.utils._http").warning("a warning outside colabkit")
        assert "a warning outside colabkit" in printed.getvalue()
    finally:
        for h, stream in zip([h for h in hf_root.handlers if isinstance(h, logging.StreamHandler)], old):
            h.setStream(stream)
