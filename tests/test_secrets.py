"""Google credential lookup (colabkit.secrets): order, sources, warnings, and that no key material shows."""
from __future__ import annotations

import json
import logging
import sys
import threading
import types

import pytest

from colabkit.config import load_config
from colabkit.errors import CredentialsError
from colabkit.secrets import (describe_google_credentials, find_google_credentials, load_google_credentials,
                              redact)

from .drive_server import DriveServer, test_private_key

SA = DriveServer.SA_EMAIL


def sa_info(email: str = SA) -> dict:
    _, pem = test_private_key()
    return {"type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": pem,
            "client_email": email, "token_uri": "http://127.0.0.1:9/token"}


def user_info() -> dict:
    return {"type": "authorized_user", "client_id": DriveServer.CLIENT_ID, "client_secret": DriveServer.CLIENT_SECRET,
            "refresh_token": DriveServer.REFRESH_TOKEN, "token_uri": "http://127.0.0.1:9/token"}


def write_key(path, info, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    path.chmod(mode)
    return path


def cfg(tmp_path, **drive):
    return load_config(data={"drive": drive} if drive else {}, start=tmp_path)


def assert_no_key_material(text: str) -> None:
    assert "PRIVATE KEY" not in text
    body = "".join(test_private_key()[1].splitlines()[1:-1])
    assert body[100:140] not in text
    assert DriveServer.REFRESH_TOKEN not in text and DriveServer.CLIENT_SECRET not in text


def test_nothing_configured_finds_nothing(tmp_path):
    assert find_google_credentials(cfg(tmp_path)) is None
    assert describe_google_credentials(cfg(tmp_path)) is None
    with pytest.raises(CredentialsError) as ei:
        load_google_credentials(cfg(tmp_path))
    assert str(ei.value) == (
        "no Google credentials found; set drive.credentials in colabkit.yaml to a service-account key file, or set "
        "COLABKIT_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS, or add the Colab Secret COLAB_SERVICE_ACCOUNT, "
        "or put the key at ~/.secrets/colab-service-account.json")


def test_lookup_order_first_found_wins(tmp_path, monkeypatch, isolated_home):
    default = write_key(isolated_home / ".secrets" / "colab-service-account.json", sa_info("default@x.iam.gserviceaccount.com"))
    assert describe_google_credentials(cfg(tmp_path)) == {
        "source": "~/.secrets/colab-service-account.json", "kind": "service_account",
        "client_email": "default@x.iam.gserviceaccount.com", "path": str(default)}
    gac = write_key(tmp_path / "gac.json", sa_info("gac@x.iam.gserviceaccount.com"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(gac))
    assert describe_google_credentials(cfg(tmp_path))["source"] == "GOOGLE_APPLICATION_CREDENTIALS"
    env = write_key(tmp_path / "env.json", sa_info("env@x.iam.gserviceaccount.com"))
    monkeypatch.setenv("COLABKIT_SERVICE_ACCOUNT", str(env))
    d = describe_google_credentials(cfg(tmp_path))
    assert (d["source"], d["client_email"], d["path"]) == ("COLABKIT_SERVICE_ACCOUNT", "env@x.iam.gserviceaccount.com",
                                                           str(env))
    conf = write_key(tmp_path / "keys" / "conf.json", sa_info("conf@x.iam.gserviceaccount.com"))
    d = describe_google_credentials(cfg(tmp_path, credentials="keys/conf.json"))  # relative to the project root
    assert d == {"source": "config", "kind": "service_account", "client_email": "conf@x.iam.gserviceaccount.com",
                 "path": str(conf)}


def test_service_account_json_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLABKIT_SERVICE_ACCOUNT", json.dumps(sa_info()))
    found = find_google_credentials(cfg(tmp_path))
    assert found.describe() == {"source": "COLABKIT_SERVICE_ACCOUNT", "kind": "service_account",
                                "client_email": SA, "path": None}
    assert_no_key_material(repr(found))
    assert_no_key_material(json.dumps(describe_google_credentials(cfg(tmp_path))))


def test_user_credentials_are_accepted(tmp_path):
    key = write_key(tmp_path / "user.json", user_info())
    creds, found = load_google_credentials(cfg(tmp_path, credentials=str(key)))
    assert found.describe() == {"source": "config", "kind": "authorized_user", "client_email": None,
                                "path": str(key)}
    assert creds.token_uri == "http://127.0.0.1:9/token", "the token URI must come from the credentials file"
    assert_no_key_material(repr(found) + json.dumps(found.describe()))


def test_scope_is_drive_file_by_default_and_configurable(tmp_path):
    key = write_key(tmp_path / "sa.json", sa_info())
    creds, _ = load_google_credentials(cfg(tmp_path, credentials=str(key)))
    assert list(creds.scopes) == ["https://www.googleapis.com/auth/drive.file"]
    creds, _ = load_google_credentials(cfg(tmp_path, credentials=str(key),
                                           scopes=["https://www.googleapis.com/auth/drive"]))
    assert list(creds.scopes) == ["https://www.googleapis.com/auth/drive"]


def test_key_readable_by_others_gets_a_chmod_warning(tmp_path, caplog):
    key = write_key(tmp_path / "sa.json", sa_info(), mode=0o644)
    with caplog.at_level(logging.WARNING, logger="colabkit"):
        find_google_credentials(cfg(tmp_path, credentials=str(key)))
    assert [r.getMessage() for r in caplog.records] == [
        f"{key} is readable by other users (mode 644); restrict it with: chmod 600 {key}"]
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="colabkit"):
        find_google_credentials(cfg(tmp_path, credentials=str(key)))
    assert caplog.records == []


def test_malformed_key_errors_never_show_the_content(tmp_path):
    broken = tmp_path / "sa.json"
    _, pem = test_private_key()
    broken.write_text('{"type": "service_account", "private_key": "' + pem[:200])   # cut off: invalid JSON
    broken.chmod(0o600)
    with pytest.raises(CredentialsError) as ei:
        find_google_credentials(cfg(tmp_path, credentials=str(broken)))
    assert str(ei.value) == (f"{broken}: not valid JSON; download the service-account key again "
                             "(IAM → Service accounts → Keys → Add key → JSON)")
    info = sa_info()
    del info["client_email"]
    write_key(broken, info)
    with pytest.raises(CredentialsError) as ei:
        find_google_credentials(cfg(tmp_path, credentials=str(broken)))
    assert str(ei.value) == f"{broken}: the service-account key lacks client_email; download a new JSON key for the service account"
    write_key(broken, {**sa_info(), "private_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"})
    with pytest.raises(CredentialsError) as ei:
        load_google_credentials(cfg(tmp_path, credentials=str(broken)))
    assert str(ei.value) == (f"{broken}: the service_account credentials could not be loaded (ValueError); "
                             "download a new key")
    assert_no_key_material(str(ei.value))
    d = describe_google_credentials(cfg(tmp_path, credentials=str(tmp_path / "missing.json")))
    assert d["error"] == f"config: {tmp_path / 'missing.json'} does not exist; fix the path or remove the setting"


def test_unsupported_credential_type(tmp_path, monkeypatch):
    monkeypatch.setenv("COLABKIT_SERVICE_ACCOUNT", json.dumps({"type": "external_account"}))
    with pytest.raises(CredentialsError) as ei:
        find_google_credentials(cfg(tmp_path))
    assert str(ei.value) == ("COLABKIT_SERVICE_ACCOUNT: credentials of type 'external_account' are not supported; "
                             "use a service-account key (type service_account) or user credentials "
                             "(type authorized_user)")


# google.colab exists only inside Colab: these stand-ins provide the one call colab_secret makes
# (userdata.get), to produce what the real one does there (a value) and in VS Code's Colab extension (a hang).
def _fake_colab(monkeypatch, get):
    colab = types.ModuleType("google.colab")
    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = get
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


def test_colab_secret_is_used_inside_colab(tmp_path, monkeypatch):
    _fake_colab(monkeypatch, lambda name: json.dumps(sa_info("colab@x.iam.gserviceaccount.com"))
                if name == "COLAB_SERVICE_ACCOUNT" else None)
    assert describe_google_credentials(cfg(tmp_path)) == {
        "source": "Colab Secret COLAB_SERVICE_ACCOUNT", "kind": "service_account",
        "client_email": "colab@x.iam.gserviceaccount.com", "path": None}


def test_colab_secret_lookup_that_hangs_counts_as_absent(tmp_path, monkeypatch, isolated_home):
    release = threading.Event()
    _fake_colab(monkeypatch, lambda name: release.wait(30) and None)
    default = write_key(isolated_home / ".secrets" / "colab-service-account.json", sa_info())
    try:
        found = find_google_credentials(cfg(tmp_path), colab_timeout=0.2)
    finally:
        release.set()
    assert found.source == "~/.secrets/colab-service-account.json" and found.path == str(default)


def test_redaction_still_scrubs_google_material():
    _, pem = test_private_key()
    text = f'{{"private_key": "{pem}"}} Authorization: Bearer ya29.a0AfH6SMBxyz refresh 1//0abcdefghijklmnopqrstuvwxyz'
    out = redact(text)
    assert_no_key_material(out)
    assert "ya29.a0AfH6SMBxyz" not in out and "1//0abcdefghijklmnopqrstuvwxyz" not in out
