"""Drive tier throughput: a 256 MB upload + download through DriveRemote (resumable 8 MiB chunks, md5+sha256
in the same read pass, verification) against a plain single-request upload and download of the same bytes to
the same local Drive server in the same run. Target: throughput ratio >= 0.8."""
from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import WORK, best_of, result, write_results  # noqa: E402

SIZE = 256 * 1000 * 1000


def _plain_roundtrip(srv, token: str, folder: str, src: Path, dst: Path) -> None:
    """One resumable session, the whole file in one PUT, then one GET of alt=media: the floor."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120, blocksize=1 << 20)
    meta = json.dumps({"name": "plain.bin", "parents": [folder]}).encode()
    conn.request("POST", "/upload/drive/v3/files?uploadType=resumable&supportsAllDrives=true&fields=id",
                 body=meta, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                     "X-Upload-Content-Length": str(SIZE)})
    r = conn.getresponse()
    r.read()
    loc = urllib.parse.urlsplit(r.getheader("Location"))
    with open(src, "rb") as f:
        conn.request("PUT", f"{loc.path}?{loc.query}", body=f,
                     headers={"Authorization": f"Bearer {token}", "Content-Length": str(SIZE),
                              "Content-Range": f"bytes 0-{SIZE - 1}/{SIZE}"})
        r = conn.getresponse()
        fid = json.loads(r.read())["id"]
    conn.request("GET", f"/drive/v3/files/{fid}?alt=media&supportsAllDrives=true",
                 headers={"Authorization": f"Bearer {token}"})
    r = conn.getresponse()
    buf = bytearray(1 << 20)
    with open(dst, "wb") as out:
        while True:
            n = r.readinto(buf)
            if not n:
                break
            out.write(memoryview(buf)[:n])
    conn.request("DELETE", f"/drive/v3/files/{fid}?supportsAllDrives=true",
                 headers={"Authorization": f"Bearer {token}"})
    conn.getresponse().read()
    conn.close()


def run() -> list[dict]:
    from colabkit.config import load_config
    from colabkit.remotes import open_remote
    from tests.drive_server import DriveServer

    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix="drive-") as tmp:
        tmp_p = Path(tmp)
        src = tmp_p / "src.bin"
        with open(src, "wb") as f:
            for _ in range(SIZE // (8 * 10**6)):
                f.write(os.urandom(8 * 10**6))
        with DriveServer(tmp_p / "server") as srv:
            folder = srv.create_folder("bench", share_with={srv.SA_EMAIL: "writer"}, shared_drive=True)
            key = srv.write_service_account(tmp_p / "sa.json")
            cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key),
                                              "endpoint": srv.endpoint},
                                    "tiers": [{"name": "drive", "remote": "drive"}]}, start=tmp_p)
            remote = open_remote(cfg, "drive")
            remote.check_access()   # token + folder lookups out of the timed part
            token = next(iter(srv.tokens))

            def through_remote() -> None:
                remote.put(src, "bench/src.bin")
                remote.get("bench/src.bin", tmp_p / "back.bin")
                remote.delete("bench/src.bin")

            def plain() -> None:
                _plain_roundtrip(srv, token, folder, src, tmp_p / "plain-back.bin")

            plain()  # warm the page cache
            t_plain = best_of(3, plain)
            t_remote = best_of(3, through_remote)
            remote.close()
    mb = SIZE / 1e6
    return [result("drive_roundtrip_256mb_throughput", mb * 2 / t_remote, mb * 2 / t_plain, 0.8, "MB/s",
                   higher_is_better=True,
                   notes=f"DriveRemote put+get {t_remote:.2f}s vs plain single-request PUT+GET {t_plain:.2f}s "
                         "to the same local Drive server; 8 MiB chunks, md5+sha256 both ways")]


if __name__ == "__main__":
    recs = run()
    for r in recs:
        print(r)
    write_results(recs)
