"""Prints what PyTorch prints when the GPU runs out of memory, then fails."""
import sys

print("step 1 loss 1.0", flush=True)
print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
      "22.03 GiB of which 1.05 GiB is free.", file=sys.stderr, flush=True)
sys.exit(1)
