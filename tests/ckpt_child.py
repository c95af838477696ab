"""A fork server for the kill -9 checkpoint test: imports torch once, then forks one saver per round.

Protocol (one line each, on stdin / stdout):
    test -> server: ``go <directory> <sync|async>``   fork a saver; ``quit``: exit
    saver  -> test: ``pid <pid>``                      its pid (the test SIGKILLs it)
                    ``resumed <step>|none``            what load_latest gave it (after stale temporaries went)
                    ``saving <step>``                  about to call save()
                    ``saved <step>``                   checkpoint <step> is fully written
    server -> test: ``exit <pid> <status>``            the saver is gone (reaped)

Each saver resumes from the newest valid checkpoint and keeps saving ``{"step": s, "w": full(s)}``; in async
mode it changes the tensor right after save() returns (the file must still hold the value at save time).
"""
from __future__ import annotations

import os
import sys

import torch  # imported once, before any fork

from colabkit.checkpoints import Checkpointer

N = 1_000_000  # 4 MB of float32 per checkpoint: a save takes long enough to be killed in the middle


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: lines from server and saver never interleave


def saver(directory: str, mode: str) -> None:
    say(f"pid {os.getpid()}")  # from the saver itself, so it always comes before the saver's other lines
    torch.set_num_threads(1)
    ck = Checkpointer(directory, prefix="k", async_save=(mode == "async"))
    state = ck.load_latest()
    step = state["step"] if state is not None else 0
    say(f"resumed {step if state is not None else 'none'}")
    w = torch.full((N,), float(step))
    prev = None
    while True:
        step += 1
        w.fill_(float(step))
        say(f"saving {step}")
        ck.save(step, {"step": step, "w": w})
        if mode == "async":
            w.fill_(-1.0)  # training goes on mutating the tensor while the write is in flight
            if prev is not None:
                say(f"saved {prev}")  # save(step) waited for the previous write
            prev = step
        else:
            say(f"saved {step}")


def main() -> None:
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        _, directory, mode = cmd
        pid = os.fork()
        if pid == 0:
            try:
                saver(directory, mode)
            except BaseException as e:  # the test fails on this line, with the reason
                import traceback
                traceback.print_exc()
                say(f"error {type(e).__name__}: {e}".replace("\n", " "))
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
