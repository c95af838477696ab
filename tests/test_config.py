"""colabkit.yaml: found by walking up, defaults without a file, and errors that name key, value and fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from colabkit.config import find_config, load_config, parse_duration, parse_size
from colabkit.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "colabkit.yaml"
    p.write_text(text)
    return p


def test_no_file_is_a_valid_configuration_with_local_tiers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.source is None and cfg.root == tmp_path.resolve()
    assert [(t.name, t.remote, t.every) for t in cfg.tiers] == [("drive", "drive", 5400.0), ("hub", "hub", 10800.0)]
    assert cfg.tier("hub").latest_only and "*.pt" in cfg.tier("hub").include
    assert "*.pt" in cfg.tier("drive").exclude
    from colabkit.remotes import open_remote
    remote = open_remote(cfg, "drive")
    assert remote.kind == "local"
    assert remote.describe() == f"local folder {cfg.home / 'remotes' / tmp_path.name / 'drive'}"


def test_found_by_walking_up(tmp_path, monkeypatch):
    cfg_file = write(tmp_path, "project: walk\n")
    deep = tmp_path / "experiments" / "v01" / "models"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_config() == cfg_file
    cfg = load_config()
    assert cfg.project == "walk" and cfg.root == tmp_path.resolve()
    assert cfg.checkpoint_dir("v01") == tmp_path.resolve() / "experiments" / "v01" / "checkpoints"
    assert cfg.remote_path(cfg.checkpoint_dir("v01") / "a.pt") == "experiments/v01/checkpoints/a.pt"


def test_colabkit_config_env_wins(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.yaml"
    other.write_text("project: from-env\n")
    write(tmp_path, "project: walked\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLABKIT_CONFIG", str(other))
    assert load_config().project == "from-env"
    monkeypatch.setenv("COLABKIT_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError) as ei:
        load_config()
    assert str(ei.value) == (f"COLABKIT_CONFIG: {str(tmp_path / 'missing.yaml')!r} does not exist; "
                             "point it at a colabkit.yaml or unset it")


def test_tiers_with_durations_sizes_and_globs(tmp_path):
    cfg = load_config(write(tmp_path, """
tiers:
  - name: drive
    every: 90m
    include: ["logs/**", "*.md"]
    max_file_size: 50MB
  - name: hub
    every: 2h
    latest_only: true
  - name: backup
    remote: local
    path: /mnt/backup
    every: 1.5h
retention: {keep_local: 2, require_remote: [hub], min_free: 5GB}
resume: {priority: [local, hub, drive], policy: first, on_unreachable: older, deadline: 2m}
"""))
    drive, hub, backup = cfg.tiers
    assert (drive.remote, drive.every, drive.include, drive.max_file_size) == ("drive", 5400.0, ("logs/**", "*.md"), 50 * 10**6)
    assert (hub.remote, hub.every, hub.latest_only) == ("hub", 7200.0, True)
    assert (backup.remote, backup.path, backup.every) == ("local", "/mnt/backup", 5400.0)
    assert cfg.retention.keep_local == 2 and cfg.retention.require_remote == ("hub",)
    assert cfg.retention.min_free == 5 * 10**9
    assert cfg.resume.priority == ("local", "hub", "drive") and cfg.resume.policy == "first"
    assert (cfg.resume.on_unreachable, cfg.resume.deadline) == ("older", 120.0)


@pytest.mark.parametrize("text, message", [
    ("tiers:\n  - name: drive\n  - name: hub\n    every: 3 hourz\n",
     "tiers[1].every: '3 hourz' is not a duration; use e.g. 90m or 2h"),
    ("tiers:\n  - name: drive\n    max_file_size: lots\n",
     "tiers[0].max_file_size: 'lots' is not a size; use e.g. 500MB or 20GB"),
    ("tiers:\n  - name: drive\n    remote: dropbox\n",
     "tiers[0].remote: 'dropbox' is not allowed; use one of local, drive, hub"),
    ("tiers:\n  - name: drive\n  - name: drive\n", "tiers: the name 'drive' is used twice; tier names must be unique"),
    ("tiers:\n  - every: 2h\n", "tiers[0].name: missing; give each tier a name such as drive or hub"),
    ("tiers:\n  - name: drive\n    evry: 2h\n",
     "tiers[0].evry: unknown key (did you mean 'every'?); allowed here: every, exclude, include, keep, latest_only, max_file_size, name, path, remote"),
    ("tiers:\n  - name: drive\n    keep: 3\n",
     "tiers[0].keep: 3 applies to hub tiers only; a drive tier keeps every checkpoint it receives. Remove keep from "
     "tier 'drive' (retention.keep_local limits the local disk)"),
    ("tiers:\n  - name: backup\n    path: /mnt/b\n    keep: 2\n",
     "tiers[0].keep: 2 applies to hub tiers only; a local tier keeps every checkpoint it receives. Remove keep from "
     "tier 'backup' (retention.keep_local limits the local disk)"),
    ("resume:\n  policy: oldest\n", "resume.policy: 'oldest' is not allowed; use one of newest, first"),
    ("resume:\n  on_unreachable: skip\n",
     "resume.on_unreachable: 'skip' is not allowed; use one of wait, older, fail"),
    ("resume:\n  priority: [local, gdrive]\n",
     "resume.priority: 'gdrive' is not a source; use local or a tier name (drive, hub)"),
    ("retention:\n  keep_local: 0\n", "retention.keep_local: 0 must be a whole number >= 1"),
    ("retention:\n  require_remote: [s3]\n", "retention.require_remote: 's3' is not a tier; configured tiers: drive, hub"),
    ("drive:\n  chunk_size: 1000\n", "drive.chunk_size: 1000 is not a multiple of 256 KiB; use e.g. 8MiB"),
    ("hub:\n  private: maybe\n", "hub.private: 'maybe' must be true or false"),
    ("train:\n  step_regex: 'step (\\d+'\n",
     "train.step_regex: 'step (\\\\d+' is not a valid regular expression (missing ), unterminated subpattern at position 5)"),
    ("tiers: drive\n", "tiers: 'drive' must be a list of tiers"),
    ("colour: blue\n", "colour: unknown key; allowed here: airlock, checkpoints, credentials, dashboard, data, "
                       "drive, experiments, home, hub, logs, project, release, resume, retention, sync, tiers, "
                       "train, triggers"),
    ("cooldown: []\n", "cooldown: rules on the training log are written as triggers: now (a list of rules with "
                       "action: {type: cooldown, ...}); see docs/triggers.md"),
])
def test_bad_configuration_names_key_value_and_fix(tmp_path, text, message):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert str(ei.value) == message


def test_malformed_yaml_says_where(tmp_path):
    p = write(tmp_path, "tiers:\n  - name: drive\n   every: [\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}: line ")
    assert "not valid YAML" in str(ei.value) and str(ei.value).endswith("fix the syntax there")


def test_top_level_must_be_mapping(tmp_path):
    p = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: the top level must be a mapping of keys, got list"


@pytest.mark.parametrize("value, seconds", [("90m", 5400), ("2h", 7200), ("45s", 45), (3600, 3600), ("1.5h", 5400),
                                            ("500ms", 0.5), ("1d", 86400), ("10", 10)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value, n", [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("100k", 100_000), (42, 42),
                                      ("1.5 GB", 1_500_000_000)])
def test_sizes(value, n):
    assert parse_size(value) == n


def test_config_show_prints_effective_values_without_credentials(tmp_path, capsys):
    from colabkit.cli import main
    p = write(tmp_path, "drive:\n  folder_id: 1AbCdEf\n  credentials: /keys/sa.json\nhub:\n  repo_id: me/runs\n")
    # no credentials file exists: show still works, and nothing secret-looking is printed
    assert main(["config", "show", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "folder_id: 1AbCdEf" in out and "repo_id: me/runs" in out


ROUNDTRIP = """\
project: rt
tiers:
  - name: drive
    remote: drive
    every: 90m
    max_file_size: 100MB
    exclude: ["*.pt"]
  - name: hub
    remote: hub
    every: 2.5h
    latest_only: true
    keep: 2
  - name: backup
    path: /mnt/backup
    every: 1500ms
    max_file_size: 1234567
