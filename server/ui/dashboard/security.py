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
  and its ``Origin`` / ``Sec-Fetch-Site``, when present, must be this site: the
  address it was reached at, or the ``--public-origin`` of a TLS reverse proxy.
- A body over :data:`MAX_BODY_BYTES` answers 413 before the app reads it.
- Only HTTP is served: a WebSocket is closed before it is accepted (403).
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_HEADER = "x-fedcoord-token"
REQUEST_HEADER = "x-fedcoord-request"
TOKEN_COOKIE = "fedcoord_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOGIN_PATH = "/login"
STATIC_PREFIX = "/static/"
MAX_BODY_BYTES = 64 * 1024
WEBSOCKET_REFUSED = 1008  # policy violation: closed before it is accepted, an HTTP 403
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
            if self._code is None or not _same(presented, self._code):
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
    public_origin : str or None
        A further ``Origin`` accepted on state-changing requests (a TLS proxy's).
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        allowed_hosts: Sequence[str] | None,
        public_origin: str | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else tuple(allowed_hosts)
        self.public_origin = public_origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or pass it on; either way add the security headers."""
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": WEBSOCKET_REFUSED, "reason": ""})
            return
        if scope["type"] != "http":
            raise ValueError(f"the dashboard serves HTTP only, not {scope['type']!r}")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        refusal = self.refusal(HTTPConnection(scope), str(scope["method"]))
        if refusal is None:
            try:
                body = await read_body(receive, MAX_BODY_BYTES)
            except ClientDisconnect:
                return
            if body is None:
                refusal = _error(scope["path"], 413, _too_large())
            else:
                receive = replay_body(body, receive)
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
            reason = cross_site_reason(connection, self.public_origin)
            if reason is not None:
                return _error(path, 403, f"cross-site request refused: {reason}")
        length = connection.headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            return _error(path, 400, "invalid Content-Length header")
        if len(length) > len(str(MAX_BODY_BYTES)) or int(length) > MAX_BODY_BYTES:
            return _error(path, 413, _too_large())
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
    return any(candidate and _same(candidate, token) for candidate in candidates)


def _same(presented: str, secret: str) -> bool:
    """Constant-time comparison that any text can be presented to (non-ASCII included)."""
    return secrets.compare_digest(presented.encode("utf-8", "replace"), secret.encode("utf-8"))


def cross_site_reason(connection: HTTPConnection, public_origin: str | None = None) -> str | None:
    """Why a state-changing request looks cross-site, or None when it is same-origin.

    The same origin is the address the request was sent to or ``public_origin``,
    the address of a reverse proxy in front of the dashboard.
    """
    headers = connection.headers
    if headers.get(REQUEST_HEADER) != "1":
        return f"the {REQUEST_HEADER} header is missing (send it as '1' from scripts)"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site}"
    origin = headers.get("origin")
    own = f"{connection.url.scheme}://{headers.get('host', '')}"
    if origin is not None and origin not in (own, public_origin):
        return f"Origin {origin[:100]} is not {public_origin or own}"
    return None


def validate_public_origin(origin: str) -> str:
    """``origin`` as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case.

    Raises
    ------
    ValueError
        If it is not an http(s) URL of a host alone (no user, path, query or fragment).
    """
    hint = f"--public-origin must look like https://dashboard.example.org, got {origin!r}"
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        raise ValueError(hint) from None
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(hint)
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    default_port = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" if port in (None, default_port) else f"{scheme}://{host}:{port}"


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it grows over ``limit`` bytes.

    Raises
    ------
    ClientDisconnect
        If the client went away before sending all of it.
    """
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then what ``receive`` gives (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


def _too_large() -> str:
    return f"request body too large: at most {MAX_BODY_BYTES} bytes"


def host_name(host_header: str) -> str:
    """``Host`` header -> host name without port (IPv6 brackets removed)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _error(path: str, status_code: int, message: str) -> Response:
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status_code)
    return Response(message, status_code=status_code, media_type="text/plain")
