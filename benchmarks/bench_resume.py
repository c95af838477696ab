"""Resume: bringing a 256 MB checkpoint back from a local-folder tier, verified, and loading it.

The figure (``resume_to_loaded_vs_copy_load``): ``colabkit.resume.locate`` + ``fetch`` + ``load_latest`` of the
checkpoint folder (list the tier, read the sidecar manifest, copy into the checkpoint folder through a temporary
name while checking the manifest's block sha256s on several threads, record that verification with the file's
identity, rename, write the manifest and the ``latest`` pointer; then discover, verify (the record: no second
hash) and load: ``torch.load(weights_only=True, mmap=True)`` with each storage copied once into memory of its
own, the same tensors a plain ``torch.load`` gives, in half its time) against the baseline
``shutil.copyfile`` + ``torch.load(weights_only=True)`` of the same file: an unverified copy and a load. Target: value / baseline <= 1.3. Page cache warm (both sides read
memory); each timed side starts after ``os.sync()`` so neither pays for the other's dirty pages.

Supplementary, as before: ``resume_fetch_verify_vs_copyfile_{warm,cold}``: locate + fetch alone against
``shutil.copyfile`` (no load), with the tier's file in the page cache and dropped from it (target <= 1.5).

    python -m benchmarks.run resume      # or: python -m benchmarks.bench_resume
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import WORK, main, result

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
    from colabkit.checkpoints import load_latest, manifest_path
    from colabkit.config import load_config
    from colabkit.fsutil import hash_file, hash_workers
    from colabkit.remotes import open_remote
    from colabkit.resume import fetch, locate

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-resume-", dir=WORK))
    try:
        root = work / "proj"
        (root / "experiments" / "v01").mkdir(parents=True)   # resume names an experiment that exists
        (root / "colabkit.yaml").write_text(f"tiers:\n  - name: drive\n    remote: local\n    path: {work / 'tier'}\n"
                                            "resume:\n  priority: [local, drive]\n")
        cfg = load_config(root / "colabkit.yaml")
        ckdir = cfg.checkpoint_dir("v01")
        # a checkpoint as the Checkpointer leaves it: a torch.save archive of one float32 tensor of SIZE bytes, its
        # manifest with the file's sha256 and its blocks' (which a machine with several cores verifies in parallel)
        import torch

        from colabkit.checkpoints import Checkpointer
        staging = work / "staging"
        src = Checkpointer(staging, prefix="v01").save(1000, {"step": 1000, "w": torch.randn(SIZE // 4)})
        d = hash_file(src)
        rel = cfg.remote_path(ckdir / src.name)
        with open_remote(cfg, "drive") as tier:  # the sync engine's upload (fills the tier's digest cache)
            tier.put(src, rel, digest=d)
            tier.put(manifest_path(src), rel + ".json")
        tier_file = work / "tier" / rel
        src.unlink()
        out = work / "copy"
        out.mkdir()
        figures: dict[str, tuple[list[float], list[float]]] = {"warm": ([], []), "cold": ([], [])}
        loaded: tuple[list[float], list[float]] = ([], [])
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
                assert path is not None and path.stat().st_size == d.size and plan.choice.source == "drive"
            # the figure: to a loaded state, verified, vs an unverified copy and a load
            hash_file(tier_file)
            for p in ckdir.glob("*"):
                p.unlink()
            os.sync()
            t0 = time.perf_counter()
            state = torch.load(shutil.copyfile(tier_file, out / "x.pt"), weights_only=True)
            loaded[0].append(time.perf_counter() - t0)
            assert state["step"] == 1000
            del state
            (out / "x.pt").unlink()
            os.sync()
            t0 = time.perf_counter()
            plan = locate(config=cfg, experiment="v01")
            fetch(plan, progress=False)
            info, state = load_latest(ckdir)
            loaded[1].append(time.perf_counter() - t0)
            assert info.step == 1000 and state["step"] == 1000 and plan.choice.source == "drive"
            del state
        records = []
        base, value = loaded
        v, b = min(value), min(base)
        records.append(result(
            "resume_to_loaded_vs_copy_load", v, b, 1.3, "s",
            notes=f"{d.size / 2**20:.0f} MiB torch checkpoint from a local-folder tier, page cache warm, best of "
                  f"{ROUNDS}: locate+fetch (the manifest's block sha256s checked on {hash_workers()} threads while "
                  f"copying, recorded)+load_latest (record trusted; archive mapped, each storage copied once) "
                  f"{v * 1000:.0f} ms vs shutil.copyfile+torch.load {b * 1000:.0f} ms"))
        for mode in ("warm", "cold"):
            if mode == "cold" and not cold_ok:
                continue
            base, value = figures[mode]
            v, b = min(value), min(base)
            records.append(result(
                f"resume_fetch_verify_vs_copyfile_{mode}", v, b, 1.5, "s",
                notes=f"supplementary: {d.size / 2**20:.0f} MiB from a local-folder tier, page cache {mode}, best of "
                      f"{ROUNDS}: locate+fetch (sha256 verified) {v * 1000:.0f} ms vs shutil.copyfile {b * 1000:.0f} ms"))
        return records
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the 256 MB files go


if __name__ == "__main__":
    main(run())
