"""`gdown_fetch`: the real gdown against tests/drive_server.py standing in for drive.google.com (reached as an
HTTPS proxy, so gdown's own Google handling runs: file names, the virus-scan page, the sign-in page)."""
from __future__ import annotations

import os

import pytest

from colabkit.errors import RemotePermissionError
from colabkit.remotes.drive import gdown_fetch

from .drive_server import drive_server  # noqa: F401  (fixture)


def test_public_file_by_id_keeps_its_name(drive_server, tmp_path):
    data = b"step 100 loss 2.31\nstep 200 loss 1.97\n"
    fid = drive_server.add_public_file("train.log", data)
    out = gdown_fetch(fid, tmp_path / "logs", endpoint=drive_server.endpoint)
    assert out == tmp_path / "logs" / "train.log"
    assert out.read_bytes() == data


def test_public_file_by_share_link_through_the_virus_scan_page(drive_server, tmp_path):
    data = os.urandom(300_000)
    fid = drive_server.add_public_file("run-logs.tar", data)
    drive_server.gdown_confirm_over = 100_000
    out = gdown_fetch(f"https://drive.google.com/file/d/{fid}/view?usp=sharing", tmp_path,
                      endpoint=drive_server.endpoint)
    assert out.name == "run-logs.tar" and out.read_bytes() == data
    assert any("/download?" in p for _, p in drive_server.requests), "the confirmation form was not followed"


def test_link_that_needs_sign_in_says_so(drive_server, tmp_path):
    fid = drive_server.add_public_file("secret.log", b"private", public=False)
    link = f"https://drive.google.com/file/d/{fid}/view"
    with pytest.raises(RemotePermissionError) as ei:
        gdown_fetch(link, tmp_path / "logs", endpoint=drive_server.endpoint)
    assert str(ei.value) == (
        f"gdown: the link {link!r} needs sign-in: the file is not shared publicly. In Drive, choose Share > General "
        "access > 'Anyone with the link', or import the run through the Drive tier with credentials instead")
    assert list((tmp_path / "logs").iterdir()) == []


@pytest.mark.parametrize("bad", ["not a link", "https://example.com/file.txt", "abc"])
def test_bad_id_or_url_is_rejected(bad, tmp_path):
    with pytest.raises(ValueError) as ei:
        gdown_fetch(bad, tmp_path)
    assert str(ei.value) == (f"{bad!r} is not a Google Drive file id or link; pass the id or the "
                             "https://drive.google.com/file/d/ID/view link")
