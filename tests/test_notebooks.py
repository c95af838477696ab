"""The notebooks users meet first — notebooks/*.ipynb and the one `colabkit init` writes — executed headless by
nbclient in a real kernel, in a temporary project, with their parameters injected the way papermill injects
them. The tests read what the cells printed: the run finished, what the resume plan chose, which tier holds the
checkpoint. A cell that hangs or a kernel that dies is a failed test naming the cell and its last output."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import colabkit

nbformat = pytest.importorskip("nbformat")  # both are in the test extra (pyproject.toml)
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {p.stem: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
TEMPLATE = ROOT / "templates" / "notebook.ipynb"
CELL_TIMEOUT = 180  # seconds one cell may take before the run fails (the longest cell trains for ~10 s)


class NotebookFailed(AssertionError):
    """A notebook run stopped: the message names the cell, what happened and the cell's last output."""


# -- the harness ---------------------------------------------------------------------------------------------
@pytest.fixture
def kernel(tmp_path_factory, monkeypatch) -> str:
    """A kernelspec whose python is this one, with this checkout first on its path (found via JUPYTER_PATH)."""
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "kernels" / "colabkit-test"
    spec.mkdir(parents=True)
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "colabkit (tests)", "language": "python",
        "env": {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}}))
    monkeypatch.setenv("JUPYTER_PATH", str(base))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(base / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(base / "ipython"))
    return "colabkit-test"


def inject(nb: Any, params: dict[str, Any]) -> Any:
    """Papermill's convention: a cell tagged ``injected-parameters`` right after the one tagged ``parameters``."""
    if not params:
        return nb
    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise NotebookFailed("the notebook has no cell tagged 'parameters' to inject into")
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    return nb


def cell_text(cell: Any) -> str:
    """Everything a code cell showed: streams, results and displays (text/plain), errors."""
    parts: list[str] = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            parts.append(str(o.get("data", {}).get("text/plain", "")) + "\n")
        elif o.get("output_type") == "error":
            parts.append(f"{o.get('ename')}: {o.get('evalue')}\n")
    return "".join(parts)


def execute(nb: Any, *, cwd: Path, kernel: str, params: dict[str, Any] | None = None,
            timeout: int = CELL_TIMEOUT) -> Any:
    """Run every cell in a fresh kernel (working directory `cwd`); return the executed notebook.

    Raises:
        NotebookFailed: a cell raised, ran past `timeout` seconds, or the kernel died (the kernel is shut down
            either way; nothing waits forever).
    """
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    inject(nb, params or {})
    current: dict[str, Any] = {}

    def started(cell, cell_index, **_):
        current.update(cell=cell, index=cell_index)

    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=timeout, startup_timeout=120,
                                     resources={"metadata": {"path": str(cwd)}}, on_cell_start=started)
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        cell, index = current.get("cell"), current.get("index")
        what = {"CellTimeoutError": f"ran past the {timeout} s per-cell timeout",
                "DeadKernelError": "killed the kernel"}.get(type(e).__name__, "raised")
        first = cell.source.splitlines()[0] if cell is not None and cell.source else ""
        last = cell_text(cell).strip().splitlines()[-15:] if cell is not None else []
        raise NotebookFailed(f"cell {index} (`{first}`) {what}; its last output:\n" + "\n".join(last)) from None
    return nb


def run(path: Path, *, cwd: Path, kernel: str, **params: Any) -> Any:
    return execute(nbformat.read(path, as_version=4), cwd=cwd, kernel=kernel, params=params)


def out(nb: Any, marker: str) -> str:
    """The output of the (first) code cell whose source contains `marker`."""
    for c in nb.cells:
        if c.cell_type == "code" and marker in c.source and "injected-parameters" not in c.metadata.get("tags", []):
            return cell_text(c)
    raise AssertionError(f"no cell contains {marker!r}")


def outs(nb: Any, marker: str) -> list[str]:
    return [cell_text(c) for c in nb.cells if c.cell_type == "code" and marker in c.source]


