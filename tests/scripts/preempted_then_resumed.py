"""A fresh start saves a checkpoint (file + manifest, no torch needed) at step 5, then runs on until the machine
is taken away (the test kills the whole process group); a resumed start finishes at step 10."""
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

ck = Path(os.environ["COLABKIT_CHECKPOINT_DIR"])
if "--resume-from" in sys.argv:
    print(f"resumed from {sys.argv[sys.argv.index('--resume-from') + 1]}", flush=True)
    print("step 10 loss 0.125", flush=True)
    print("done", flush=True)
    sys.exit(0)
ck.mkdir(parents=True, exist_ok=True)
data = b"not really torch, but verified by its manifest" * 10
path = ck / "v01_step_00000005.pt"
path.write_bytes(data)
man = {"format": 1, "step": 5, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
       "file": path.name, "created": "2026-11-22T00:00:00Z", "run_id": "t", "colabkit_version": "0"}
(ck / (path.name + ".json")).write_text(json.dumps(man))
print("step 5 loss 0.25")
print(f"saved checkpoint at iteration 5 to {path}", flush=True)
print("step 7 loss 0.2", flush=True)
threading.Event().wait(120)  # training on, until the preemption
