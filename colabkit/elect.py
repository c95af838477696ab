"""Elected upload: of several workers holding the same checkpoint, a few chosen per checkpoint upload it.

With ``sync.workers`` set (``{id, group, uploaders, takeover_after, run}``), every tier of the sync engine goes
through one mechanism for each checkpoint (a checkpoint file with its manifest, or a checkpoint folder):

* **The election** (:func:`election_order`): the worker ids ``0 .. group-1`` shuffled by a Fisher-Yates shuffle
  driven by a sha256 stream seeded with ``sha256("<run>:<step>")`` (no ``hash()``, no ``random``: the same order
  on every machine and Python version, with no communication). Workers that cannot write to the tier are
  dropped from the order (they published no membership record, below); the first ``uploaders`` of what is left
  are wave 0, the next ``uploaders`` wave 1, and so on.
* **Waves and takeover**: a worker of wave ``w`` may take part from ``w * takeover_after`` after it first saw
  the checkpoint complete on its disk. Who uploads is decided by a **lease**: generation ``g`` of the lease
  may be taken from ``g * takeover_after`` on, by the workers of waves ``0 .. g``, and only one can take it
  (:meth:`Remote.create_exclusive`). So at first one worker of wave 0 uploads; if no verified copy has
  appeared ``takeover_after`` later (its machine was preempted, or it is slow), one more worker (from wave 0
  or 1) takes lease 1 and uploads too, and so on: a preempted uploader never loses the checkpoint.
* **The claim**: the first worker whose copy is complete and verified records it in a way two workers cannot
  both win: the Hub commits the files and the claim record in one commit on the head it read
  (``create_commit(parent_commit=...)``; the second commit on the same parent is refused with HTTP 412); a
  local folder creates the claim with ``link()`` (fails when it exists); Drive, which has no exclusive create,
  takes a claim file per worker, the first created (``createdTime``, then id) winning, checked after the
  upload and once more a moment later, the losers deleting theirs. Another uploader of the same
  checkpoint stops at its next chunk boundary (it watches for the claim), cleans up (a temporary file, a Drive
  resumable session; LFS objects already sent are left to the Hub's collection) and records the checkpoint
  as held by the tier.
* **Watching**: every other worker looks for the claim and the copy on each tick (every few seconds); once the
  tier holds exactly its local bytes, its ledger records them as held, ``uploaded_by`` the winner, so
  retention may delete the local copy on every worker.
* **Membership**: before it joins (``%sync start``, ``%train``), a worker proves it can write to each tier by
  writing its membership record there (``.colabkit-workers/<run>/members/worker-<id>.member``): the proof is
  a real write that stays, and no junk is left. A worker that cannot write says so and is excluded from that
  tier's elections, and because the others only elect workers whose record they see, they never wait for it.

Records live under :data:`colabkit.remotes.base.WORKERS_DIR` on each tier (never listed as tier content)::

    .colabkit-workers/<run>/members/worker-00003.member
    .colabkit-workers/<run>/leases/<checkpoint remote path>/<content tag>.lease-<g>
    .colabkit-workers/<run>/claims/<checkpoint remote path>/<content tag>.claim

The content tag (the first 16 hex digits of the checkpoint's sha256) keys a claim to these bytes: a checkpoint
saved again under the same name with other bytes is elected afresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .remotes.base import WORKERS_DIR

if TYPE_CHECKING:
    from .config import WorkersConfig
    from .remotes.base import Remote

log = logging.getLogger(__name__)

FORMAT = 1
_MEMBERS_MAX_AGE = 30.0     # the membership list is read again at least this often


# -- the election ---------------------------------------------------------------------------------
class _Stream:
    """Unsigned 64-bit numbers from sha256(seed || counter), counter as 8 big-endian bytes."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.counter = 0
        self.buf = b""

    def next64(self) -> int:
        if len(self.buf) < 8:
            self.buf += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        v, self.buf = int.from_bytes(self.buf[:8], "big"), self.buf[8:]
        return v

    def below(self, n: int) -> int:
        """Uniform in [0, n) by rejection (no modulo bias)."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            v = self.next64()
            if v < limit:
                return v % n


def seeded_shuffle(items: Sequence[Any], seed: bytes) -> list[Any]:
    """Fisher-Yates over a sha256 stream: the same order for the same seed on every machine and Python."""
    out = list(items)
    s = _Stream(seed)
    for i in range(len(out) - 1, 0, -1):
        j = s.below(i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def election_seed(run: str, step: int) -> bytes:
    """``sha256("<run>:<step>")``."""
    return hashlib.sha256(f"{run}:{int(step)}".encode("utf-8")).digest()


def election_order(run: str, step: int, group: int) -> list[int]:
    """Every worker id of the group in the order the election goes through them for checkpoint `step`.

    Example:
        >>> election_order("v01", 1200, 6)[:2]     # wave 0 with uploaders=2
        [...]
    """
    return seeded_shuffle(range(group), election_seed(run, step))


def waves(order: Sequence[int], members: set[int] | None, uploaders: int) -> dict[int, int]:
    """{worker id: its wave} for the workers of `order` that are `members` (None: all)."""
    kept = [w for w in order if members is None or w in members]
    return {w: i // uploaders for i, w in enumerate(kept)}


# -- one tier's view of the group ---------------------------------------------------------------------
@dataclass
class Decision:
    action: str                 # "held" (the tier holds it: record), "upload" (this worker holds the lease), "wait"
    note: str = ""
    by: int | None = None       # who uploaded it ("held")
    gen: int | None = None      # the lease generation this worker holds ("upload")


def content_tag(sha256: str) -> str:
    return sha256[:16]


class TierElection:
    """The elected-upload state of one tier for this worker (used by the tier's sync thread only)."""

    def __init__(self, workers: "WorkersConfig", remote: "Remote", tier: str) -> None:
        self.w = workers
        self.remote = remote
        self.tier = tier
        self.base = f"{WORKERS_DIR}/{workers.run}"
        self.member = False            # this worker's record is on the tier (it may upload)
        self.excluded: str | None = None
        self._members: set[int] | None = None
        self._members_at = 0.0
        self._first_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- records -------------------------------------------------------------------------------
    def member_path(self, wid: int) -> str:
        return f"{self.base}/members/worker-{wid:05d}.member"

    def lease_path(self, key: str, tag: str, gen: int) -> str:
        return f"{self.base}/leases/{key.rstrip('/')}/{tag}.lease-{gen}"

    def claim_path(self, key: str, tag: str) -> str:
        return f"{self.base}/claims/{key.rstrip('/')}/{tag}.claim"

    def record(self, **extra: Any) -> bytes:
        return (json.dumps({"format": FORMAT, "worker": self.w.id, "group": self.w.group, "run": self.w.run,
                            "host": socket.gethostname(), "pid": os.getpid(), "at": time.time(), **extra},
                           sort_keys=True) + "\n").encode()

    # -- membership ------------------------------------------------------------------------------
    def join(self) -> str | None:
        """Publish this worker's membership record (the proof that it can write here). Returns None when it
        joined, else what it says: why it is excluded from this tier's elections."""
        from .errors import ColabkitError
        from .secrets import redact
        try:
            path = self.member_path(self.w.id)
            if self.remote.read_bytes(path) is None:
                import tempfile
                from pathlib import Path
                with tempfile.TemporaryDirectory(prefix=".colabkit-tmp-member-") as d:
                    p = Path(d) / "member"
                    p.write_bytes(self.record(tier=self.tier))
                    self.remote.put(p, path)
        except (ColabkitError, OSError) as e:
            self.member = False
            self.excluded = (f"worker {self.w.id} cannot write to tier {self.tier!r} ({redact(str(e))}): it is "
                             f"excluded from the upload elections of run {self.w.run!r} on that tier; the other "
                             "workers upload its checkpoints there")
            log.info("%s", self.excluded)   # the caller says it (start notes, preflight warnings)
            return self.excluded
        self.member = True
        self.excluded = None
        self._members_at = 0.0
        return None

    def members(self, *, fresh: bool = False) -> set[int]:
        now = time.monotonic()
        if fresh or self._members is None or now - self._members_at > min(_MEMBERS_MAX_AGE, self.w.takeover_after):
            got: set[int] = set()
            for f in self.remote.list(f"{self.base}/members"):
                name = f.path.rsplit("/", 1)[-1]
                if name.startswith("worker-") and name.endswith(".member"):
                    try:
                        wid = int(name[len("worker-"):-len(".member")])
                    except ValueError:
                        continue
                    if 0 <= wid < self.w.group:
                        got.add(wid)
            if self.member:
                got.add(self.w.id)
            self._members, self._members_at = got, now
        return set(self._members)

    # -- one checkpoint ----------------------------------------------------------------------------
    def first_seen(self, key: str, tag: str) -> tuple[float, bool]:
        """(when this worker first saw the checkpoint complete, whether that is now)."""
        k = f"{key}@{tag}"
        t = self._first_seen.get(k)
        if t is None:
            t = self._first_seen[k] = time.monotonic()
            return t, True
        return t, False

    def forget(self, key: str, tag: str) -> None:
        self._first_seen.pop(f"{key}@{tag}", None)

    def claim_of(self, key: str, tag: str) -> dict[str, Any] | None:
        """The claim record of the checkpoint (who won), or None while nobody has."""
        raw = self.remote.read_bytes(self.claim_path(key, tag))
        if raw is None:
            return None
        try:
            rec = json.loads(raw)
            return rec if isinstance(rec, dict) else {"worker": None}
        except ValueError:
            return {"worker": None}

    def claimed(self, key: str, tag: str) -> bool:
        return self.remote.stat(self.claim_path(key, tag)) is not None

    def decide(self, key: str, tag: str, step: int) -> Decision:
        """What this worker does now about the checkpoint `key` with content `tag` (`step` seeds the order)."""
        seen, new = self.first_seen(key, tag)
        claim = self.claim_of(key, tag)
        if claim is not None:
            return Decision("held", by=claim.get("worker"))
        if not self.member:
            return Decision("wait", note="excluded from this tier's elections: watching for another worker's copy")
        order = election_order(self.w.run, step, self.w.group)
        wave = waves(order, self.members(fresh=new), self.w.uploaders).get(self.w.id)
        if wave is None:   # pragma: no cover - a member is always in its own list
            return Decision("wait", note="not a member")
        gen = int((time.monotonic() - seen) // self.w.takeover_after)   # the newest lease that may be taken now
        if wave > gen:
            return Decision("wait", note=f"wave {wave}: watching for the copy of wave 0")
        held = self._leases(key, tag)
        mine = [g for g, who in held.items() if who == self.w.id]
        if mine:
            return Decision("upload", gen=max(mine))   # ours: a restart of this worker's syncer
        if held and max(held) >= gen:
            top = max(held)
            return Decision("wait", note=f"worker {held[top]} is uploading it (lease {top})")
        if self.remote.create_exclusive(self.lease_path(key, tag, gen), self.record(gen=gen, key=key, tag=tag)):
            log.info("%s: worker %d takes lease %d of %s", self.tier, self.w.id, gen, key)
            return Decision("upload", gen=gen)
        return Decision("wait", note=f"lease {gen} went to another worker")

    def _leases(self, key: str, tag: str) -> dict[int, int | None]:
        """{generation: worker} of the leases taken for this checkpoint."""
        folder = f"{self.base}/leases/{key.rstrip('/')}"
        out: dict[int, int | None] = {}
        prefix = f"{tag}.lease-"
        for f in self.remote.list(folder):
            name = f.path.rsplit("/", 1)[-1]
            if not name.startswith(prefix):
                continue
            try:
                g = int(name[len(prefix):])
            except ValueError:
                continue
            out[g] = None
        for g in sorted(out)[-4:]:   # the newest few say who is uploading
            raw = self.remote.read_bytes(self.lease_path(key, tag, g))
            try:
                out[g] = int(json.loads(raw)["worker"]) if raw else None
            except (ValueError, KeyError, TypeError):
                out[g] = None
        return out

    def poll_interval(self) -> float:
        """How often a worker watching for another's copy looks again."""
        return max(0.25, min(10.0, self.w.takeover_after / 8))
