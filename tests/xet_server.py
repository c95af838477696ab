"""A Xet CAS (content-addressed storage) server on 127.0.0.1 that the real ``hf_xet`` uploads to and downloads from.

It is the third port of a Xet-enabled :class:`tests.hub_server.HubServer` (``HubServer(xet=True)``): the Hub hands
out short-lived CAS tokens (``GET /api/{type}s/{repo}/xet-write-token/{rev}`` and ``xet-read-token``: JSON
``casUrl``/``accessToken``/``exp`` plus the ``X-Xet-Cas-Url``/``X-Xet-Access-Token``/``X-Xet-Token-Expiration``
headers), and ``hf_xet`` then talks to this server with ``Authorization: Bearer <token>``.

The routes are the ones ``hf_xet`` 1.8 calls (seen on the wire, and in xet-core's own local CAS server):

* ``GET /v1/chunks/{prefix}/{chunk}`` — global dedup (the client asks for the first chunk of a file and for a
  sample of chunks): a full shard (header, the xorb-info section of the shard upload that listed the chunk, lookup
  tables, footer; no file info; chunk hashes not keyed with an HMAC) when one did, else 404. ``global_dedup=False``
  answers 404 always (the client then dedups only against its own shard cache, ``HF_XET_CACHE``).
* ``POST /v1/xorb-grants/{prefix}/{xorb}`` (body ``{"length", "checksum"}``) — 200 when the xorb is already
  stored (the client then does not send it: this is what makes a restart after a kill cheap), 404 when no grant
  is offered (the client falls back to the direct upload below).
* ``POST /v1/xorbs/{prefix}/{xorb}`` — a serialized xorb (chunks, each an 8-byte header: version, compressed
  length (3 bytes LE), compression scheme (0 none, 1 LZ4 frame, 2 byte-grouping-4 + LZ4), uncompressed length
  (3 bytes LE)); stored once, answered ``{"was_inserted": bool}``.
* ``POST /v2/shards`` → 404 (the client falls back), ``POST /v1/shards`` — a shard: 48-byte header (tag
  ``HFRepoMetaData…``, version 2), file-info section (per file: hash, flags, n; n segments of xorb hash + chunk
  index range + unpacked bytes; optional verification entries; the sha256 metadata extension) ended by an
  all-0xFF bookend, then the xorb-info section (per xorb: hash, n chunks; per chunk: hash, unpacked start and
  length), bookend. Every xorb a file refers to must be stored first (else 400). Answer ``{"result": 1}``.
* ``GET /v2/reconstructions/{file}`` → 404 (the client falls back), ``GET /v1/reconstructions/{file}``
  (``Range: bytes=a-b`` honoured) — ``{"offset_into_first_range", "terms": [{hash, unpacked_length,
  range}], "fetch_info": {xorb: [{range, url, url_range}]}}``; the URLs point at ``GET /xorb/{xorb}`` here
  which serves the xorb's raw bytes for the ``Range`` header (the client decompresses; a ``drop_after`` fault
  cuts the body midway).
* ``HEAD /v1/files/{file}`` (size), ``POST /v1/telemetry`` (accepted, ignored).

Not served (the client falls back or does not need them): the V2 shard and reconstruction APIs, upload grants
that hand out a presigned URL (``xorb-commits``), the batch reconstruction query, HMAC-keyed chunk hashes in
global-dedup answers; tokens are not scoped to a repo.

Hashes are hex as xet writes them: each of the four little-endian u64 words of the 32 bytes as 16 hex digits.
The server does not recompute Merkle hashes (it trusts the client's keys) but it parses every xorb and shard,
refuses malformed ones, and can rebuild a file's bytes (LZ4 / byte grouping, ``lz4`` package) for the Hub's
plain download path and for tests. Counters: :attr:`XetCAS.xorb_bytes_received` (every xorb body byte,
complete or not: what a restart after a kill costs), ``xorb_uploads``, ``shard_uploads``, ``dedup_queries``,
``grants``. ``pause_xorb_at`` holds a xorb upload once that many bytes of it arrived and ``pause_after_stored``
xorbs are stored (``paused`` / ``gate``, as ``HubServer.pause_lfs_at``). Faults use the Hub's vocabulary:
``hub.inject(port="cas", ...)`` and ``hub.ratio``.
"""
from __future__ import annotations

