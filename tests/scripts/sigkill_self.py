"""A fresh start kills itself with SIGKILL (as the OOM killer, or a user's kill -9, would); a restart finishes."""
import os
import signal
import sys

print(f"attempt {os.environ.get('COLABKIT_ATTEMPT')}", flush=True)
if os.environ.get("COLABKIT_ATTEMPT") == "1":
    os.kill(os.getpid(), signal.SIGKILL)
print("step 2 loss 0.5", flush=True)
sys.exit(0)
