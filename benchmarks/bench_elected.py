"""Elected upload: the bytes 6 workers holding the same 10 checkpoints send to the Hub, against the bytes of
the checkpoints (what one uploader would send).

Six `colabkit sync watch` processes (each its own project folder, ``sync.workers: {id: i, group: 6}``, so two
elected uploaders per checkpoint) sync to tests/hub_server.py on 127.0.0.1 and to one shared local-folder
tier. Each checkpoint is written into every worker's folder at the same moment; the next one follows once
every worker's ledger holds the previous one on both tiers. The value is the LFS bytes the Hub server
received (counted while it receives them, complete uploads or not); the baseline is the bytes of the 10
checkpoint files. Without the election every worker would upload: ratio 6. Target: <= 1.25.

    python -m benchmarks.run elected      # or: python -m benchmarks.bench_elected
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .common import WORK, main, result  # noqa: E402

SIZE = int(os.environ.get("COLABKIT_BENCH_ELECTED_BYTES", 4 * 1024 * 1024))
CHECKPOINTS = 10
GROUP = 6


def run() -> list[dict[str, Any]]:
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.hub_server import HubServer
    from tests.test_elect_workers import Workers
    from tests.test_sync import wait_for
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-elected-", dir=WORK))
    try:
        with HubServer(work / "server") as srv:
            srv.create_repo("alice/ckpt")
            w = Workers(work, srv, GROUP, takeover_after=120)
            try:
                w.start_all()
                winners = []
                for k in range(CHECKPOINTS):
                    rel, _data = w.save(100 * (k + 1), SIZE)
                    wait_for(lambda: w.held_everywhere(rel), 300, f"every worker to hold {rel}")
                shared = sum(n for i in range(GROUP) for _t, n, r in w.ledger(i, "shared").uploads
                             if r.endswith(".pt"))
                for i in range(GROUP):
                    w.stop(i)
                from tests.test_elect_workers import _claims
                hub_claims, _ = _claims(srv, w.shared)
                winners = sorted(set(hub_claims.values()))
            finally:
                w.close()
            sent = srv.lfs_bytes_received
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = SIZE * CHECKPOINTS
    return [result("elected_upload_hub_bytes_vs_checkpoint_bytes", float(sent), float(total), 1.25, "bytes",
                   notes=f"LFS bytes the test Hub received for {CHECKPOINTS} checkpoints of {SIZE} B held by "
                         f"{GROUP} workers (2 elected each), / the checkpoints' bytes; every worker uploading "
                         f"would be {GROUP}; the shared folder tier got {shared / total:.2f}x; uploaders seen: "
                         f"{winners}")]


if __name__ == "__main__":
    main(run())
