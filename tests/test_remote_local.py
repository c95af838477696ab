from __future__ import annotations

from pathlib import Path

import pytest

import errno
import os

from colabkit.errors import RemoteError
from colabkit.remotes import local as local_module
from colabkit.remotes.local import LocalRemote

from .remote_contract import FaultContract, RemoteContract


class TestLocalRemoteContract(RemoteContract):
    @pytest.fixture
    def remote(self, tmp_path: Path) -> LocalRemote:
        return LocalRemote("local-test", tmp_path / "remote-root")


class _FolderFaults:
    """What a folder answers when it is a mounted Drive that misbehaves: errno values at the copy (put, get) and
    at the folder walk (list). A double at colabkit's own seams (fsutil.atomic_copy, the module's os.walk): no
    FUSE mount here to break for real."""

    ERRNOS = {"503": errno.EIO, "500": errno.ENOTCONN, "429": errno.EAGAIN, "drop": errno.ECONNABORTED,
              "permission": errno.EACCES, "quota": errno.ENOSPC}
    kinds = tuple(ERRNOS)

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.left = {"copy": 0, "walk": 0}
        self.code = 0
        real_copy = local_module.atomic_copy
        real_os = local_module.os

        def copy(*a, **kw):
            if self.left["copy"] > 0:
                self.left["copy"] -= 1
                raise OSError(self.code, os.strerror(self.code))
            return real_copy(*a, **kw)

        class _Os:
            def __getattr__(_self, name):
                return getattr(real_os, name)

            def walk(_self, top, *a, onerror=None, **kw):
                if self.left["walk"] > 0:
                    self.left["walk"] -= 1
                    e = OSError(self.code, os.strerror(self.code))
                    if onerror is not None:
                        onerror(e)
                    return iter(())
                return real_os.walk(top, *a, onerror=onerror, **kw)
        monkeypatch.setattr(local_module, "atomic_copy", copy)
        monkeypatch.setattr(local_module, "os", _Os())

    def inject(self, kind: str, op: str, times: int) -> None:
        self.code = self.ERRNOS[kind]
        self.left["walk" if op == "list" else "copy"] = times

    def clear(self) -> None:
        self.left = {"copy": 0, "walk": 0}


class TestLocalRemoteFaults(FaultContract):
    @pytest.fixture
    def remote(self, tmp_path: Path) -> LocalRemote:
        return LocalRemote("local-test", tmp_path / "remote-root")

    @pytest.fixture
    def faults(self, monkeypatch) -> _FolderFaults:
        return _FolderFaults(monkeypatch)


def test_check_access_on_unusable_folder_fails_before_training(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the tier folder should be")
    with pytest.raises(RemoteError) as ei:
        LocalRemote("drive", blocker / "tier").check_access()
    assert str(ei.value).startswith("drive: ")
    assert ei.value.remote == "drive"


def test_a_folder_that_is_briefly_unusable_is_transient_and_not_listed_empty(tmp_path: Path, monkeypatch):
    """os.walk skips a folder it cannot read: a mounted Drive that hiccups would list as empty, and resume
    would take an older checkpoint for the newest."""
    remote = LocalRemote("drive-mount", tmp_path / "mnt")
    (tmp_path / "src").write_bytes(b"x" * 10)
    remote.put(tmp_path / "src", "ck/a.pt")
    faults = _FolderFaults(monkeypatch)
    faults.inject("503", "list", times=1)
    with pytest.raises(RemoteError) as ei:
        remote.list("ck")
    assert ei.value.kind == "transient"
    assert str(ei.value) == (f"drive-mount: Input/output error ({tmp_path / 'mnt'}); the folder is briefly "
                             "unusable (a mounted Drive reconnecting?); it will be retried")
    assert [f.path for f in remote.list("ck")] == ["ck/a.pt"]
