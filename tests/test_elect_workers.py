"""Elected upload with real worker processes: each its own project folder and `colabkit sync watch`, all
pointed at the test Hub server and at one shared local-folder tier."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from colabkit.ledger import Ledger
from tests.drive_server import drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)
from tests.test_sync import wait_for

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
RUN = "elect"


class Workers:
    """`group` worker processes running `colabkit sync watch`; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, tmp: Path, hub: HubServer | None, group: int, *, takeover_after: float,
                 tokens: dict[int, str] | None = None, drive: Any = None, keep_local: int = 20) -> None:
        """`drive`: a DriveServer; the first tier is then a Drive folder instead of the Hub."""
        self.tmp, self.hub, self.group = tmp, hub, group
        self.shared = tmp / "shared-tier"
        self.roots = [tmp / f"worker{i}" for i in range(group)]
        self.procs: dict[int, subprocess.Popen] = {}
        first = "drive" if drive is not None else "hub"
        self.tiers = (first, "shared")
        extra: dict[str, Any] = {}
        if drive is not None:
            folder = drive.create_folder("colabkit", share_with={drive.SA_EMAIL: "writer"}, shared_drive=True)
            key = drive.write_service_account(tmp / "keys" / "sa.json")
            extra["drive"] = {"folder_id": folder, "credentials": str(key), "endpoint": drive.endpoint,
                              "chunk_size": "1MiB"}
            self.folder = folder
        else:
            extra["hub"] = {"repo_id": "alice/ckpt", "endpoint": hub.endpoint}
        for i, root in enumerate(self.roots):
            (root / "checkpoints").mkdir(parents=True)
            (root / "colabkit.yaml").write_text(yaml.safe_dump({
                "project": RUN, **extra,
                "tiers": [{"name": first, "remote": first, "every": 1, "include": ["*.pt", "*.pt.json"],
                           "exclude": [], "latest_only": False},
                          {"name": "shared", "remote": "local", "path": str(self.shared), "every": 1,
                           "include": ["*.pt", "*.pt.json"], "exclude": [], "latest_only": False}],
                "retention": {"keep_local": keep_local},
                "sync": {"settle": 0.1, "watch": ["checkpoints"], "flush_timeout": 60,
                         "workers": {"id": i, "group": group, "takeover_after": takeover_after}}}))
        self.tokens = tokens or {}

    def start(self, i: int) -> None:
        root = self.roots[i]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_TOKEN": self.tokens.get(i, HubServer.WRITE_TOKEN),
               "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(root / "hf_home")}
        out = open(root / "out.txt", "w")
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "colabkit", "sync", "watch", "--config", str(root / "colabkit.yaml")],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        out.close()

    def start_all(self) -> None:
        for i in range(self.group):
            self.start(i)
        for i in range(self.group):
            wait_for(lambda i=i: "Ctrl-C or SIGTERM flushes and stops" in self.out(i) or self.procs[i].poll(),
                     120, f"worker {i} to join")
            assert self.procs[i].poll() is None, self.out(i)

    def out(self, i: int) -> str:
        return (self.roots[i] / "out.txt").read_text()

    def save(self, step: int, size: int) -> tuple[str, bytes]:
        """The same checkpoint in every worker's folder (complete at once: data, then its manifest, each
        renamed into place); each manifest says when its worker wrote it."""
        data = os.urandom(size)
        name = f"v01_step_{step:08d}.pt"
        for i, root in enumerate(self.roots):
            d = root / "checkpoints"
            (d / f".tmp-{name}").write_bytes(data)
            os.replace(d / f".tmp-{name}", d / name)
            (d / f".tmp-{name}.json").write_text(json.dumps(
                {"format": 1, "step": step, "size": size, "sha256": hashlib.sha256(data).hexdigest(),
                 "file": name, "created": f"worker {i}"}))
            os.replace(d / f".tmp-{name}.json", d / f"{name}.json")
        return f"checkpoints/{name}", data

    def ledger(self, i: int, tier: str) -> Ledger:
        return Ledger.load(self.roots[i] / ".colabkit", tier)

    def held_everywhere(self, rel: str, workers=None) -> bool:
        return all(rel in self.ledger(i, t).entries and rel + ".json" in self.ledger(i, t).entries
                   for i in (workers if workers is not None else range(self.group)) for t in self.tiers)

    def stop(self, i: int, timeout: float = 90) -> int:
        p = self.procs[i]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            raise AssertionError(f"worker {i} did not stop within {timeout}s: {self.out(i)[-2000:]}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _claims(hub: HubServer, shared: Path) -> tuple[dict[str, int], dict[str, int]]:
    """{checkpoint remote path: winning worker} from the claim records on the Hub and in the shared tier."""
    prefix = f".colabkit-workers/{RUN}/claims/"
    hub_claims = {}
    for path, e in hub.files("alice/ckpt").items():
        if path.startswith(prefix):
            rec = json.loads((hub.root / "git" / e.oid).read_bytes())
            hub_claims[path[len(prefix):].rsplit("/", 1)[0]] = rec["worker"]
    local_claims = {}
    base = shared / prefix
    for p in base.rglob("*.claim") if base.exists() else []:
        local_claims[p.parent.relative_to(base).as_posix()] = json.loads(p.read_bytes())["worker"]
    return hub_claims, local_claims


def test_six_workers_upload_each_checkpoint_once_per_tier_and_take_turns(hub_server, tmp_path):
    hub_server.create_repo("alice/ckpt")
    w = Workers(tmp_path, hub_server, 6, takeover_after=20, keep_local=2)
    try:
        w.start_all()
        members = [p for p in hub_server.files("alice/ckpt") if "/members/" in p]
        assert len(members) == 6
        size, saved = 2 * MiB, []
        for step in (100, 200, 300, 400):
            rel, data = w.save(step, size)
            saved.append((rel, data))
            wait_for(lambda: w.held_everywhere(rel), 120, f"every worker to hold {rel} on both tiers")
        files = hub_server.files("alice/ckpt")
        for rel, data in saved:
            e = files[rel]
            assert e.lfs == hashlib.sha256(data).hexdigest() and e.size == size
            assert (w.shared / rel).read_bytes() == data
        ckpt_files = sorted(p for p in files if not p.startswith(".colabkit-workers/") and p != ".gitattributes")
        assert ckpt_files == sorted([r for r, _ in saved] + [r + ".json" for r, _ in saved])   # one copy each
        hub_claims, local_claims = _claims(hub_server, w.shared)
        assert sorted(hub_claims) == sorted(local_claims) == sorted(r for r, _ in saved)
        # bytes sent, counted at the Hub server, and what the workers copied into the shared folder
        assert hub_server.lfs_bytes_received <= 1.25 * size * len(saved), hub_server.lfs_bytes_received
        copied = sum(n for i in range(6) for _t, n, rel in w.ledger(i, "shared").uploads if rel.endswith(".pt"))
        assert copied <= 1.25 * size * len(saved)
        # every worker's ledger says who uploaded each copy, and the uploaders change between checkpoints
        for rel, _ in saved:
            by = {w.ledger(i, "hub").entries[rel].get("uploaded_by") for i in range(6)}
            assert by == {hub_claims[rel]}
        from colabkit.elect import election_order
        for (rel, _), step in zip(saved, (100, 200, 300, 400)):   # wave 0 uploaded each (no takeover needed)
            assert hub_claims[rel] in election_order(RUN, step, 6)[:2]
            assert local_claims[rel] in election_order(RUN, step, 6)[:2]
        assert len(set(hub_claims.values())) > 1 and len(set(local_claims.values())) > 1
        # retention deletes the older local copies on every worker, uploader or not: the tiers hold them
        newest = sorted(p.rsplit("/", 1)[1] for p, _ in saved[-2:])
        for i in range(6):
            wait_for(lambda i=i: sorted(p.name for p in (w.roots[i] / "checkpoints").glob("*.pt")) == newest, 30,
                     f"worker {i} to keep only its 2 newest checkpoints")
        for i in range(6):
            assert w.stop(i) == 0, w.out(i)[-3000:]
            assert "stopped: everything due is uploaded" in w.out(i)
    finally:
        w.close()


def test_kill_9_of_the_elected_uploader_mid_upload_another_takes_over(hub_server, tmp_path):
    hub_server.create_repo("alice/ckpt")
    w = Workers(tmp_path, hub_server, 4, takeover_after=4)
    try:
        w.start_all()
        hub_server.pause_lfs_at = 2 * MiB       # the first LFS upload stops there (its sender is killed)
        rel, data = w.save(500, 8 * MiB)
        assert hub_server.paused.wait(60), "no upload started"
        lease0 = next(p for p in hub_server.files("alice/ckpt") if p.endswith(".lease-0") and "/leases/" in p)
        oid = hub_server.files("alice/ckpt")[lease0].oid
        victim = json.loads((hub_server.root / "git" / oid).read_bytes())["worker"]
        other = next(i for i in range(4) if i != victim)

        def says_watching():   # what `colabkit sync status` shows of another worker meanwhile
            from colabkit.config import load_config
            from colabkit.sync import persisted_status, tier_notes
            snaps = persisted_status(config=load_config(start=w.roots[other]))
            hub = snaps[-1]["tiers"]["hub"] if snaps else {}
            return hub.get("state") == "watching" and \
                "watching for 1 checkpoint another worker uploads" in tier_notes(hub)
        wait_for(says_watching, 30, f"worker {other} to say it is watching")
        w.procs[victim].send_signal(signal.SIGKILL)
        assert w.procs[victim].wait(30) == -signal.SIGKILL
        hub_server.gate.set()
        others = [i for i in range(4) if i != victim]
        wait_for(lambda: w.held_everywhere(rel, others), 120, "the survivors to hold the checkpoint")
        e = hub_server.files("alice/ckpt")[rel]
        assert e.lfs == hashlib.sha256(data).hexdigest()
        hub_claims, _ = _claims(hub_server, w.shared)
        assert hub_claims[rel] != victim
        assert any(p.endswith(".lease-1") for p in hub_server.files("alice/ckpt"))   # taken over
        for i in others:   # nobody keeps uploading: every survivor flushes at once and stops
            assert w.stop(i) == 0, w.out(i)[-3000:]
            assert "stopped: everything due is uploaded" in w.out(i)
    finally:
        w.close()


def test_a_worker_with_a_read_only_token_is_excluded_and_says_so(hub_server, tmp_path):
    hub_server.create_repo("alice/ckpt")
    w = Workers(tmp_path, hub_server, 3, takeover_after=20, tokens={2: HubServer.READ_TOKEN})
    try:
        w.start_all()
        assert ("worker 2 cannot write to tier 'hub' (hub: uploading 1 file(s) to model repo 'alice/ckpt' failed: "
                "the token from the HF_TOKEN environment variable may not write to model repo 'alice/ckpt' "
                "(HTTP 403 (This token does not have write access)); use a token with write access to it): it is "
                "excluded from the upload elections of run 'elect' on that tier; the other workers upload its "
                "checkpoints there") in w.out(2)
        assert "cannot write" not in w.out(0) + w.out(1)
        saved = [w.save(step, MiB) for step in range(1, 5)]   # steps whose order puts worker 2 first, too
        for rel, data in saved:
            wait_for(lambda: w.held_everywhere(rel), 120, f"every worker to hold {rel}")
        hub_claims, local_claims = _claims(hub_server, w.shared)
        assert 2 not in hub_claims.values() and len(hub_claims) == 4
        assert len(local_claims) == 4   # it can write the shared folder: a member there
        hub_members = sorted(p.rsplit("/", 1)[1] for p in hub_server.files("alice/ckpt") if "/members/" in p)
        assert hub_members == ["worker-00000.member", "worker-00001.member"]
        assert sorted(os.listdir(w.shared / ".colabkit-workers" / RUN / "members")) == [
            "worker-00000.member", "worker-00001.member", "worker-00002.member"]
        from colabkit.elect import election_order
        for (rel, _), step in zip(saved, range(1, 5)):   # one uploader per checkpoint: the first who can write
            order = election_order(RUN, step, 3)
            assert hub_claims[rel] == [i for i in order if i != 2][0]
            assert local_claims[rel] == order[0]
        assert 2 in [election_order(RUN, s, 3)[0] for s in range(1, 5)]   # worker 2 was elected, and skipped
        for rel, _ in saved:
            assert w.ledger(2, "hub").entries[rel]["uploaded_by"] in (0, 1)
        for i in range(3):
            assert w.stop(i) == 0, w.out(i)[-3000:]
    finally:
        w.close()


def test_workers_with_a_drive_tier_upload_each_checkpoint_once_there(drive_server, tmp_path):
    """Drive has no exclusive create: the claim is a file per worker, the first created wins, the losers delete
    theirs. One copy of each checkpoint, about one checkpoint's bytes sent, every worker's ledger holding it."""
    w = Workers(tmp_path, None, 3, takeover_after=20, drive=drive_server)
    try:
        w.start_all()
        size, saved = 3 * MiB, []
        for step in (7, 8):
            rel, data = w.save(step, size)
            saved.append((rel, data))
            wait_for(lambda: w.held_everywhere(rel), 120, f"every worker to hold {rel} on both tiers")
        live = [f for f in drive_server.files.values() if not f.trashed and not f.mimeType.endswith(".folder")]
        for rel, data in saved:
            name = rel.rsplit("/", 1)[1]
            copies = [f for f in live if f.name == name]
            assert len(copies) == 1 and copies[0].md5 == hashlib.md5(data).hexdigest()
            assert len([f for f in live if f.name == name + ".json"]) == 1
        claims = [f for f in live if f.name.endswith(".claim")]
        assert len(claims) == 2
        sent = 0
        for cr in drive_server.content_ranges:
            if cr.startswith("bytes ") and not cr.startswith("bytes */"):
                a, b = cr.split()[1].split("/")[0].split("-")
                sent += int(b) - int(a) + 1
        assert sent <= 1.25 * size * len(saved), sent
        for i in range(3):
            assert w.stop(i) == 0, w.out(i)[-3000:]
    finally:
        w.close()
