"""The contract every remote must pass. A remote's test module subclasses :class:`RemoteContract`
and provides a ``remote`` fixture (a fresh, empty remote) — see tests/test_remote_local.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from colabkit.errors import IntegrityError, RemoteError, RemoteNotFoundError
from colabkit.fsutil import hash_file
from colabkit.remotes.base import Remote, RemoteFile


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class RemoteContract:
    """Behaviour every storage tier shares. Subclasses define the `remote` fixture."""

    @pytest.fixture
    def remote(self) -> Remote:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_empty_remote_lists_nothing(self, remote: Remote):
        assert remote.list() == []
        assert remote.list("missing/folder") == []
        assert remote.stat("nothing-here.bin") is None

    def test_put_then_list_reports_size_and_hash(self, remote: Remote, tmp_path: Path):
        data = os.urandom(300_000)
        src = _write(tmp_path / "a.bin", data)
        rec = remote.put(src, "run/logs/a.bin")
        digest = hash_file(src)
        assert isinstance(rec, RemoteFile)
        assert rec.path == "run/logs/a.bin" and rec.size == len(data)
        assert rec.matches(digest)
        listed = remote.list("run")
        assert [f.path for f in listed] == ["run/logs/a.bin"]
        assert listed[0].size == len(data) and listed[0].matches(digest)
        assert remote.stat("run/logs/a.bin").matches(digest)

    def test_get_roundtrip_is_byte_identical(self, remote: Remote, tmp_path: Path):
        data = os.urandom(1_000_003)
        remote.put(_write(tmp_path / "src.pt", data), "ck/model_step_00000010.pt")
        dst = tmp_path / "out" / "model.pt"
        rec = remote.get("ck/model_step_00000010.pt", dst)
        assert dst.read_bytes() == data
        assert rec.size == len(data)
        assert not [p for p in dst.parent.iterdir() if p.name != "model.pt"], "temporary files left behind"

    def test_put_replaces_existing_content(self, remote: Remote, tmp_path: Path):
        remote.put(_write(tmp_path / "log.txt", b"line 1\n"), "logs/train.log")
        remote.put(_write(tmp_path / "log.txt", b"line 1\nline 2\n"), "logs/train.log")
        files = remote.list("logs")
        assert [f.path for f in files] == ["logs/train.log"], "a re-upload must not create a second copy"
        assert files[0].size == len(b"line 1\nline 2\n")
        remote.get("logs/train.log", tmp_path / "back.txt")
        assert (tmp_path / "back.txt").read_bytes() == b"line 1\nline 2\n"

    def test_list_prefix_filters_by_folder(self, remote: Remote, tmp_path: Path):
        for p in ("a/x.txt", "a/b/y.txt", "ab/z.txt", "c.txt"):
            remote.put(_write(tmp_path / "f", p.encode()), p)
        assert [f.path for f in remote.list("a")] == ["a/b/y.txt", "a/x.txt"]
        assert [f.path for f in remote.list()] == ["a/b/y.txt", "a/x.txt", "ab/z.txt", "c.txt"]

    def test_delete_removes_and_is_idempotent(self, remote: Remote, tmp_path: Path):
        remote.put(_write(tmp_path / "f", b"bye"), "d/f.txt")
        remote.delete("d/f.txt")
        assert remote.stat("d/f.txt") is None
        assert remote.list("d") == []
        remote.delete("d/f.txt")  # a second delete is not an error

    def test_get_missing_raises_not_found(self, remote: Remote, tmp_path: Path):
        with pytest.raises(RemoteNotFoundError) as ei:
            remote.get("no/such.pt", tmp_path / "x.pt")
        assert "no/such.pt" in str(ei.value)
        assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, RemoteError)
        assert not (tmp_path / "x.pt").exists()

    def test_get_over_an_older_copy_replaces_it_or_leaves_it(self, remote: Remote, tmp_path: Path):
        data = os.urandom(400_000)
        rec = remote.put(_write(tmp_path / "new.pt", data), "ck/m.pt")
        dst = _write(tmp_path / "out" / "m.pt", b"an older local copy")
        forged = RemoteFile(rec.path, rec.size, sha256="0" * 64 if rec.sha256 else None,
                            md5="0" * 32 if rec.md5 else None, modified=rec.modified, id=rec.id)
        with pytest.raises(IntegrityError):
            remote.get("ck/m.pt", dst, expected=forged)
        assert dst.read_bytes() == b"an older local copy", "a failed download must leave the old copy as it was"
        remote.get("ck/m.pt", dst)
        assert dst.read_bytes() == data
        assert [p.name for p in dst.parent.iterdir()] == ["m.pt"], "the old copy or a temporary file was left"

    def test_get_with_wrong_expected_hash_leaves_nothing(self, remote: Remote, tmp_path: Path):
        rec = remote.put(_write(tmp_path / "f", b"real content"), "v/f.bin")
        forged = RemoteFile(rec.path, rec.size, sha256="0" * 64 if rec.sha256 else None,
                            md5="0" * 32 if rec.md5 else None, modified=rec.modified, id=rec.id)
        with pytest.raises(IntegrityError):
            remote.get("v/f.bin", tmp_path / "dst.bin", expected=forged)
        assert not (tmp_path / "dst.bin").exists()

    def test_rejects_paths_escaping_the_root(self, remote: Remote, tmp_path: Path):
        src = _write(tmp_path / "f", b"x")
        for bad in ("../outside.txt", "/etc/passwd", "a/../../b"):
            with pytest.raises(ValueError):
                remote.put(src, bad)

    def test_check_access_leaves_no_marker(self, remote: Remote):
        remote.check_access()
        assert remote.list() == []

    def test_empty_file_roundtrip(self, remote: Remote, tmp_path: Path):
        remote.put(_write(tmp_path / "empty", b""), "e/empty.txt")
        assert remote.stat("e/empty.txt").size == 0
        remote.get("e/empty.txt", tmp_path / "e.txt")
        assert (tmp_path / "e.txt").read_bytes() == b""

    def test_put_many_uploads_all(self, remote: Remote, tmp_path: Path):
        items = [(_write(tmp_path / f"f{i}", f"content {i}".encode()), f"many/f{i}.txt") for i in range(3)]
        recs = remote.put_many(items, message="test commit")
        assert sorted(r.path for r in recs) == ["many/f0.txt", "many/f1.txt", "many/f2.txt"]
        assert [f.path for f in remote.list("many")] == ["many/f0.txt", "many/f1.txt", "many/f2.txt"]

    def test_describe_is_printable(self, remote: Remote):
        assert isinstance(remote.describe(), str) and remote.describe()


# -- the fault table -------------------------------------------------------------------------------------
#: every fault a remote can meet, and the one classification (RemoteError.kind) each must come out as
FAULT_TABLE = {"503": "transient", "500": "transient", "429": "transient", "drop": "transient",
               "auth": "auth", "permission": "permission", "quota": "quota"}
TRANSIENT = tuple(k for k, v in FAULT_TABLE.items() if v == "transient")


class FaultContract:
    """The same fault table for every remote. Subclasses define `remote` and a `faults` fixture: an object with
    ``kinds`` (the FAULT_TABLE keys the service can produce), ``inject(kind, op, times)`` (``op``: put, get
    or list; fault the requests that op makes) and ``clear()``. The remote should give up quickly (few tries,
    short waits) so that persistent faults end in an error."""

    @pytest.fixture
    def faults(self):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _op(remote: Remote, op: str, tmp_path: Path, data: bytes) -> None:
        if op == "put":
            remote.put(_write(tmp_path / "up.bin", data), "f/a.bin")
        elif op == "get":
            remote.get("f/a.bin", tmp_path / "down.bin")
            assert (tmp_path / "down.bin").read_bytes() == data
        else:
            assert [f.path for f in remote.list("f")] == ["f/a.bin"]

    def test_transient_faults_are_transient_and_pass(self, remote: Remote, faults, tmp_path: Path):
        """A fault the service recovers from: the call succeeds (the remote retried) or raises a transient error,
        and once the service answers again it succeeds; nothing is duplicated."""
        from colabkit.errors import error_kind
        data = os.urandom(70_000)
        remote.put(_write(tmp_path / "first.bin", data), "f/a.bin")
        for kind in [k for k in TRANSIENT if k in faults.kinds]:
            for op in ("put", "get", "list"):
                faults.inject(kind, op, times=2)
                try:
                    self._op(remote, op, tmp_path, data)
                except (RemoteError, OSError) as e:
                    assert error_kind(e) == "transient", f"{kind} during {op}: {type(e).__name__}: {e}"
                faults.clear()
                self._op(remote, op, tmp_path, data)
        assert [f.path for f in remote.list("f")] == ["f/a.bin"], "a retried upload left a second copy"

    def test_persistent_faults_are_classified(self, remote: Remote, faults, tmp_path: Path):
        """When the service keeps failing, the error says which kind of failure it is: only auth, permission
        and quota may stop a tier; a 5xx, 429 or dropped connection never does."""
        from colabkit.errors import error_kind
        data = os.urandom(50_000)
        remote.put(_write(tmp_path / "first.bin", data), "f/a.bin")
        for kind in faults.kinds:
            for op in (("put",) if kind == "quota" else ("put", "get")):
                faults.inject(kind, op, times=10_000)
                with pytest.raises((RemoteError, OSError)) as ei:
                    self._op(remote, op, tmp_path, os.urandom(50_000) if op == "put" else data)
                faults.clear()
                assert error_kind(ei.value) == FAULT_TABLE[kind], \
                    f"{kind} during {op} came out as {error_kind(ei.value)}: {ei.value}"
                assert str(ei.value).startswith(f"{remote.name}: "), str(ei.value)
        assert remote.stat("f/a.bin") is not None, "a failed call removed what the remote held"
