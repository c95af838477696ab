"""Checkpoint folders: colabkit's sharded (DCP) saves and folders other tools wrote, in one process.

The multi-process behaviour (DDP on rank 0 only, DTensor shards from 2 ranks, async saves) runs under real
torchrun at the end of this file; kill -9 during a sharded save is in test_distributed_kill.py.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from colabkit.checkpoints import LATEST, Checkpointer
from colabkit.distributed import (FOLDER_MANIFEST, MEGATRON_TRACKER, discover_units, load_latest_unit, load_unit,
                                  remove_stale_folders, verify_unit)
from colabkit.errors import CheckpointError, IntegrityError, NoCheckpointError
from colabkit.fsutil import TMP_PREFIX, sha256_file

ROOT = Path(__file__).resolve().parent.parent


def _state(v: float) -> dict:
    return {"step": int(v), "model": {"w": torch.full((16, 4), v), "b": torch.arange(4.0) + v}}


def _template() -> dict:
    return {"step": 0, "model": {"w": torch.zeros(16, 4), "b": torch.zeros(4)}}


def _flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- colabkit's own folders --------------------------------------------------------------------------
def test_sharded_save_writes_a_folder_with_its_manifest_and_moves_latest(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True, run_id="r1")
    final = ck.save(100, _state(1.0))
    assert final == tmp_path / "v01_step_00000100" and final.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["latest", "v01_step_00000100"]  # no temporary left
    m = json.loads((final / FOLDER_MANIFEST).read_text())
    assert (m["format"], m["kind"], m["step"], m["world_size"], m["run_id"], m["folder"]) == (
        1, "dcp", 100, 1, "r1", "v01_step_00000100")
    on_disk = sorted(n for n in os.listdir(final) if n != FOLDER_MANIFEST)
    assert [f["path"] for f in m["files"]] == on_disk == [".metadata", "__0_0.distcp"]
    for f in m["files"]:
        assert f["size"] == (final / f["path"]).stat().st_size and f["sha256"] == sha256_file(final / f["path"])
    assert m["size"] == sum(f["size"] for f in m["files"])
    assert json.loads((tmp_path / LATEST).read_text()) == {"format": 1, "file": "v01_step_00000100", "step": 100,
                                                            "kind": "folder"}
    [unit] = discover_units(tmp_path)
    assert (unit.kind, unit.step, unit.size, unit.is_folder) == ("folder", 100, m["size"], True)


def test_load_latest_loads_a_folder_into_the_state_given_or_whole(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    template = _template()
    got = Checkpointer(tmp_path, prefix="v01").load_latest(state=template)
    assert got is template and got["step"] == 2 and torch.equal(template["model"]["w"], torch.full((16, 4), 2.0))
    whole = ck.load_latest()  # no state given: everything read into memory
    assert whole["step"] == 2 and torch.equal(whole["model"]["b"], torch.arange(4.0) + 2)
    assert ck.loaded.path == tmp_path / "v01_step_00000002" and ck.loaded.step == 2


def test_async_sharded_save_keeps_the_values_at_save_time(tmp_path):
    w = torch.full((1000,), 5.0)
    with Checkpointer(tmp_path, prefix="a", sharded=True, async_save=True) as ck:
        ck.save(1, {"w": w})
        w.fill_(-1.0)
        ck.save(2, {"w": w})  # waits for step 1 first: at most one write in flight
        w.fill_(-2.0)
    assert torch.equal(load_unit(discover_units(tmp_path)[0])["w"], torch.full((1000,), 5.0))
    assert torch.equal(load_unit(discover_units(tmp_path)[1])["w"], torch.full((1000,), -1.0))


def test_async_sharded_save_error_is_raised_at_the_next_save(tmp_path):
    ck = Checkpointer(tmp_path, prefix="a", sharded=True, async_save=True)
    ck.save(1, {"w": torch.ones(3)})
    ck.save(2, {"w": torch.ones(3), "fn": lambda: 0})  # staged, then fails in the background (cannot pickle)
    with pytest.raises(CheckpointError) as e:
        ck.save(3, {"w": torch.ones(3)})
    assert str(e.value) == ("sharded checkpoint step 2 was not saved (rank 0: AttributeError: Can't pickle local "
                            "object 'test_async_sharded_save_error_is_raised_at_the_next_save.<locals>.<lambda>'); the previous "
                            "checkpoint is intact")
    ck.close()
    assert [u.step for u in discover_units(tmp_path)] == [1]  # nothing of step 2 left, step 3 not started
    assert sorted(os.listdir(tmp_path)) == ["a_step_00000001", "latest"]


def test_the_interpreter_waits_at_exit_for_an_async_sharded_write(tmp_path):
    code = ("import torch\nfrom colabkit.checkpoints import Checkpointer\n"
            f"ck = Checkpointer({str(tmp_path)!r}, prefix='x', sharded=True, async_save=True)\n"
            "ck.save(9, {'w': torch.full((2_000_000,), 9.0)})\n")  # no close(): the exit hook must wait
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    [unit] = discover_units(tmp_path)
    verify_unit(unit)
    assert unit.name == "x_step_00000009" and torch.equal(load_unit(unit)["w"], torch.full((2_000_000,), 9.0))


def test_a_sharded_save_that_fails_leaves_nothing_and_says_why(tmp_path):
    ck = Checkpointer(tmp_path, prefix="a", sharded=True)
    with pytest.raises(CheckpointError) as e:
        ck.save(1, {"w": torch.ones(3), "fn": lambda: 0})
    assert str(e.value) == ("sharded checkpoint step 1 was not saved (rank 0: AttributeError: Can't pickle local "
                            "object 'test_a_sharded_save_that_fails_leaves_nothing_and_says_why.<locals>.<lambda>'); the previous "
                            "checkpoint is intact")
    assert os.listdir(tmp_path) == []


def test_shards_that_other_ranks_wrote_elsewhere_are_a_clear_error(tmp_path):
    from colabkit.distributed import DistributedSaver
    saver = DistributedSaver(Checkpointer(tmp_path, prefix="v01"))
    tmp = tmp_path / f"{TMP_PREFIX}v01_step_00000001.x-1"
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"m")
    files = [{"path": ".metadata", "size": 1, "sha256": "0"}, {"path": "__1_0.distcp", "size": 9, "sha256": "0"}]
    with pytest.raises(CheckpointError) as e:
        saver._commit(1, tmp, tmp_path / "v01_step_00000001", files)  # rank 1 wrote its shard on another node
    assert str(e.value) == (f"__1_0.distcp written by other ranks are not in rank 0's {tmp}: a sharded checkpoint "
                            "needs a folder every rank shares (one node, or a shared file system)")
    assert not (tmp_path / "v01_step_00000001").exists()


def test_corrupt_shard_falls_back_to_the_previous_folder_and_says_why(tmp_path, caplog):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    shard = tmp_path / "v01_step_00000002" / "__0_0.distcp"
    _flip_byte(shard)
    with pytest.raises(IntegrityError, match=r"__0_0.distcp: sha256 .* does not match its manifest's .* \(corrupt\)"):
        verify_unit(discover_units(tmp_path)[-1])
    with caplog.at_level(logging.WARNING, logger="colabkit.distributed"):
        got = ck.load_latest(state=_template())
    assert got["step"] == 1
    assert "checkpoint v01_step_00000002 is not usable" in caplog.text
    assert "falling back to v01_step_00000001" in caplog.text
    assert "resumed from v01_step_00000001 (step 1) after skipping 1 corrupt or partial checkpoint(s)" in caplog.text


def test_ranks_verify_disjoint_shares_that_cover_the_folder(tmp_path):
    from colabkit.distributed import _verify_manifest_folder
    Checkpointer(tmp_path, prefix="v01", sharded=True).save(1, _state(1.0))
    [unit] = discover_units(tmp_path)
    for name in [f["path"] for f in unit.manifest["files"]]:
        original = (unit.path / name).read_bytes()
        _flip_byte(unit.path / name, offset=len(original) // 2)
        failing = []
        for rank in range(3):  # three ranks, two files: one rank has nothing to hash
            try:
                _verify_manifest_folder(unit, share=(rank, 3))
            except IntegrityError as e:
                failing.append((rank, name in str(e)))
        assert len(failing) == 1 and failing[0][1], (name, failing)
        (unit.path / name).write_bytes(original)


def test_missing_or_truncated_shard_is_refused_and_none_valid_says_each_reason(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    one, two = tmp_path / "v01_step_00000001", tmp_path / "v01_step_00000002"
    (one / "__0_0.distcp").unlink()
    data = (two / "__0_0.distcp").read_bytes()
    (two / "__0_0.distcp").write_bytes(data[:100])
    with pytest.raises(NoCheckpointError) as e:
        ck.load_latest(state=_template())
    assert str(e.value) == (
        f"no valid checkpoint in {tmp_path}: v01_step_00000002: {two / '__0_0.distcp'}: 100 bytes, its manifest says "
        f"{len(data)} (truncated or partial); v01_step_00000001: {one / '__0_0.distcp'}: missing (listed in "
        f"{FOLDER_MANIFEST}); fetch one from a remote with 'colabkit resume'")


def test_a_folder_without_its_manifest_or_under_a_temporary_name_is_not_a_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    (tmp_path / "v01_step_00000002" / FOLDER_MANIFEST).unlink()  # the rank-0 step never ran
    # what a killed save leaves: a temporary folder with shards and no live writer
    dead = tmp_path / f"{TMP_PREFIX}v01_step_00000003.0123456789ab-1"
    dead.mkdir()
    (dead / "__0_0.distcp").write_bytes(b"x" * 10)
    (dead / ".colabkit-writing").write_bytes(b"")  # its lock file, no longer locked by anyone
    young = tmp_path / f"{TMP_PREFIX}v01_step_00000004.0123456789ab-2"
    young.mkdir()  # just made by a writer about to take its lock: left alone
    old = tmp_path / f"{TMP_PREFIX}v01_step_00000005.0123456789ab-3"
    old.mkdir()  # the writer died before it took its lock, a while ago
    os.utime(old, (1_000_000_000, 1_000_000_000))
    # v01_step_00000002 still has DCP's .metadata: discovered as a foreign DCP folder, verified by loading it
    assert [(u.name, u.kind) for u in discover_units(tmp_path)] == [("v01_step_00000001", "folder"),
                                                                      ("v01_step_00000002", "dcp")]
    # named by the save's rank 0 (the token carries its owner tag): one whose rank 0 is gone is abandoned at once,
    # lock or no lock (another rank made it before rank 0 took the lock, then the group was killed); one whose
    # rank 0 lives is left to it
    import subprocess
    import sys
    from colabkit.fsutil import owner_tag
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{TMP_PREFIX}v01_step_00000006.{owner_tag(int(gone.stdout))}-abcdef-1"
    orphan.mkdir()
    (orphan / "__1_0.distcp").write_bytes(b"x" * 10)   # rank 1's shard; rank 0 never got to its lock
    mine = tmp_path / f"{TMP_PREFIX}v01_step_00000007.{owner_tag()}-abcdef-2"
    mine.mkdir()
    assert sorted(remove_stale_folders(tmp_path)) == [dead, old, orphan] and young.is_dir() and mine.is_dir()
    young.rmdir()
    mine.rmdir()
    (tmp_path / "v01_step_00000002" / ".metadata").unlink()
    assert [u.name for u in discover_units(tmp_path)] == ["v01_step_00000001"]


def test_load_of_a_folder_path_verifies_it_first(tmp_path):
    ck = Checkpointer(tmp_path / "c", prefix="v01", sharded=True)
    final = ck.save(4, _state(4.0))
    template = _template()
    assert ck.load(final, state=template) is template and template["step"] == 4
    _flip_byte(final / "__0_0.distcp")
    with pytest.raises(IntegrityError, match=r"__0_0.distcp: sha256 .* \(corrupt\)"):
        ck.load(final, state=_template())
    _dcp_save(_state(8.0), tmp_path / "final")  # any name will do for a path given explicitly
    assert ck.load(tmp_path / "final", state=_template())["step"] == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoCheckpointError) as e:
        ck.load(tmp_path / "empty")
    assert str(e.value) == (f"{tmp_path / 'empty'}: not a complete checkpoint folder (no {FOLDER_MANIFEST}, "
                            ".metadata, safetensors index or tracked Megatron iteration); check --resume-from / the "
                            "path given")


def test_a_prefix_with_dots_still_names_discoverable_folders(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v0.1", sharded=True)
    ck.save(3, _state(3.0))
    assert [(u.name, u.step) for u in ck.units()] == [("v0.1_step_00000003", 3)]
    assert ck.load_latest()["step"] == 3


def test_a_new_checkpointer_removes_what_a_killed_sharded_save_left(tmp_path):
    dead = tmp_path / f"{TMP_PREFIX}v01_step_00000003.0123456789ab-1"
    dead.mkdir(parents=True)
    (dead / "__0_0.distcp").write_bytes(b"x" * 10)
    (dead / ".colabkit-writing").write_bytes(b"")
    Checkpointer(tmp_path, prefix="v01")
    assert os.listdir(tmp_path) == []


def test_resaving_a_step_replaces_the_folder(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(5, _state(1.0))
    ck.save(5, _state(7.0))
    assert sorted(os.listdir(tmp_path)) == ["latest", "v01_step_00000005"]
    assert ck.load_latest()["step"] == 7


def test_a_state_that_does_not_fit_the_folder_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", sharded=True)
    ck.save(1, {"w": torch.ones(4)})
    with pytest.raises(CheckpointError, match=r"v01_step_00000001: does not fit the state passed in \(.*\); pass a "
                                              r"state dict with the keys and shapes that were saved"):
        ck.load_latest(state={"other": torch.zeros(4)})
    with pytest.raises(CheckpointError) as e:
        ck.load_latest(state=[torch.zeros(4)])
    assert str(e.value) == ("state=list cannot receive v01_step_00000001: pass the state dict to load into, e.g. "
                            "{'model': model.state_dict(), 'optim': opt.state_dict()}")


def test_bad_sharded_option_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path, sharded="yes")
    assert str(e.value) == "sharded='yes' must be True, False or None (None: when the state holds DTensor shards)"


def test_files_and_folders_are_one_ordered_list_of_units(tmp_path):
    Checkpointer(tmp_path, prefix="v01").save(1, _state(1.0))
    Checkpointer(tmp_path, prefix="v01", sharded=True).save(2, _state(2.0))
    torch.save(_state(3.0), tmp_path / "model_step_3.pt")
    units = discover_units(tmp_path)
    assert [(u.name, u.kind, u.step) for u in units] == [("v01_step_00000001.pt", "file", 1),
                                                         ("v01_step_00000002", "folder", 2),
                                                         ("model_step_3.pt", "file", 3)]
    for u in units:
        verify_unit(u)
    unit, state = load_latest_unit(tmp_path)
    assert unit.name == "model_step_3.pt" and state["step"] == 3


# -- folders other tools wrote -----------------------------------------------------------------------
def _dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def test_foreign_dcp_folder_is_discovered_verified_by_loading_and_loaded(tmp_path, caplog):
    _dcp_save(_state(1.0), tmp_path / "checkpoint-100")
    _dcp_save(_state(2.0), tmp_path / "checkpoint-200")
    units = discover_units(tmp_path)
    assert [(u.name, u.kind, u.step, u.verified_by_hash) for u in units] == [("checkpoint-100", "dcp", 100, False),
                                                                             ("checkpoint-200", "dcp", 200, False)]
    shard = tmp_path / "checkpoint-200" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(IntegrityError, match=rf"__0_0.distcp: {size // 2} bytes, .metadata needs \d+ \(truncated\)"):
        verify_unit(units[1])
    with caplog.at_level(logging.WARNING, logger="colabkit.distributed"):
        got = Checkpointer(tmp_path).load_latest(state=_template())
    assert got["step"] == 1 and "falling back to checkpoint-100" in caplog.text


def test_foreign_dcp_folder_with_a_corrupt_tensor_fails_to_load(tmp_path):
    _dcp_save({"w": torch.ones(10000)}, tmp_path / "step_5")
    shard = tmp_path / "step_5" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    shard.write_bytes(bytes(data))
    [unit] = discover_units(tmp_path)
    with pytest.raises(IntegrityError, match=r"__0_0.distcp: w fails its CRC check in record .* \(corrupt\)"):
        verify_unit(unit)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data)."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_hf_safetensors_folder_with_an_index_is_discovered_verified_and_loaded(tmp_path):
    for step in (100, 200):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        _write_safetensors(folder / "model-00001-of-00002.safetensors", {"a.weight": torch.full((3, 2), step / 1.0)})
        _write_safetensors(folder / "model-00002-of-00002.safetensors", {"b.bias": torch.arange(5)})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}}))
    units = discover_units(tmp_path)
    assert [(u.name, u.kind, u.step) for u in units] == [("checkpoint-100", "safetensors", 100),
                                                         ("checkpoint-200", "safetensors", 200)]
    unit, state = load_latest_unit(tmp_path)
    assert unit.step == 200 and sorted(state) == ["a.weight", "b.bias"]
    assert torch.equal(state["a.weight"], torch.full((3, 2), 200.0)) and torch.equal(state["b.bias"], torch.arange(5))
    shard = tmp_path / "checkpoint-200" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(IntegrityError) as e:
        verify_unit(units[1])
    assert str(e.value) == f"{shard}: its tensors need 40 data bytes, the file holds 32 (truncated)"
    unit, state = load_latest_unit(tmp_path)
    assert unit.step == 100


def test_hf_folder_without_index_or_weights_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")  # HF writes the weights before it
    assert discover_units(tmp_path) == []
    _write_safetensors(tmp_path / "checkpoint-5" / "model.safetensors", {"w": torch.ones(2)})
    [unit] = discover_units(tmp_path)
    assert unit.kind == "safetensors" and torch.equal(load_unit(unit)["w"], torch.ones(2))


def test_megatron_iteration_folders_follow_the_tracker_file(tmp_path):
    for it in (100, 200):
        (tmp_path / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
        torch.save({"iteration": it, "model": {"w": torch.full((4,), float(it))}},
                   tmp_path / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    assert discover_units(tmp_path) == []  # no tracker: Megatron has finished no save
    (tmp_path / MEGATRON_TRACKER).write_text("100")
    assert [(u.name, u.kind) for u in discover_units(tmp_path)] == [("iter_0000100", "megatron")]  # 200 unfinished
    (tmp_path / MEGATRON_TRACKER).write_text("200")
    unit, state = load_latest_unit(tmp_path)
    assert unit.name == "iter_0000200" and state["iteration"] == 200
    pt = tmp_path / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt"
    _flip_byte(pt, offset=200)
    with pytest.raises(IntegrityError, match="model_optim_rng.pt: .*(CRC|not a readable)"):
        verify_unit(discover_units(tmp_path)[-1])
    unit, state = load_latest_unit(tmp_path)
    assert unit.name == "iter_0000100" and torch.equal(state["model"]["w"], torch.full((4,), 100.0))


# -- real torchrun, 2 ranks, gloo ----------------------------------------------------------------------
def test_ddp_and_dtensor_checkpoints_under_torchrun_then_resharded_to_one_process(tmp_path):
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    Checkpointer(tmp_path / "one", prefix="o", sharded=True).save(7, {"w": full * 7, "step": 7})  # world size 1
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist_child.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by = {(r["part"], r["rank"]): r for r in lines}
    # DDP: rank 1 returned at once and wrote nothing; rank 0 wrote the file; both loaded it
    assert by["ddp-save", 1]["exists"] is False and by["ddp-save", 0]["exists"] is True
    for rank in (0, 1):
        assert by["ddp-load", rank] == {"rank": rank, "part": "ddp-load", "step": 2, "same": True,
                                        "loaded": "d_step_00000002.pt"}
    assert sorted(os.listdir(tmp_path / "ddp")) == ["d_step_00000002.pt", "d_step_00000002.pt.json", "latest"]
    # sharded: one folder per step, each rank's shard in it, loaded back on both ranks
    for rank in (0, 1):
        r = by["sharded-load", rank]
        assert (r["step"], r["same"], r["loaded"]) == (2, True, "s_step_00000002")
        assert r["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", FOLDER_MANIFEST]
    m = json.loads((tmp_path / "sharded" / "s_step_00000002" / FOLDER_MANIFEST).read_text())
    assert m["world_size"] == 2 and [f["path"] for f in m["files"]] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # a corrupt shard of the newest folder: rank 0 refused it, both ranks loaded step 1
    for rank in (0, 1):
        assert by["fallback", rank] == {"rank": rank, "part": "fallback", "step": 1, "same": True,
                                        "loaded": "s_step_00000001"}
        # closing the Checkpointer ended the threads of its process group (before, a group lived until the
        # interpreter's exit, where a gloo thread still freeing a collective's tensors aborted the rank: exit -6)
        assert by["close", rank]["released"] > 0, by["close", rank]
        # a folder saved by one process, resharded onto the DTensors of 2 ranks
        assert by["reshard", rank] == {"rank": rank, "part": "reshard", "step": 7, "same": True}
    assert "checkpoint s_step_00000002 is not usable" in proc.stderr and "__1_0.distcp: sha256" in proc.stderr
    # resharded on load: the folders 2 ranks wrote, read by one process into whole tensors
    for step, want in ((1, full),):
        template = {"w": torch.zeros(8, 4), "step": 0}
        unit = [u for u in discover_units(tmp_path / "sharded") if u.step == step][0]
        verify_unit(unit)
        got = load_unit(unit, state=template)
        assert got["step"] == step and torch.equal(template["w"], want)
    # the folder 2 ranks wrote, synced to a tier and resumed on an empty disk by one process (world size 1)
    import shutil

    import yaml

    from colabkit import sync
    from colabkit.config import load_config
    from colabkit.resume import fetch, locate
    shutil.rmtree(tmp_path / "sharded" / "s_step_00000002")       # the one corrupted above
    (tmp_path / "colabkit.yaml").write_text(yaml.safe_dump({
        "tiers": [{"name": "backup", "remote": "local", "path": str(tmp_path / "tier"), "every": 3600}],
        "resume": {"priority": ["local", "backup"]}, "sync": {"settle": 0.1}}))
    cfg = load_config(start=tmp_path)
    assert sync.once(paths=[tmp_path / "sharded"], config=cfg)["ok"]
    shutil.rmtree(tmp_path / "sharded")
    plan = locate(config=cfg, directory=tmp_path / "sharded")
    assert (plan.choice.source, plan.choice.step, plan.choice.folder) == ("backup", 1, True)
    path = fetch(plan, progress=False)
    assert path == tmp_path / "sharded" / "s_step_00000001"
    template = {"w": torch.zeros(8, 4), "step": 0}
    got = Checkpointer(path.parent, prefix="s").load(path, state=template)
    assert got["step"] == 1 and torch.equal(template["w"], full)


def test_async_sharded_saves_reuse_their_staging_copy_and_follow_a_state_that_changes_shape(tmp_path):
    # the staging copy is kept between async saves; a state that gains keys or changes shape is staged afresh
    w = torch.full((1000,), 1.0)
    with Checkpointer(tmp_path, prefix="a", sharded=True, async_save=True) as ck:
        ck.save(1, {"w": w, "step": 1})
        w.fill_(2.0)
        ck.save(2, {"w": w, "step": 2})   # same structure: copied into the same buffers
        w.fill_(3.0)
        ck.save(3, {"w": w, "step": 3, "opt": {"m": torch.full((10,), 7.0)}})   # an optimizer state appears
        ck.save(4, {"w": torch.arange(6.0).reshape(2, 3), "step": 4})          # and a shape changes
        w.fill_(-1.0)
    units = discover_units(tmp_path)
    assert [u.step for u in units] == [1, 2, 3, 4]
    got = [load_unit(u) for u in units]
    assert [g["step"] for g in got] == [1, 2, 3, 4]
    assert torch.equal(got[0]["w"], torch.full((1000,), 1.0)) and torch.equal(got[1]["w"], torch.full((1000,), 2.0))
    assert torch.equal(got[2]["w"], torch.full((1000,), 3.0)) and torch.equal(got[2]["opt"]["m"], torch.full((10,), 7.0))
    assert torch.equal(got[3]["w"], torch.arange(6.0).reshape(2, 3)) and "opt" not in got[3]


def test_async_sharded_saves_stage_parameters_empty_and_scalar_tensors_into_one_reused_copy(tmp_path):
    # what a real state holds besides plain weights: a Parameter, an empty buffer, a 0-dim step counter, a list;
    # the second save copies into the buffers the first one allocated (no new allocation while training waits)
    p = torch.nn.Parameter(torch.full((64,), 1.5))
    state = {"p": p, "empty": torch.empty(0, 3), "count": torch.tensor(7), "hist": [torch.ones(2), 3]}
    with Checkpointer(tmp_path, prefix="b", sharded=True, async_save=True) as ck:
        ck.save(1, state)
        stager = ck._distributed._stager
        first = stager.state_dict_cache["p"].data_ptr()
        with torch.no_grad():
            p.fill_(2.5)
        state["count"] = torch.tensor(8)
        ck.save(2, state)
        assert stager.state_dict_cache["p"].data_ptr() == first, "the staging copy was allocated again"
        with torch.no_grad():
            p.fill_(-1.0)   # after save() returned: not in checkpoint 2
    got = [load_unit(u) for u in discover_units(tmp_path)]
    assert torch.equal(got[0]["p"], torch.full((64,), 1.5)) and torch.equal(got[1]["p"], torch.full((64,), 2.5))
    assert int(got[0]["count"]) == 7 and int(got[1]["count"]) == 8
    assert got[1]["empty"].shape == (0, 3) and torch.equal(got[1]["hist"][0], torch.ones(2)) and got[1]["hist"][1] == 3
