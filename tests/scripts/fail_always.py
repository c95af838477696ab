"""Prints a few lines and fails with exit code 3, every time."""
import os
import sys

n = os.environ.get("COLABKIT_ATTEMPT")
print(f"attempt {n} starting")
print("step 7 loss 0.5")
print(f"ValueError: bad batch in attempt {n}", file=sys.stderr, flush=True)
sys.exit(3)
