"""Hub tier throughput: a 256 MB checkpoint up and down through HubRemote vs plain HTTP to the same server.

Both go to tests/hub_server.py on 127.0.0.1 in the same run, through the same HTTP primitives of
huggingface_hub: the plain baseline is one streaming PUT of the bytes to the storage port (``http_backoff``,
as the LFS upload does) and one GET back into a file (``http_get``, as a download does). The Hub path is ``HubRemote.put`` (sha256 of the file, preupload,
LFS batch, PUT, verify, ndjson commit, paths-info check) and ``HubRemote.get`` (HEAD on resolve, redirect to
the storage port, GET hashed while streaming, size and sha256 checked, atomic rename). Neither side fsyncs the
download (a download is a copy of what the Hub keeps: see colabkit.fsutil).
Target: Hub throughput / plain throughput >= 0.8.

    python -m benchmarks.run hub      # or: python -m benchmarks.bench_hub
"""
from __future__ import annotations

import os

# huggingface_hub reads these once at import; the local server speaks classic LFS, and nothing leaves the machine
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .common import WORK, main, result  # noqa: E402

SIZE = int(os.environ.get("COLABKIT_BENCH_HUB_BYTES", 256 * 1024 * 1024))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_HUB_ROUNDS", 7))


def _server_module():
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests import hub_server
    return hub_server


def run() -> list[dict[str, Any]]:
    import warnings

    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import disable_progress_bars, http_backoff

    from colabkit.remotes.hub import HubRemote

    constants.HF_HUB_DISABLE_XET = True  # in case another benchmark imported huggingface_hub first
    hs = _server_module()
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=WORK))
    try:
        src = work / "v1_step_00001000.pt"
        with open(src, "wb") as f:
            for _ in range(SIZE // (16 * 1024 * 1024)):
                f.write(os.urandom(16 * 1024 * 1024))
            f.write(os.urandom(SIZE % (16 * 1024 * 1024)))
        from colabkit.fsutil import hash_file
        digest = hash_file(src)  # what the sync engine's ledger already holds when it calls put/put_many
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # httpx2 on the library's data=file
        disable_progress_bars()  # the Hub path runs without bars too
        plain_up, plain_down, hub_up, hub_down, cold_up = [], [], [], [], []
        with hs.HubServer(work / "server") as srv:
            remote = HubRemote("hub", "alice/bench", endpoint=srv.endpoint, token=srv.WRITE_TOKEN, project="bench")
            remote.check_access()
            for i in range(ROUNDS):
                def plain_round() -> None:
                    # plain: PUT the bytes, GET them back into a file
                    t0 = time.perf_counter()
                    with open(src, "rb") as f:
                        http_backoff("PUT", f"{srv.cdn}/plain/ck{i}", data=f).raise_for_status()
                    t1 = time.perf_counter()
                    dst = work / f"plain{i}.pt"
                    with open(dst, "wb") as out:
                        http_get(f"{srv.cdn}/plain/ck{i}", out, expected_size=SIZE)
                    t2 = time.perf_counter()
                    plain_up.append(t1 - t0)
                    plain_down.append(t2 - t1)
                    dst.unlink()
                    (srv.root / "plain" / f"ck{i}").unlink()

                def hub_round() -> None:
                    # the Hub remote: a fresh path each round, and an emptied LFS store, so nothing is deduplicated
                    shutil.rmtree(srv.root / "lfs")
                    (srv.root / "lfs").mkdir()
                    path = f"v1/checkpoints/round{i}/v1_step_00001000.pt"
                    t0 = time.perf_counter()
                    remote.put(src, path, digest=digest)
                    t1 = time.perf_counter()
                    remote.get(path, work / f"hub{i}.pt")
                    t2 = time.perf_counter()
                    hub_up.append(t1 - t0)
                    hub_down.append(t2 - t1)
                    (work / f"hub{i}.pt").unlink()

                # alternate the order, so neither side always runs after the other's disk writes
                for step in ((plain_round, hub_round) if i % 2 == 0 else (hub_round, plain_round)):
                    step()
                # cold: the remote hashes the file itself (a caller without a ledger)
                shutil.rmtree(srv.root / "lfs")
                (srv.root / "lfs").mkdir()
                t0 = time.perf_counter()
                remote.put(src, f"v1/checkpoints/cold{i}/v1_step_00001000.pt")
                cold_up.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = SIZE / 1e6
    pu, pd, hu, hd, cu = min(plain_up), min(plain_down), min(hub_up), min(hub_down), min(cold_up)
    notes = (f"{SIZE} bytes, best of {ROUNDS} interleaved rounds; local server tests/hub_server.py, classic LFS "
             f"(HF_HUB_DISABLE_XET=1); plain up {mb / pu:.0f} MB/s down {mb / pd:.0f} MB/s; hub up {mb / hu:.0f} MB/s "
             f"down {mb / hd:.0f} MB/s; put given the digest the sync ledger already holds")
    return [
        result("hub_checkpoint_roundtrip_throughput_ratio", 2 * mb / (hu + hd), 2 * mb / (pu + pd), 0.8, "MB/s",
               higher_is_better=True, notes=notes),
        result("hub_checkpoint_upload_throughput_ratio", mb / hu, mb / pu, 0.8, "MB/s", higher_is_better=True,
               notes="upload half of the round trip above (digest given)"),
        result("hub_checkpoint_download_throughput_ratio", mb / hd, mb / pd, 0.8, "MB/s", higher_is_better=True,
               notes="download half of the round trip above (sha256 verified while streaming, atomic rename)"),
        result("hub_checkpoint_roundtrip_cold_throughput_ratio", 2 * mb / (cu + hd), 2 * mb / (pu + pd), 0.8, "MB/s",
               higher_is_better=True, notes=f"as the round trip, but put hashes the file itself (no digest): "
               f"up {mb / cu:.0f} MB/s"),
    ]


if __name__ == "__main__":
    main(run())
