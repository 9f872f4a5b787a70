"""MLflow tracking: one MLflow run per fedcoord run, mirrored from its run store.

With ``tracking-uri`` set, :class:`RunTracker` reads the run's ``run.db`` from a
thread of its own and mirrors it into one MLflow run (named after the fedcoord
run, in experiment ``tracking-experiment``, default ``fedcoord``):

- params: the run-config, as the run store keeps it;
- metrics: each round's numbers (``results.round_scalars``) at ``step=round``,
  round 0 being the initial model;
- tags: ``fedcoord.run-name``, ``fedcoord.model-hash`` and ``fedcoord.chain-hash``
  of the newest round, ``fedcoord.run-dir``, and at the end ``fedcoord.state``;
- artifacts, at the end: the final checkpoint (``checkpoints/``) and the
  ``fedcoord plot`` PNG (``rounds.png``).

Tracking is a guest of the run. The round loop never waits for MLflow, and any
failure of MLflow or its store (unreachable, disk full, a damaged database) is
logged as one WARNING line (the same failure once) while the run goes on; the
thread retries at its next sync and catches up with the rounds it missed.
The MLflow run's id is kept in ``tracking.json`` in the run directory, so that a
resumed run continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flwr.common.logger import log

from server.record import lifecycle
from server.record.checkpoints import checkpoint_path
from server.record.results import plot_rounds, round_scalars
from server.record.store import RunStore
from task.config import RunConfig, config_to_dict
from task.config_values import without_credentials

T = TypeVar("T")
TRACKING_FILE = "tracking.json"
TAG_PREFIX = "fedcoord."
SYNC_INTERVAL_S = 2.0
FINISH_TIMEOUT_S = 60.0
# MLflow's batch limits (``mlflow.utils.validation``): metrics and params per call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
# MLflow refuses other characters in a param or metric name (and names longer than 250
# characters); a run-config key or a round metric it would refuse is left out.
PARAM_NAME = re.compile(r"^[\w\-. /]{1,250}$")
# 9999-12-31T23:59:59Z: a later (or non-finite) stored time is logged as the current time.
LATEST_TIME = 253402300799.0
RUN_STATUS = {
    lifecycle.COMPLETED: "FINISHED",
    lifecycle.STOPPED: "KILLED",
    lifecycle.FAILED: "FAILED",
}


def mlflow_name(name: str) -> bool:
    """Whether MLflow takes ``name`` as a param or metric name.

    ``PARAM_NAME``, and no name it would read as another path (``a//b``, ``./a``,
    ``../a``, ``/a``).
    """
    return (
        bool(PARAM_NAME.match(name))
        and posixpath.normpath(name) == name
        and not (name == "." or name.startswith(("..", "/")))
    )


def _milliseconds(seconds: object) -> int:
    """A stored time as MLflow's timestamp; a time that is not one is taken as now."""
    if (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and math.isfinite(seconds)
        and 0 <= seconds <= LATEST_TIME
    ):
        return int(seconds * 1000)
    return int(time.time() * 1000)


def tracked_params(config: RunConfig) -> dict[str, str]:
    """The run-config as MLflow params: every key the run store keeps, as text.

    A ``tracking-uri`` is logged without its credentials (``user:password@``).
    """
    stored = {**config_to_dict(config), "dataset-defaults": ",".join(config.dataset_defaults)}
    stored["tracking-uri"] = without_credentials(str(stored.get("tracking-uri", "")))
    return {
        key: (str(value).lower() if isinstance(value, bool) else str(value))[:MAX_PARAM_LENGTH]
        for key, value in stored.items()
        if mlflow_name(key)
    }


def start_tracking(config: RunConfig, run_dir: Path) -> RunTracker | None:
    """Start mirroring the run into MLflow when ``tracking-uri`` is set; None otherwise."""
    uri = config.tracking_uri
    if not uri:
        return None
    tracker = RunTracker(run_dir, uri, config.experiment_name, tracked_params(config))
    tracker.start()
    return tracker


