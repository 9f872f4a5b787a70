"""Who may use the dashboard: host, token and cross-site checks, and safe response headers.

The model, in one place:

- Bound to a loopback address (the default) the dashboard needs no token, but
  answers only requests whose ``Host`` is a loopback name, so a page on another
  site cannot reach it through DNS rebinding.
- Bound to any other address it needs a token for everything but ``/login`` and
  the static files: the ``X-Fedcoord-Token`` header, ``Authorization: Bearer``,
  or the cookie that the one-time login link sets.
- Every request that changes anything (any method but GET / HEAD / OPTIONS) must
  carry ``X-Fedcoord-Request: 1``, which a cross-site form cannot send and a
  cross-site script cannot send without a CORS preflight that is never granted,
  and its ``Origin`` / ``Sec-Fetch-Site``, when present, must be this site.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_HEADER = "x-fedcoord-token"
REQUEST_HEADER = "x-fedcoord-request"
TOKEN_COOKIE = "fedcoord_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOGIN_PATH = "/login"
STATIC_PREFIX = "/static/"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}
SIGN_IN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fedcoord dashboard: sign in</title><link rel="stylesheet" href="/static/dashboard.css">
</head><body><main class="narrow"><section class="card"><h1>Sign in needed</h1>
<p>This dashboard is bound to a network address, so it needs its token. Open the one-time
login link that <code>fedcoord dashboard</code> printed at start, or send the token in the
<code>X-Fedcoord-Token</code> header.</p></section></main></body></html>"""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or host name) is this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return secrets.token_urlsafe(32)


class OneTimeCode:
    """A login code that signs in one browser, once."""

    def __init__(self, code: str | None) -> None:
        self._code = code
        self._lock = threading.Lock()

    def consume(self, presented: str) -> bool:
        """True, once, when ``presented`` is the code; it is spent from then on."""
        with self._lock:
            if self._code is None or not secrets.compare_digest(presented, self._code):
                return False
            self._code = None
            return True


class GuardMiddleware:
    """ASGI middleware applying the checks in this module's docstring to every request.

    Parameters
    ----------
    app : ASGIApp
        The application it guards.
    token : str or None
        The token every non-open request must present; None = no token needed.
    allowed_hosts : sequence of str or None
        Host names (without port) the ``Host`` header may carry; None = any.
    """

    def __init__(
        self, app: ASGIApp, token: str | None, allowed_hosts: Sequence[str] | None
    ) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else tuple(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or pass it on; either way add the security headers."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        refusal = self.refusal(HTTPConnection(scope), str(scope["method"]))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def refusal(self, connection: HTTPConnection, method: str) -> Response | None:
        """The response refusing this request, or None when it may go on."""
        path = connection.url.path
        if not self.host_allowed(connection):
            return _error(path, 400, "invalid Host header: this dashboard answers loopback only")
        if self.needs_token(path) and not token_presented(connection, self.token):
            if path.startswith("/api/"):
                return _error(path, 401, "missing or wrong token (X-Fedcoord-Token)")
            return HTMLResponse(SIGN_IN_PAGE, status_code=401)
        if method not in SAFE_METHODS:
            reason = cross_site_reason(connection)
            if reason is not None:
                return _error(path, 403, f"cross-site request refused: {reason}")
        return None

    def host_allowed(self, connection: HTTPConnection) -> bool:
        """Whether the ``Host`` header names one of the allowed hosts."""
        if self.allowed_hosts is None:
            return True
        return host_name(connection.headers.get("host", "")) in self.allowed_hosts

    def needs_token(self, path: str) -> bool:
        """Whether a request for ``path`` must carry the token."""
        if self.token is None:
            return False
        is_static = path.startswith(STATIC_PREFIX) and ".." not in path
        return not (path == LOGIN_PATH or is_static)


def token_presented(connection: HTTPConnection, token: str | None) -> bool:
    """Whether the request carries ``token`` in a header or the cookie."""
    if token is None:
        return False
    bearer = connection.headers.get("authorization", "")
    candidates = (
        connection.headers.get(TOKEN_HEADER, ""),
        bearer[7:] if bearer.lower().startswith("bearer ") else "",
        connection.cookies.get(TOKEN_COOKIE, ""),
    )
    return any(
        candidate and secrets.compare_digest(candidate.encode(), token.encode())
        for candidate in candidates
    )


def cross_site_reason(connection: HTTPConnection) -> str | None:
    """Why a state-changing request looks cross-site, or None when it is same-origin."""
    headers = connection.headers
    if headers.get(REQUEST_HEADER) != "1":
        return f"the {REQUEST_HEADER} header is missing (send it as '1' from scripts)"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site}"
    origin = headers.get("origin")
    own = f"{connection.url.scheme}://{headers.get('host', '')}"
    if origin is not None and origin != own:
        return f"Origin {origin} is not {own}"
    return None


def host_name(host_header: str) -> str:
    """``Host`` header -> host name without port (IPv6 brackets removed)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _error(path: str, status_code: int, message: str) -> Response:
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status_code)
    return Response(message, status_code=status_code, media_type="text/plain")
