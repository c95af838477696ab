"""Prints a step line every 20 ms up to --steps (default: effectively forever); handles SIGTERM by exiting."""
import argparse
import sys
import threading

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=10**9)
p.add_argument("--resume-from", default=None)
a = p.parse_args()
stop = threading.Event()
import signal
signal.signal(signal.SIGTERM, lambda *_: stop.set())
for step in range(1, a.steps + 1):
    print(f"step {step}/{a.steps} loss {1.0 / step:.6f}", flush=True)
    if stop.wait(0.02):
        print("got SIGTERM, exiting", flush=True)
        sys.exit(143)
print("done", flush=True)
