"""A checkpoint conversion command as trigger rules run it: a colabkit checkpoint -> a .safetensors file."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

src, dest = sys.argv[1], Path(sys.argv[2])
state = torch.load(src, weights_only=True)
dest.parent.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in state["model"].items()}, str(dest))
print(f"converted {src} -> {dest}")
