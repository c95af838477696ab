"""Checkpointer: atomic saves, manifests, the latest pointer, async saves, verified loading, a full disk."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from colabkit import Checkpointer
from colabkit.checkpoints import (CheckpointInfo, discover, is_manifest, load, load_latest, manifest_path,
                                  remove_stale_temporaries, step_of, verify)
from colabkit.config import format_size
from colabkit.errors import CheckpointError, DiskFullError, IntegrityError, NoCheckpointError
from colabkit.fsutil import TMP_PREFIX, free_bytes, hash_file


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,step", [
    ("v68_step_1200.pt", 1200), ("v01_step_00000100.pt", 100), ("iter_0001200", 1200), ("step-5.pth", 5),
    ("global_step300.ckpt", 300), ("model-step_7.bin", 7), ("ckpt_iter_42.tar", 42),
    ("notes.txt", None), ("v01_step_00000100.pt.json", None), ("stepper.pt", None), ("mystep_5.pt", None),
    ("latest", None), (TMP_PREFIX + "v01_step_00000100.pt.abc.tmp", None), ("model_step_1200.pt.part", None),
])
def test_step_of_reads_the_step_from_common_names(name, step):
    assert step_of(name) == step


def test_is_manifest_and_manifest_path():
    assert is_manifest("v01_step_00000100.pt.json")
    assert not is_manifest("config.json") and not is_manifest("v01_step_00000100.pt")
    assert manifest_path(Path("/x/v01_step_00000100.pt")) == Path("/x/v01_step_00000100.pt.json")


def test_save_writes_file_manifest_and_latest_pointer(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", run_id="run-1")
    path = ck.save(100, {"step": 100, "w": torch.arange(4.0)})
    assert path == tmp_path / "v01_step_00000100.pt"
    assert files(tmp_path) == ["latest", "v01_step_00000100.pt", "v01_step_00000100.pt.json"]
    m = json.loads((tmp_path / "v01_step_00000100.pt.json").read_text())
    digest = hash_file(path)
    assert m["format"] == 1 and m["step"] == 100 and m["file"] == "v01_step_00000100.pt"
    assert m["size"] == digest.size and m["sha256"] == digest.sha256
    assert m["run_id"] == "run-1" and m["colabkit_version"] == __import__("colabkit").__version__
    assert m["created"].endswith("Z")
    assert json.loads((tmp_path / "latest").read_text()) == {"format": 1, "file": "v01_step_00000100.pt", "step": 100}
    state = torch.load(path, weights_only=True)
    assert state["step"] == 100 and torch.equal(state["w"], torch.arange(4.0))


def test_load_latest_returns_the_newest_state_and_none_on_a_fresh_start(tmp_path):
    ck = Checkpointer(tmp_path / "c", prefix="run")
    assert ck.load_latest() is None and ck.load_latest(default={}) == {}
    for s in (5, 20, 10):
        ck.save(s, {"step": s})
    assert ck.load_latest() == {"step": 20}
    assert ck.loaded.step == 20 and ck.loaded.name == "run_step_00000020.pt"


def test_resaving_a_step_replaces_file_and_manifest(tmp_path):
    ck = Checkpointer(tmp_path, prefix="a")
    ck.save(3, {"v": torch.zeros(10)})
    ck.save(3, {"v": torch.ones(1000)})
    (info,) = discover(tmp_path)
    verify(info)
    assert torch.equal(ck.load_latest()["v"], torch.ones(1000))


def test_plain_torch_save_files_are_discovered_without_manifests(tmp_path):
    torch.save({"step": 1200}, tmp_path / "v68_step_1200.pt")
    torch.save({"step": 1300}, tmp_path / "iter_0001300")
    torch.save({"other": 1}, tmp_path / "optimizer.pt")  # no step in the name: not a checkpoint
    infos = discover(tmp_path)
    assert [(i.name, i.step, i.manifest) for i in infos] == [("v68_step_1200.pt", 1200, None),
                                                             ("iter_0001300", 1300, None)]
    info, state = load_latest(tmp_path)
    assert (info.step, state) == (1300, {"step": 1300})


def test_corrupt_newest_falls_back_to_the_previous_and_says_why(tmp_path, caplog):
    ck = Checkpointer(tmp_path, prefix="v01")
    ck.save(1, {"w": torch.full((1000,), 1.0)})
    newest = ck.save(2, {"w": torch.full((1000,), 2.0)})
    flip_byte(newest)
    with caplog.at_level(logging.WARNING, logger="colabkit.checkpoints"):
        state = ck.load_latest()
    assert float(state["w"][0]) == 1.0 and ck.loaded.step == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith(f"checkpoint v01_step_00000002.pt is not usable: {newest}: sha256 ")
    assert msg.endswith("does not match its manifest's " + json.loads(manifest_path(newest).read_text())["sha256"][:12]
                        + "... (corrupt); falling back to v01_step_00000001.pt")


def test_truncated_plain_file_falls_back(tmp_path, caplog):
    torch.save({"step": 1}, tmp_path / "m_step_1.pt")
    torch.save({"step": 2, "w": torch.zeros(10000)}, tmp_path / "m_step_2.pt")
    with open(tmp_path / "m_step_2.pt", "r+b") as f:
        f.truncate(20000)
    with caplog.at_level(logging.WARNING, logger="colabkit.checkpoints"):
        info, state = load_latest(tmp_path)
    assert state == {"step": 1}
    assert "checkpoint m_step_2.pt is not usable" in caplog.text and "falling back to m_step_1.pt" in caplog.text


def test_flipped_byte_in_plain_file_fails_its_crc(tmp_path):
    p = tmp_path / "m_step_9.pt"
    torch.save({"w": torch.zeros(10000)}, p)
    flip_byte(p, 1000)
    with pytest.raises(IntegrityError) as ei:
        verify(discover(tmp_path)[0])
    assert str(ei.value) == f"{p}: record m_step_9/data/0 fails its CRC check (corrupt)"


def test_no_valid_checkpoint_raises_with_each_reason(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01")
    p = ck.save(1, {"w": torch.zeros(100)})
    with open(p, "r+b") as f:
        f.truncate(50)
    size = json.loads(manifest_path(p).read_text())["size"]
    with pytest.raises(NoCheckpointError) as ei:
        ck.load_latest()
    assert str(ei.value) == (f"no valid checkpoint in {tmp_path}: v01_step_00000001.pt: {p}: 50 bytes, its manifest "
                             f"says {size} (truncated or partial); fetch one from a remote with 'colabkit resume'")


def test_weights_only_refusal_is_not_mistaken_for_corruption(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01")
    ck.save(1, {"w": torch.zeros(2)})
    ck.save(2, {"args": Path("/x")})  # an object weights_only=True refuses
    with pytest.raises(CheckpointError) as ei:
        ck.load_latest()
    assert "holds objects that weights_only=True refuses" in str(ei.value)
    assert ck.load_latest(weights_only=False) == {"args": Path("/x")}


def test_load_verifies_against_the_manifest(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01")
    p = ck.save(7, {"w": torch.ones(100)})
    assert torch.equal(load(p)["w"], torch.ones(100))
    flip_byte(p)
    with pytest.raises(IntegrityError):
        ck.load(p)
    with pytest.raises(NoCheckpointError) as ei:
        load(tmp_path / "missing_step_1.pt")
    assert str(ei.value) == f"{tmp_path / 'missing_step_1.pt'}: no such checkpoint file; check --resume-from / the path given"


@pytest.mark.parametrize("kwargs,message", [
    ({"prefix": "a/b"}, "prefix 'a/b' is not a file name prefix; use e.g. 'v01'"),
    ({"keep": 0}, "keep=0 must be a whole number >= 1 (or None to keep all)"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(CheckpointError) as ei:
        Checkpointer(tmp_path, **kwargs)
    assert str(ei.value) == message


def test_bad_step_is_refused(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        ck.save(-1, {})
    assert str(ei.value) == "step=-1 must be a whole number >= 0"


def test_defaults_come_from_the_train_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLABKIT_CHECKPOINT_DIR", str(tmp_path / "env-ckpt"))
    monkeypatch.setenv("COLABKIT_EXPERIMENT", "v07")
    monkeypatch.setenv("COLABKIT_RUN_ID", "r-42")
    p = Checkpointer().save(1, {})
    assert p == tmp_path / "env-ckpt" / "v07_step_00000001.pt"
    assert json.loads(manifest_path(p).read_text())["run_id"] == "r-42"


def test_keep_never_deletes_without_a_verified_remote_copy(tmp_path):
    ck = Checkpointer(tmp_path / "c", prefix="v01", keep=1)
    for s in (1, 2, 3):
        ck.save(s, {"s": s})
    # no tier holds a copy: pruning (colabkit.retention, when present) must keep all three
    assert [i.step for i in discover(tmp_path / "c")] == [1, 2, 3]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import fcntl
    dead = tmp_path / f"{TMP_PREFIX}v01_step_00000005.pt.ab12cd.tmp"
    live = tmp_path / f"{TMP_PREFIX}v01_step_00000006.pt.ef34gh.tmp"
    other = tmp_path / f"{TMP_PREFIX}journal.md.xyz"  # not a checkpoint temporary: not ours to remove
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a writer still busy with it
        removed = remove_stale_temporaries(tmp_path)
    assert removed == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_colabkit_imports_without_torch():
    code = ("import sys; import colabkit, colabkit.checkpoints, colabkit.resume, colabkit.commands.resume; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- async ----------------------------------------------------------------------------------------
def test_async_save_snapshots_the_state(tmp_path):
    w = torch.zeros(1000)
    params = {"a": w, "tied": w, "view": w[10:20]}
    with Checkpointer(tmp_path, prefix="v01", async_save=True) as ck:
        path = ck.save(1, {"model": params, "step": 1, "hist": [1.5]})
        w.add_(5.0)  # training goes on while the write is in flight
        params["hist"] = None
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["model"]["a"], torch.zeros(1000))
    assert state["model"]["tied"] is state["model"]["a"], "tensors sharing memory must still share it"
    assert state["model"]["view"].untyped_storage().data_ptr() == state["model"]["a"].untyped_storage().data_ptr()
    assert state["hist"] == [1.5]
    verify(discover(tmp_path)[0])


class Gate:
    """A state entry whose pickling waits for the test: holds a background write in flight, deterministically."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        self.entered.set()
        assert self.release.wait(30), "the test never released the gate"
        return (dict, ())


