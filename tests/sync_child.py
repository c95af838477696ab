"""Helpers for the sync tests: fault-injecting wrappers at our own Remote interface, and a child-process
entry point that runs the real sync engine against a local-folder tier.

    python -m tests.sync_child ROOT MODE    MODE: block-before | block-mid | block-after | once | watch

``block-before`` blocks inside put() before any byte is copied; ``block-mid`` once the copy has begun (its
temporary is in the tier folder); ``block-after`` blocks after
the copy finished but before the ledger could record it. Both write ``<ROOT>/blocked`` when they block,
so the parent knows when to kill -9. Every completed put appends "path sha256" to ``<ROOT>/puts.log``.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from colabkit.errors import TransientRemoteError
from colabkit.remotes.base import Remote, RemoteFile


class WrappedRemote(Remote):
    """Delegates everything to `inner` (a real remote); subclasses inject behaviour into put()."""

    def __init__(self, inner: Remote) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.kind = inner.kind
        self.root = getattr(inner, "root", None)
        self.calls = 0
        self.puts: list[str] = []
        self.lock = threading.Lock()

    def list(self, prefix: str = "") -> list[RemoteFile]:
        return self.inner.list(prefix)

    def stat(self, path: str) -> RemoteFile | None:
        return self.inner.stat(path)

    def put(self, local, path, *, digest=None, upload_state=None, progress=None) -> RemoteFile:
        rec = self.inner.put(local, path, digest=digest, upload_state=upload_state, progress=progress)
        with self.lock:
            self.puts.append(path)
        return rec

    def get(self, path, local, *, expected=None, progress=None):
        return self.inner.get(path, local, expected=expected, progress=progress)

    def delete(self, path: str) -> None:
        self.inner.delete(path)

    def adopt(self, path, record, digest):
        return self.inner.adopt(path, record, digest)

    def check_access(self) -> None:
        self.inner.check_access()

    def describe(self) -> str:
        return "test wrapper around " + self.inner.describe()


class FlakyRemote(WrappedRemote):
    """Fails every third put() with a transient error (as a 503 from a real service would)."""

    def put(self, local, path, **kw) -> RemoteFile:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n % 3 == 0:
            raise TransientRemoteError(f"{self.name}: 503 Service Unavailable (injected, call {n})",
                                       remote=self.name, path=path)
        return super().put(local, path, **kw)


class CountingRemote(WrappedRemote):
    """Appends every completed put to a log file (survives the process, unlike a counter)."""

    def __init__(self, inner: Remote, log_path: Path) -> None:
        super().__init__(inner)
        self.log_path = log_path

    def put(self, local, path, **kw) -> RemoteFile:
        rec = super().put(local, path, **kw)
        with open(self.log_path, "a") as f:
            f.write(f"{path} {rec.sha256}\n")
            f.flush()
            os.fsync(f.fileno())
        return rec


class BlockingRemote(CountingRemote):
    """Blocks forever in put() of a checkpoint (before or after copying), writing a marker first."""

    def __init__(self, inner: Remote, log_path: Path, marker: Path, *, after: bool | str) -> None:
        super().__init__(inner, log_path)
        self.marker = marker
        self.after = after
        self.never = threading.Event()

    def put(self, local, path, **kw) -> RemoteFile:
        if not path.endswith(".pt"):
            return super().put(local, path, **kw)
        if self.after == "mid":
            def progress(n):   # the first chunk is in the temporary: block there
                self.marker.write_text(path)
                self.never.wait()
            kw["progress"] = progress
            return super().put(local, path, **kw)
        if self.after:
            super().put(local, path, **kw)
        self.marker.write_text(path)
        self.never.wait()  # until kill -9
        raise AssertionError("unreachable")


def main(argv: list[str]) -> int:
    root, mode = Path(argv[0]), argv[1]
    from colabkit import sync
    from colabkit.config import load_config
    from colabkit.remotes import open_remote
    cfg = load_config(start=root)
    inner = open_remote(cfg, "backup")
    puts = root / "puts.log"
    if mode in ("block-before", "block-mid", "block-after"):
        after = {"block-before": False, "block-mid": "mid", "block-after": True}[mode]
        remote: Remote = BlockingRemote(inner, puts, root / "blocked", after=after)
        sync.start(config=cfg, remotes={"backup": remote})
        threading.Event().wait()  # until kill -9
        return 1
    if mode == "once":
        res = sync.once(config=cfg, remotes={"backup": CountingRemote(inner, puts)})
        print("ok" if res["ok"] else f"failed {res}", flush=True)
        return 0 if res["ok"] else 1
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