import os
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .hub_server import HubServer

SHARD_TAG = bytes([72, 70, 82, 101, 112, 111, 77, 101, 116, 97, 68, 97, 116, 97, 0, 85, 105, 103, 69, 106, 123,
                   129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169])
_BOOKEND = b"\xff" * 32
_FLAG_VERIFICATION = 1 << 31
_FLAG_METADATA_EXT = 1 << 30
_ENTRY = 48
TOKEN_TTL = 3600


def xet_hex(raw: bytes) -> str:
    """A 32-byte xet hash as xet prints it (each little-endian u64 word as 16 hex digits)."""
    return "".join("%016x" % w for w in struct.unpack("<4Q", raw))


def xet_raw(hexstr: str) -> bytes:
    return struct.pack("<4Q", *(int(hexstr[i:i + 16], 16) for i in range(0, 64, 16)))


class FormatError(ValueError):
    pass


@dataclass
class Segment:
    xorb: str
    chunk_start: int
    chunk_end: int      # exclusive
    unpacked: int


@dataclass
class FileInfo:
    file_hash: str
    segments: list[Segment]
    sha256: str | None

    @property
    def size(self) -> int:
        return sum(s.unpacked for s in self.segments)


@dataclass
class XorbInfo:
    """A stored xorb: per chunk (byte start, byte end) of its serialized form and its uncompressed length."""
    size: int
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, scheme, unpacked)


def parse_xorb(data: bytes) -> XorbInfo:
    """Walk a serialized xorb's chunk headers; a footer (xorb metadata) after the chunks is tolerated."""
    info = XorbInfo(len(data))
    off = 0
    while off + 8 <= len(data):
        ver, scheme = data[off], data[off + 4]
        clen = int.from_bytes(data[off + 1:off + 4], "little")
        ulen = int.from_bytes(data[off + 5:off + 8], "little")
        if ver != 0 or scheme not in (0, 1, 2) or off + 8 + clen > len(data) or ulen == 0:
            break  # the footer, or garbage (caught below when nothing parsed)
        info.chunks.append((off + 8, off + 8 + clen, scheme, ulen))
        off += 8 + clen
    if not info.chunks:
        raise FormatError("not a xorb: no valid chunk header")
    return info


def parse_shard(data: bytes) -> tuple[list[FileInfo], dict[str, tuple[list[tuple[str, int, int]], bytes]]]:
    """(files, xorbs) of a shard; xorbs map a xorb hash to its chunks (hash, unpacked start, unpacked length) and
    the raw bytes of its block in the xorb-info section (header + chunk entries)."""
    if len(data) < 48 or data[:32] != SHARD_TAG:
        raise FormatError("not a shard: wrong magic number")
    (version, _footer_size) = struct.unpack("<QQ", data[32:48])
    if version != 2:
        raise FormatError(f"shard header version {version}, expected 2")
    off = 48

    def entry() -> tuple[bytes, tuple[int, int, int, int]]:
        nonlocal off
        if off + _ENTRY > len(data):
            raise FormatError("shard truncated")
        raw = data[off:off + 32]
        rest = struct.unpack("<IIII", data[off + 32:off + 48])
        off += _ENTRY
        return raw, rest

    files: list[FileInfo] = []
    while True:
        raw, (flags, n, _a, _b) = entry()
        if raw == _BOOKEND:
            break
        segs = []
        for _ in range(n):
            xr, (_xf, unpacked, cs, ce) = entry()
            if ce <= cs:
                raise FormatError("shard segment with an empty chunk range")
            segs.append(Segment(xet_hex(xr), cs, ce, unpacked))
        if flags & _FLAG_VERIFICATION:
            for _ in range(n):
                entry()
        sha = None
        if flags & _FLAG_METADATA_EXT:
            sr, _ = entry()
            sha = xet_hex(sr)
        files.append(FileInfo(xet_hex(raw), segs, sha))
    xorbs: dict[str, tuple[list[tuple[str, int, int]], bytes]] = {}
    while off < len(data):
        begin = off
        raw, (_flags, n, _nb, _nd) = entry()
        if raw == _BOOKEND:
            break
        chunks = []
        for _ in range(n):
            cr, (start, ulen, _cf, _u) = entry()
            chunks.append((xet_hex(cr), start, ulen))
        xorbs[xet_hex(raw)] = (chunks, data[begin:off])
    return files, xorbs