def test_async_save_keeps_at_most_one_write_in_flight(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", async_save=True)
    gate = Gate()
    ck.save(1, {"gate": gate})
    assert gate.entered.wait(30)
    assert ck.busy
    second_done = threading.Event()

    def second():
        ck.save(2, {"w": torch.ones(3)})
        second_done.set()

    t = threading.Thread(target=second, name="test-second-save")
    t.start()
    try:
        # the second save must wait for the first write: it cannot finish while the first is held
        assert not second_done.wait(0.5)
        writers = [x for x in threading.enumerate() if x.name.startswith("colabkit-checkpoint-")]
        assert len(writers) == 1
        assert not (tmp_path / "v01_step_00000002.pt").exists()
    finally:
        gate.release.set()
        t.join(30)
    assert second_done.is_set()
    ck.close()
    assert [i.step for i in discover(tmp_path)] == [1, 2]
    assert not [x for x in threading.enumerate() if x.name.startswith("colabkit-checkpoint-")]


class Boom:
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def test_async_error_surfaces_at_the_next_save_and_only_once(tmp_path):
    ck = Checkpointer(tmp_path, prefix="v01", async_save=True)
    ck.save(1, {"x": Boom()})
    with pytest.raises(RuntimeError, match="cannot pickle this on purpose"):
        ck.save(2, {"w": torch.ones(2)})
    ck.save(3, {"w": torch.ones(2)})
    ck.wait()
    assert [i.step for i in discover(tmp_path)] == [3], "the failed write must leave nothing behind"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    ck.save(4, {"x": Boom()})
    with pytest.raises(RuntimeError, match="cannot pickle this on purpose"):
        ck.wait()
    ck.close()
    with pytest.raises(CheckpointError) as ei:
        ck.save(5, {})
    assert str(ei.value) == f"this Checkpointer for {tmp_path} is closed; create a new one"


# -- a full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (tests run as root in CI); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    d = tmp_path / "small"
    d.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def _check_disk_full(d: Path, err: DiskFullError, step: int, needed_at_least: int) -> None:
    assert err.free == free_bytes(d)
    assert err.needed >= needed_at_least
    assert str(err) == (
        f"cannot save checkpoint step {step} to {d}: {format_size(err.free)} free, about {format_size(err.needed)} "
        "needed; the previous checkpoint is intact. Free space there (old checkpoints are removed only once a "
        "remote holds a verified copy: run 'colabkit sync flush') or point the Checkpointer at a larger disk")
    assert isinstance(err.__cause__, OSError) or "No space left" in str(err.__cause__)


def test_disk_full_raises_and_leaves_the_previous_checkpoint_intact(small_disk):
    ck = Checkpointer(small_disk, prefix="v01")
    ck.save(1, {"w": torch.ones(1000)})
    before = files(small_disk)
    big = torch.zeros(2_000_000)  # 8 MB: cannot fit on 4 MiB
    with pytest.raises(DiskFullError) as ei:
        ck.save(2, {"w": big})
    _check_disk_full(small_disk, ei.value, 2, big.nbytes)
    assert files(small_disk) == before, "no partial file and no temporary may remain"
    assert json.loads((small_disk / "latest").read_text())["step"] == 1
    assert torch.equal(ck.load_latest()["w"], torch.ones(1000))


def test_disk_full_in_a_background_write_is_raised_at_wait(small_disk):
    ck = Checkpointer(small_disk, prefix="v01", async_save=True)
    ck.save(1, {"w": torch.ones(10)})
    ck.save(2, {"blob": b"x" * 6_000_000})  # bytes, not tensors: the size is only discovered while writing
    with pytest.raises(DiskFullError) as ei:
        ck.wait()
    _check_disk_full(small_disk, ei.value, 2, 1)
    assert [i.step for i in discover(small_disk)] == [1]
    assert [p for p in small_disk.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    ck.close()


def test_async_saves_reusing_buffers_keep_each_step_own_values(tmp_path):
    w = torch.zeros(50_000)
    with Checkpointer(tmp_path, prefix="v01", async_save=True) as ck:
        for s in range(1, 5):
            w.fill_(float(s))
            ck.save(s, {"w": w, "b": w[:10]})
            w.fill_(-1.0)
    for info in discover(tmp_path):
        verify(info)
        state = torch.load(info.path, weights_only=True)
        assert float(state["w"].min()) == float(state["w"].max()) == float(info.step)
        assert float(state["b"][0]) == float(info.step)


def test_a_script_ending_without_close_still_finishes_its_last_async_write(tmp_path):
    code = ("import torch; from colabkit import Checkpointer; "
            f"ck = Checkpointer({str(tmp_path)!r}, prefix='v01', async_save=True); "
            "ck.save(1, {'w': torch.ones(2_000_000)}); print('returned', flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "returned"
    (info,) = discover(tmp_path)
    verify(info)
    assert info.manifest is not None and info.step == 1
