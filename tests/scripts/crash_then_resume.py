"""A fresh start saves a checkpoint (file + manifest, no torch needed) at step 5 and crashes; a resumed start
prints what it resumed from and finishes."""
import hashlib
import json
import os
import sys
from pathlib import Path

ck = Path(os.environ["COLABKIT_CHECKPOINT_DIR"])
attempt = os.environ.get("COLABKIT_ATTEMPT")
resume = None
if "--resume-from" in sys.argv:
    resume = sys.argv[sys.argv.index("--resume-from") + 1]
print(f"attempt {attempt} resume-from {resume}", flush=True)
if resume is None:
    ck.mkdir(parents=True, exist_ok=True)
    data = b"not really torch, but verified by its manifest" * 10
    path = ck / "v01_step_00000005.pt"
    path.write_bytes(data)
    man = {"format": 1, "step": 5, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
           "file": path.name, "created": "2026-11-22T00:00:00Z", "run_id": "t", "colabkit_version": "0"}
    (ck / (path.name + ".json")).write_text(json.dumps(man))
    print(f"step 5 loss 0.25")
    print(f"saved checkpoint at iteration 5 to {path}", flush=True)
    sys.exit(1)
print("step 10 loss 0.125")
print("done", flush=True)
