"""Ignores SIGTERM (as a script stuck in a C extension would) and keeps printing: only SIGKILL ends it."""
import signal
import threading

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
ev = threading.Event()
step = 0
while True:
    step += 1
    print(f"step {step}", flush=True)
    ev.wait(0.05)
