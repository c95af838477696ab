"""Nothing secret is ever printed: redaction of free text, configuration data and log records."""
from __future__ import annotations

import logging

from colabkit.secrets import REDACTED, install_log_redaction, redact, redact_config

PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n"
HF = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJzYUBwcm9qLmlhbSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def test_redact_free_text():
    text = (f"key={PEM} token {HF} Authorization: Bearer ya29.a0AfH6SMBx-secret-value "
            f'{{"refresh_token": "1//0gAbCdEfGhIjKlMnOpQrStUvWxYz"}} assertion={JWT}')
    clean = redact(text)
    for secret in ("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7", HF, "ya29.a0AfH6SMBx-secret-value",
                   "1//0gAbCdEfGhIjKlMnOpQrStUvWxYz", JWT):
        assert secret not in clean
    assert REDACTED in clean


def test_redact_config_replaces_secret_keys_only():
    data = {"drive": {"folder_id": "1AbC", "credentials": "/keys/sa.json"},
            "hub": {"token": HF, "repo_id": "me/runs"}, "tiers": [{"name": "drive", "api_key": "xyz"}]}
    out = redact_config(data)
    assert out["drive"] == {"folder_id": "1AbC", "credentials": "/keys/sa.json"}
    assert out["hub"] == {"token": REDACTED, "repo_id": "me/runs"}
    assert out["tiers"] == [{"name": "drive", "api_key": REDACTED}]


def test_log_records_are_scrubbed(caplog):
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("colabkit.test")
    with caplog.at_level(logging.INFO, logger="colabkit"):
        logger.info("uploading with token %s", HF)
    assert HF not in caplog.text and REDACTED in caplog.text
    other = logging.getLogger("someone.else")
    with caplog.at_level(logging.INFO, logger="someone.else"):
        other.info("not ours: %s", "hf_" + "x" * 30)
    assert "hf_" + "x" * 30 in caplog.text, "records of other libraries are left alone"
