"""The project templates: train.py is deterministic across a real SIGKILL and a resume; the other templates
load (colabkit.yaml), ignore secrets (.gitignore) and are valid notebooks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colabkit.templates import template_path, template_text

TRAIN = template_path("train.py")


def run_template(ck: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), "--checkpoint-dir", str(ck), "--save-every", "50", *extra],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLABKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_interrupted_and_resumed_run_ends_bit_for_bit_equal(tmp_path):
    import torch
    # run A: straight to 300 steps
    a = run_template(tmp_path / "A", "--steps", "300", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    assert "step 300 loss " in a.stdout
    assert f"saved checkpoint at iteration 300 to {tmp_path / 'A' / 'v01_step_00000300.pt'}" in a.stdout

    # run B: killed with a real SIGKILL after its step-100 checkpoint, while it trains on
    b = subprocess.Popen([sys.executable, str(TRAIN), "--checkpoint-dir", str(tmp_path / "B"), "--save-every", "50",
                          "--steps", "300", "--step-delay", "0.01"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=_env())
    seen = []
    try:
        for line in b.stdout:
            seen.append(line)
            if line.startswith("saved checkpoint at iteration 100 to "):
                os.kill(b.pid, signal.SIGKILL)
                break
    finally:
        b.kill()
        b.wait()
        b.stdout.close()
    assert b.returncode == -signal.SIGKILL
    assert not (tmp_path / "B" / "v01_step_00000300.pt").exists()  # it really was cut short
    ck100 = tmp_path / "B" / "v01_step_00000100.pt"
    r = run_template(tmp_path / "B", "--steps", "300", "--resume-from", str(ck100), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"resumed from {ck100} at step 100\n")

    sa = torch.load(tmp_path / "A" / "v01_step_00000300.pt", weights_only=True)
    sb = torch.load(tmp_path / "B" / "v01_step_00000300.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 300
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for pid, st in sa["optim"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optim"]["state"][pid][k]), (pid, k)
    # and the checkpoints the helper wrote are complete: manifest + latest pointer
    man = json.loads((tmp_path / "B" / "v01_step_00000300.pt.json").read_text())
    assert man["step"] == 300 and man["file"] == "v01_step_00000300.pt"
    assert json.loads((tmp_path / "B" / "latest").read_text())["step"] == 300


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path):
    a = run_template(tmp_path / "A", "--steps", "50", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    ck = tmp_path / "A" / "v01_step_00000050.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    r = run_template(tmp_path / "A", "--steps", "60", "--resume-from", str(ck), cwd=tmp_path)
    assert r.returncode == 1
    assert "IntegrityError" in r.stderr and "v01_step_00000050.pt" in r.stderr


def test_colabkit_yaml_template_loads_with_the_documented_defaults(tmp_path):
    from colabkit.config import DashboardConfig, TrainConfig, load_config
    (tmp_path / "colabkit.yaml").write_text(template_text("colabkit.yaml").replace("{{project}}", "demo"))
    cfg = load_config(tmp_path / "colabkit.yaml")
    assert cfg.project == "demo"
    assert cfg.train == TrainConfig()
    assert [(t.name, t.remote, t.every) for t in cfg.tiers] == [("drive", "drive", 5400.0), ("hub", "hub", 10800.0)]
    assert cfg.resume.priority == ("local", "drive", "hub")
    assert cfg.dashboard == DashboardConfig()


def test_gitignore_template_ignores_secrets_and_state(tmp_path):
    lines = template_text("gitignore").splitlines()
    for pattern in (".secrets/", ".colabkit/", "experiments/*/logs/", "experiments/*/checkpoints/"):
        assert pattern in lines
    # and git agrees: a key under .secrets/ is ignored, train.py is not
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(template_text("gitignore"))
    (tmp_path / ".secrets").mkdir()
    (tmp_path / ".secrets" / "colab-service-account.json").write_text("{}")
    (tmp_path / "experiments" / "v01" / "checkpoints").mkdir(parents=True)
    (tmp_path / "experiments" / "v01" / "checkpoints" / "v01_step_00000001.pt").write_text("x")
    (tmp_path / "experiments" / "v01" / "train.py").write_text("")
    out = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert sorted(x for x in out if x) == ["?? .gitignore", "?? experiments/v01/train.py"]


def test_notebook_template_is_a_valid_notebook():
    import nbformat
    nb = nbformat.reads(template_text("notebook.ipynb"), as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "%load_ext colabkit" in code and "%train {{experiment}}" in code


def test_secrets_example_is_obviously_fake():
    root = Path(__file__).resolve().parents[1] / "secrets.example"
    key = json.loads((root / "colab-service-account.json").read_text())
    assert key["type"] == "service_account"
    assert key["private_key"] == "-----BEGIN PRIVATE KEY-----\nFAKE-KEY-FOR-DOCS-ONLY\n-----END PRIVATE KEY-----\n"
    readme = (root / "README.md").read_text()
    for needed in ("Colab Secrets", "COLABKIT_SERVICE_ACCOUNT", "chmod 600", "0600"):
        assert needed in readme