drive:
  folder_id: 1AbC
  credentials: keys/sa.json
  chunk_size: 8MiB
  timeout: 45s
retention:
  min_free: 1.5GB
sync:
  settle: 0.25s
  poll: true
train:
  max_vram: 20GB
  stall_after: 1d
  total_steps: 300
  step_regex: 'it (?P<step>\\d+)'
  data: [pg19]
data:
  cache: /mnt/ssd/data
  min_free: 2GB
  sets:
    - name: pg19
      source: hub:datasets/alice/pg19@v1.0:train/*.parquet
      version: v1.0
      unpack: tar
      sha256: {pg19.tar: 5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03}
release:
  command: sudo -n shutdown -h +2
  idle_after: 45m
  tiers: [hub]
triggers:
  - name: cool
    event: checkpoint
    conditions:
      at: [200]
    action:
      type: cooldown
      args: [--lr, "1e-4"]
  - name: quiet
    inactivity: 30m
    action:
      type: log
      message: no output for 30m
"""


def test_config_show_prints_what_a_user_writes_and_parses_back_to_an_equal_config(tmp_path, capsys):
    import yaml

    from colabkit.cli import main
    p = write(tmp_path, ROUNDTRIP)
    cfg = load_config(p)
    assert main(["config", "show", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for expected in ("  every: 90m", "  max_file_size: 100MB", "  every: 150m", "  every: 1500ms",
                     "  max_file_size: 1234567", "  chunk_size: 8MiB", "  timeout: 45s", "  min_free: 1500MB",
                     "  settle: 250ms", "  max_vram: 20GB", "  stall_after: 1d", "  retry_max: 10m",
                     "  min_free: 2GB", "  max_unpacked: 500GB", "  idle_after: 45m"):
        assert expected in lines, expected
    back = load_config(data=yaml.safe_load(out), start=cfg.root)
    assert back.with_changes(source=cfg.source) == cfg
    # the defaults too: no colabkit.yaml at all
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["config", "show", "--config", str(write(empty, ""))]) == 0
    out = capsys.readouterr().out
    assert "  every: 90m" in out and "  max_file_size: 100MB" in out and "  every: 3h" in out
    assert load_config(data=yaml.safe_load(out), start=empty).with_changes(source=empty / "colabkit.yaml") == \
        load_config(empty / "colabkit.yaml")


def test_an_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "teirs:\n  - name: drive\n"))
    assert str(ei.value).startswith("teirs: unknown key (did you mean 'tiers'?); allowed here: airlock, ")
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "resume:\n  polcy: first\n"))
    assert str(ei.value) == ("resume.polcy: unknown key (did you mean 'policy'?); allowed here: deadline, "
                             "on_unreachable, policy, priority")