# -- the harness itself fails loudly ------------------------------------------------------------------------
def _tiny(*sources: str) -> Any:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def test_a_hung_cell_fails_the_run_naming_the_cell_and_its_last_output(kernel, tmp_path):
    nb = _tiny("x = 1", "print('waiting for a reply that never comes', flush=True)\nimport threading\n"
                        "threading.Event().wait()")
    with pytest.raises(NotebookFailed) as ei:
        execute(nb, cwd=tmp_path, kernel=kernel, timeout=5)
    assert str(ei.value).startswith("cell 1 (`print('waiting for a reply that never comes', flush=True)`) ran "
                                    "past the 5 s per-cell timeout; its last output:\nwaiting for a reply that never "
                                    "comes\n"), str(ei.value)


def test_a_dead_kernel_fails_the_run_naming_the_cell(kernel, tmp_path):
    nb = _tiny("print('about to die', flush=True)\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
               "print('never runs')")
    with pytest.raises(NotebookFailed) as ei:
        execute(nb, cwd=tmp_path, kernel=kernel, timeout=60)
    assert str(ei.value).startswith("cell 0 (`print('about to die', flush=True)`) killed the kernel; its last "
                                    "output:")
    assert "never runs" not in cell_text(nb.cells[1])


# -- what every notebook shares -----------------------------------------------------------------------------
def test_every_notebook_says_where_it_runs_installs_from_the_git_url_and_ships_without_outputs():
    assert sorted(NOTEBOOKS) == ["agent", "colab_a100", "vm_l4"]
    rendered = re.sub(r"\{\{colabkit_git_url\}\}", colabkit.GIT_URL, TEMPLATE.read_text())
    for name, text in [*((n, p.read_text()) for n, p in NOTEBOOKS.items()), ("template", rendered)]:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "markdown", name
        if name != "template":
            assert "**Where it runs:**" in first.source and "**What it needs" in first.source, name
            assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), name
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        if name != "agent":  # the agent's kernel is set up by whoever runs it
            assert f'COLABKIT_GIT_URL = "{colabkit.GIT_URL}"' in code, name
        # the PyPI name `colabkit` is an unrelated project: no notebook may install it
        assert not re.search(r"pip install[^\n]*\scolabkit\b(?![/\w.-])", text), name


# -- notebooks/colab_a100.ipynb --------------------------------------------------------------------------------
@pytest.mark.magic
def test_colab_notebook_runs_on_a_laptop_pull_skipped_resume_train_in_background_flush(kernel, tmp_path):
    project = tmp_path / "colab"
    nb = run(NOTEBOOKS["colab_a100"], cwd=tmp_path, kernel=kernel, PROJECT_DIR=str(project), STEPS=40,
             SAVE_EVERY=20)
    assert out(nb, "find_spec(\"colabkit\")").strip() == \
        f"colabkit {colabkit.__version__} is installed ({ROOT / 'colabkit'})"
    assert out(nb, "ON_COLAB = ").strip() == \
        "Not on Colab: there are no Colab Secrets here; tiers without credentials are local folders."
    pulled = out(nb, "%airlock pull")
    assert pulled.startswith("Nothing to pull (skipped): no bundle of 'v01' on local folder "), pulled
    assert "No code of v01 here (nothing was pulled): scaffolding the template experiment" in out(nb, "%colabkit init")
    first_resume, after = outs(nb, "%resume --experiment")
    assert "Nothing to resume from: training starts fresh." in first_resume
    assert "v01: started in the background" in out(nb, "--background")
    waited = out(nb, "%train wait").splitlines()
    assert waited[0].startswith("v01: finished · attempt 1 · step 40/40"), waited
    # the run's end flushed sync: the hub tier holds the last checkpoint, the drive tier none (logs only)
    assert re.search(r"^  hub\s+step 40\s+v01_step_00000040\.pt$", after, re.M), after
    assert re.search(r"^  drive\s+no checkpoint$", after, re.M), after
    assert "Choice: local step 40" in after
    last = out(nb, "sync.once(")
    assert "drive: ok" in last and "hub: ok" in last, last
    assert "newest checkpoint on each tier: drive none, hub step 40" in last
    assert "Safe to lose: this runtime's disk." in last
    assert (project / "experiments" / "v01" / "checkpoints" / "v01_step_00000040.pt").is_file()
    # the data set went to the local SSD, verified against nothing (a demo folder: said so), journaled once
    fetched = out(nb, "%data fetch")
    assert re.search(r"^toy sha-[0-9a-f]{12}: 1 files, 10\.4 KB in .*/data/toy/sha-[0-9a-f]{12} \(downloaded 10\.4 KB\)$",
                     fetched, re.M), fetched
    assert "  UNVERIFIED: no digest to check against: a local copy without a declared sha256" in fetched
    assert (project / "journal.md").read_text().count("- **Dataset**: toy sha-") == 1
    # the release cell, on a laptop: the checks, and a refusal (nothing to release here)
    rel = out(nb, "%release --experiment").splitlines()
    assert rel[0] == "Release checks:", rel
    assert rel[1] == ("  FAIL  platform  not on Colab or a Google VM: nothing is configured to release this machine "
                      "(set release.command in colabkit.yaml)")
    assert any(x.startswith("  ok    tiers     every tier holds a verified copy of the final checkpoint") for x in rel)
    assert rel[-2].startswith("Dry run: would refuse: nothing to release here (failing: platform")


