"""Shared fixtures: an isolated colabkit home per test, and a check that no test leaks a thread."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

# never reach a real service from the tests, whatever the machine's environment holds
for _var in ("COLABKIT_CONFIG", "COLABKIT_SERVICE_ACCOUNT", "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN",
             "HUGGING_FACE_HUB_TOKEN", "COLABKIT_DRIVE_ENDPOINT", "HF_ENDPOINT"):
    os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# A shell that starts the suite in the background without job control (`cmd &` in a script, nohup) hands it
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler, in this process or in any child it
# starts: the Ctrl-C tests would wait forever. Give the suite the handler an interactive session has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own COLABKIT_HOME and HOME, so nothing touches the developer's files."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COLABKIT_HOME", str(home / ".colabkit"))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    return home


@pytest.fixture(autouse=True)
def terminal_command_form():
    """Messages name next steps as terminal commands ('colabkit airlock pull v01') unless a test drives the
    magics (the `ip` fixture makes the magic form the default, as %load_ext does in a kernel)."""
    from colabkit.runtime import set_default_command_form
    set_default_command_form(None)
    yield
    set_default_command_form(None)


# threads that belong to libraries and live for the whole process (not leaks of ours)
_ALLOWED_THREAD_PREFIXES = ("pydevd", "IPythonHistorySavingThread", "asyncio_", "ThreadPoolExecutor-")


@pytest.fixture(autouse=True)
def no_leaked_threads(request):
    """Fail a test that leaves a colabkit (or any new non-library) thread alive after it ends."""
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("allow_threads"):
        return
    leaked: list[threading.Thread] = []
    for _ in range(50):  # threads asked to stop may need a moment to finish their last line
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and not t.name.startswith(_ALLOWED_THREAD_PREFIXES)]
        if not leaked:
            break
        leaked[0].join(0.1)
    if leaked:
        pytest.fail(f"test left threads running: {[t.name for t in leaked]}")


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_threads: the test deliberately leaves library threads running")


@pytest.fixture(scope="session", autouse=True)
def _ipython_started():
    """Start the test IPython shell once, before any test captures output: IPython 7 writes a terminal
    title escape to stdout when its shell starts, which would otherwise land in the first test's capture."""
    from IPython.testing.globalipapp import get_ipython
    ip = get_ipython()
    ip.term_title = False
    yield ip


@pytest.fixture
def ip(_ipython_started):
    """The real IPython shell with colabkit loaded (``ip.run_line_magic("sync", "status")``)."""
    from colabkit.commands import magic_form
    from colabkit.runtime import set_default_command_form
    _ipython_started.run_line_magic("load_ext", "colabkit")
    set_default_command_form(magic_form)  # what loading the extension does (a second %load_ext does nothing)
    return _ipython_started
