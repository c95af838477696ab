"""A fork server for the kill -9 sharded-save test: imports torch once, then forks a group of 2 ranks per round.

Protocol (one line each, on stdin / stdout):
    test -> server: ``go <directory> <store file> <sync|async>``   fork ranks 0 and 1; ``quit``: exit
    rank   -> test: ``pid <rank> <pid>``             its pid (the test SIGKILLs it)
                    ``resumed <rank> <step>|none``   what load_latest gave it
                    ``phase <rank> <text>``          a step of the save (colabkit.distributed's debug lines)
                    ``saved <rank> <step>``          save() of <step> returned (async: the previous one finished)
    server -> test: ``exit <rank> <status>``         the rank is gone (reaped)

Each rank holds its half of a DTensor sharded over a CPU mesh of 2 ranks (gloo); every value of step s's tensor
is s. The group resumes from the newest valid checkpoint and keeps saving.
"""
from __future__ import annotations

import logging
import os
import sys

import torch  # imported once, before any fork

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from colabkit.checkpoints import Checkpointer  # noqa: E402

N = 512 * 1024  # 2 MB of float32 per rank: a save takes long enough to be killed in the middle


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: lines from the processes never interleave


class _Phases(logging.Handler):
    def __init__(self, rank: int) -> None:
        super().__init__(logging.DEBUG)
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        say(f"phase {self.rank} {record.getMessage()}")


def rank_main(rank: int, directory: str, store: str, mode: str) -> None:
    say(f"pid {rank} {os.getpid()}")
    torch.set_num_threads(1)
    lg = logging.getLogger("colabkit.distributed")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(_Phases(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    ck = Checkpointer(directory, prefix="k", sharded=True, async_save=(mode == "async"))
    template = {"w": distribute_tensor(torch.zeros(2 * N), mesh, [Shard(0)]), "step": 0}
    state = ck.load_latest(state=template)
    step = state["step"] if state is not None else 0
    say(f"resumed {rank} {step if state is not None else 'none'}")
    w = template["w"]
    prev = None
    while True:
        step += 1
        with torch.no_grad():
            w.fill_(float(step))
        ck.save(step, {"w": w, "step": step})
        if mode == "async":
            with torch.no_grad():
                w.fill_(-1.0)
            if prev is not None:
                say(f"saved {rank} {prev}")
            prev = step
        else:
            say(f"saved {rank} {step}")


def main() -> None:
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        _, directory, store, mode = cmd
        pids = {}
        for rank in (0, 1):
            pid = os.fork()
            if pid == 0:
                try:
                    rank_main(rank, directory, store, mode)
                except BaseException as e:  # a rank whose peer was killed fails in a collective: expected
                    say(f"failed {rank} {type(e).__name__}")
                finally:
                    os._exit(1)
            pids[rank] = pid
        for rank, pid in pids.items():
            _, status = os.waitpid(pid, 0)
            say(f"exit {rank} {status}")


if __name__ == "__main__":
    main()
