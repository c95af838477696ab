"""The live dashboard in a real IPython shell and a real kernel: the refresh thread (one per view, replaced when
the cell runs again, stopped by close), the post_run_cell redraw (what Colab renders), --follow, the CLI and the
magic, and the outputs a notebook executed by nbclient keeps (the widget beside text/plain and text/html)."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from colabkit import dashboard, runner
from colabkit.cli import main
from colabkit.config import load_config

SCRIPTS = Path(__file__).parent / "scripts"


def _dash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("colabkit-dashboard-") and
            t.name != "colabkit-dashboard-resume" and t.is_alive()]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("COLABKIT_FAKE_GPU", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["init", "proj"]) == 0
    root = tmp_path / "proj"
    data = yaml.safe_load((root / "colabkit.yaml").read_text())
    data["train"].update({"max_restarts": 0, "min_free_disk": "1MB", "grace": 5})
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(SCRIPTS / "slow_steps.py", root / "experiments" / "v01" / "train.py")
    monkeypatch.chdir(root)
    dashboard.clear_resume_cache()
    yield root
    dashboard.close_all()
    runner.stop(config=load_config(root / "colabkit.yaml"), timeout=30)
    dashboard.wait_resume(30)
    dashboard.clear_resume_cache()


def _step(view) -> int:
    return int((view.snap.get("train") or {}).get("step") or 0)


@pytest.mark.magic
def test_the_view_updates_itself_from_one_named_thread_and_rerunning_replaces_it(ip, project, capsys):
    cfg = load_config()
    job = runner.train("v01", config=cfg, background=True, resume="none", sync=False, args=["--steps", "100000"])
    view = dashboard.show(config=cfg, notebook=True, refresh=0.05)
    assert [t.name for t in _dash_threads()] == ["colabkit-dashboard-proj"]
    first = _step(view)
    assert view.wait_render(view.renders + 5, timeout=60)
    assert view.wait_render(view.renders + 1, timeout=60) and _step(view) > first  # no cell was run again
    bar = view._parts["progress"]
    assert (bar.value, bar.max) == (_step(view), 100000) and bar.layout.display is None
    assert f"data-step='{_step(view)}'" in view._parts["train_head"].value
    assert "data-tier='drive'" in view._parts["sync"].value and "data-tier='hub'" in view._parts["sync"].value
    # the cell again: the old view's thread ends, the new one replaces it
    again = dashboard.show(config=cfg, notebook=True, refresh=0.05)
    assert view.thread is not None and not view.thread.is_alive()
    assert [t for t in _dash_threads()] == [again.thread]
    assert dashboard.views() == [again]
    again.close()
    assert _dash_threads() == []
    job.stop(timeout=30)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


@pytest.mark.magic
def test_post_run_cell_redraws_the_view_and_the_text_beside_it(ip, project, capsys):
    cfg = load_config()
    view = dashboard.show(config=cfg, notebook=True, refresh=3600)  # the thread will not tick in this test
    capsys.readouterr()
    before = view.renders
    job = runner.train("v01", config=cfg, background=True, resume="none", sync=False, args=["--steps", "100000"])
    assert job.wait(0.5) is None
    ip.run_cell("x = 1")  # any cell: Colab renders what is sent while a cell runs
    assert view.renders == before + 1
    assert view.snap["train"]["state"] in ("starting", "running")
    text = capsys.readouterr().out
    assert "  v01: " in text  # the text/plain beside the widget was refreshed (a terminal shell prints it)
    job.stop(timeout=30)


def test_follow_updates_in_the_foreground_until_the_run_ends(project):
    cfg = load_config()
    job = runner.train("v01", config=cfg, background=True, resume="none", sync=False, args=["--steps", "40"])
    lines: list[str] = []
    view = dashboard.show(config=cfg, notebook=False, follow=True, refresh=0.05, out=lines.append)
    assert job.wait(30) is not None
    assert view.snap["train"]["state"] == "finished"
    follow = [x for x in lines if x.startswith("v01: ")]
    assert len(follow) >= 2 and follow[-1].startswith("v01: finished · step 40/40")
    assert [x for x in lines if x.startswith("  → ")]  # the whole view once more at the end


def test_interrupting_follow_stops_the_watching_never_the_training(project):
    cfg = load_config()
    job = runner.train("v01", config=cfg, background=True, resume="none", sync=False, args=["--steps", "100000"])
    lines: list[str] = []
    raised = threading.Event()

    def out(line: str) -> None:
        lines.append(line)
        if line.startswith("v01: running · step") and not raised.is_set():
            raised.set()
            raise KeyboardInterrupt  # what Ctrl-C / interrupting the kernel does inside the loop
    dashboard.show(config=cfg, notebook=False, follow=True, refresh=0.05, out=out)
    assert raised.is_set()
    assert "Stopped following; the run goes on. '%colabkit dashboard' shows it again." in lines
    assert job.running and job.state == "running"
    job.stop(timeout=30)


def test_cli_dashboard_json_and_text(project, capsys):
    assert main(["dashboard", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == 1 and data["project"] == "proj"
    assert list(data["sync"]["tiers"]) == ["drive", "hub"]
    assert data["resume"]["state"] == "fresh" and data["resume"]["choice"] is None  # asked now: a CLI has no later
    assert main(["dashboard"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"colabkit — project proj at {project.resolve()}"
    assert "  drive: off · last upload never · next due — · holds 0 files" in out
    assert next(x for x in out if x.startswith("  → ")) == "  → fresh start (no source holds a checkpoint: start fresh)"


def test_cli_dashboard_refuses_a_zero_refresh(project, capsys):
    assert main(["dashboard", "--refresh", "0"]) == 1
    assert capsys.readouterr().err.strip() == "Error: --refresh: 0 must be a positive duration, e.g. 2s"


@pytest.mark.magic
def test_magic_in_a_terminal_shell_prints_the_text_view(ip, project, capsys):
    ip.run_line_magic("colabkit", "dashboard")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"colabkit — project proj at {project.resolve()}"
    assert "triggers:" in out and "VBox" not in out
    assert dashboard.views() == []  # no widget front end: no live thread either


def test_status_stays_a_one_shot_text_view(project, capsys):
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "resume sources (priority order)" in out
    assert _dash_threads() == []


@pytest.mark.slow
def test_a_kernel_run_keeps_the_widget_and_the_facts_as_text(project, tmp_path):
    """nbclient in a real kernel: the dashboard cell's output holds the widget view beside text/plain and
    text/html, refreshed after the next cell ran, and the kernel's exit stops the refresh thread."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext colabkit"),
                nbformat.v4.new_code_cell("%colabkit dashboard --refresh 0.2"),
                nbformat.v4.new_code_cell("import threading\n"
                                          "print(sorted(t.name for t in threading.enumerate() "
                                          "if t.name.startswith('colabkit-dashboard-')))")]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(project)}})
    client.execute()
    outs = nb.cells[1].outputs
    assert len(outs) == 1 and outs[0].output_type == "display_data"
    data = outs[0].data
    assert "application/vnd.jupyter.widget-view+json" in data
    plain = data["text/plain"]
    assert plain.splitlines()[0] == f"colabkit — project proj at {project.resolve()}"
    assert "  drive: " in plain and "  hub: " in plain and "triggers:" in plain
    assert "data-section='resume'" in data["text/html"]
    threads = nb.cells[2].outputs[0].text
    assert "colabkit-dashboard-proj" in threads
    # the post_run_cell refresh after cell 3 replaced the text: the resume answer arrived meanwhile
    assert any(x.startswith("  → ") for x in plain.splitlines())


def test_a_widget_that_cannot_be_built_degrades_to_text_never_a_traceback(project, monkeypatch):
    def broken(self):
        raise RuntimeError("no widget manager here")
    monkeypatch.setattr(dashboard.Dashboard, "build", broken)
    lines: list[str] = []
    view = dashboard.show(config=load_config(), notebook=True, out=lines.append)
    assert view.widget is None and dashboard.views() == [] and _dash_threads() == []
    assert lines[0] == f"colabkit — project proj at {project.resolve()}"
    assert "training:" in lines and "  no run" in lines
