"""Retention and the disk guard with checkpoint folders: a folder goes only when every file of it has a
verified copy in the required tiers, and then it goes whole."""
from __future__ import annotations

from pathlib import Path

from colabkit import retention, sync
from colabkit.checkpoints import Checkpointer
from colabkit.config import load_config
from colabkit.distributed import FOLDER_MANIFEST, discover_units
from colabkit.ledger import Ledger
from tests.test_retention import project_with
from tests.test_units_sync import sharded


def steps(d: Path) -> list[int]:
    return [u.step for u in discover_units(d)]


def _copy_ledger(cfg, src: str, dst: str, *, without: set[str]) -> None:
    """`dst`'s ledger records what `src`'s does, less `without` (as if those uploads were never verified)."""
    a, b = Ledger.load(cfg.state_dir, src), Ledger.load(cfg.state_dir, dst)
    for rel, e in a.entries.items():
        if rel not in without:
            b.record(rel, **{k: e.get(k) for k in ("remote_path", "size", "sha256", "md5", "remote_id",
                                                     "local_size", "local_mtime_ns")}, save=False)
            b.entries[rel].update({k: v for k, v in e.items() if k == "files"})
    b.save()


def test_a_folder_is_deleted_only_when_every_required_tier_holds_every_file(tmp_path):
    root = project_with(tmp_path, keep_local=1, require_remote=("mirror", "vault"))
    folders = [sharded(root, s) for s in (1, 2, 3)]
    cfg = load_config(start=root)
    ck = root / "checkpoints"
    assert sync.once(config=cfg, tiers=["mirror"])["ok"]
    assert retention.prune(ck, config=cfg) == []          # vault holds nothing yet
    assert steps(ck) == [1, 2, 3]
    # vault holds everything but one shard of step 1 and the manifest of step 2: both stay
    shard = next(p.name for p in folders[0].iterdir() if p.suffix == ".distcp")
    _copy_ledger(cfg, "mirror", "vault", without={f"checkpoints/{folders[0].name}/{shard}",
                                                  f"checkpoints/{folders[1].name}/{FOLDER_MANIFEST}"})
    assert retention.prune(ck, config=cfg) == []
    assert steps(ck) == [1, 2, 3]
    # the sync of vault uploads what it lacks, and its tick prunes: both older folders go, whole
    assert sync.once(config=cfg, tiers=["vault"])["ok"]
    assert steps(ck) == [3]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", folders[2].name]   # no half-deleted folder


def test_checkpointer_keep_prunes_sharded_folders_once_they_are_synced(tmp_path):
    root = project_with(tmp_path, keep_local=5)
    cfg = load_config(start=root)
    ck = Checkpointer(root / "checkpoints", prefix="v01", sharded=True, keep=1)
    import torch
    ck.save(1, {"w": torch.ones(10)})
    ck.save(2, {"w": torch.ones(10) * 2})
    assert steps(root / "checkpoints") == [1, 2]            # nothing is synced: keep never deletes
    assert sync.once(config=cfg, tiers=["mirror"])["ok"]
    ck.save(3, {"w": torch.ones(10) * 3})
    assert steps(root / "checkpoints") == [3]               # 1 and 2 have verified copies; 3 is the newest


def test_the_disk_guard_counts_folders_and_names_the_unsynced_ones(tmp_path):
    root = project_with(tmp_path, keep_local=1)
    cfg = load_config(start=root)
    a, b = sharded(root, 1), sharded(root, 2)
    ck = root / "checkpoints"
    freed = retention.make_room(ck, 10 ** 18, config=cfg)
    assert freed == 0 and steps(ck) == [1, 2]
    msg = retention.guard_status()[str(ck)]["message"]
    assert "nothing more can be deleted: 2 checkpoint(s) have no verified remote copy " \
           f"({a.name}, {b.name})" in msg
    assert sync.once(config=cfg, tiers=["mirror"])["ok"]
    size = discover_units(ck)[0].size
    assert steps(ck) == [2]       # the sync tick already pruned beyond keep_local (the newest always stays)
    assert size > 0


def test_the_disk_guard_says_when_it_deletes_inside_keep_local(tmp_path, caplog):
    """The guard deleting a synced checkpoint the user asked to keep (keep_local) is worth a line in sync.log
    (the soak counted only the guard's warnings and a sampled dip, and missed it under load)."""
    import logging
    root = project_with(tmp_path, keep_local=5)
    cfg = load_config(start=root)
    a, b = sharded(root, 1), sharded(root, 2)
    assert sync.once(config=cfg, tiers=["mirror"])["ok"]
    ck = root / "checkpoints"
    assert steps(ck) == [1, 2]                      # keep_local 5: retention keeps both
    with caplog.at_level(logging.INFO, logger="colabkit.retention"):
        retention.make_room(ck, 10 ** 18, config=cfg)   # more than any disk: delete what may go
    assert steps(ck) == [2]                         # the newest always stays
    assert f"disk guard: deleted {a.name} inside retention.keep_local (it has verified copies) to keep " \
           f"{10 ** 18} bytes free in {ck}" in caplog.text
