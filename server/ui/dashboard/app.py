"""The dashboard web app (Starlette): pages, JSON API, live stream, charts and actions.

Endpoints (``NAME`` is a run directory's name in the runs directory):

====== ================================ ==============================================
GET    ``/``                            runs page
GET    ``/runs/NAME``                   run page
GET    ``/login?code=CODE``             one-time sign-in: sets the token cookie
GET    ``/api/runs``                    every run's summary (JSON)
GET    ``/api/runs/NAME``               one run: status, rounds, nodes, rejections, events
GET    ``/api/runs/NAME/stream``        the same, as server-sent events while it changes
GET    ``/api/runs/NAME/charts/C.svg``  chart ``accuracy``, ``loss``, ``clients`` or ``privacy``
GET    ``/api/compare?run=A&run=B``     runs compared, as ``fedcoord compare --json``
GET    ``/api/compare/X.svg?run=A&...`` their accuracy against ``round`` or ``time``
POST   ``/api/runs/NAME/pause``         also ``resume`` and ``stop``: queue the command
POST   ``/api/runs/NAME/weight``        ``{"partition": P, "weight": W}``
====== ================================ ==============================================

A comparison names each run in its own ``run`` parameter (a run name may hold a
comma), optionally with ``target=0.9``; too few or too many runs, a run named
twice or a target outside [0, 1] answers 400 with the reason.

Actions go through :mod:`server.record.operations`, the CLI's own validation: a refused
one answers 409 with the reason and changes nothing. A body that is not the JSON
asked for answers 400 with the reason (:mod:`server.ui.dashboard.strict_json`). A run
whose ``run.db`` cannot be read is listed as ``unreadable``; its page, data, charts
and actions answer 409 with the reason and its stream ends with a ``problem`` event.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.record import lifecycle
from server.record.compare import CompareError, validate_target
from server.record.operations import request_command, request_weight
from server.record.runs import RunNotFoundError, run_status
from server.record.store import RunStoreError
from server.ui.dashboard.charts import CHARTS, COMPARISON_AXES, comparison_chart, render_chart
from server.ui.dashboard.security import (
    TOKEN_COOKIE,
    GuardMiddleware,
    OneTimeCode,
    token_presented,
)
from server.ui.dashboard.strict_json import (
    BodyError,
    dumps,
    json_safe,
    parse_json_body,
    validate_weight_body,
)
from server.ui.dashboard.views import (
    UNREADABLE,
    RunNameError,
    RunUnreadableError,
    compare_view,
    find_run,
    list_runs,
    read_run,
    reason,
    round_rows,
    run_detail,
)

STATIC_DIR = Path(__file__).with_name("static")
NO_STORE = {"cache-control": "no-store"}
MESSAGE_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fedcoord: {title}</title><link rel="stylesheet" href="/static/dashboard.css">
</head><body><main class="narrow"><section class="card"><h1>{heading}</h1>
<p>{message}</p><p><a href="/">All runs</a></p></section></main></body></html>"""


@dataclass(frozen=True)
class DashboardSettings:
    """What one dashboard serves and how it guards it.

    Parameters
    ----------
    runs_dir : Path
        The runs directory; no run outside it can be reached.
    token : str or None
        Required on every request but ``/login`` and static files; None = none needed.
    login_code : str or None
        The one-time code of ``/login?code=``, which sets the token cookie.
    allowed_hosts : tuple of str or None
        ``Host`` names answered (loopback binding); None = any.
    public_origin : str or None
        ``https://host`` of a TLS reverse proxy in front: its ``Origin`` is accepted
        on actions and the login cookie is ``Secure`` when it is https.
    stream_interval_s : float
        Seconds between reads of the run store while streaming.
    stream_keepalive_s : float
        Send a snapshot at least this often, changed or not.
    stream_max_s : float
        Close a stream after this long; the browser reconnects by itself.
    """

    runs_dir: Path
    token: str | None = None
    login_code: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    public_origin: str | None = None
    stream_interval_s: float = 1.0
    stream_keepalive_s: float = 5.0
    stream_max_s: float = 600.0


