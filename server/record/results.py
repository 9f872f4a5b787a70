"""Round results out of the run store: CSV / JSON lines export, scalars and a PNG plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from server.record.privacy_report import round_epsilon
from server.record.schema import int_value, real_or_none, stored_number

EXPORT_COLUMNS = (
    "round",
    "started_at",
    "ended_at",
    "duration_s",
    "sampled",
    "accepted",
    "rejected",
    "failed",
    "updated",
    "train_loss",
    "central_loss",
    "central_accuracy",
    "federated_loss",
    "federated_accuracy",
    "epsilon",
    "model_hash",
    "chain_hash",
    "note",
)

# Columns of a round row that are numbers of the round besides its metrics.
ROUND_COUNTS = ("sampled", "accepted", "rejected", "failed", "updated")


def finite_or_none(value: object) -> object:
    """``value`` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: object) -> str:
    """``value`` as strict JSON: non-finite numbers become ``null`` (never ``NaN``)."""
    return json.dumps(finite_or_none(value), allow_nan=False)


def stored_metrics(metrics_json: object) -> dict[str, object] | None:
    """The metrics object a round row stores, or None when the text is not a JSON object."""
    try:
        metrics = json.loads(str(metrics_json))
    except (ValueError, RecursionError):
        return None
    return metrics if isinstance(metrics, dict) else None


def round_scalars(row: Mapping[str, object]) -> dict[str, float]:
    """A round row's numbers by name, as MLflow and TensorBoard get them.

    The round's metrics under their own names (``central-accuracy``,
    ``federated-loss``, ``train-loss``, ``seconds-*``, ...), the reply counts
    (``sampled``, ``accepted``, ``rejected``, ``failed``), ``updated`` (1 or 0) and
    ``duration-s``. Values that are not finite numbers are left out.
    """
    metrics = stored_metrics(row.get("metrics_json")) or {}
    values: dict[str, object] = {**metrics, **{key: row.get(key) for key in ROUND_COUNTS}}
    values["duration-s"] = row.get("duration_s")
    numbers = {str(key): stored_number(value) for key, value in values.items()}
    return {key: number for key, number in numbers.items() if number is not None}


def write_rows(rows: list[dict[str, object]], fmt: str, output: TextIO) -> None:
    """Write round rows as ``csv`` (one header line) or ``jsonl`` (one strict object a line).

    ``epsilon`` is the round's cumulative epsilon: ``inf`` in CSV for a run without
    noise, ``null`` in JSON (which has no infinity); empty when not recorded.
    """
    rows = [{**row, "epsilon": round_epsilon(row)} for row in rows]
    if fmt == "csv":
        writer = csv.DictWriter(output, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    for row in rows:
        record = {key: row[key] for key in EXPORT_COLUMNS}
        record["metrics"] = stored_metrics(row["metrics_json"])
        output.write(strict_json(record) + "\n")


def figure_pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported only when plotting
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: object, title: str, output: Path) -> None:
    """Title ``figure``, write it to ``output`` (PNG, folders made) and close it."""
    figure.suptitle(title)  # type: ignore[attr-defined]
    figure.tight_layout()  # type: ignore[attr-defined]
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)  # type: ignore[attr-defined]
    figure_pyplot().close(figure)


def plot_rounds(
    rows: list[dict[str, object]], run_name: str, output: Path, step: str = "round"
) -> None:
    """Central and federated accuracy, losses and clients per round (or version), as one PNG."""
    plt = figure_pyplot()

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(int_value(r, "round"), real_or_none(r, key)) for r in rows]
        kept = [(server_round, value) for server_round, value in points if value is not None]
        return [p[0] for p in kept], [p[1] for p in kept]

    figure, (accuracy, loss, clients, privacy) = plt.subplots(1, 4, figsize=(20, 4))
    for key, label in (("central_accuracy", "central"), ("federated_accuracy", "federated")):
        accuracy.plot(*series(key), marker="o", label=label)
    accuracy.set(title="accuracy", xlabel=step, ylim=(0, 1))
    accuracy.legend()
    for key, label in (
        ("central_loss", "central"),
        ("federated_loss", "federated"),
        ("train_loss", "train"),
    ):
        loss.plot(*series(key), marker="o", label=label)
    loss.set(title="loss", xlabel=step)
    loss.legend()
    trained = [r for r in rows if int_value(r, "round") > 0]
    rounds = [int_value(r, "round") for r in trained]
    accepted = [int_value(r, "accepted") for r in trained]
    clients.bar(rounds, accepted, label="accepted")
    clients.bar(
        rounds,
        [int_value(r, "rejected") + int_value(r, "failed") for r in trained],
        bottom=accepted,
        label="rejected / failed",
    )
    clients.set(title=f"clients per {step}", xlabel=step)
    clients.legend()
    plot_privacy(privacy, rows)
    save_figure(figure, run_name, output)


def plot_privacy(axes: object, rows: list[dict[str, object]]) -> None:
    """Central accuracy against the cumulative epsilon of each round (``inf``: said so).

    The initial model (round 0) cost nothing: it is drawn at epsilon 0.
    """
    points = [
        (0.0 if row["round"] == 0 else epsilon, accuracy)
        for row in rows
        if ((epsilon := round_epsilon(row)) is not None or row["round"] == 0)
        and (accuracy := real_or_none(row, "central_accuracy")) is not None
    ]
    finite = [(e, a) for e, a in points if e is not None and math.isfinite(e)]
    if len(finite) > 1 or (finite and len(points) == 1):
        axes.plot(*zip(*finite, strict=True), marker="o")  # type: ignore[attr-defined]
        axes.set(ylim=(0, 1))  # type: ignore[attr-defined]
    else:
        why = "epsilon = inf: no noise,\nnot differentially private" if points else "no epsilon"
        axes.text(0.5, 0.5, why, ha="center", va="center", transform=axes.transAxes)  # type: ignore[attr-defined]
    axes.set(title="accuracy against epsilon", xlabel="epsilon", ylabel="central accuracy")  # type: ignore[attr-defined]
