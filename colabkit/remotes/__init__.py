"""Storage tiers behind one interface. :func:`open_remote` builds the remote a tier is configured with."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Remote, RemoteFile, UploadState, normalize_path

if TYPE_CHECKING:
    from ..config import Config, TierConfig

log = logging.getLogger(__name__)

__all__ = ["Remote", "RemoteFile", "UploadState", "normalize_path", "open_remote", "local_tier_path"]


def local_tier_path(config: "Config", tier: "TierConfig") -> Path:
    """Where a local-folder tier keeps its files: its `path`, else <home>/remotes/<project>/<tier>."""
    if tier.path:
        p = Path(tier.path).expanduser()
        return p if p.is_absolute() else config.root / p
    return config.home / "remotes" / config.project / tier.name


def open_remote(config: "Config", tier: "TierConfig | str") -> Remote:
    """The remote for `tier` (a TierConfig or a tier name).

    A ``drive`` tier with no ``drive.folder_id`` and a ``hub`` tier with no ``hub.repo_id`` fall back to a
    local folder, so everything works with no credentials.
    """
    if isinstance(tier, str):
        tier = config.tier(tier)
    kind = tier.remote
    if kind == "drive" and config.drive.configured:
        from .drive import DriveRemote
        return DriveRemote.from_config(config, tier)
    if kind == "hub" and config.hub.configured:
        from .hub import HubRemote
        return HubRemote.from_config(config, tier)
    from .local import LocalRemote
    return LocalRemote(tier.name, local_tier_path(config, tier))
