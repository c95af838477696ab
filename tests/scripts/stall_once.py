"""Attempt 1 prints one line and then hangs (no output, no checkpoint); later attempts finish."""
import os
import signal

print(f"attempt {os.environ.get('COLABKIT_ATTEMPT')} started", flush=True)
if os.environ.get("COLABKIT_ATTEMPT") == "1":
    while True:
        signal.pause()  # hangs until a signal ends it, as a dead data loader would
print("step 3 loss 0.1", flush=True)
