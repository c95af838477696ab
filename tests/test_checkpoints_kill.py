"""kill -9 a real process that saves checkpoints in a loop, at 20 random moments.

After every kill, ``load_latest`` must return a valid checkpoint at least as new as the last one the process
reported written, and no file under a final name may be corrupt. The saver is a real child process (forked
from a server that imported torch once, to keep the test short) and receives a real SIGKILL. Moments are
random: a random number of output lines into the run, or a random number of bytes into a checkpoint's
temporary file; the test synchronises on those lines and file sizes, never on bare sleeps.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from colabkit.checkpoints import (LATEST, discover, is_manifest, load_latest, read_manifest, step_of, verify)
from colabkit.fsutil import TMP_PREFIX

CHILD = Path(__file__).with_name("ckpt_child.py")
ROUNDS = 20
TIMEOUT = 30.0


class Server:
    """The fork server and a reader thread turning its stdout into a queue of lines."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=str(Path(__file__).parent.parent))
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.saver: int | None = None
        self.reader = threading.Thread(target=self._read, name="test-kill-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put(None)

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def next(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from the saver for {timeout}s") from None
        if line is None:
            raise AssertionError(f"the fork server exited (rc={self.proc.wait()})")
        if line.startswith("error "):
            raise AssertionError(f"the saver failed: {line}")
        return line

    def get_nowait(self) -> str | None:
        try:
            line = self.lines.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            raise AssertionError("the fork server exited")
        if line.startswith("error "):
            raise AssertionError(f"the saver failed: {line}")
        return line

    def close(self) -> None:
        if self.saver is not None:  # a failed round: the saver is still running
            try:
                os.kill(self.saver, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.send("quit")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(TIMEOUT)
        if not self.reader.is_alive():  # never close the pipe under a reader still blocked on it
            self.proc.stdout.close()


def temporaries(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]


def check_folder(d: Path, last_written: int | None, seed: int, rnd: int) -> int | None:
    """Every final-named file is valid, and load_latest gives a consistent state no older than last_written."""
    where = f"(seed {seed}, round {rnd})"
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX):
            continue
        if p.name == LATEST:
            pointer = json.loads(p.read_text())  # valid JSON: written atomically
            assert (d / pointer["file"]).is_file(), f"latest points at a missing file {where}"
        elif is_manifest(p.name):
            assert read_manifest(p) is not None, f"{p.name} is not a valid manifest {where}"
            assert (d / p.name[:-len(".json")]).is_file(), f"manifest without its file {where}"
        else:
            assert step_of(p.name) is not None, f"unexpected file {p.name} {where}"
    for info in discover(d):
        verify(info)  # raises IntegrityError for a corrupt or partial file under a final name
    found = load_latest(d)
    if last_written is None and found is None:
        return None
    assert found is not None, f"no checkpoint after step {last_written} was reported written {where}"
    info, state = found
    assert state["step"] == info.step
    assert float(state["w"][0]) == float(state["w"][-1]) == float(info.step), \
        f"step {info.step} holds a tensor changed after save() {where}"
    assert last_written is None or info.step >= last_written, \
        f"load_latest gave step {info.step}, but step {last_written} was reported written {where}"
    return info.step


def wait_for_bytes(d: Path, step: int, nbytes: int, server: Server, pending: list[str]) -> None:
    """Poll until the temporary file of `step` holds `nbytes` (or the save finished): a moment mid-write."""
    name = f"{TMP_PREFIX}k_step_{step:08d}.pt."
    deadline = time.monotonic() + TIMEOUT
    idle = threading.Event()
    while time.monotonic() < deadline:
        for p in temporaries(d):
            if p.name.startswith(name):
                try:
                    if p.stat().st_size >= nbytes:
                        return
                except FileNotFoundError:
                    pass
        line = server.get_nowait()
        if line is not None:
            pending.append(line)
            if line == f"saved {step}" or line.startswith("saving "):
                return  # the write finished before reaching that size: kill here instead
        idle.wait(0.0005)
    raise AssertionError(f"checkpoint {step} never reached {nbytes} bytes (lines seen: {pending})")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks its savers (POSIX only)")
def test_kill_9_at_random_moments_never_leaves_a_corrupt_checkpoint(tmp_path: Path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = tmp_path / "ckpt"
    server = Server()
    last_written: int | None = None
    expected: int | None = None  # what load_latest gave after the previous kill
    stale: list[Path] = []
    kills_mid_write = 0
    torn = 0
    try:
        for rnd in range(ROUNDS):
            mode = "async" if rnd % 2 else "sync"
            server.send(f"go {d} {mode}")
            pid = int(server.next().split()[1])
            server.saver = pid
            resumed = server.next()
            assert resumed.startswith("resumed "), resumed
            assert resumed == f"resumed {expected if expected is not None else 'none'}", \
                f"the saver resumed from {resumed!r}, the test found {expected} (seed {seed}, round {rnd})"
            left = [p for p in stale if p.exists()]
            assert left == [], f"temporary files of a killed save were not removed: {left} (seed {seed})"
            pending: list[str] = []
            how = rng.choice(("lines", "bytes", "bytes"))
            if how == "lines":
                target = rng.randrange(1, 8)  # kill right after the n-th line of output
                for _ in range(target):
                    pending.append(server.next())
            else:
                for _ in range(rng.randrange(0, 3)):  # let a few saves complete first
                    line = server.next()
                    pending.append(line)
                    while not line.startswith("saved "):
                        line = server.next()
                        pending.append(line)
                line = server.next()
                while not line.startswith("saving "):
                    pending.append(line)
                    line = server.next()
                step = int(line.split()[1])
                wait_for_bytes(d, step, rng.randrange(0, 4_100_000), server, pending)
                kills_mid_write += 1
            os.kill(pid, signal.SIGKILL)
            server.saver = None
            while True:
                line = server.next()
                if line.startswith("exit "):
                    assert line.split()[1] == str(pid)
                    break
                pending.append(line)
            for line in pending:
                if line.startswith("saved "):
                    last_written = max(last_written or 0, int(line.split()[1]))
            expected = check_folder(d, last_written, seed, rnd)
            stale = temporaries(d)
            torn += bool(stale)
        print(f"seed {seed}: {torn} kills left a torn temporary file, last written step {last_written}")
        assert torn > 0, f"no kill landed in the middle of a write (seed {seed})"
        assert last_written is not None and last_written >= ROUNDS // 2, "the savers made too little progress"
        assert kills_mid_write > 0
    finally:
        server.close()
