"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

With Flower's default ``--isolation subprocess`` the SuperNode starts
``flower-superexec``, which launches a new ``flwr-clientapp`` process for every
message: each imports torch and flwr (2-8 s) and reads the node's data again.
This worker takes the SuperExec's place. It imports the heavy libraries once,
acquires ClientApp tasks from the SuperNode's Runtime API every few
milliseconds, and runs each one in this same process, so the app's modules, the
node's data shard (``client.shard`` caches it), the model and the CUDA context
stay warm from one round to the next.

Each task follows Flower's own protocol (``flwr.supernode.runtime.run_clientapp``):
pull the task input, run the ClientApp, push the reply, push the task output
(with the updated ``context.state``). Only the process is kept.

Only app builds (FABs) the node's operator allowed are run (``--allow-app
HASH``, repeatable, or ``--allow-any-app``): the worker hashes the FAB bytes of
each task itself, before installing or importing anything, and answers a build
that is not listed with an error reply and one log line (deploy/apps.py).

A task of another allowed build than the one whose modules are loaded is run by
a fresh one-task worker process (``--task-token``), and the worker then
re-executes itself, so new app code is never mixed with old modules.

Usage (``python -m deploy supernode`` starts it for you)::

    python -m deploy.worker --runtime-api-address 127.0.0.1:9094 --parent-pid PID \
        --allow-app FAB_HASH
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import FrameType

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.logger import update_console_handler
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from deploy.apps import AppAllowList, AppRefusedError, check_build_names, fab_hash, parse_app_hash
from deploy.checks import DeployError

DEFAULT_POLL_INTERVAL_S = 0.05
# Imported before the first task so that it only pays for the app's own modules.
DEFAULT_PRELOAD = ("numpy", "torch", "torchvision", "sklearn", "datasets", "flwr_datasets")
CLIENTAPP_TASK_TYPES = [TaskType.CLIENT_APP.value]
OBJECT_PULL_BACKOFF_S = 0.02
OBJECT_PULL_BACKOFF_CAP_S = 0.5
# Checked builds are installed under FLWR_HOME/BUILDS_DIR/<full SHA-256 of the FAB bytes>.
BUILDS_DIR = "fedcoord-builds"


class StopWorkerError(BaseException):
    """SIGTERM / SIGINT, or the SuperNode went away: not caught as a task error."""


def _runtime_retry_invoker(max_time_s: float) -> RetryInvoker:
    """Retry transport errors and 5xx; give up on 4xx (a cancelled or expired task).

    Flower's own HTTP retry invoker sends SIGINT to its process on a 401, which
    is right for a one-task ``flwr-clientapp`` but would end this worker.
    """

    def should_give_up(error: Exception) -> bool:
        return isinstance(error, httpx.HTTPStatusError) and error.response.status_code < 500

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.1, max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time_s,
        should_giveup=should_give_up,
    )


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``pull_task_input``, polling for the message's objects every 20 ms.

    The SuperNode creates the task before it has pulled the message's objects
    from the SuperLink. A cold ``flwr-clientapp`` asks seconds later; this
    worker asks at once, and Flower's default backoff (1 s, then 2 s, ...) would
    then wait about 3 s for objects that arrive a few milliseconds later.
    """
    response = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = response.task_id
    TaskIdentity.run_id = response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    context = context_from_proto(response.context)
    run = run_from_proto(response.run)
    fab = fab_from_proto(response.fab)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    object_tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        object_tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_PULL_BACKOFF_S,
        backoff_cap=OBJECT_PULL_BACKOFF_CAP_S,
    )
    # The deflated message does not carry its own id (its object id).
    message.metadata.__dict__["_message_id"] = object_tree.object_id
    return message, context, run, fab


def task_heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Task heartbeats that never signal this process.

    Flower's ``make_task_heartbeat_fn_http`` raises SIGINT when the SuperNode no
    longer knows the task, ending a one-task ``flwr-clientapp``; here the task is
    simply no longer heartbeated and its reply will be refused.
    """
    request = SendTaskHeartbeatRequest()
    abandoned = False

    def heartbeat() -> bool:
        nonlocal abandoned
        if abandoned:
            return True
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.HTTPStatusError as error:
            if error.response.status_code >= 500:
                return False
            abandoned = True
            return True
        except httpx.HTTPError:
            return False
        if not response.success:
            log(WARNING, "the SuperNode no longer knows the task in progress")
            abandoned = True
        return True

    return heartbeat


