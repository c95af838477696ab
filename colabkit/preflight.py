"""The checks before a ``%train`` run starts (:func:`preflight`), and what they found (:class:`Preflight`).

Each failure is a :class:`~colabkit.errors.PreflightError` that says what to do: the experiment and its
``train.py`` exist; the GPU's memory tier (an L4-class GPU is Tier 1, where a job is capped at 20 GB; a larger
``--max-vram`` is refused with the advice to move to Tier 2), on every GPU the ranks use; free disk against
``train.min_free_disk``; ``train.data_paths`` on a network/FUSE mount (refused unless allowed: pre-fetch to
local disk); the data sets ``train.data`` names, fetched and verified; write access to every sync tier.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ColabkitError, PreflightError
from .fsutil import free_bytes
from .runtime import command

if TYPE_CHECKING:
    from .config import Config

SCRIPT = "train.py"


@dataclass
class Preflight:
    """What the checks before a run found.

    Attributes:
        script: the train.py to run.
        gpu: the first GPU's name (None without one); tier: its memory tier.
        max_vram: the cap passed to the child in bytes (None: no cap).
        warnings: things worth telling the user that do not stop the run.
    """

    experiment: str
    experiment_dir: Path
    script: Path
    gpu: str | None
    gpu_memory: int | None
    tier: int | None
    max_vram: int | None
    free_disk: int
    warnings: list[str] = field(default_factory=list)
    tiers_checked: list[str] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)    # train.data name -> local path (COLABKIT_DATA_<NAME>)
    #: every visible GPU: {"index", "name", "memory", "tier"}; nproc_per_node: the ranks this node runs
    gpus: list[dict[str, Any]] = field(default_factory=list)
    nproc_per_node: int = 1

    def data_env(self) -> dict[str, str]:
        from .data import env_name
        return {f"COLABKIT_DATA_{env_name(n)}": p for n, p in self.data.items()}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["experiment_dir"], d["script"] = str(self.experiment_dir), str(self.script)
        return d


def preflight(experiment: str, *, config: "Config | None" = None, max_vram: int | str | None = None,
              check_tiers: bool = True, script: str | os.PathLike | None = None,
              allow_network_data: bool = False, nproc_per_node: int | str | None = None) -> Preflight:
    """The checks before a run starts, without starting anything.

    Args:
        experiment: ``vXX``.
        config: the configuration (default: loaded from the working directory).
        max_vram: the GPU memory cap in bytes (or ``20GB``); default ``train.max_vram``, else 20 GB on Tier 1.
        check_tiers: check write access to every sync tier (``Remote.check_access``).
        script: run this file instead of ``experiments/<experiment>/train.py``.
        allow_network_data: let ``train.data_paths`` on a network/FUSE mount through (with a warning).
        nproc_per_node: ranks to start on this node (``auto``: one per visible GPU, 1 without; default
            ``train.nproc_per_node``); each GPU the ranks use is checked.
    Returns:
        A :class:`Preflight` (its ``warnings`` list what did not stop the run; ``data`` the local path of each
        data set ``train.data`` names).
    Raises:
        PreflightError: saying what failed and what to do.
    """
    from . import runtime
    from .config import format_size, load_config, parse_size
    cfg = config if config is not None else load_config()
    exp_dir = cfg.require_experiment(experiment)  # the one check of every command that takes an experiment
    path = Path(script).expanduser() if script is not None else exp_dir / SCRIPT
    if not path.is_absolute():
        path = exp_dir / path
    if not path.is_file():
        raise PreflightError(f"{experiment}: no {path.name} in {path.parent}; put the training script there "
                             f"('{command('init')}' writes a template) or pull the experiment's bundle with "
                             f"'{command('airlock pull ' + experiment)}'")

    warnings: list[str] = []
    gpus = runtime.gpus()
    gpu = gpus[0] if gpus else None
    from .launch import parse_nproc
    nproc = parse_nproc(nproc_per_node if nproc_per_node is not None else cfg.train.nproc_per_node)
    if nproc == "auto":
        nproc = max(1, len(gpus))
    assert isinstance(nproc, int)
    if gpus and nproc > len(gpus):
        raise PreflightError(f"{experiment}: --nproc-per-node {nproc} but this machine has {len(gpus)} GPU"
                             f"{'s' if len(gpus) != 1 else ''} ({', '.join(g.name for g in gpus)}); one rank per "
                             "GPU: lower --nproc-per-node, or use --nproc-per-node auto")
    if not gpus and nproc > 1:
        warnings.append(f"no GPU found: the {nproc} ranks run on the CPU (use the gloo backend in train.py)")
    cap = parse_size(max_vram, key="--max-vram") if max_vram is not None else cfg.train.max_vram
    # every GPU a rank uses gets the same checks (the cap applies per process, on its own GPU)
    for gpu in (gpus[:nproc] if gpus else []):
        if gpu.tier == 1:
            limit = runtime.TIER1_DEFAULT_CAP
            if cap is not None and cap > limit:
                raise PreflightError(
                    f"{experiment}: --max-vram {format_size(cap)} is more than a Tier 1 job may use "
                    f"({gpu.name}, {format_size(gpu.memory_total)}: jobs are capped at {format_size(limit)}); "
                    f"move this run to Tier 2 (an A100 80 GB: '{command('airlock export ' + experiment)}', then pull and "
                    "train it on the cluster), or lower --max-vram")
            cap = cap if cap is not None else limit
        if cap is not None and cap > gpu.memory_total:
            raise PreflightError(
                f"{experiment}: --max-vram {format_size(cap)} is more than this {gpu.name} has "
                f"({format_size(gpu.memory_total)}); lower --max-vram or move the run to a larger GPU")
    if not gpus and cap is not None:
        warnings.append(f"no GPU found: --max-vram {format_size(cap)} has nothing to cap")
        cap = None
    gpu = gpus[0] if gpus else None

    ck_dir = cfg.checkpoint_dir(experiment)
    free = free_bytes(ck_dir)
    if free < cfg.train.min_free_disk:
        raise PreflightError(
            f"{experiment}: only {format_size(free)} free on the disk of {ck_dir} (train.min_free_disk is "
            f"{format_size(cfg.train.min_free_disk)}); free space first (old checkpoints are pruned once a "
            f"remote holds them: '{command('sync flush')}'), or lower train.min_free_disk in colabkit.yaml")

    for d in cfg.train.data_paths:
        p = Path(d).expanduser()
        p = p if p.is_absolute() else cfg.root / p
        if runtime.is_network_path(p):
            if not allow_network_data:
                raise PreflightError(
                    f"{experiment}: data path {p} is on a network/FUSE mount: training from it is slow and stalls "
                    "when the mount hiccups. Pre-fetch it to the local SSD "
                    f"('{command('data fetch NAME --source PATH')}', and "
                    "list NAME in train.data), or pass --allow-network-data to train from the mount anyway")
            warnings.append(f"data path {p} is on a network/FUSE mount: training from it is slow and stalls "
                            "when the mount hiccups; pre-fetch it to local SSD (/content/ or /mnt/) before "
                            "train.py starts and point train.data_paths there")
        elif not p.exists():
            warnings.append(f"data path {p} does not exist (train.data_paths); pre-fetch the data there first")

    data_paths: dict[str, str] = {}
    if cfg.train.data:
        from .data import ready
        from .errors import DataError
        try:
            found = ready(cfg.train.data, config=cfg)
        except DataError as e:
            raise PreflightError(f"{experiment}: {e}") from None
        for n, p in found.items():
            if runtime.is_network_path(p) and not allow_network_data:  # pragma: no cover - the cache refuses it
                raise PreflightError(f"{experiment}: data set {n} at {p} is on a network/FUSE mount; fetch it to "
                                     "the local SSD, or pass --allow-network-data")
            data_paths[n] = str(p)

    checked: list[str] = []
    if check_tiers:
        from .remotes import open_remote
        from .secrets import redact
        for t in cfg.tiers:
            try:
                with open_remote(cfg, t) as r:
                    if cfg.sync.workers is not None and getattr(r, "supports_claims", False):
                        # one of several workers: the proof of write access is its membership record on
                        # the tier (colabkit.elect); a worker that cannot write is excluded, not stopped
                        from .elect import TierElection
                        note = TierElection(cfg.sync.workers, r, t.name).join()
                        if note:
                            warnings.append(note)
                            continue
                    else:
                        r.check_access()
            except (ColabkitError, OSError) as e:
                raise PreflightError(
                    f"{experiment}: cannot write to sync tier {t.name!r}: {redact(str(e))}; fix its access "
                    f"('{command('config show')}' shows what is configured) or run with --no-sync") from None
            checked.append(t.name)
    return Preflight(experiment=experiment, experiment_dir=exp_dir, script=path, gpu=gpu.name if gpu else None,
                     gpu_memory=gpu.memory_total if gpu else None, tier=gpu.tier if gpu else None, max_vram=cap,
                     free_disk=free, warnings=warnings, tiers_checked=checked, data=data_paths,
                     gpus=[{"index": i, "name": g.name, "memory": g.memory_total, "tier": g.tier}
                           for i, g in enumerate(gpus)], nproc_per_node=nproc)


def _check_name(experiment: str) -> None:
    from .config import check_experiment_name
    check_experiment_name(experiment)


def oom_advice(tier: int | None, gpu: str | None, experiment: str) -> str:
    """What to do after running out of memory, by hardware tier."""
    if tier == 1:
        return (f"this is a Tier 1 GPU ({gpu}, jobs capped at 20 GB): reduce the batch size or the model, or "
                f"move the run to Tier 2 (an A100 80 GB: '{command('airlock export ' + experiment)}', then pull and train it "
                "on the cluster)")
    if tier == 2:
        return ("reduce the batch size (gradient accumulation keeps the effective batch), use mixed precision or "
                "activation checkpointing")
    return "reduce the batch size or the data held in memory, or move the run to a machine with more memory"


__all__ = ["Preflight", "preflight", "oom_advice", "SCRIPT"]
