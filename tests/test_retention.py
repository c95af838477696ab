"""Retention and the disk guard: nothing without a verified remote copy is ever deleted."""
from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colabkit import retention, sync
from colabkit.config import load_config
from colabkit.ledger import Ledger
from tests.test_sync import ckpt, make_project, wait_for

TIERS = ("mirror", "vault")  # plain names: a tier named drive or hub would inherit that tier's default globs


def project_with(tmp: Path, *, keep_local=3, require_remote=(), min_free=None) -> Path:
    ret = {"keep_local": keep_local, "require_remote": list(require_remote)}
    if min_free is not None:
        ret["min_free"] = min_free
    return make_project(tmp, tiers=[{"name": n, "remote": "local", "path": str(tmp / f"remote_{n}"), "every": 0.1}
                                    for n in TIERS], retention=ret)


def hold(root: Path, tier: str, path: Path, *, sha: str | None = None, manifest: bool = True) -> None:
    """Record in `tier`'s ledger that it holds `path` (with its own sha256 unless told otherwise) and its
    manifest (unless `manifest` is False)."""
    cfg = load_config(start=root)
    led = Ledger.load(cfg.state_dir, tier)
    digest = sha or hashlib.sha256(path.read_bytes()).hexdigest()
    rel = cfg.remote_path(path)
    led.record(rel, remote_path=rel, size=path.stat().st_size, sha256=digest, md5=None, remote_id=rel,
               local_size=None, local_mtime_ns=None)
    man = path.with_name(path.name + ".json")
    if man.is_file() and manifest:   # sync uploads a checkpoint's manifest right after it
        led.record(rel + ".json", remote_path=rel + ".json", size=man.stat().st_size,
                   sha256=hashlib.sha256(man.read_bytes()).hexdigest(), md5=None, remote_id=rel + ".json",
                   local_size=None, local_mtime_ns=None)


def names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


def test_prune_deletes_only_old_synced_checkpoints_with_their_manifests(tmp_path):
    root = project_with(tmp_path, keep_local=2)
    cks = [ckpt(root, s) for s in (1, 2, 3, 4, 5)]
    plain = root / "checkpoints" / "v68_step_0.pt"  # a plain torch.save file: hashed against the ledger
    plain.write_bytes(b"plain checkpoint")
    hold(root, "mirror", plain)
    for c in cks[:4]:
        hold(root, "mirror", c)
    hold(root, "vault", cks[1], sha="0" * 64)  # a different content under the same path is not a copy
    removed = retention.prune(root / "checkpoints")
    assert names(removed) == ["v01_step_00000001.pt", "v01_step_00000002.pt", "v01_step_00000003.pt", "v68_step_0.pt"]
    left = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert left == ["v01_step_00000004.pt", "v01_step_00000004.pt.json", "v01_step_00000005.pt",
                    "v01_step_00000005.pt.json"]
    assert not plain.exists()


def test_a_checkpoint_whose_manifest_the_tier_lacks_is_kept(tmp_path):
    """A checkpoint is a unit: deleting it while its manifest's upload is still being retried would lose the
    manifest (the only copy)."""
    root = project_with(tmp_path, keep_local=1)
    cks = [ckpt(root, s) for s in (1, 2, 3)]
    hold(root, "mirror", cks[0], manifest=False)
    hold(root, "mirror", cks[1])
    assert names(retention.prune(root / "checkpoints")) == ["v01_step_00000002.pt"]
    assert cks[0].exists() and cks[0].with_name(cks[0].name + ".json").exists()


def test_require_remote_needs_every_named_tier(tmp_path):
    root = project_with(tmp_path, keep_local=1, require_remote=("mirror", "vault"))
    a, b, c = (ckpt(root, s) for s in (1, 2, 3))
    hold(root, "mirror", a)
    hold(root, "mirror", b)
    hold(root, "vault", b)
    assert names(retention.prune(root / "checkpoints")) == ["v01_step_00000002.pt"]
    assert a.exists() and c.exists()