# -- notebooks/vm_l4.ipynb -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", [None, "NVIDIA L4:24152899584"], ids=["laptop-no-gpu", "fake-L4"])
def test_vm_notebook_checks_the_machine_exports_refuses_what_would_not_fit_imports_and_journals(
        kernel, tmp_path, monkeypatch, gpu):
    if gpu:
        monkeypatch.setenv("COLABKIT_FAKE_GPU", gpu)  # runtime.gpus() reads it instead of nvidia-smi
    project = tmp_path / "vm"
    nb = run(NOTEBOOKS["vm_l4"], cwd=tmp_path, kernel=kernel, PROJECT_DIR=str(project), STEPS=40)
    assert f"No colabkit.yaml here: scaffolding a project in {project}" in out(nb, "find_config(")
    from colabkit.config import format_size
    machine = out(nb, "rt = runtime.detect()")
    refusal = out(nb, 'max_vram="40GB"')
    if gpu is None:
        assert "GPU: none found (no nvidia-smi, or it lists none): this is not the L4 VM" in machine
        assert refusal.strip() == (f"no GPU here, so nothing to refuse (no GPU found: --max-vram {format_size(40e9)} "
                                   "has nothing to cap); on the L4 VM this job is refused before it starts")
    else:
        l4, cap = format_size(24152899584), format_size(20e9)
        assert f"GPU: NVIDIA L4, {l4} (Tier 1)" in machine
        assert f"Tier 1 (home base): jobs are capped at {cap} of GPU memory" in machine
        assert refusal.startswith(f"preflight refused the 40 GB job: v01: --max-vram {format_size(40e9)} is more "
                                  f"than a Tier 1 job may use (NVIDIA L4, {l4}: jobs are capped at {cap})"), refusal
    exported = out(nb, "%airlock export $EXPERIMENT")
    assert re.match(r"Bundle [0-9a-f]{12} of v01: \d+ files", exported), exported
    assert "uploaded to drive:" in exported
    trained = out(nb, "%train $EXPERIMENT --max-vram 20GB").splitlines()
    assert any(x.startswith("v01: finished · step 40/40") for x in trained), trained
    imported = out(nb, "%airlock import $EXPERIMENT")
    assert imported.startswith("Imported logs of v01 from "), imported
    assert "## Run v01" in imported
    journal = out(nb, "%journal data")
    assert "Added to journal.md:" in journal and "toy-regression" in journal
    assert re.search(r"(?i)Pinned pyyaml==\S+ in \S*experiments/v01/requirements\.txt", journal), journal
    assert "toy-regression" in (project / "journal.md").read_text()
    # turning the VM off: on a laptop only the checks, and no release (nothing is configured to release it)
    rel = out(nb, "%release --experiment").splitlines()
    assert rel[0] == "Release checks:" and rel[-2].startswith("Dry run: would refuse: nothing to release here"), rel


# -- notebooks/agent.ipynb -----------------------------------------------------------------------------------
def _agent_result(nb: Any) -> dict[str, Any]:
    return json.loads(out(nb, "json.dumps(result)").splitlines()[0])


