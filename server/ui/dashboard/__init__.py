"""The web dashboard: ``fedcoord dashboard`` serves runs, rounds, charts, nodes and actions.

It reads run directories like the CLI does and acts on them through the same
validated operations (:mod:`server.record.operations`); see :mod:`server.ui.dashboard.app`
for the endpoints and :mod:`server.ui.dashboard.security` for who may use them.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from server.ui.dashboard.app import DashboardSettings, create_app
from server.ui.dashboard.security import (
    LOOPBACK_NAMES,
    host_name,
    is_loopback,
    new_token,
    validate_public_origin,
)

__all__ = ["DashboardSettings", "create_app", "dashboard_settings", "serve", "startup_lines"]


def dashboard_settings(
    runs_dir: Path, host: str, public_origin: str | None = None
) -> DashboardSettings:
    """Settings for binding ``host``, behind a reverse proxy at ``public_origin`` if given.

    Bound to loopback with no proxy, the dashboard answers loopback names and needs
    no token. Bound to another address, or reached through a proxy (which makes it
    reachable from the network), it needs a token; behind a proxy it also answers
    the proxy's host name and accepts its ``Origin``.

    Raises
    ------
    ValueError
        If ``public_origin`` is not ``http(s)://host[:port]``.
    """
    origin = None if public_origin is None else validate_public_origin(public_origin)
    if is_loopback(host) and origin is None:
        return DashboardSettings(runs_dir=runs_dir, allowed_hosts=LOOPBACK_NAMES)
    allowed_hosts = None
    if is_loopback(host) and origin is not None:
        allowed_hosts = (*LOOPBACK_NAMES, host_name(origin.split("://", 1)[1]))
    return DashboardSettings(
        runs_dir=runs_dir,
        token=new_token(),
        login_code=secrets.token_urlsafe(16),
        allowed_hosts=allowed_hosts,
        public_origin=origin,
    )


def startup_lines(settings: DashboardSettings, host: str, port: int) -> list[str]:
    """What ``fedcoord dashboard`` prints at start: the address and, if any, the token."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    lines = [f"fedcoord dashboard: {url}/  (runs in {settings.runs_dir}; Ctrl-C stops it)"]
    if settings.public_origin is not None:
        url = settings.public_origin
        lines.append(f"  behind the reverse proxy at {url}/ (its Origin is accepted)")
    if settings.token is not None:
        if host in ("0.0.0.0", "::") and settings.public_origin is None:
            lines.append(f"  bound to every interface: use this machine's address for {host}")
        lines += [
            f"  sign a browser in once: {url}/login?code={settings.login_code}",
            f"  token for scripts (header X-Fedcoord-Token): {settings.token}",
        ]
    return lines


def serve(settings: DashboardSettings, host: str, port: int) -> None:
    """Serve the dashboard with uvicorn until interrupted."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()