def create_app(settings: DashboardSettings) -> Starlette:
    """The Starlette application serving ``settings.runs_dir``."""
    routes = [
        Route("/", index_page),
        Route("/runs/{name}", run_page),
        Route("/login", login),
        Route("/api/runs", api_runs),
        Route("/api/runs/{name}", api_run),
        Route("/api/runs/{name}/stream", api_stream),
        Route("/api/runs/{name}/charts/{chart}.svg", api_chart),
        Route("/api/compare", api_compare),
        Route("/api/compare/{axis}.svg", api_compare_chart),
        Route("/api/runs/{name}/weight", api_weight, methods=["POST"]),
        Route("/api/runs/{name}/{command}", api_command, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    guard = Middleware(
        GuardMiddleware,
        token=settings.token,
        allowed_hosts=settings.allowed_hosts,
        public_origin=settings.public_origin,
    )
    app = Starlette(routes=routes, middleware=[guard], exception_handlers=EXCEPTION_HANDLERS)
    app.state.settings = settings
    app.state.login_code = OneTimeCode(settings.login_code)
    return app


def _settings(request: Request) -> DashboardSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _run_dir(request: Request) -> Path:
    return find_run(_settings(request).runs_dir, request.path_params["name"])


# ------------------------------------------------------------------- pages
def index_page(request: Request) -> Response:
    """The runs page."""
    return FileResponse(STATIC_DIR / "runs.html", headers=NO_STORE)


def run_page(request: Request) -> Response:
    """The run page (its data comes from the API); 404 for no run, 409 for an unreadable one."""
    try:
        read_run(run_status, _run_dir(request))
    except (RunNameError, RunNotFoundError) as error:
        return _message_page("no such run", "No such run", str(error), 404)
    except RunUnreadableError as error:
        return _message_page(f"{UNREADABLE} run", "Unreadable run", str(error), 409)
    return FileResponse(STATIC_DIR / "run.html", headers=NO_STORE)


def _message_page(title: str, heading: str, message: str, status_code: int) -> Response:
    escaped = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    page = MESSAGE_PAGE.format(title=title, heading=heading, message=escaped)
    return HTMLResponse(page, status_code=status_code, headers=NO_STORE)


def login(request: Request) -> Response:
    """Spend the one-time login code: set the token cookie and go to the runs page."""
    settings = _settings(request)
    if settings.token is None or token_presented(request, settings.token):
        return RedirectResponse("/", status_code=303)
    if not request.app.state.login_code.consume(request.query_params.get("code", "")):
        message = "this login link is wrong or was already used; restart the dashboard"
        return Response(message, status_code=403, media_type="text/plain")
    response = RedirectResponse("/", status_code=303)
    secure = (settings.public_origin or "").startswith("https://")
    response.set_cookie(
        TOKEN_COOKIE, settings.token, httponly=True, samesite="lax", path="/", secure=secure
    )
    return response


# ---------------------------------------------------------------- read API
def api_runs(request: Request) -> Response:
    """Every run's summary, newest first."""
    return _json(list_runs(_settings(request).runs_dir))


def api_run(request: Request) -> Response:
    """One run's status, config, rounds, nodes, rejections, events and pending commands."""
    return _json(read_run(run_detail, _run_dir(request)))


def api_chart(request: Request) -> Response:
    """One chart of the run's rounds as SVG."""
    chart = request.path_params["chart"]
    if chart not in CHARTS:
        raise HTTPException(404, f"unknown chart {chart!r}; charts: {', '.join(CHARTS)}")
    svg = read_run(lambda run_dir: render_chart(chart, *round_rows(run_dir)), _run_dir(request))
    return Response(svg, media_type="image/svg+xml", headers=NO_STORE)


def api_compare(request: Request) -> Response:
    """Runs side by side: what differs, accuracy, time to the target, rejected, epsilon."""
    return _json(_comparison(request))


def api_compare_chart(request: Request) -> Response:
    """Central accuracy of the compared runs against ``round`` or wall ``time``, as SVG."""
    axis = request.path_params["axis"]
    if axis not in COMPARISON_AXES:
        raise HTTPException(404, f"unknown chart {axis!r}; charts: {', '.join(COMPARISON_AXES)}")
    x_key = "round" if axis == "round" else "elapsed_s"
    curves = []
    for run in _comparison(request)["runs"]:  # type: ignore[attr-defined]
        curve = run["curve"]
        points = zip(curve[x_key], curve["central_accuracy"], strict=True)
        kept = [(x, acc) for x, acc in points if x is not None and acc is not None]
        curves.append((run["label"], kept))
    return Response(comparison_chart(axis, curves), media_type="image/svg+xml", headers=NO_STORE)


def _comparison(request: Request) -> dict[str, object]:
    """The comparison the query asks for: ``run`` (repeated) and ``target``."""
    text = request.query_params.get("target", "").strip()
    try:
        target = float(text) if text else None
    except ValueError:
        raise CompareError(f"target must be a number in [0, 1], got {text[:40]!r}") from None
    names = request.query_params.getlist("run")
    return compare_view(_settings(request).runs_dir, names, validate_target(target))


async def api_stream(request: Request) -> Response:
    """Server-sent ``run`` events (the :func:`api_run` object) while the run changes.

    A snapshot goes out when anything but the heartbeat's age changed, and at
    least every ``stream_keepalive_s``; the stream ends after a final state, or
    with a ``problem`` event (``{"state": "unreadable", "error": reason}``) when
    the run cannot be read.
    """
    run_dir = await run_in_threadpool(_run_dir, request)
    settings = _settings(request)
    return StreamingResponse(
        _snapshots(run_dir, settings),
        media_type="text/event-stream",
        headers={**NO_STORE, "x-accel-buffering": "no"},
    )


async def _snapshots(run_dir: Path, settings: DashboardSettings) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    deadline = time.monotonic() + settings.stream_max_s
    last_key, last_sent = "", 0.0
    while time.monotonic() < deadline:
        try:
            detail = await run_in_threadpool(read_run, run_detail, run_dir)
        except RunUnreadableError as error:
            yield _event("problem", {"state": UNREADABLE, "error": str(error)})
            return
        key = _change_key(detail)
        if key != last_key or time.monotonic() - last_sent >= settings.stream_keepalive_s:
            yield _event("run", detail)
            last_key, last_sent = key, time.monotonic()
        if detail["status"]["state"] in lifecycle.FINAL_STATES:  # type: ignore[index]
            return
        await anyio.sleep(settings.stream_interval_s)


def _change_key(detail: dict[str, object]) -> str:
    status = dict(detail["status"])  # type: ignore[call-overload]
    status.pop("heartbeat_age_s", None)
    return json.dumps({**detail, "now": None, "status": status}, default=str)


def _event(kind: str, data: object) -> str:
    return f"event: {kind}\ndata: {dumps(data)}\n\n"


# ----------------------------------------------------------------- actions
async def api_command(request: Request) -> Response:
    """Queue ``pause``, ``resume`` or ``stop`` after the CLI's own state check."""
    command = request.path_params["command"]
    if command not in lifecycle.COMMANDS:
        raise HTTPException(404, f"unknown action {command!r}")
    run_dir = await run_in_threadpool(_run_dir, request)
    message = await run_in_threadpool(read_run, lambda d: request_command(d, command), run_dir)
    return _json({"ok": True, "message": message}, status_code=202)


async def api_weight(request: Request) -> Response:
    """Queue an operator weight, ``{"partition": int, "weight": number}``."""
    run_dir = await run_in_threadpool(_run_dir, request)
    partition, weight = validate_weight_body(parse_json_body(await request.body()))
    message = await run_in_threadpool(_queue_weight, run_dir, partition, weight)
    return _json({"ok": True, "message": message}, status_code=202)


def _queue_weight(run_dir: Path, partition: int, weight: float) -> str:
    """:func:`request_weight` on a readable run; each of its refusals is a 409 with the reason."""
    read_run(run_status, run_dir)
    try:
        return request_weight(run_dir, partition, weight)
    except (ValueError, ArithmeticError) as error:
        raise lifecycle.InvalidTransitionError(reason(error)) from None


# ------------------------------------------------------------------ errors
def _json(data: object, status_code: int = 200) -> Response:
    return JSONResponse(json_safe(data), status_code=status_code, headers=NO_STORE)


def _error_handler(status_code: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, error: Exception) -> Response:
        if isinstance(error, HTTPException):
            return _json({"error": error.detail}, status_code=error.status_code)
        body = {"error": reason(error)}
        if isinstance(error, RunUnreadableError):
            body["state"] = UNREADABLE
        return _json(body, status_code=status_code)

    return handle


async def _internal_error(request: Request, error: Exception) -> Response:
    """Last resort: one line, no traceback (the server still logs it)."""
    return _json({"error": f"internal error ({type(error).__name__})"}, status_code=500)


EXCEPTION_HANDLERS = {
    HTTPException: _error_handler(500),
    BodyError: _error_handler(400),
    CompareError: _error_handler(400),
    RunNameError: _error_handler(400),
    RunNotFoundError: _error_handler(404),
    lifecycle.InvalidTransitionError: _error_handler(409),
    RunUnreadableError: _error_handler(409),
    RunStoreError: _error_handler(409),
    sqlite3.Error: _error_handler(409),
    500: _internal_error,
}