def test_agent_notebook_runs_headless_parses_json_and_reports_the_run(kernel, tmp_path):
    project = tmp_path / "agent"
    archive = tmp_path / "archive" / "toy"   # a data set "on the archive" (a local path standing in for it)
    archive.mkdir(parents=True)
    (archive / "train.txt").write_text("".join(f"{i} {i * i}\n" for i in range(100)))
    nb = run(NOTEBOOKS["agent"], cwd=tmp_path, kernel=kernel, experiment="v02", steps=40, project_dir=str(project),
             data_source=str(archive))
    assert "init: 7 created, 0 kept as they were" in out(nb, 'ck("init"')
    fetched = out(nb, "if data_source:")
    assert fetched.startswith("data: dataset ") and " 1 files, 744 bytes at " in fetched, fetched
    assert "- **Dataset**: dataset " in (project / "journal.md").read_text()
    released = out(nb, "rel = ck(")
    assert released.startswith("release: dry-run") and "  ok tiers: " in released, released
    assert "resume choice: none (a fresh start)" in out(nb, "choice = plan")
    assert out(nb, "run = ck(").startswith("run: finished at step 40 · last checkpoint ")
    after = out(nb, "after = ck(")
    assert "checkpoint on local: step 40" in after and "checkpoint on hub: step 40" in after, after
    res = _agent_result(nb)
    assert res == {"experiment": "v02", "state": "finished", "step": 40, "steps": 40, "errors": [],
                   "checkpoint": str(project / "experiments" / "v02" / "checkpoints" / "v02_step_00000040.pt")}


def _failing_project(project: Path) -> None:
    from colabkit.templates import scaffold
    scaffold(project, experiment="v01")
    (project / "colabkit.yaml").write_text("train:\n  max_restarts: 0\n")
    (project / "experiments" / "v01" / "train.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")