class RunTracker:
    """Mirror one run directory into one MLflow run, from a daemon thread.

    Parameters
    ----------
    run_dir : Path
        The run directory; its ``run.db`` is read (read-only) at each sync.
    tracking_uri : str
        A resolved MLflow tracking URI (``RunConfig.tracking_uri``).
    experiment : str
        The MLflow experiment, created if absent.
    params : Mapping[str, str]
        The run's params (``tracked_params``).
    """

    def __init__(
        self, run_dir: Path, tracking_uri: str, experiment: str, params: Mapping[str, str]
    ) -> None:
        self.run_dir = run_dir
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.params = dict(params)
        self.run_id: str | None = None
        self._client: Any = None
        self._params_logged = False
        self._logged_through = -1
        self._last_warning = ""
        self._left_out: set[str] = set()
        self._finishing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="fedcoord-tracking", daemon=True)

    def start(self) -> None:
        """Start the thread; its first sync opens (or continues) the MLflow run."""
        self._thread.start()

    def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Log the last rounds, the artifacts and the run's end; wait at most ``timeout_s``."""
        self._finishing.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log(
                WARNING,
                "tracking: MLflow did not finish within %.0fs; the MLflow run may lack "
                "the end of this run",
                timeout_s,
            )

    # ------------------------------------------------------------------ thread
    def _work(self) -> None:
        while True:
            self._attempt(self._sync)
            if self._finishing.wait(SYNC_INTERVAL_S):
                break
        if self._attempt(self._sync):
            self._attempt(self._close)

    def _attempt(self, step: Callable[[], None]) -> bool:
        """Run ``step``; a failure is one WARNING line (not repeated while it lasts) and False."""
        try:
            step()
        except Exception as error:  # noqa: BLE001 - tracking must never end the run
            lines = self._shown(str(error)).strip().splitlines()
            warning = f"tracking: {type(error).__name__}: {lines[0] if lines else ''}"[:300]
            if warning != self._last_warning:
                self._last_warning = warning
                log(WARNING, "%s; the run goes on, tracking retries", warning)
            return False
        if self._last_warning:
            self._last_warning = ""
            log(INFO, "tracking: MLflow answers again; the rounds it missed are logged")
        return True

    def _shown(self, text: str) -> str:
        """``text`` without the tracking URI's ``user:password@``, for the log."""
        netloc = urlsplit(self.tracking_uri).netloc
        if "@" not in netloc:
            return text
        return text.replace(netloc.rsplit("@", 1)[0] + "@", "")

    def _sync(self) -> None:
        """Open the MLflow run if needed, then log params and the rounds not yet logged."""
        rows, run = self._read_store(lambda store: (store.rounds(), store.run_row()))
        if self.run_id is None:
            self._open(str(run["run_name"]), run["created_at"])
        if not self._params_logged:
            self._log_params()
        new = [row for row in rows if int(row["round"]) > self._logged_through]  # type: ignore[call-overload]
        if new:
            self._log_rounds(new)

    def _close(self) -> None:
        """Log the final checkpoint and the plot, tag the state and end the MLflow run."""
        rows, run, checkpoints = self._read_store(
            lambda store: (store.rounds(), store.run_row(), store.checkpoints())
        )
        client, run_id = self._client, self.run_id
        if checkpoints:
            newest = checkpoint_path(self.run_dir, int(checkpoints[-1]["round"]))  # type: ignore[call-overload]
            if newest.is_file():
                client.log_artifact(run_id, str(newest), "checkpoints")
        if rows:
            with tempfile.TemporaryDirectory(prefix="fedcoord-plot-") as folder:
                plot = Path(folder) / "rounds.png"
                plot_rounds(rows, str(run["run_name"]), plot)
                client.log_artifact(run_id, str(plot))
        state = str(run["state"])
        client.set_tag(run_id, TAG_PREFIX + "state", state)
        client.set_terminated(run_id, RUN_STATUS.get(state, "KILLED"))

    # ------------------------------------------------------------------ store
    def _read_store(self, read: Callable[[RunStore], T]) -> T:
        """``read(store)`` on a read-only store of this thread's own, closed after."""
        store = RunStore(self.run_dir, readonly=True)
        try:
            return read(store)
        finally:
            store.close()

    # ------------------------------------------------------------------ MLflow
    def _open(self, run_name: str, created_at: object) -> None:
        """Continue the MLflow run of ``tracking.json``, or create one and record it there."""
        from mlflow import MlflowClient

        if self.tracking_uri.startswith("file:"):  # MLflow 3 asks for an opt-in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = self._recorded_run_id(client)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            history = client.get_metric_history(run_id, "central-accuracy")
            self._logged_through = max((metric.step for metric in history), default=-1)
            verb = "continued"
        else:
            tags = {TAG_PREFIX + "run-name": run_name, TAG_PREFIX + "run-dir": str(self.run_dir)}
            run = client.create_run(
                self._experiment_id(client),
                start_time=_milliseconds(created_at),
                tags=tags,
                run_name=run_name,
            )
            run_id = run.info.run_id
            self._client, self.run_id = client, run_id  # kept even if it cannot be recorded
            self._record_run_id(run_id)
            verb = "new"
        self._client, self.run_id = client, run_id
        log(
            INFO,
            "tracking: run %s -> %s MLflow run %s, experiment %r, in %s",
            run_name,
            verb,
            run_id,
            self.experiment,
            without_credentials(self.tracking_uri),
        )

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = None
        if self.tracking_uri.startswith("sqlite:///"):  # else MLflow puts them in the cwd
            database = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (database.parent / "mlartifacts").as_uri()
        return str(client.create_experiment(self.experiment, artifact_location=location))

    def _recorded_run_id(self, client: Any) -> str | None:
        """The MLflow run this run directory recorded for this store, if it still exists."""
        path = self.run_dir / TRACKING_FILE
        try:
            if not path.is_file():  # absent; a folder, or a FIFO that would block the read
                return None
            recorded = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
            return None
        if not isinstance(recorded, dict) or recorded.get("tracking-uri") != self.tracking_uri:
            return None
        run_id = recorded.get("run-id")
        if not isinstance(run_id, str):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:  # deleted from the store, or another store at that URI
            return None
        return run_id if run.info.lifecycle_stage == "active" else None

    def _record_run_id(self, run_id: str) -> None:
        """Keep ``run_id`` in ``tracking.json``; where it cannot be written, say so once."""
        record = {"tracking-uri": self.tracking_uri, "experiment": self.experiment}
        temporary = self.run_dir / f".tmp-{TRACKING_FILE}"
        try:
            temporary.unlink(missing_ok=True)  # a leftover (or a link): never written through
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with open(os.open(temporary, flags, 0o644), "w") as file:
                file.write(json.dumps({**record, "run-id": run_id}) + "\n")
            os.replace(temporary, self.run_dir / TRACKING_FILE)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            log(
                WARNING,
                "tracking: cannot write %s (%s); this run is tracked, a resumed run "
                "starts a new MLflow run",
                self.run_dir / TRACKING_FILE,
                error.strerror or error,
            )

    def _log_params(self) -> None:
        """Log the params the MLflow run lacks; a changed value (on resume) becomes a tag.

        MLflow params cannot change; a resumed run may raise ``num-server-rounds``
        and always has ``resume=true``: those values go to ``fedcoord.config.KEY``.
        """
        from mlflow.entities import Param, RunTag

        logged = self._client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in self.params.items() if k not in logged]
        tags = [
            RunTag(f"{TAG_PREFIX}config.{key}", value)
            for key, value in self.params.items()
            if key in logged and logged[key] != value
        ]
        for batch in _batches(params, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=batch)
        if tags:
            self._client.log_batch(self.run_id, tags=tags)
        self._params_logged = True

    def _log_rounds(self, rows: Sequence[Mapping[str, object]]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics = []
        for row in rows:
            timestamp, step = _milliseconds(row["ended_at"]), int(row["round"])  # type: ignore[call-overload]
            for key, value in round_scalars(row).items():
                if mlflow_name(key):
                    metrics.append(Metric(key, value, timestamp, step))
                else:  # MLflow would refuse the whole batch, this round and every later one
                    self._note_left_out(key)
        for batch in _batches(metrics, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch)
        newest = rows[-1]
        tags = [
            RunTag(TAG_PREFIX + "model-hash", str(newest["model_hash"])),
            RunTag(TAG_PREFIX + "chain-hash", str(newest["chain_hash"])),
        ]
        self._client.log_batch(self.run_id, tags=tags)
        self._logged_through = int(newest["round"])  # type: ignore[call-overload]

    def _note_left_out(self, name: str) -> None:
        """One WARNING line the first time a metric name MLflow refuses is left out."""
        if name not in self._left_out and len(self._left_out) < 20:
            self._left_out.add(name)
            log(
                WARNING,
                "tracking: metric %s is not a name MLflow takes (letters, digits, _-. /, "
                "at most 250); left out of MLflow, kept in run.db",
                repr(name)[:80],
            )


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