def dedup_shard(blocks: list[bytes]) -> bytes:
    """A full shard (header, empty file section, the xorb-info blocks, lookup tables, footer) for a global-dedup
    answer: what the client imports into its shard cache to dedup against xorbs it did not upload itself."""
    def words(raw: bytes) -> tuple[int, ...]:
        return struct.unpack("<4Q", raw[:32])
    blocks = sorted(blocks, key=words)             # xorbs in hash order (the lookup tables are searched sorted)
    out = bytearray(SHARD_TAG + struct.pack("<QQ", 2, 200))
    file_info_offset = len(out)
    out += _BOOKEND + bytes(16)                    # no file info: only what dedup needs
    xorb_info_offset = len(out)
    xorb_keys, chunk_keys = [], []
    index = nbytes = ndisk = 0
    for block in blocks:
        _flags, n, nb, nd = struct.unpack("<IIII", block[32:48])
        out += block
        xorb_keys.append((words(block)[0], index))
        chunk_keys += [(words(block[48 + 48 * i:80 + 48 * i])[0], index, i) for i in range(n)]
        index += 1 + n
        nbytes, ndisk = nbytes + nb, ndisk + nd
    out += _BOOKEND + bytes(16)
    file_lookup_offset = len(out)                  # no files
    xorb_lookup_offset = len(out)
    for k, i in xorb_keys:                         # (truncated hash = first u64 word, entry index)
        out += struct.pack("<QI", k, i)
    chunk_lookup_offset = len(out)
    for k, xi, ci in sorted(chunk_keys):
        out += struct.pack("<QII", k, xi, ci)
    footer_offset = len(out)
    out += struct.pack("<9Q", 1, file_info_offset, xorb_info_offset, file_lookup_offset, 0, xorb_lookup_offset,
                       len(xorb_keys), chunk_lookup_offset, len(chunk_keys))
    out += bytes(32)                               # no HMAC key: chunk hashes in the clear
    out += struct.pack("<2Q", int(time.time()), 2**64 - 1) + bytes(48)
    out += struct.pack("<4Q", ndisk, nbytes, nbytes, footer_offset)
    return bytes(out)


def decompress_chunk(scheme: int, payload: bytes, unpacked: int) -> bytes:
    if scheme == 0:
        out = payload
    else:
        import lz4.frame  # a test dependency (pyproject `test` extra)
        out = lz4.frame.decompress(payload)
        if scheme == 2:  # byte grouping 4: the four byte lanes were stored one after the other
            n = len(out)
            q, r = divmod(n, 4)
            sizes = [q + (1 if k < r else 0) for k in range(4)]
            lanes, pos = [], 0
            for s in sizes:
                lanes.append(out[pos:pos + s])
                pos += s
            buf = bytearray(n)
            for k in range(4):
                buf[k::4] = lanes[k]
            out = bytes(buf)
    if len(out) != unpacked:
        raise FormatError(f"chunk unpacked to {len(out)} bytes, header says {unpacked}")
    return out


