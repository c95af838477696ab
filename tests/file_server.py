"""A plain HTTP file server on 127.0.0.1 with ``Range`` support and fault knobs, standing in for an
``https://`` data link.

    with FileServer(folder) as srv:
        url = srv.url("pg19.tar")
        srv.drop_after = 100_000        # the next GET is cut after this many body bytes
        ...
        srv.requests                    # [(method, path, status, range header or None, body bytes sent)]
"""
from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        path = owner.root / unquote(self.path.split("?", 1)[0]).lstrip("/")
        rng = self.headers.get("Range")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            owner.log(self.command, self.path, 404, rng, 0)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and owner.ranges:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                owner.log(self.command, self.path, 416, rng, 0)
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes" if owner.ranges else "none")
        self.send_header("ETag", f'"{int(path.stat().st_mtime_ns)}-{size}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        if not head:
            cut = None
            with owner.lock:
                if owner.drop_after is not None:
                    cut, owner.drop_after = owner.drop_after, None
            with open(path, "rb") as f:
                f.seek(start)
                todo = length if cut is None else min(length, cut)
                while todo > 0:
                    buf = f.read(min(todo, 256 * 1024))
                    if not buf:
                        break
                    self.wfile.write(buf)
                    sent += len(buf)
                    todo -= len(buf)
            if cut is not None and sent < length:
                self.wfile.flush()
                self.close_connection = True
                owner.log(self.command, self.path, status, rng, sent)
                import socket
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        owner.log(self.command, self.path, status, rng, sent)


class _Server(ThreadingHTTPServer):
    daemon_threads = False      # server_close() joins the handler threads: the leak check sees none
    owner: "FileServer"


class FileServer:
    """Serves the files under `root`. ``ranges=False`` makes it ignore Range (answers 200 with the whole file)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int, str | None, int]] = []
        self.drop_after: int | None = None
        self.ranges = True
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._srv.owner = self
        self._thread = threading.Thread(target=self._srv.serve_forever, name="test-file-server", daemon=True)

    def log(self, method: str, path: str, status: int, rng: str | None, sent: int) -> None:
        with self.lock:
            self.requests.append((method, path, status, rng, sent))

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._srv.server_address[1]}/{quote(name)}"

    def gets(self) -> list[tuple[str, str, int, str | None, int]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET"]

    def start(self) -> "FileServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
