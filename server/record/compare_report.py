"""A comparison of runs shown: as text tables and as a PNG of accuracy curves.

``fedcoord compare`` and the end of ``fedcoord sweep`` print
:func:`format_comparison` of :func:`server.record.compare.compare_records`;
``fedcoord compare -o`` draws :func:`plot_comparison`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.record.compare import STRATEGY_KEY, format_number, label_of, printable, show_value
from server.record.results import figure_pyplot, save_figure


def format_comparison(comparison: Mapping[str, object]) -> list[str]:
    """The comparison as text: the runs table, then the summary over seeds if any."""
    target = comparison["target"]
    keys = [k for k in comparison["differing_keys"] if k != STRATEGY_KEY]  # type: ignore[attr-defined]
    headers = ["RUN", "STATE", "STRATEGY", "CONFIG", "ROUNDS", "FINAL", "BEST"]
    if target is not None:
        headers += [f"ROUND@{target:g}", f"TIME@{target:g}"]
    headers += ["REJECTED", "EPSILON"]
    rows = []
    for run in comparison["runs"]:  # type: ignore[attr-defined]
        row = [
            run["run_name"],
            run["state"],
            show_value(run["strategy"]),
            label_of(run["differs"], keys) or "-",
            f"{run['rounds']}/{run['num_rounds']}",
            format_number(run["final_accuracy"]),
            format_number(run["best_accuracy"]),
        ]
        if target is not None:
            row += [format_number(run["target_round"]), fmt_seconds(run["target_time_s"])]
        row += [str(run["rejected"]), str(run["epsilon_text"])]
        rows.append(row)
    lines = format_table(headers, rows)
    summaries = comparison["over_seeds"]
    if summaries:
        lines += ["", *format_seed_table(summaries, target)]  # type: ignore[arg-type]
    return lines


def format_seed_table(summaries: Sequence[Mapping[str, object]], target: object) -> list[str]:
    """Mean ± std over seeds, one line per combination of the other keys."""
    headers = ["OVER SEEDS", "RUNS", "FINAL", "BEST"]
    if target is not None:
        headers += [f"REACHED {target:g}", f"TIME@{target:g}"]
    headers.append("WALL TIME")
    rows = []
    for summary in summaries:
        row = [
            str(summary["label"]),
            str(summary["runs"]),
            _fmt_mean_std(summary["final_accuracy"]),
            _fmt_mean_std(summary["best_accuracy"]),
        ]
        if target is not None:
            row += [
                f"{summary['reached_target']}/{summary['runs']}",
                _fmt_mean_std(summary["target_time_s"], seconds=True),
            ]
        row.append(_fmt_mean_std(summary["wall_time_s"], seconds=True))
        rows.append(row)
    return format_table(headers, rows)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns, two spaces apart, the header line first.

    A cell with a character that is not printable (a bidi control such as U+202E,
    a zero-width one, a control character) is shown escaped, as :func:`printable`.
    """
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]


def fmt_seconds(seconds: object) -> str:
    """``95.3s``, ``12m05s``, ``3.2e+12s`` or ``-``."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "-"
    if seconds >= 1e9:  # centuries: no minutes worth spelling out
        return f"{seconds:.3g}s"
    if seconds < 600:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _fmt_mean_std(stats: object, seconds: bool = False) -> str:
    if not isinstance(stats, Mapping) or stats["mean"] is None:
        return "-"
    show = fmt_seconds if seconds else format_number
    std = stats["std"]
    return show(stats["mean"]) + ("" if std is None else f" ± {show(std)}")


def plot_comparison(comparison: Mapping[str, object], output: Path) -> None:
    """Central accuracy against round and against wall time, one line a run, as one PNG."""
    plt = figure_pyplot()
    figure, (by_round, by_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in comparison["runs"]:  # type: ignore[attr-defined]
        curve = run["curve"]
        kept = [i for i, acc in enumerate(curve["central_accuracy"]) if acc is not None]
        accuracy = [curve["central_accuracy"][i] for i in kept]
        by_round.plot([curve["round"][i] for i in kept], accuracy, marker="o", label=run["label"])
        timed = [i for i in kept if curve["elapsed_s"][i] is not None]
        by_time.plot(
            [curve["elapsed_s"][i] for i in timed],
            [curve["central_accuracy"][i] for i in timed],
            marker="o",
            label=run["label"],
        )
    target = comparison["target"]
    for axes, xlabel in ((by_round, "round"), (by_time, "wall time in rounds (s)")):
        if target is not None:
            axes.axhline(
                target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}"
            )
        axes.set(xlabel=xlabel, ylabel="central accuracy", ylim=(0, 1))
        axes.grid(alpha=0.3)
    by_round.xaxis.get_major_locator().set_params(integer=True)
    by_round.set_title("accuracy per round")
    by_time.set_title("accuracy over wall time")
    by_time.legend(loc="lower right", fontsize="small")
    keys = ", ".join(comparison["differing_keys"]) or "nothing"  # type: ignore[arg-type]
    save_figure(figure, f"runs compared (differ in {keys})", output)