class XetCAS:
    """The store and its counters. Served by :class:`tests.hub_server.HubServer` on its ``cas`` port."""

    def __init__(self, root: Path, hub: "HubServer") -> None:
        self.root = Path(root)
        (self.root / "xorbs").mkdir(parents=True, exist_ok=True)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.hub = hub
        self.lock = threading.RLock()
        self.files: dict[str, FileInfo] = {}
        self.by_sha256: dict[str, str] = {}            # sha256 -> xet file hash
        self.xorbs: dict[str, XorbInfo] = {}
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (scope "read"/"write", expiry)
        self.shard_blocks: dict[str, list[bytes]] = {}  # uploaded shard -> its xorb-info blocks
        self.chunk_shard: dict[str, str] = {}           # chunk hash -> the shard upload that listed it
        #: answer global-dedup queries (else always 404)
        self.global_dedup = True
        self.xorb_bytes_received = 0
        self.xorb_uploads: list[tuple[str, int, bool]] = []   # (xorb, bytes received, complete) per POST
        self.shard_uploads: list[int] = []                    # size of every accepted shard
        self.dedup_queries: list[tuple[str, bool]] = []       # (chunk asked for, answered with a shard)
        self.grants: list[tuple[str, bool]] = []              # (xorb, already stored)
        self.served_bytes = 0
        self.xorbs_in_flight = 0                              # xorb POST bodies being received now
        self.pause_xorb_at: int | None = None
        #: pause_xorb_at arms only once this many xorbs are stored (to cut a later xorb of a large file)
        self.pause_after_stored = 0
        self.paused = threading.Event()
        self.gate = threading.Event()
        self.url = ""

    # -- tokens ---------------------------------------------------------------------------------------
    def issue_token(self, scope: str) -> tuple[str, int]:
        tok = f"xet_{scope}_{uuid.uuid4().hex}"
        exp = int(time.time()) + TOKEN_TTL
        with self.lock:
            self.tokens[tok] = (scope, exp)
        return tok, exp

    def check_token(self, auth: str, *, write: bool) -> None:
        from .hub_server import _HTTPError
        tok = auth.split(" ", 1)[-1].strip() if auth else ""
        scope, exp = self.tokens.get(tok, (None, 0.0))
        if scope is None or exp < time.time():
            raise _HTTPError(401, None, "Invalid or expired CAS token")
        if write and scope != "write":
            raise _HTTPError(403, None, "This CAS token may only read")

    # -- what tests look at ---------------------------------------------------------------------------
    def xorb_path(self, h: str) -> Path:
        return self.root / "xorbs" / h

    def file_by_sha256(self, sha256: str) -> FileInfo | None:
        with self.lock:
            fh = self.by_sha256.get(sha256)
            return self.files.get(fh) if fh else None

    def reconstruct(self, file_hash: str) -> bytes:
        """The file's bytes, rebuilt from its segments (decompressing every chunk)."""
        fi = self.files[file_hash]
        out = bytearray()
        for seg in fi.segments:
            data = self.xorb_path(seg.xorb).read_bytes()
            info = self.xorbs[seg.xorb]
            for start, end, scheme, ulen in info.chunks[seg.chunk_start:seg.chunk_end]:
                out += decompress_chunk(scheme, data[start:end], ulen)
        return bytes(out)

    def corrupt(self, file_hash: str) -> None:
        """Flip bytes of the first stored chunk of a file (what a broken storage node would serve)."""
        seg = self.files[file_hash].segments[0]
        p = self.xorb_path(seg.xorb)
        data = bytearray(p.read_bytes())
        start, end, scheme, _u = self.xorbs[seg.xorb].chunks[seg.chunk_start]
        if scheme == 0:
            for i in range(start, min(end, start + 16)):
                data[i] ^= 0xFF
        else:  # keep the LZ4 frame decodable: flip literal bytes near the end of the frame's data
            for i in range(max(start, end - 24), end - 8):
                data[i] ^= 0x01
        p.write_bytes(bytes(data))

    # -- the routes -----------------------------------------------------------------------------------
    def handle(self, h: Any) -> None:
        """Serve one request on handler `h` (a tests.hub_server._Handler on the ``cas`` port)."""
        from .hub_server import _HTTPError
        p, m = h.url_path, h.command
        auth = h.headers.get("Authorization") or ""
        if p == "/v1/telemetry" and m == "POST":
            h._body()
            return h._json({})
        mx = re.fullmatch(r"/xorb/([0-9a-f]{64})", p)
        if mx and m in ("GET", "HEAD"):
            sig = (h.query.get("sig") or [""])[0]
            if not sig or sig not in self.tokens:
                raise _HTTPError(403, None, "Request has expired or the signature does not match")
            return self._serve_xorb(h, mx.group(1))
        write = m == "POST"
        self.check_token(auth, write=write)
        mg = re.fullmatch(r"/v1/xorb-grants/([\w-]+)/([0-9a-f]{64})", p)
        if mg and m == "POST":
            h._body()
            with self.lock:
                have = mg.group(2) in self.xorbs
                self.grants.append((mg.group(2), have))
            if have:
                return h._json({})
            raise _HTTPError(404, None, "upload grants are not offered; use POST /v1/xorbs")
        mu = re.fullmatch(r"/v1/xorbs/([\w-]+)/([0-9a-f]{64})", p)
        if mu and m == "POST":
            return self._post_xorb(h, mu.group(2))
        if mu and m == "HEAD":
            if mu.group(2) not in self.xorbs:
                raise _HTTPError(404, None, "XORB not found")
            return h._send(200, b"")
        if p == "/v2/shards" and m == "POST":
            raise _HTTPError(404, None, "V2 shard upload is not offered")
        if p == "/v1/shards" and m == "POST":
            return self._post_shard(h)
        mc = re.fullmatch(r"/v1/chunks/([\w-]+)/([0-9a-f]{64})", p)
        if mc and m == "GET":
            with self.lock:
                sid = self.chunk_shard.get(mc.group(2)) if self.global_dedup else None
                self.dedup_queries.append((mc.group(2), sid is not None))
                blocks = self.shard_blocks.get(sid) if sid else None
            if not blocks:
                raise _HTTPError(404, None, "Shard not found")
            return h._send(200, dedup_shard(blocks), ctype="application/octet-stream")
        if re.fullmatch(r"/v2/reconstructions/[0-9a-f]{64}", p) and m == "GET":
            raise _HTTPError(404, None, "V2 reconstruction is not offered")
        mr = re.fullmatch(r"/v1/reconstructions/([0-9a-f]{64})", p)
        if mr and m == "GET":
            return self._reconstruction(h, mr.group(1), auth)
        mf = re.fullmatch(r"/v1/files/([0-9a-f]{64})", p)
        if mf and m == "HEAD":
            fi = self.files.get(mf.group(1))
            if fi is None:
                raise _HTTPError(404, None, "File not found")
            h._status = 200
            h.send_response(200)
            h.send_header("Content-Length", str(fi.size))
            h.end_headers()
            return None
        raise _HTTPError(404, None, f"no route for {m} {p}")

    def _post_xorb(self, h: Any, xh: str) -> None:
        from .hub_server import _HTTPError
        h._body_read = True
        n = int(h.headers.get("Content-Length") or 0)
        buf = bytearray()
        with self.lock:
            self.xorbs_in_flight += 1
        try:
            self._receive(h, buf, n)
        finally:
            with self.lock:
                self.xorbs_in_flight -= 1
                self.xorb_uploads.append((xh, len(buf), len(buf) == n))
        if len(buf) != n:  # the client went away mid-body (a kill): nobody to answer
            raise ConnectionResetError(f"incomplete body: {len(buf)} of {n} bytes")
        data = bytes(buf)
        try:
            info = parse_xorb(data)
        except FormatError as e:
            raise _HTTPError(400, None, str(e))
        with self.lock:
            inserted = xh not in self.xorbs
            if inserted:
                tmp = self.root / "xorbs" / f".tmp-{uuid.uuid4().hex}"
                tmp.write_bytes(data)
                os.replace(tmp, self.xorb_path(xh))
                self.xorbs[xh] = info
        h._json({"was_inserted": inserted})

    def _receive(self, h: Any, buf: bytearray, n: int) -> None:
        from .hub_server import _CHUNK
        while len(buf) < n:
            b = h.rfile.read(min(_CHUNK, n - len(buf)))
            if not b:
                break
            buf += b
            with self.lock:
                self.xorb_bytes_received += len(b)
                hold = (self.pause_xorb_at is not None and len(buf) >= self.pause_xorb_at
                        and len(self.xorbs) >= self.pause_after_stored)
                if hold:
                    self.pause_xorb_at = None
            if hold:
                self.paused.set()
                while not self.gate.wait(0.05) and self.hub._servers:
                    pass

    def _post_shard(self, h: Any) -> None:
        from .hub_server import _HTTPError
        data = h._body()
        try:
            files, xorbs = parse_shard(data)
        except FormatError as e:
            raise _HTTPError(400, None, str(e))
        with self.lock:
            for fi in files:
                for s in fi.segments:
                    x = self.xorbs.get(s.xorb)
                    if x is None:
                        raise _HTTPError(400, None, f"shard refers to xorb {s.xorb}, which was not uploaded")
                    if s.chunk_end > len(x.chunks):
                        raise _HTTPError(400, None, f"shard refers to chunks {s.chunk_start}-{s.chunk_end} of xorb "
                                         f"{s.xorb}, which has {len(x.chunks)}")
                    if sum(u for (_a, _b, _c, u) in x.chunks[s.chunk_start:s.chunk_end]) != s.unpacked:
                        raise _HTTPError(400, None, f"shard segment size does not match xorb {s.xorb}")
            sid = uuid.uuid4().hex
            (self.root / "shards" / sid).write_bytes(data)
            self.shard_blocks[sid] = [block for xh, (_c, block) in xorbs.items() if xh in self.xorbs]
            for xh, (chunks, _block) in xorbs.items():
                for ch, _s, _l in chunks:
                    self.chunk_shard.setdefault(ch, sid)
            for fi in files:
                self.files[fi.file_hash] = fi
                if fi.sha256:
                    self.by_sha256[fi.sha256] = fi.file_hash
            self.shard_uploads.append(len(data))
        h._json({"result": 1})

    def _reconstruction(self, h: Any, fh: str, auth: str) -> None:
        from .hub_server import _HTTPError
        fi = self.files.get(fh)
        if fi is None:
            raise _HTTPError(404, None, "File not found")
        size = fi.size
        start, end = 0, size  # [start, end)
        rng = h.headers.get("Range")
        if rng:
            mr = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not mr or (not mr.group(1) and not mr.group(2)):
                raise _HTTPError(416, None, "Invalid range")
            if mr.group(1):
                start = int(mr.group(1))
                end = min(size, int(mr.group(2)) + 1) if mr.group(2) else size
            else:
                start, end = max(0, size - int(mr.group(2))), size
            if start >= end:
                raise _HTTPError(416, None, "Range not satisfiable")
        terms: list[dict[str, Any]] = []
        fetch: dict[str, list[dict[str, Any]]] = {}
        sig = auth.split(" ", 1)[-1].strip()
        pos, first_offset = 0, None
        for seg in fi.segments:
            info = self.xorbs[seg.xorb]
            c0 = c1 = None
            seg_first_pos = None
            for ci in range(seg.chunk_start, seg.chunk_end):
                ulen = info.chunks[ci][3]
                if pos + ulen > start and pos < end:
                    if c0 is None:
                        c0, seg_first_pos = ci, pos
                    c1 = ci + 1
                pos += ulen
            if c0 is None:
                continue
            if first_offset is None:
                first_offset = start - seg_first_pos
            unpacked = sum(info.chunks[ci][3] for ci in range(c0, c1))
            terms.append({"hash": seg.xorb, "unpacked_length": unpacked, "range": {"start": c0, "end": c1}})
            fi = {"range": {"start": c0, "end": c1}, "url": f"{self.url}/xorb/{seg.xorb}?sig={sig}",
                  "url_range": {"start": info.chunks[c0][0] - 8, "end": info.chunks[c1 - 1][1] - 1}}
            if fi not in fetch.setdefault(seg.xorb, []):  # a chunk range the file uses twice is fetched once
                fetch[seg.xorb].append(fi)
        h._json({"offset_into_first_range": first_offset or 0, "terms": terms, "fetch_info": fetch})

    def _serve_xorb(self, h: Any, xh: str) -> None:
        """The xorb's raw bytes for the ``Range`` asked (the storage behind fetch_info URLs; ``drop_after`` faults
        cut it midway, as on the CDN)."""
        from .hub_server import _HTTPError
        p = self.xorb_path(xh)
        if not p.is_file():
            raise _HTTPError(404, None, "NoSuchKey")
        size = p.stat().st_size
        n = size
        mr = re.fullmatch(r"bytes=(\d+)-(\d*)", (h.headers.get("Range") or "").strip())
        if mr:
            end = min(size - 1, int(mr.group(2))) if mr.group(2) else size - 1
            n = max(0, end - int(mr.group(1)) + 1)
        with self.lock:
            self.served_bytes += n if h._drop_after is None else min(n, h._drop_after)
        h._serve_file(p)
