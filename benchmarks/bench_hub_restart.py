"""What a kill -9 mid-upload costs on the Hub tier, classic LFS vs Xet, and what Xet's chunk dedup saves on a
checkpoint that differs a little from the previous one. Bytes are counted where they arrive: the test Hub's LFS
storage port (classic) and its Xet CAS (tests/xet_server.py), both on 127.0.0.1, driven by the real
``colabkit sync once`` (huggingface_hub + hf_xet) in a child process.

Restart rows (``hub_restart_bytes_classic`` / ``hub_restart_bytes_xet``): TRIALS times, a fresh repo, a random
checkpoint of SIZE bytes, ``sync once`` killed with SIGKILL once the upload has sent a fraction of SIZE drawn
uniformly at random (the same fractions for both paths), then a clean ``sync once``; ratio = bytes received ÷
bytes needed, over all trials (one kill per trial: 2 is the most a kill can cost; classic's expected figure is
1 + the mean cut fraction, 1.5). The Xet restart keeps its local xet cache (HF_HOME), as a restart on the same
machine does. Classic LFS sends the whole file again after a cut (1 + the cut fraction); Xet sends again only
the xorbs (≤ 64 MiB each) that were on the wire.

Dedup rows (``hub_dedup_bytes_classic`` / ``_xet`` / ``_xet_new_machine``): a second checkpoint of SIZE bytes
that differs from the first in 1 % of its bytes (one contiguous region), uploaded from the same machine (xet
cache kept) or from a new one (empty HF_HOME): bytes received for it ÷ SIZE.

    python -m benchmarks.run hub_restart      # or: python -m benchmarks.bench_hub_restart
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .common import WORK, main, result

MiB = 1024 * 1024
SIZE = int(os.environ.get("COLABKIT_BENCH_RESTART_BYTES", 160 * MiB))
TRIALS = int(os.environ.get("COLABKIT_BENCH_RESTART_TRIALS", 10))
ROOT = Path(__file__).resolve().parent.parent
XET_ENV = {"HF_HUB_DISABLE_XET": "0", "HF_XET_TELEMETRY_ENABLED": "0"}


def _hub_server():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import hub_server
    return hub_server


def _checkpoint(root: Path, data: bytes, step: int) -> Path:
    import hashlib
    p = root / "checkpoints" / f"v01_step_{step:08d}.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    (p.parent / (p.name + ".json")).write_text(json.dumps(
        {"format": 1, "step": step, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "file": p.name}))
    return p


def _project(root: Path, endpoint: str) -> list[str]:
    import yaml
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1}}))
    return [sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")]


class _Meter:
    """Bytes received by the path's storage, and a trigger that fires once an attempt has sent `at` more."""

    def __init__(self, srv: Any, xet: bool) -> None:
        self.srv, self.xet = srv, xet

    def received(self) -> int:
        return self.srv.cas.xorb_bytes_received if self.xet else self.srv.lfs_bytes_received

    def idle(self) -> bool:
        return self.srv.cas.xorbs_in_flight == 0 if self.xet else True


def _kill_at(child: subprocess.Popen, meter: _Meter, at: int, done: threading.Event) -> bool:
    """SIGKILL `child` once `meter` has counted `at` bytes; False when the child ended first."""
    while child.poll() is None:
        if meter.received() >= at:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            return True
        done.wait(0.002)
    return False


def _wait_idle(meter: _Meter, srv: Any) -> None:
    import time
    deadline = time.monotonic() + 30
    last = -1
    while time.monotonic() < deadline:   # the server reads what the socket buffers still held, then stops
        now = meter.received()
        if meter.idle() and now == last:
            return
        last = now
        threading.Event().wait(0.2)


