"""kill -9 one rank of a group of 2 during sharded (DCP) saves, at 20 random moments.

Each round a group of 2 real processes (forked from a server that imported torch once, gloo over a file store)
resumes from the newest valid checkpoint and saves a DTensor sharded over both ranks in a loop; the test
SIGKILLs a random rank at a random moment of a save (a random one of its phase lines, then a random short
delay), then the other rank as torchrun would. After every round ``load_latest`` must give a complete, verified
checkpoint at least as new as the last one a rank reported saved, every folder under a final name must verify,
and the next group must resume from it. The test synchronises on the ranks' lines, never on bare sleeps.
"""
from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from colabkit.checkpoints import Checkpointer
from colabkit.distributed import FOLDER_MANIFEST, discover_units, load_latest_unit, verify_unit
from colabkit.fsutil import TMP_PREFIX

CHILD = Path(__file__).with_name("dist_kill_child.py")
ROUNDS = 20
TIMEOUT = 60.0
N = 512 * 1024


class Server:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        self.proc = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.pids: dict[int, int] = {}
        self.reader = threading.Thread(target=self._read, name="test-dist-kill-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put(None)

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def next(self) -> list[str]:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no output from the group for {TIMEOUT}s") from None
        if line is None:
            raise AssertionError(f"the fork server exited (rc={self.proc.wait()})")
        return line.split(" ", 2)

    def kill(self, rank: int) -> None:
        pid = self.pids.pop(rank, None)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for rank in list(self.pids):
            self.kill(rank)
        try:
            self.send("quit")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(TIMEOUT)


def _check_folder(directory: Path, at_least: int | None) -> int | None:
    """Every folder under a final name verifies; load_latest gives one at least as new as `at_least`."""
    for unit in discover_units(directory):
        assert unit.kind == "folder", unit
        verify_unit(unit)
    found = load_latest_unit(directory, state={"w": torch.zeros(2 * N), "step": 0})
    if at_least is None and found is None:
        return None
    assert found is not None, "no checkpoint after a save was reported complete"
    unit, state = found
    assert at_least is None or unit.step >= at_least, (unit.step, at_least)
    assert state["step"] == unit.step and bool((state["w"] == float(unit.step)).all()), unit.name
    assert (unit.path / FOLDER_MANIFEST).is_file()
    return unit.step


@pytest.mark.slow
def test_kill_9_of_a_rank_during_sharded_saves_never_leaves_a_bad_folder(tmp_path):
    rng = random.Random(int(os.environ.get("COLABKIT_KILL_SEED", "13")))
    directory = tmp_path / "ckpt"
    server = Server()
    saved: int | None = None   # the newest step any rank reported saved
    newest: int | None = None  # what load_latest gave after the previous round
    try:
        for rnd in range(ROUNDS):
            mode = "async" if rnd % 2 else "sync"
            server.send(f"go {directory} {tmp_path / f'store-{rnd}'} {mode}")
            victim = rng.randrange(2)
            target = rng.randrange(1, 12)  # the victim's n-th phase/saved line after it resumed
            delay = rng.choice([0.0, 0.0, rng.uniform(0, 0.02)])
            resumed: dict[int, str] = {}
            seen = 0
            while True:
                kind, rank_s, rest = (server.next() + ["", ""])[:3]
                if kind == "pid":
                    server.pids[int(rank_s)] = int(rest)
                elif kind == "resumed":
                    resumed[int(rank_s)] = rest
                elif kind == "saved":
                    saved = max(saved or 0, int(rest))
                elif kind in ("failed", "exit"):
                    raise AssertionError(f"round {rnd}: rank {rank_s} ended before it was killed ({kind} {rest})")
                if int(rank_s or -1) == victim and kind in ("phase", "saved") and len(resumed) == 2:
                    seen += 1
                    if seen >= target:
                        break
            if delay:
                threading.Event().wait(delay)  # a random moment after the line, not a synchronisation
            server.kill(victim)
            server.kill(1 - victim)  # torchrun takes the rest of the group down
            exits = 0
            while exits < 2:
                kind, _, _ = (server.next() + ["", ""])[:3]
                exits += kind == "exit"
                # lines a rank wrote before it died: a save reported complete must be loadable
                if kind == "saved":
                    saved = max(saved or 0, int(_))
            want_resume = "none" if newest is None else str(newest)
            assert resumed == {0: want_resume, 1: want_resume}, (rnd, resumed, newest)
            newest = _check_folder(directory, saved)
        assert newest is not None and newest >= ROUNDS // 2
        leftovers = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
        assert len(leftovers) <= 2  # the last round's temporary folder (and the pointer's temporary, if killed there)
        Checkpointer(directory, prefix="k", sharded=True).load_latest(state={"w": torch.zeros(2 * N), "step": 0})
        # the next run removes them (a folder whose writer died before it took its lock only once it is a minute old)
        assert not [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)
                    and not ((directory / n).is_dir() and not (directory / n / ".colabkit-writing").exists())]
    finally:
        server.close()
