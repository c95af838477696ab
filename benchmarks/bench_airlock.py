"""Airlock export speed: ``colabkit.airlock.export`` of a 200 MB committed tree of code and small files
(git state, sha256 of every file, secret scan, deterministic zip, manifest, upload to a local-folder remote)
against ``zip -r -X -q`` of the same tree in the same run. Target: ratio <= 1.5.

Also recorded: an unchanged re-export uploads 0 bytes (value 0 against the bundle's size as baseline), and
its time against the same zip baseline (it hashes and scans but builds nothing).

Skips with a note when the ``zip`` tool is absent (``apt-get install zip``).

    python -m benchmarks.run airlock      # or: python -m benchmarks.bench_airlock
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import WORK, best_of, main, result  # noqa: E402

TOTAL = 200 * 1000 * 1000
RUNS = 3

_WORDS = ("self", "return", "import", "torch", "tensor", "def", "class", "for", "in", "range", "if", "else",
          "None", "True", "False", "x", "y", "batch", "hidden", "weight", "bias", "layer", "config", "loss",
          "optimizer", "step", "grad", "attention", "head", "dim", "mask", "dropout", "norm", "=", "+", "*",
          "(", ")", ":", ",", "[", "]", "0", "1", "2", "nn.Linear", "F.softmax", "assert", "lambda", "yield")


def _make_tree(exp: Path, total: int, seed: int = 0) -> int:
    """Python-like text files of 1-200 KB under models/, utils/, configs/ (compresses like code, ~3-4x)."""
    rnd = random.Random(seed)
    pool = []
    for _ in range(20000):
        n = rnd.randint(3, 14)
        ident = f"v{rnd.getrandbits(20):x}"
        pool.append("    " * rnd.randint(0, 3) + " ".join(rnd.choice(_WORDS) for _ in range(n)) + f"  # {ident}\n")
    written, i = 0, 0
    (exp / "train.py").write_text("".join(rnd.choices(pool, k=400)))
    (exp / "requirements.txt").write_text("torch>=2.0\n")
    while written < total:
        sub = ("models", "utils", "configs", "scripts")[i % 4]
        size = int(min(200_000, max(1000, rnd.lognormvariate(10.0, 1.0))))
        d = exp / sub / f"pkg{i // 200:03d}"
        d.mkdir(parents=True, exist_ok=True)
        text = "".join(rnd.choices(pool, k=max(1, size // 45)))
        p = d / f"mod{i:05d}.py"
        p.write_text(text)
        written += len(text)
        i += 1
    return i


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def run() -> list[dict[str, Any]]:
    if shutil.which("zip") is None:
        print("bench_airlock: skipped: the 'zip' tool is not installed (apt-get install zip); no baseline to "
              "compare against", file=sys.stderr)
        return []
    from colabkit import airlock
    from colabkit.config import load_config

    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix="airlock-") as tmp:
        root = Path(tmp) / "proj"
        exp = root / "experiments" / "v01"
        exp.mkdir(parents=True)
        nfiles = _make_tree(exp, TOTAL)
        remote = Path(tmp) / "remote"
        os.environ.setdefault("COLABKIT_HOME", str(Path(tmp) / "home"))
        (root / "colabkit.yaml").write_text(f"tiers:\n  - name: drive\n    remote: drive\n    path: {remote}\n")
        (root / ".gitignore").write_text(".colabkit/\n")
        _git(root, "init", "-q", "-b", "main")
        _git(root, "-c", "user.email=b@example.com", "-c", "user.name=bench", "add", "-A")
        _git(root, "-c", "user.email=b@example.com", "-c", "user.name=bench", "-c", "commit.gpgsign=false",
             "commit", "-q", "-m", "bench")
        cfg = load_config(root / "colabkit.yaml")
        size = sum(p.stat().st_size for p in exp.rglob("*") if p.is_file())

        def baseline() -> None:
            out = Path(tmp) / "baseline.zip"
            out.unlink(missing_ok=True)
            subprocess.run(["zip", "-r", "-X", "-q", str(out), "experiments/v01"], cwd=root, check=True)

        state: dict[str, Any] = {}

        def fresh_export() -> None:
            shutil.rmtree(remote, ignore_errors=True)
            state["res"] = airlock.export("v01", config=cfg)

        baseline()  # warm the page cache for both sides alike
        t_zip = best_of(RUNS, baseline)
        t_export = best_of(RUNS, fresh_export)
        res = state["res"]
        assert res["uploaded"], res

        def again() -> None:
            state["again"] = airlock.export("v01", config=cfg)

        t_again = best_of(RUNS, again)
        again_res = state["again"]
        zip_size = (Path(tmp) / "baseline.zip").stat().st_size
        notes = (f"{nfiles + 2} files, {size / 1e6:.0f} MB; bundle {res['bundle_size'] / 1e6:.1f} MB, "
                 f"zip -r -X -q {zip_size / 1e6:.1f} MB; best of {RUNS}; {os.cpu_count()} cores")
        return [
            result("airlock_export_vs_zip", t_export, t_zip, 1.5, "s", notes=notes),
            result("airlock_reexport_unchanged_bytes_uploaded", float(again_res["bytes_uploaded"]),
                   float(res["bundle_size"]), 0.0, "bytes",
                   notes="an unchanged re-export uploads nothing; baseline: the bundle's size"),
            result("airlock_reexport_unchanged_vs_zip", t_again, t_zip, 1.0, "s",
                   notes="unchanged re-export (git state, hashing, secret scan, remote check) vs zip -r -X -q"),
        ]


if __name__ == "__main__":
    main(run())
