"""``colabkit config show | check`` — the effective configuration, secrets redacted."""
from __future__ import annotations

import argparse
from typing import Any

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check the effective configuration")
    ss = p.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True
    common(ss.add_parser("show", help="print the effective configuration (secrets redacted)")).set_defaults(func=show)
    common(ss.add_parser("check", help="load colabkit.yaml and report the first error")).set_defaults(func=check)


def effective(ctx: Context) -> dict[str, Any]:
    """The configuration as plain data, secrets redacted, with where credentials come from."""
    cfg = ctx.config()
    data = cfg.as_dict(redact=True)
    creds: dict[str, Any] = {}
    try:
        from ..secrets import describe_google_credentials  # added with the Drive tier
        creds["drive"] = describe_google_credentials(cfg)
    except ImportError:
        pass
    try:
        if cfg.hub.configured:
            from ..remotes.hub import describe_hub_token
            creds["hub"] = describe_hub_token()
    except ImportError:
        pass
    data["credentials_used"] = creds
    from ..remotes import open_remote
    data["remotes"] = {}
    for t in cfg.tiers:
        try:
            data["remotes"][t.name] = open_remote(cfg, t).describe()
        except Exception as e:  # a tier that cannot be opened is shown, not fatal, in `show`
            from ..secrets import redact
            data["remotes"][t.name] = f"unavailable: {redact(str(e))}"
    return data


def show(args: argparse.Namespace, ctx: Context) -> int:
    data = effective(ctx)

    def text():
        # what a user writes (90m, 100MB), in a form colabkit.yaml accepts back; what is not a setting is a comment
        import yaml
        from ..secrets import redact_config
        cfg = ctx.config()
        src = cfg.source
        yield f"# effective configuration ({'from ' + str(src) if src else 'no colabkit.yaml found: defaults'})"
        yield f"# project root: {cfg.root}"
        yield yaml.safe_dump(redact_config(cfg.as_yaml_data()), sort_keys=False, default_flow_style=False).rstrip()
        extra = {"credentials used": data.get("credentials_used") or {}, "remotes": data.get("remotes") or {}}
        for line in yaml.safe_dump(extra, sort_keys=False, default_flow_style=False).rstrip().splitlines():
            yield f"# {line}"
    ctx.emit(data, text)
    return 0


def check(args: argparse.Namespace, ctx: Context) -> int:
    cfg = ctx.config()
    ctx.emit({"ok": True, "source": str(cfg.source) if cfg.source else None},
             f"OK: {cfg.source or 'no colabkit.yaml (defaults)'}")
    return 0
