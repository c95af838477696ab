"""Data sets: fetch + verify throughput from the Hub, and the cost of a repeated fetch of an unchanged set.

1. ``data_fetch_hub_256mb_throughput``: ``data.fetch`` of a 256 MB data set (4 LFS shards of 64 MB in a dataset
   repo on tests/hub_server.py: repo info, tree listing, per file HEAD + GET hashed while streaming, size and
   sha256 checked, renamed into place, the record and the journal entry) vs a plain ``http_get`` of the same
   four blobs from the same server into files. Target >= 0.8.
2. ``data_refetch_unchanged_vs_stat_walk``: a second ``data.fetch`` of an unchanged data set of 5000 files whose
   version is declared (the record read, every file's size and mtime compared; the source is not contacted)
   vs a bare ``os.walk`` + ``os.stat`` of the same files. Target <= 5.

    python -m benchmarks.run data      # or: python -m benchmarks.bench_data
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .common import WORK, main, result  # noqa: E402

SIZE = int(os.environ.get("COLABKIT_BENCH_DATA_BYTES", 256 * 1024 * 1024))
SHARDS = 4
ROUNDS = int(os.environ.get("COLABKIT_BENCH_DATA_ROUNDS", 5))
SMALL_FILES = int(os.environ.get("COLABKIT_BENCH_DATA_FILES", 5000))


def _server_module():
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests import hub_server
    return hub_server


def _project(root: Path, cache: Path, sets: list[dict[str, Any]]) -> Any:
    import yaml

    from colabkit.config import load_config
    root.mkdir(parents=True, exist_ok=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({"data": {"cache": str(cache), "min_free": 0,
                                                                 "sets": sets}}))
    return load_config(root / "colabkit.yaml")


def hub_throughput(work: Path) -> dict[str, Any]:
    import warnings

    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import disable_progress_bars

    from colabkit import data
    from colabkit.remotes.hub import HubRemote

    constants.HF_HUB_DISABLE_XET = True
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    disable_progress_bars()
    hs = _server_module()
    shard = SIZE // SHARDS
    src = work / "shards"
    src.mkdir()
    items = []
    for i in range(SHARDS):
        p = src / f"train-{i:05d}.parquet"
        with open(p, "wb") as f:
            for _ in range(shard // (16 * 2**20)):
                f.write(os.urandom(16 * 2**20))
            f.write(os.urandom(shard % (16 * 2**20)))
        items.append((p, f"train/{p.name}"))
    plain, ours = [], []
    with hs.HubServer(work / "server") as srv:
        HfApi(endpoint=srv.endpoint, token=srv.WRITE_TOKEN).create_repo("alice/bench-data", repo_type="dataset",
                                                                       private=False)
        recs = HubRemote("up", "alice/bench-data", repo_type="dataset", endpoint=srv.endpoint,
                         token=srv.WRITE_TOKEN).put_many(items, message="data")
        os.environ["HF_ENDPOINT"] = srv.endpoint
        try:
            for i in range(ROUNDS):
                def plain_round() -> None:
                    out = work / f"plain{i}"
                    out.mkdir()
                    t0 = time.perf_counter()
                    for r in recs:
                        with open(out / Path(r.path).name, "wb") as f:
                            http_get(f"{srv.cdn}/lfs/{r.sha256}", f, expected_size=r.size)
                    plain.append(time.perf_counter() - t0)
                    shutil.rmtree(out)

                def our_round() -> None:
                    cfg = _project(work / f"proj{i}", work / f"ssd{i}",
                                   [{"name": "bench", "source": "hub:datasets/alice/bench-data:train/*"}])
                    t0 = time.perf_counter()
                    res = data.fetch("bench", config=cfg, progress=False)
                    ours.append(time.perf_counter() - t0)
                    assert res.files == SHARDS and res.verified == "source" and res.downloaded == SHARDS * shard
                    shutil.rmtree(work / f"ssd{i}")

                for step in ((plain_round, our_round) if i % 2 == 0 else (our_round, plain_round)):
                    step()
        finally:
            os.environ.pop("HF_ENDPOINT", None)
    mb = SHARDS * shard / 1e6
    p, o = min(plain), min(ours)
    return result("data_fetch_hub_256mb_throughput", mb / o, mb / p, 0.8, "MB/s", higher_is_better=True,
                  notes=f"{SHARDS} LFS shards, {SHARDS * shard} bytes, from a dataset repo on tests/hub_server.py, best "
                        f"of {ROUNDS} alternated rounds: data.fetch (listing, repo info, per file HEAD + GET hashed "
                        f"while streaming, verified, renamed into place, record, journal entry) {o:.2f}s "
                        f"({mb / o:.0f} MB/s) vs plain http_get of the same blobs {p:.2f}s ({mb / p:.0f} MB/s)")


def refetch_unchanged(work: Path) -> dict[str, Any]:
    from colabkit import data
    src = work / "many"
    for i in range(SMALL_FILES):
        d = src / f"part-{i // 500:02d}"
        if i % 500 == 0:
            d.mkdir(parents=True)
        (d / f"{i:06d}.jsonl").write_bytes(b"x" * 64)
    cfg = _project(work / "proj-many", work / "ssd-many", [{"name": "many", "source": str(src), "version": "v1"}])
    first = data.fetch("many", config=cfg, progress=False)
    assert first.files == SMALL_FILES

    def walk() -> int:
        n = 0
        for dirpath, _dirs, files in os.walk(first.path):
            for f in files:
                os.stat(os.path.join(dirpath, f))
                n += 1
        return n

    def again() -> None:
        res = data.fetch("many", config=cfg, progress=False)
        assert res.up_to_date and res.downloaded == 0

    walks, fetches = [], []
    for i in range(7):
        for fn, out in (((walk, walks), (again, fetches)) if i % 2 == 0 else ((again, fetches), (walk, walks))):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    w, f = min(walks), min(fetches)
    return result("data_refetch_unchanged_vs_stat_walk", f, w, 5.0, "s",
                  notes=f"{SMALL_FILES} files, version declared (the source is not contacted): data.fetch "
                        f"{f * 1000:.1f} ms (record read, size + mtime of every file, journal checked) vs os.walk + "
                        f"os.stat {w * 1000:.1f} ms; best of 7 alternated")


def run() -> list[dict[str, Any]]:
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=WORK))
    try:
        return [hub_throughput(work), refetch_unchanged(work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(run())
