"""Resume fetch: bringing a 256 MB checkpoint back from a local-folder tier, verified, vs a plain copy.

Baseline (same run, same file, same disk): ``shutil.copyfile`` of the tier's file into a folder (no hash, no
fsync). Value: ``colabkit.resume.locate`` + ``fetch`` of the same checkpoint from a local-folder tier (list
the tier, read the sidecar manifest, copy into the checkpoint folder through a temporary name while hashing
it with sha256 against the manifest, rename (a fetched copy is not fsynced, like the baseline: see
``colabkit.fsutil``), write the manifest and the ``latest`` pointer). Each timed side starts after ``os.sync()``
so neither pays for the other's dirty pages.
Target: value / baseline <= 1.5.

Two records: with the tier's file in the page cache (``warm``, both sides read memory), and with it dropped
from the cache before each copy (``cold``, both sides read the disk, as on a machine that just started).

    python -m benchmarks.run resume      # or: python -m benchmarks.bench_resume
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import WORK, result, write_results

SIZE = int(os.environ.get("COLABKIT_BENCH_RESUME_BYTES", 256 * 1024 * 1024))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_RESUME_ROUNDS", 5))


def _drop_cache(path: Path) -> bool:
    """Evict `path` from the page cache (written back first); False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def run() -> list[dict[str, Any]]:
    from colabkit.checkpoints import manifest_path
    from colabkit.config import load_config
    from colabkit.fsutil import hash_file
    from colabkit.remotes import open_remote
    from colabkit.resume import fetch, locate

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-resume-", dir=WORK))
    try:
        root = work / "proj"
        root.mkdir()
        (root / "colabkit.yaml").write_text(f"tiers:\n  - name: drive\n    remote: local\n    path: {work / 'tier'}\n"
                                            "resume:\n  priority: [local, drive]\n")
        cfg = load_config(root / "colabkit.yaml")
        ckdir = cfg.checkpoint_dir("v01")
        # a checkpoint as the Checkpointer leaves it (random bytes stand in for the archive: only bytes matter)
        staging = work / "staging"
        staging.mkdir()
        src = staging / "v01_step_00001000.pt"
        with open(src, "wb") as f:
            for _ in range(SIZE // (16 * 2**20)):
                f.write(os.urandom(16 * 2**20))
            f.write(os.urandom(SIZE % (16 * 2**20)))
        d = hash_file(src)
        import json
        manifest_path(src).write_text(json.dumps({"format": 1, "step": 1000, "size": d.size, "sha256": d.sha256,
                                                  "file": src.name}))
        rel = cfg.remote_path(ckdir / src.name)
        with open_remote(cfg, "drive") as tier:  # the sync engine's upload (fills the tier's digest cache)
            tier.put(src, rel, digest=d)
            tier.put(manifest_path(src), rel + ".json")
        tier_file = work / "tier" / rel
        src.unlink()
        out = work / "copy"
        out.mkdir()
        figures: dict[str, tuple[list[float], list[float]]] = {"warm": ([], []), "cold": ([], [])}
        cold_ok = True
        for r in range(ROUNDS):
            for mode in ("warm", "cold"):
                base, value = figures[mode]
                if mode == "cold":
                    cold_ok = _drop_cache(tier_file) and cold_ok
                else:
                    hash_file(tier_file)  # read once: in the cache
                os.sync()  # neither side pays for the other's dirty pages still being written back
                t0 = time.perf_counter()
                shutil.copyfile(tier_file, out / "x.pt")
                base.append(time.perf_counter() - t0)
                (out / "x.pt").unlink()
                if mode == "cold":
                    _drop_cache(tier_file)
                for p in ckdir.glob("*") if ckdir.exists() else ():
                    p.unlink()
                os.sync()
                t0 = time.perf_counter()
                plan = locate(config=cfg, experiment="v01")
                path = fetch(plan, progress=False)
                value.append(time.perf_counter() - t0)
                assert path is not None and path.stat().st_size == SIZE and plan.choice.source == "drive"
        records = []
        for mode in ("warm", "cold"):
            if mode == "cold" and not cold_ok:
                continue
            base, value = figures[mode]
            v, b = min(value), min(base)
            records.append(result(
                f"resume_fetch_verify_vs_copyfile_{mode}", v, b, 1.5, "s",
                notes=f"{SIZE / 2**20:.0f} MiB from a local-folder tier, page cache {mode}, best of {ROUNDS}: "
                      f"locate+fetch (sha256 verified) {v * 1000:.0f} ms vs shutil.copyfile {b * 1000:.0f} ms"))
        return records
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the 256 MB files go


if __name__ == "__main__":
    write_results(run())
