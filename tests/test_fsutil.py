"""Atomic replacement of downloaded copies (colabkit.fsutil.replace_copy / atomic_open(durable=False))."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from colabkit import fsutil
from colabkit.fsutil import atomic_open, replace_copy


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=["exchange", "rename"])
def how(request, monkeypatch):
    """Both ways a copy is put in place: the Linux swap, and the plain rename used where there is none."""
    if request.param == "rename":
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    return request.param


def test_replace_copy_over_an_existing_file(tmp_path, how):
    old, new = tmp_path / "ckpt.pt", tmp_path / ".colabkit-tmp-ckpt.pt.x"
    old.write_bytes(b"old copy")
    new.write_bytes(b"new copy, longer")
    with open(old, "rb") as reader:          # a reader of the old copy keeps reading it
        replace_copy(new, old)
        assert reader.read() == b"old copy"
    assert old.read_bytes() == b"new copy, longer"
    assert _files(tmp_path) == ["ckpt.pt"], "the old copy or the temporary name was left behind"


def test_replace_copy_to_a_new_name(tmp_path, how):
    new = tmp_path / ".colabkit-tmp-a.x"
    new.write_bytes(b"data")
    replace_copy(new, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"data" and _files(tmp_path) == ["a.bin"]


def test_replace_copy_onto_a_symlink_replaces_the_link_not_its_target(tmp_path, how):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    (tmp_path / "link.bin").symlink_to(target)
    new = tmp_path / ".colabkit-tmp-l.x"
    new.write_bytes(b"downloaded")
    replace_copy(new, tmp_path / "link.bin")
    assert not (tmp_path / "link.bin").is_symlink()
    assert (tmp_path / "link.bin").read_bytes() == b"downloaded" and target.read_bytes() == b"keep me"


def test_replace_copy_onto_a_directory_fails_and_keeps_both(tmp_path, how):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_bytes(b"x")
    new = tmp_path / ".colabkit-tmp-d.x"
    new.write_bytes(b"file")
    with pytest.raises(OSError):
        replace_copy(new, tmp_path / "d")
    assert (tmp_path / "d" / "inside").read_bytes() == b"x" and new.read_bytes() == b"file"


def test_download_that_fails_midway_leaves_the_old_copy(tmp_path, how):
    dst = tmp_path / "m.pt"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(dst, "wb", durable=False) as f:
            f.write(b"half of the new")
            raise RuntimeError("connection lost")
    assert dst.read_bytes() == b"old" and _files(tmp_path) == ["m.pt"]
    with atomic_open(dst, "wb", durable=False) as f:
        f.write(b"the new copy")
    assert dst.read_bytes() == b"the new copy" and _files(tmp_path) == ["m.pt"]


def test_a_large_copy_is_hashed_alongside_and_the_digest_is_of_the_bytes_written(tmp_path):
    import hashlib
    import os

    from colabkit.fsutil import CHUNK, atomic_copy
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * CHUNK + 12345))        # past the size where the hash runs in its own thread
    seen: list[int] = []
    d = atomic_copy(src, tmp_path / "out" / "big.bin", md5=True, progress=seen.append)
    data = (tmp_path / "out" / "big.bin").read_bytes()
    assert data == src.read_bytes()
    assert (d.size, d.sha256, d.md5) == (len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert sum(seen) == len(data)


@pytest.mark.parametrize("raw", ["four", "0", "-2", "2.5"])
def test_a_hash_workers_setting_that_is_not_a_thread_count_is_reported_once_and_the_default_used(
        monkeypatch, caplog, raw):
    monkeypatch.setattr(fsutil, "_warned_hash_workers", set())
    monkeypatch.delenv("COLABKIT_HASH_WORKERS", raising=False)
    default = fsutil.hash_workers()
    monkeypatch.setenv("COLABKIT_HASH_WORKERS", raw)
    with caplog.at_level("WARNING", logger="colabkit.fsutil"):
        assert fsutil.hash_workers() == default
        assert fsutil.hash_workers() == default
    msgs = [r.getMessage() for r in caplog.records if "COLABKIT_HASH_WORKERS" in r.getMessage()]
    assert msgs == [f"COLABKIT_HASH_WORKERS={raw!r} is not a number of threads (a whole number, at least 1, e.g. 4);"
                    f" verifying on {default} (one per core, at most 8)"]
    monkeypatch.setenv("COLABKIT_HASH_WORKERS", "3")
    assert fsutil.hash_workers() == 3