def _restart_trial(hs: Any, work: Path, xet: bool, frac: float, data: bytes) -> tuple[int, int, bool]:
    srv = hs.HubServer(work / "srv", xet=xet).start()
    try:
        srv.create_repo("alice/weights")
        root = work / "proj"
        cmd = _project(root, srv.endpoint)
        _checkpoint(root, data, 1)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": srv.WRITE_TOKEN, "HF_HOME": str(work / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", **(XET_ENV if xet else {"HF_HUB_DISABLE_XET": "1"})}
        meter = _Meter(srv, xet)
        child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            killed = _kill_at(child, meter, int(frac * len(data)), threading.Event())
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        _wait_idle(meter, srv)
        again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if again.returncode != 0:
            raise RuntimeError(f"clean pass failed: {again.stderr[-1500:]}")
        e = srv.files("alice/weights")["checkpoints/v01_step_00000001.pt"]
        assert e.size == len(data) and (e.xet is not None) == xet
        return meter.received(), len(data), killed
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def _dedup(hs: Any, work: Path, xet: bool, a: bytes, b: bytes, *, new_machine: bool = False) -> int:
    srv = hs.HubServer(work / "srv", xet=xet).start()
    try:
        srv.create_repo("alice/weights")
        root = work / "proj"
        cmd = _project(root, srv.endpoint)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": srv.WRITE_TOKEN, "HF_HOME": str(work / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", **(XET_ENV if xet else {"HF_HUB_DISABLE_XET": "1"})}
        meter = _Meter(srv, xet)
        _checkpoint(root, a, 1)
        subprocess.run(cmd, cwd=root, env=env, capture_output=True, check=True, timeout=600)
        first = meter.received()
        _checkpoint(root, b, 2)
        if new_machine:   # an empty xet cache: only the CAS's global-dedup answers say what it holds
            env["HF_HOME"] = str(work / "hf-new-machine")
        subprocess.run(cmd, cwd=root, env=env, capture_output=True, check=True, timeout=600)
        return meter.received() - first
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def run() -> list[dict[str, Any]]:
    hs = _hub_server()
    WORK.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-hub-restart-", dir=WORK))
    rng = random.Random(1)
    fracs = [rng.uniform(0.05, 0.95) for _ in range(TRIALS)]
    records = []
    try:
        figures: dict[str, tuple[int, int, int]] = {}
        for xet in (False, True):
            sent = needed = kills = 0
            for i, frac in enumerate(fracs):
                got, need, killed = _restart_trial(hs, base / f"r{int(xet)}-{i}", xet, frac, os.urandom(SIZE))
                sent, needed, kills = sent + got, needed + need, kills + killed
            figures["xet" if xet else "classic"] = (sent, needed, kills)
        for path, (sent, needed, kills) in figures.items():
            how = ("Xet (hf_xet, CAS xorb grants: a stored xorb is not sent again)" if path == "xet"
                   else "classic LFS (HF_HUB_DISABLE_XET=1: the cut file is sent again from byte 0)")
            records.append(result(f"hub_restart_bytes_{path}", sent, needed, 2.0 if path == "classic" else 1.3,
                                  "bytes", notes=f"{how}; {TRIALS} trials of a {SIZE // MiB} MiB random checkpoint, "
                                  f"{kills} kill -9 of `sync once` at uniform random points of the upload, then a "
                                  "clean pass; bytes received by the test Hub's storage / bytes needed"))
        a = os.urandom(SIZE)
        cut = bytearray(a)
        n = SIZE // 100
        cut[SIZE // 2:SIZE // 2 + n] = os.urandom(n)
        b = bytes(cut)
        for path, xet, new in (("classic", False, False), ("xet", True, False), ("xet_new_machine", True, True)):
            got = _dedup(hs, base / f"d-{path}", xet, a, b, new_machine=new)
            how = {"classic": "classic LFS",
                   "xet": "Xet chunk dedup, from the machine that uploaded the first (its xet cache kept)",
                   "xet_new_machine": "Xet chunk dedup from a new machine (empty xet cache; the CAS's global-dedup "
                                      "answers)"}[path]
            records.append(result(f"hub_dedup_bytes_{path}", got, SIZE, 1.0 if not xet else 0.05, "bytes",
                                  notes=f"{how}: a second {SIZE // MiB} MiB checkpoint differing from the first in "
                                  "1 % (one region); bytes received for it / its size"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return records


if __name__ == "__main__":
    main(run())
