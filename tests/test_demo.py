"""``colabkit demo``: the whole loop on local folders — export, pull, train with sync, a real SIGKILL of the
training process group, resume on an empty disk from the hub tier, import, journal, status."""
from __future__ import annotations

import json
import re

import pytest

from colabkit.cli import main


def test_demo_survives_a_preemption_and_ends_with_the_uninterrupted_weights(tmp_path, capsys):
    base = tmp_path / "demo"
    assert main(["demo", "--dir", str(base), "--steps", "200", "--save-every", "50"]) == 0
    out = capsys.readouterr().out
    # the preemption happened mid-run, after the hub tier held a checkpoint, and the disk went with it
    m = re.search(r"PREEMPTED \(SIGKILL to the whole process group, pid \d+\); the hub tier holds step (\d+)", out)
    assert m, out
    kill_step = int(m.group(1))
    assert 50 <= kill_step < 200
    assert not (base / "cluster-a").exists()
    # a checkpoint saved on cluster A but not yet on the hub is lost with the disk, and the demo says why
    saved_a = [int(s) for s in re.findall(r"saved checkpoint at iteration (\d+) to \S*/cluster-a/", out)]
    assert saved_a and max(saved_a) >= kill_step
    for step in (s for s in saved_a if s > kill_step):
        assert re.search(rf"^    step {step} is lost with the disk: saved \S+ (ms|s) before the preemption, it had "
                         r"not been synced yet: (its upload to the hub tier had started but not finished|it was "
                         r"waiting for the hub tier's next upload, due \S+ (ms|s) after the preemption|the hub tier "
                         rf"\(every 1s\) had not picked it up yet).*; the run resumes from step {kill_step}$", out,
                         re.M), out
    assert not re.search(rf"step ({'|'.join(str(s) for s in saved_a if s <= kill_step)}) is lost", out)
    # the new machine resumed from the hub tier, not from scratch, and finished
    assert re.search(rf"Choice: hub step {kill_step}\b", out), out
    assert "finished at step 200" in out
    # cluster B saved only the steps after the fetched checkpoint: nothing before it was recomputed
    saved_b = [int(s) for s in re.findall(r"saved checkpoint at iteration (\d+) to \S*/cluster-b/", out)]
    assert saved_b == list(range(kill_step + 50, 201, 50)), out
    assert (base / "cluster-b" / "experiments" / "v01" / "checkpoints" / "v01_step_00000200.pt").is_file()
    assert "final weights after preemption + resume == uninterrupted run (bit for bit)" in out
    # the logs came home from the drive tier, the preempted run's attempt log among them
    logs = base / "laptop" / "experiments" / "v01" / "logs"
    attempt_logs = sorted(logs.glob("*/*.attempt1.log"))
    assert len(attempt_logs) == 2, sorted(p.relative_to(logs) for p in logs.rglob("*"))
    journal = (base / "laptop" / "journal.md").read_text()
    assert "## Run v01" in journal and "**Steps reached**: 200" in journal
    assert "hub: experiments/v01/checkpoints/v01_step_00000200.pt" in journal
    # status on the laptop: the hub tier holds the final step
    assert re.search(r"hub: ok · newest step 200", out), out


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"Error: {tmp_path} is not empty; pass a new or empty folder (--dir) so nothing of "
                           "yours is touched")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--steps", "100", "--save-every", "60"]])
def test_demo_rejects_a_run_too_short_to_preempt(tmp_path, capsys, argv):
    assert main(["demo", "--dir", str(tmp_path / "d"), *argv]) == 1
    assert "the run needs at least two checkpoints before its end" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_json_summary(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "d"), "--steps", "100", "--save-every", "25", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights_identical"] is True
    assert data["resumed"]["from"] == "hub" and data["resumed"]["step"] == 100
    assert data["export"]["reexport_bytes"] == 0
