"""Under torchrun: rank 1 prints what PyTorch prints when its GPU runs out of memory and fails; rank 0 waits
(as a rank blocked in a collective would) until torchrun ends it."""
import os
import sys
import threading

if os.environ.get("RANK") == "1":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", file=sys.stderr, flush=True)
    sys.exit(1)
print("step 1 loss 1.0", flush=True)
threading.Event().wait(120)
