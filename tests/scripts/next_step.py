"""Prints a next step the way colabkit's own messages write it inside train.py (a Checkpointer's errors)."""
from colabkit.runtime import command

print(f"next step: {command('sync flush')}", flush=True)
print("step 1 loss 1.0", flush=True)