@dataclass
class ClientAppWorker:
    """Acquires ClientApp tasks from one SuperNode and runs them in this process."""

    runtime_api_address: str
    parent_pid: int | None = None
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    allowed: AppAllowList = field(default_factory=AppAllowList)
    loaded_fab_hash: str | None = None
    tasks_run: int = 0
    _installed: dict[str, Path] = field(default_factory=dict)

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        """Acquire and run tasks until stopped."""
        acquirer = RuntimeHttpClient.from_server_address(
            self.runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=_runtime_retry_invoker(max_time_s=float("inf")),
        )
        log(INFO, "fedcoord ClientApp worker ready (pid %d)", os.getpid())
        try:
            while True:
                response = acquirer.AcquireTask(
                    AcquireTaskRequest(supported_task_types=CLIENTAPP_TASK_TYPES)
                )
                if response.HasField("task") and response.token:
                    self.run_task(response.token, response.task.fab_hash.lower())
                else:
                    time.sleep(self.poll_interval_s)
        finally:
            acquirer.close()

    def run_task(self, token: str, fab_hash: str) -> None:
        """Run one task here, or in a fresh process when it is another allowed app build.

        A build that is not allowed is refused here: that loads no app code.
        """
        new_build = self.loaded_fab_hash is not None and fab_hash != self.loaded_fab_hash
        if new_build and fab_hash and self.allowed.allows_hash(fab_hash):
            log(WARNING, "a new app build (FAB %s): running it cold, then restarting", fab_hash[:8])
            self.run_cold(token)
            self.restart()  # does not return
            return
        self.run_warm(token, fab_hash)
        self.tasks_run += 1

    # ----------------------------------------------------------------- tasks
    def run_warm(self, token: str, announced_hash: str = "") -> None:
        """Flower's ``run_clientapp`` steps, in this process, without exiting.

        The build run is the one whose bytes were checked: installed and loaded by the
        digest computed here, never by the hash, id or version the SuperLink names.
        """
        client = RuntimeHttpClient.from_server_address(
            self.runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=_runtime_retry_invoker(max_time_s=60.0),
        )
        heartbeat = HeartbeatSender(task_heartbeat_fn(client))
        heartbeat.start()
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        marks = [time.perf_counter()]
        try:
            message, context, run, fab = pull_task_input(client)
            digest = self.verified_build(fab.content, (announced_hash, fab.hash_str))
            installed = self._install(fab.content, digest)
            app = self._load_app(run.fab_id, run.fab_version, digest, installed)
            marks.append(time.perf_counter())
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # noqa: BLE001 - reported to the server as Flower does
            reply, details = self._error_reply(message, error)
        finally:
            marks.append(time.perf_counter())
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as error:  # noqa: BLE001
                log(ERROR, "failed to push the reply: %s", error)
            push_task_output(client, context, sub_status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            marks.append(time.perf_counter())
            self._log_task(message, marks)

    @staticmethod
    def _log_task(message: Message | None, marks: list[float]) -> None:
        kind = message.metadata.message_type if message is not None else "?"
        steps = [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)]
        log(
            INFO,
            "%s task: %.2fs (%s)",
            kind,
            marks[-1] - marks[0],
            ", ".join(
                f"{name} {seconds:.2f}s"
                for name, seconds in zip(("input", "app", "output"), steps, strict=False)
            ),
        )

    def verified_build(self, content: bytes, claimed: Sequence[str]) -> str:
        """The digest of the build in ``content``, once it may run in this process.

        Raises
        ------
        AppRefusedError
            When the build is not allowed, when a hash the SuperLink gave for it
            (the task's, the FAB's) is not the digest of its bytes, or when another
            build's modules are already loaded here.
        """
        problem = self.allowed.find_app_problem(content)
        if problem is not None:
            raise AppRefusedError(problem)
        digest = fab_hash(content)
        for hash_given in claimed:
            if hash_given and hash_given.lower() != digest:
                raise AppRefusedError(
                    f"refused app build {digest}: the SuperLink named it {hash_given[:64]!r}, "
                    "which is not the SHA-256 of its bytes; check the SuperLink"
                )
        if self.loaded_fab_hash is not None and digest != self.loaded_fab_hash:
            raise AppRefusedError(
                f"refused app build {digest}: this worker has build "
                f"{self.loaded_fab_hash} loaded; it runs another build only in a fresh process"
            )
        return digest

    def _install(self, fab_content: bytes, digest: str) -> Path:
        """Install the checked bytes once, under a folder named by their full digest.

        Flower's own folder name keeps 8 hex digits of the hash and reuses a folder
        that exists: another build with those 8 digits, installed earlier, would load.
        """
        if digest not in self._installed:
            check_build_names(fab_content, digest)
            builds = get_flwr_home() / BUILDS_DIR / digest
            builds.mkdir(parents=True, exist_ok=True)
            # A fresh folder per process: nothing found on disk is reused unverified
            base = Path(tempfile.mkdtemp(dir=builds, prefix="install-"))
            installed = install_from_fab(fab_content, install_dir=base, skip_prompt=True)
            if installed is None:
                raise AppRefusedError(f"app build {digest} could not be installed")
            self._installed[digest] = Path(installed)
        return self._installed[digest]

    def _load_app(self, fab_id: str, fab_version: str, digest: str, installed: Path) -> ClientApp:
        """Load the ClientApp from the folder the checked bytes were installed in."""
        load = get_load_client_app_fn(default_app_ref="", app_path=str(installed), multi_app=True)
        self.loaded_fab_hash = digest  # before importing: a failed load leaves its modules
        return load(fab_id, fab_version, digest)

    @staticmethod
    def _error_reply(message: Message | None, error: Exception) -> tuple[Message | None, str]:
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = f"{type(error)}:<'{error}'>"
        if isinstance(error, AppRefusedError):
            code, reason = ErrorCode.INVALID_FAB, str(error)
            log(WARNING, "%s", reason)
        elif isinstance(error, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = f"An exception was raised when attempting to load `ClientApp`: {error}"
            log(ERROR, "ClientApp raised an exception: %s", error, exc_info=error)
        else:
            log(ERROR, "ClientApp raised an exception: %s", error, exc_info=error)
        reply = Message(Error(code=code, reason=reason), reply_to=message) if message else None
        return reply, reason

    def run_cold(self, token: str) -> None:
        """Run one task in a fresh one-task worker, with the same allow-list."""
        command = [
            sys.executable,
            "-m",
            "deploy.worker",
            "--runtime-api-address",
            self.runtime_api_address,
            "--task-token",
            token,
            *self.allowed.arguments(),
        ]
        if self.parent_pid is not None:
            command += ["--parent-pid", str(self.parent_pid)]
        subprocess.run(command, check=False)

    def restart(self) -> None:
        """Replace this process with a fresh worker (same PID, same arguments)."""
        os.execv(sys.executable, [sys.executable, "-m", "deploy.worker", *sys.argv[1:]])


def preload(modules: Sequence[str]) -> float:
    """Import ``modules`` (missing ones are skipped); return the seconds it took."""
    started = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            log(WARNING, "preload: cannot import %s: %s", name, error)
    return time.perf_counter() - started


def _allow_list(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AppAllowList:
    """The app builds to run, from ``--allow-app`` / ``--allow-any-app``; exits on bad values."""
    if args.allow_any_app == bool(args.allow_app):
        parser.error("give --allow-app FAB_HASH (repeatable) or --allow-any-app, not both")
    try:
        hashes = frozenset(parse_app_hash(text) for text in args.allow_app)
    except DeployError as error:
        parser.error(str(error))
    return AppAllowList(hashes, args.allow_any_app)


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise StopWorkerError(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry of the worker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the node supervisor) ends"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL_S,
        help="seconds between task polls of the local Runtime API",
    )
    parser.add_argument(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        help="comma-separated modules imported before the first task",
    )
    parser.add_argument(
        "--allow-app",
        action="append",
        default=[],
        metavar="FAB_HASH",
        help="an app build this node runs (repeatable)",
    )
    parser.add_argument(
        "--allow-any-app", action="store_true", help="run every app build the SuperLink sends"
    )
    parser.add_argument("--task-token", help="run this one task, then exit")
    args = parser.parse_args(argv)
    allowed = _allow_list(parser, args)
    update_console_handler(timestamps=True)  # a node operator reads when things happened
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT here when the SuperNode ends
    worker = ClientAppWorker(args.runtime_api_address, args.parent_pid, args.poll_interval, allowed)
    if args.task_token:
        worker.run_warm(args.task_token)
        return 0
    try:
        seconds = preload([name for name in args.preload.split(",") if name])
        log(INFO, "fedcoord ClientApp worker: preloaded in %.1fs", seconds)
        worker.serve()
    except StopWorkerError as stop:
        log(
            INFO, "fedcoord ClientApp worker stopping (%s) after %d task(s)", stop, worker.tasks_run
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