def test_agent_notebook_through_papermill_exits_non_zero_when_the_run_fails(kernel, tmp_path):
    """The way an agent runs it: `papermill ... -p NAME VALUE`; a failed run is a non-zero exit naming why."""
    project = tmp_path / "agent"
    _failing_project(project)
    executed = tmp_path / "out.ipynb"
    pm = shutil.which("papermill", path=str(Path(sys.executable).parent))
    assert pm, "papermill is missing from this environment: pip install -e '.[test]' (the test extra has it)"
    p = subprocess.run([pm, str(NOTEBOOKS["agent"]), str(executed), "-k", kernel, "--cwd", str(tmp_path),
                        "--execution-timeout", str(CELL_TIMEOUT), "--no-progress-bar",
                        "-p", "experiment", "v01", "-p", "steps", "20", "-p", "project_dir", str(project)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr[-3000:]
    assert ("RuntimeError: training v01 did not finish: v01: train.py failed 1 time (last: exited with code 3); "
            "gave up after 0 restarts (--max-restarts).") in p.stderr, p.stderr[-3000:]
    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'experiment = "v01"' in injected[0].source
    res = _agent_result(nb)
    assert res["state"] == "failed" and res["steps"] == 20 and res["errors"][0]["exit_code"] == 1
    assert out(nb, "if data_source:").startswith("data: no data_source given: nothing to pre-fetch")


# -- templates/notebook.ipynb, as `colabkit init` writes it ----------------------------------------------------
def test_template_notebook_runs_top_to_bottom_right_after_init(kernel, tmp_path):
    from colabkit.templates import scaffold
    root = tmp_path / "fresh"
    scaffold(root, experiment="v07")
    text = (root / "notebook.ipynb").read_text()
    assert "{{" not in text and "}}" not in text
    nb = execute(nbformat.reads(text, as_version=4), cwd=root, kernel=kernel)
    pulled = out(nb, "%airlock pull v07")
    assert pulled.startswith("Nothing to pull (skipped): no bundle of 'v07' on local folder "), pulled
    assert "Nothing to resume from: training starts fresh." in out(nb, "%resume --experiment v07")
    trained = out(nb, "%train v07 --").splitlines()
    assert any(x.startswith("v07: finished · step 300/300") for x in trained), trained[-5:]
    assert "hub: holds 2 files" in out(nb, "%sync status")


@pytest.mark.magic
def test_the_raw_template_placeholder_is_refused_as_an_experiment_name(ip, tmp_path, monkeypatch):
    from IPython.core.error import UsageError
    monkeypatch.chdir(tmp_path)
    expected = ("'{experiment}' is a template placeholder left unrendered, not an experiment name: this comes from "
                "the raw template; run 'colabkit init' and use the notebook.ipynb it writes, or put the "
                "experiment's folder name (e.g. v01) in its place")
    for magic, line in (("train", "{{experiment}} -- --steps 3"), ("resume", "--experiment {{experiment}}"),
                        ("airlock", "pull {{experiment}} --missing-ok"), ("airlock", "export {{experiment}}")):
        with pytest.raises(UsageError) as ei:
            ip.run_line_magic(magic, line)
        assert str(ei.value) == expected, (magic, line)
    assert not (tmp_path / "experiments").exists()


def test_a_template_placeholder_nothing_fills_in_is_an_error(tmp_path):
    from colabkit.templates import InitError, _fill
    assert _fill("# {{project}} at {{ date }}", {"project": "p", "date": "d"}) == "# p at d"
    with pytest.raises(InitError) as ei:
        _fill("%train {{experiment}} {{experimnet}}", {"experiment": "v01", "project": "p"}, name="notebook.ipynb")
    assert str(ei.value) == ("the notebook.ipynb template has placeholders nothing fills in: {{experimnet}}; known: "
                             "{{experiment}}, {{project}} (please report this)")


# -- what the notebooks' cells rely on: a cluster cell that skips, waiting for a background run ---------------
def test_pull_missing_ok_skips_with_a_note_only_when_nothing_was_exported(tmp_path, capsys):
    from colabkit.cli import main
    from colabkit.templates import scaffold
    scaffold(tmp_path, experiment="v01")
    cfg = f"--config={tmp_path / 'colabkit.yaml'}"
    assert main(["airlock", "pull", "v01", cfg]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: no bundle of 'v01' on local folder ") and \
        err.endswith("(airlock/v01/latest.json is missing); run 'colabkit airlock export v01' where the code is")
    where = err[len("Error: no bundle of 'v01' on "):err.index(" (airlock/")]
    assert main(["airlock", "pull", "v01", "--missing-ok", cfg]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Nothing to pull (skipped): no bundle of 'v01' on {where} (airlock/v01/latest.json is missing); run "
        "'colabkit airlock export v01' where the code is.",
        "  Pulling is for the cluster; where the code is written, export it first."]
    assert main(["airlock", "pull", "v01", "--missing-ok", "--json", cfg]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pulled"] is False and data["bundle"] is None and data["experiment"] == "v01"
    # a bundle asked for by its hash is never "nothing to pull": a typo must not pass silently
    assert main(["airlock", "pull", "v01", "--bundle", "abcd1234", "--missing-ok", cfg]) == 1
    assert capsys.readouterr().err.strip() == f"Error: no bundle 'abcd1234' of 'v01' on {where}; available: none"
    assert not (tmp_path / "experiments" / "v01" / "checkpoints").exists()


@pytest.mark.magic
def test_train_wait_returns_when_the_background_run_ends(ip, tmp_path, monkeypatch, capsys):
    from IPython.core.error import UsageError
    from colabkit.templates import scaffold
    scaffold(tmp_path, experiment="v01")
    (tmp_path / "colabkit.yaml").write_text("train:\n  min_free_disk: 1MB\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("train", "wait")
    assert str(ei.value) == ("no training job found for this project; start one with '%train vXX' (or "
                             "'%train vXX --background')")
    ip.run_line_magic("train", "v01 --background --no-sync -- --steps 30 --save-every 10")
    capsys.readouterr()
    ip.run_line_magic("train", "wait v01 --timeout 5m")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v01: finished · attempt 1 · step 30/30"), lines
    assert lines[1] == f"  last checkpoint: {tmp_path.resolve() / 'experiments/v01/checkpoints/v01_step_00000030.pt'}"
    ip.run_line_magic("train", "wait v01 --json")  # the run ended: returns at once, from the job file
    data = json.loads(capsys.readouterr().out)
    assert data["timed_out"] is False and [j["state"] for j in data["jobs"]] == ["finished"]
