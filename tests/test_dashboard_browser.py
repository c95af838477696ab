"""The live dashboard in a real browser: JupyterLab 4 + ipywidgets 8, and the classic Notebook 6 + ipywidgets 7.7
(Colab's version), each a real server on 127.0.0.1 with a token, driven by Debian's headless Chromium through
selenium (pointed at /usr/bin/chromium and /usr/bin/chromedriver: nothing downloads a browser).

The notebook trains the template of a project made by ``colabkit init`` in the background and shows the
dashboard; the assertions read the DOM, without re-running the cell: the step shown advances at least twice,
the loss curve gains points, each tier has its row, and the resume section names its choice.

Without Chromium these tests skip on a developer's machine and fail under CI (``CI=true``).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("COLABKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("COLABKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
#: the classic Notebook 6 + ipywidgets 7.7 environment (`make test-colab` builds it)
NOTEBOOK6_PYTHON = os.environ.get("COLABKIT_NOTEBOOK6_PYTHON", str(ROOT / ".venv-colab" / "bin" / "python"))
SHOTS = os.environ.get("COLABKIT_SCREENSHOTS")  # a folder to keep the screenshots in (default: the test's tmp)

pytestmark = [pytest.mark.browser]

STEPS = 400


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what}; CI must run the browser tests (.ci/run installs chromium and chromium-driver)")
    pytest.skip(what)


def _need_browser() -> None:
    for p in (CHROMIUM, CHROMEDRIVER):
        if not os.access(p, os.X_OK):
            _missing(f"{p} is not installed (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test,browser]')")


def _driver(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads anything (it is not even run: paths given)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800",
              "--no-first-run", "--disable-extensions", "--disable-background-networking",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for a failure report
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)


def _project(tmp_path: Path) -> Path:
    """A project made by `colabkit init`, with a notebook that trains the template and shows the dashboard."""
    env = _env(tmp_path)
    subprocess.run([sys.executable, "-m", "colabkit", "init", str(tmp_path / "proj")], check=True, env=env,
                   capture_output=True, timeout=120)
    proj = tmp_path / "proj"
    # a short foreground run first leaves a checkpoint: the background run resumes from it (one loss curve), and
    # the resume section has a checkpoint to choose
    cells = [
        "%load_ext colabkit",
        "%train v01 --no-sync -- --steps 40 --save-every 40 --log-every 5",
        f"%train v01 --background -- --steps {STEPS} --save-every 100 --log-every 5 --step-delay 0.04",
        "%colabkit dashboard --refresh 0.5",
    ]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": c,
                     "id": f"c{i}"} for i, c in enumerate(cells)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (proj / "dash.ipynb").write_text(json.dumps(nb))
    return proj


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLABKIT_", "JUPYTER", "JPY_"))}
    env.update({"PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "HOME": str(tmp_path / "home"),
                "COLABKIT_HOME": str(tmp_path / "home" / ".colabkit"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
                "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


class Server:
    """A Jupyter server (lab or classic notebook) on 127.0.0.1:<free port> with a token; stopped with its kernels."""

    def __init__(self, argv: list[str], *, token_option: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.token = uuid.uuid4().hex
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = ["--allow-root"] if os.geteuid() == 0 else []  # CI containers run as root
        self.proc = subprocess.Popen([*argv, "--no-browser", "--ip=127.0.0.1", f"--port={port}", *root,
                                      f"--{token_option}={self.token}"],
                                     cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.log = log
        self._urls: queue.Queue[str] = queue.Queue()
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="test-jupyter-log", daemon=True)
        self._reader.start()
        try:
            self.base = self._urls.get(timeout=120)
        except queue.Empty:
            self.base = ""
        if not self.base:
            self.stop()
            raise AssertionError("the Jupyter server did not start:\n" + "".join(self._lines[-40:])) from None

    def _read(self) -> None:
        pat = re.compile(r"(http://127\.0\.0\.1:\d+)/")
        with open(self.log, "w") as f:
            for line in self.proc.stderr:
                f.write(line)
                f.flush()
                self._lines.append(line)
                m = pat.search(line)
                if m and self._urls.empty():
                    self._urls.put(m.group(1))
        self._urls.put("")  # the server ended before it printed its address

    def start_kernel(self, path: str) -> None:
        import urllib.error
        import urllib.request
        body = json.dumps({"path": path, "type": "notebook", "name": path, "kernel": {"name": "python3"}}).encode()
        req = urllib.request.Request(f"{self.base}/api/sessions", data=body, method="POST",
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while True:  # the address is printed just before the socket accepts connections
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status in (200, 201), r.status
                    return
            except urllib.error.URLError as e:
                if not isinstance(e.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                    raise
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.2)  # ...or the server ended
            if self.proc.poll() is not None:
                raise AssertionError("the Jupyter server ended:\n" + "".join(self._lines[-40:]))

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # jupyter asks to confirm once; twice shuts down with kernels
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(10)


def _stop_leftover_children(proj: Path) -> None:
    """A kernel shut down normally stops its run (atexit); if it did not, its child must not outlive the test."""
    for p in (proj / ".colabkit" / "jobs").glob("*.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("child_pid")
        if pid:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _KernelAsked(Exception):
    """JupyterLab showed its kernel dialog after the cells ran (a busy machine's page may ask late)."""


def _watch(driver, *, timeout: float = 180.0) -> dict:
    """Read the dashboard's DOM until the step has advanced at least twice and the loss curve gained points."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    seen: dict = {"steps": [], "points": []}

    def progressed(d) -> bool:
        if d.find_elements(By.CSS_SELECTOR, ".jp-Dialog"):
            raise _KernelAsked()   # JupyterLab asks for a kernel again: the cells run again in the one it gets
        try:
            step_el = d.find_elements(By.CSS_SELECTOR, ".colabkit-dashboard .ck-step")
            svg = d.find_elements(By.CSS_SELECTOR, ".colabkit-dashboard svg.ck-loss")
            if not step_el or not svg:
                return False
            step = step_el[0].get_attribute("data-step")
            points = int(svg[0].get_attribute("data-points") or 0)
        except Exception:  # the view was redrawn between two reads
            return False
        if step and step.isdigit() and (not seen["steps"] or int(step) != seen["steps"][-1]):
            seen["steps"].append(int(step))
        if not seen["points"] or points != seen["points"][-1]:
            seen["points"].append(points)
        return len(seen["steps"]) >= 3 and len(seen["points"]) >= 3

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(progressed)
    return seen


def _assert_sections(driver) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def read(d):
        # the view redraws itself every refresh: an element found may be replaced before it is read, so a stale
        # one means "read the view again", never a failure
        try:
            dash = d.find_element(By.CSS_SELECTOR, ".colabkit-dashboard")
            el = dash.find_elements(By.CSS_SELECTOR, ".ck-resume-choice")
            if not el or not el[0].get_attribute("data-source"):
                return False
            return ([e.get_attribute("data-section") for e in dash.find_elements(By.CSS_SELECTOR, ".ck-section")],
                    [e.get_attribute("data-tier") for e in dash.find_elements(By.CSS_SELECTOR, "tr.ck-tier")],
                    dash.find_element(By.CSS_SELECTOR, "[data-section=triggers]").text, el[0].text,
                    [e.get_attribute("data-source") for e in dash.find_elements(By.CSS_SELECTOR, "tr.ck-source")])
        except StaleElementReferenceException:
            return False

    sections, tiers, triggers_text, text, sources = WebDriverWait(driver, 60, poll_frequency=0.2).until(read)
    assert sections[:5] == ["runtime", "training", "sync", "triggers", "resume"]
    assert sections[5:] in ([], ["release"])  # the release guard's facts, when the project has them
    assert tiers == ["drive", "hub"]
    assert "none configured" in triggers_text
    assert re.fullmatch(r"→ local step \d+ \(.+\)", text), text
    assert sources == ["local", "drive", "hub"]


def _shot(driver, tmp_path: Path, name: str) -> Path:
    from selenium.webdriver.common.by import By
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    from selenium.common.exceptions import StaleElementReferenceException
    for attempt in range(5):  # the view may be redrawn between finding it and taking its picture
        try:
            el = driver.find_element(By.CSS_SELECTOR, ".colabkit-dashboard")
            driver.execute_script("arguments[0].scrollIntoView(true);", el)
            el.screenshot(str(path))
            break
        except StaleElementReferenceException:
            if attempt == 4:
                raise
    assert path.stat().st_size > 10_000  # a real picture, not an empty box
    return path


def _run(tmp_path: Path, argv: list[str], token_option: str, open_path: str, run_all, shot: str) -> dict:
    proj = _project(tmp_path)
    env = _env(tmp_path)
    server = Server(argv, token_option=token_option, cwd=proj, env=env, log=tmp_path / "jupyter.log")
    driver = None
    try:
        server.start_kernel("dash.ipynb")  # the page then joins that session instead of asking for a kernel
        driver = _driver(tmp_path)
        driver.get(server.url(open_path))
        for attempt in range(3):
            run_all(driver)
            try:
                seen = _watch(driver)
                break
            except _KernelAsked:
                if attempt == 2:
                    raise AssertionError("JupyterLab asked for a kernel three times after the cells ran") from None
        assert seen["steps"] == sorted(seen["steps"]) and seen["steps"][-1] > seen["steps"][0]
        assert seen["points"][-1] > seen["points"][0]
        _assert_sections(driver)
        _shot(driver, tmp_path, shot)
        return seen
    except BaseException:
        if driver is not None:  # what the page showed, for the failure report
            folder = Path(SHOTS) if SHOTS else tmp_path
            folder.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(folder / f"failed-{shot}"))
            (folder / f"failed-{shot}.html").write_text(driver.page_source)
            with contextlib.suppress(Exception):
                (folder / f"failed-{shot}.console.txt").write_text(
                    "\n".join(f"{e.get('level')} {e.get('message')}" for e in driver.get_log("browser")))
        raise
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
        _stop_leftover_children(proj)


def test_jupyterlab4_ipywidgets8_dashboard_updates_live(tmp_path):
    _need_browser()
    try:
        import jupyterlab  # noqa: F401
        import ipywidgets
    except ImportError:
        _missing("jupyterlab is not installed (pip install -e '.[test,browser]')")
    assert ipywidgets.__version__.startswith("8.")
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def run_all(d):
        state = {"ran_at": None, "clicked": False, "asked_at": 0.0}

        def started(d) -> bool:
            # a fresh JupyterLab may ask which kernel to use, even for a running session: take the preferred one
            accept = d.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept")
            if accept:
                with contextlib.suppress(Exception):
                    accept[0].click()
                state["ran_at"], state["clicked"] = None, False
                return False
            # every cell queued or run, the first one run: in the kernel the page now holds. A kernel chosen in a dialog
            # after "Run All" (a busy machine's JupyterLab may ask late) runs only what was still queued: cells 1-3
            # show [ ] while the dashboard's cell shows [1], and "Run All" goes again
            marks = [re.search(r"\[(\*|\d*)\]", p.text) for p in
                     d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-InputPrompt")]
            if state["clicked"] and marks and all(m and m.group(1) for m in marks) \
                    and marks[0].group(1).isdigit():
                return True   # (prompts of an earlier run count only once "Run All" was clicked in this one)
            if any(e.text.strip() == "No Kernel" for e in d.find_elements(By.CSS_SELECTOR, ".jp-Toolbar .jp-KernelName")):
                # the page let go of its kernel (a dialog answered while it was still being drawn): ask for one, as a
                # person clicks "No Kernel"; the dialog it opens is accepted above
                if time.monotonic() - state["asked_at"] > 5:   # one dialog at a time
                    with contextlib.suppress(WebDriverException):
                        d.find_element(By.CSS_SELECTOR, ".jp-Toolbar .jp-KernelName").click()
                    state["asked_at"] = time.monotonic()
                state["ran_at"], state["clicked"] = None, False
                return False
            idle = d.find_elements(By.XPATH, "//*[contains(@class,'jp-Notebook-ExecutionIndicator') and "
                                             "@data-status='idle']")
            if idle and (state["ran_at"] is None or time.monotonic() - state["ran_at"] > 10):
                try:
                    d.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']").click()
                    WebDriverWait(d, 10, poll_frequency=0.1).until(lambda d: d.find_elements(
                        By.XPATH, "//div[contains(@class,'lm-Menu-itemLabel') and text()='Run All Cells']"))
                    d.find_element(By.XPATH,
                                   "//div[contains(@class,'lm-Menu-itemLabel') and text()='Run All Cells']").click()
                except WebDriverException:   # a dialog opened over the menu, or the menu was redrawn: next poll
                    state["ran_at"] = time.monotonic() - 9   # the menu may still be open: try again in a second
                    return False
                state["ran_at"], state["clicked"] = time.monotonic(), True
            return False

        WebDriverWait(d, 180, poll_frequency=0.3, ignored_exceptions=(StaleElementReferenceException,)).until(started)

    _run(tmp_path, [sys.executable, "-m", "jupyterlab",
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.extension_manager=readonly"],
         "IdentityProvider.token", "lab/tree/dash.ipynb", run_all, "dashboard-jupyterlab4.png")


def test_classic_notebook6_ipywidgets7_renders_the_dashboard(tmp_path):
    _need_browser()
    py = Path(NOTEBOOK6_PYTHON)
    if not py.exists():
        _missing(f"{py} does not exist (make test-colab builds the Notebook 6 + ipywidgets 7.7 environment)")
    versions = subprocess.run([str(py), "-c", "import notebook, ipywidgets; print(notebook.__version__, "
                               "ipywidgets.__version__)"], capture_output=True, text=True, timeout=120)
    if versions.returncode != 0:
        _missing(f"{py} has no classic notebook: {versions.stderr.strip()[-200:]}")
    nb_version, w_version = versions.stdout.split()
    assert nb_version.startswith("6.") and w_version.startswith("7.7"), versions.stdout
    from selenium.webdriver.support.ui import WebDriverWait

    def run_all(d):
        WebDriverWait(d, 120, poll_frequency=0.2).until(lambda d: d.execute_script(
            "return !!(window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel"
            " && Jupyter.notebook.kernel.is_connected() && Jupyter.notebook.kernel.widget_manager)"))
        # ipywidgets 7's classic front end, once connected, asks the kernel which widgets exist: through the
        # "jupyter.widget.control" comm, or (a kernel that has not imported ipywidgets yet refuses that comm) a
        # comm_info request on the shell channel. That answer is not ordered with the widgets' own comm_open
        # messages (iopub): when it is still queued behind the cells, the manager re-creates widgets the cells are
        # opening and their view stays empty. A person opens the page and clicks later; the test waits the same
        # way: the same load again, which the kernel answers after the manager's own (both go through the shell
        # channel in order), so once it has returned the manager's has been handled.
        d.set_script_timeout(120)
        loaded = d.execute_async_script("const done = arguments[arguments.length - 1];"
                               "Jupyter.notebook.kernel.widget_manager._loadFromKernel()"
                               ".then(() => done(true), e => done(String(e)));")
        assert loaded is True, f"the widget manager could not load the kernel's widgets: {loaded}"
        d.execute_script("Jupyter.notebook.execute_all_cells();")

    _run(tmp_path, [str(py), "-m", "notebook"], "NotebookApp.token", "notebooks/dash.ipynb", run_all, "dashboard-notebook6.png")