def test_changed_local_file_is_not_deleted_on_a_stale_ledger(tmp_path):
    root = project_with(tmp_path, keep_local=1)
    a = root / "checkpoints" / "v01_step_00000001.pt"
    a.write_bytes(b"old")
    hold(root, "mirror", a)
    a.write_bytes(b"new content")  # overwritten after the upload: the remote copy is not this file
    ckpt(root, 2)
    assert retention.prune(root / "checkpoints") == []
    assert a.read_bytes() == b"new content"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(min_value=1, max_value=7),
    held=st.lists(st.tuples(st.sampled_from(["none", "same", "other"]), st.sampled_from(["none", "same", "other"]),
                            st.booleans()), min_size=7, max_size=7),
    keep=st.integers(min_value=1, max_value=4),
    require=st.sampled_from([(), ("mirror",), ("vault",), ("mirror", "vault")]),
    pressure=st.booleans(),
)
def test_retention_never_deletes_an_unsynced_checkpoint(n, held, keep, require, pressure):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = project_with(tmp, keep_local=keep, require_remote=require)
        cks, synced = [], {}
        for i in range(n):
            drive_state, hub_state, manifest = held[i]
            c = ckpt(root, i + 1, size=100 + i, manifest=manifest)
            holders = set()
            for tier, state in (("mirror", drive_state), ("vault", hub_state)):
                if state != "none":
                    hold(root, tier, c, sha=None if state == "same" else "f" * 64)
                if state == "same":
                    holders.add(tier)
            ok = bool(holders) and (set(require) <= holders if require else True)
            cks.append(c)
            synced[c.name] = ok
        before = {c.name: c.read_bytes() for c in cks}
        if pressure:
            retention.make_room(root / "checkpoints", 10**18)  # more than any disk: delete what may go
            removed = sorted(k for k in before if not (root / "checkpoints" / k).exists())
        else:
            removed = names(retention.prune(root / "checkpoints"))
        for name in removed:
            assert synced[name], f"{name} was deleted without a verified copy"
            assert not (root / "checkpoints" / (name + ".json")).exists()
        assert cks[-1].exists(), "the newest checkpoint is always kept"
        if not pressure:  # prune removes exactly the synced ones older than the newest `keep`
            expected = sorted(c.name for c in cks[: max(n - keep, 0)] if synced[c.name])
            assert removed == expected
        for c in cks:
            if c.exists():
                assert c.read_bytes() == before[c.name]


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MB tmpfs inside a project, mounted at <project>/checkpoints (tests run as root)."""
    root = project_with(tmp_path, keep_local=3, min_free=1_500_000)
    mnt = root / "checkpoints"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {r.stderr.strip()}")
    try:
        yield root
    finally:
        sync.stop(flush=False)
        subprocess.run(["umount", str(mnt)], check=True)


def fill(root: Path, steps, size=900_000) -> list[Path]:
    return [ckpt(root, s, size=size) for s in steps]


def test_disk_full_guard_deletes_synced_and_refuses_unsynced(tmpfs, caplog):
    root = tmpfs
    d = root / "checkpoints"
    a, b, c = fill(root, (1, 2, 3))  # ~2.7 MB of 4 MB
    hold(root, "mirror", a)
    freed = retention.make_room(d, 2_300_000)
    assert freed >= 900_000 and not a.exists() and b.exists() and c.exists()
    assert retention.guard_status()[str(d)]["state"] == "pruned"
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="colabkit.retention"):
        freed = retention.make_room(d, 3_900_000)  # only unsynced ones left: nothing may go
        assert freed == 0 and b.exists() and c.exists()
        again = retention.make_room(d, 3_900_000)  # the same situation on the next tick: not repeated loudly
    assert again == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("disk guard: ")
    assert warnings[0].endswith(
        "nothing more can be deleted: 2 checkpoint(s) have no verified remote copy "
        "(v01_step_00000002.pt, v01_step_00000003.pt); run 'colabkit sync flush' or free space by hand")
    assert retention.guard_status()[str(d)]["state"] == "blocked"


def test_sync_tick_runs_the_disk_guard(tmpfs, tmp_path):
    """The guard runs on every tick: once the tiers hold verified copies, old checkpoints make room."""
    root = tmpfs
    d = root / "checkpoints"
    cks = fill(root, (1, 2, 3))  # 2.7 MB used: less than min_free (1.5 MB) left
    before = [c.read_bytes() for c in cks]
    g = sync.start(config=load_config(start=root), every=0.1)
    wait_for(lambda: not cks[0].exists(), timeout=30, what="the guard to prune")
    assert (tmp_path / "remote_mirror" / "checkpoints" / cks[0].name).read_bytes() == before[0]
    # only as much as min_free needs: the other (synced) checkpoints inside keep_local stay
    wait_for(lambda: g.status()["disk"].get(str(d), {}).get("state") in ("ok", "pruned"), what="guard status")
    assert cks[1].exists() and cks[2].exists()
    assert not (d / (cks[0].name + ".json")).exists()


def test_checkpointer_save_makes_room_through_the_guard(tmpfs):
    torch = pytest.importorskip("torch")
    from colabkit.checkpoints import Checkpointer
    from colabkit.errors import DiskFullError
    root = tmpfs
    d = root / "checkpoints"
    state = {"w": torch.zeros(300_000)}  # ~1.2 MB: three fit in 4 MiB, four do not
    with Checkpointer(d, prefix="v01") as ck:
        first = ck.save(1, state)
        ck.save(2, state)
        ck.save(3, state)
        with pytest.raises(DiskFullError):
            ck.save(4, state)  # nothing synced: nothing may be deleted, the save fails cleanly
        assert first.exists()
        hold(root, "mirror", first)
        ck.save(4, state)  # the guard deletes the synced one and the save succeeds
    assert not first.exists() and (d / "v01_step_00000004.pt").exists()
