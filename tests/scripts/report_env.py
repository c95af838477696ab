"""Prints the environment %train gives the child, its arguments and a few progress lines, then exits 0."""
import os
import sys

for k in ("COLABKIT_EXPERIMENT", "COLABKIT_RUN_ID", "COLABKIT_PROJECT_ROOT", "COLABKIT_CHECKPOINT_DIR",
          "COLABKIT_LOG_DIR", "COLABKIT_RESUME_FROM", "COLABKIT_MAX_VRAM", "COLABKIT_ATTEMPT"):
    print(f"env {k}={os.environ.get(k, '')}")
print(f"argv {sys.argv[1:]}")
print(f"cwd {os.getcwd()}")
print(f"script {os.path.abspath(sys.argv[0])}")
for step in range(1, 4):
    print(f"step {step} loss {1.0 / step:.4f}", flush=True)
print("stderr line", file=sys.stderr, flush=True)
