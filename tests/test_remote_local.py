from __future__ import annotations

from pathlib import Path

import pytest

from colabkit.errors import RemoteError
from colabkit.remotes.local import LocalRemote

from .remote_contract import RemoteContract


class TestLocalRemoteContract(RemoteContract):
    @pytest.fixture
    def remote(self, tmp_path: Path) -> LocalRemote:
        return LocalRemote("local-test", tmp_path / "remote-root")


def test_check_access_on_unusable_folder_fails_before_training(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the tier folder should be")
    with pytest.raises(RemoteError) as ei:
        LocalRemote("drive", blocker / "tier").check_access()
    assert str(ei.value).startswith("drive: ")
    assert ei.value.remote == "drive"
