"""The files fedcoord writes inside a run folder are plain files and folders, never links.

A run folder's own link out of the runs folder is refused elsewhere
(:func:`task.names.find_run_dir_problem`); the names inside it are checked here,
because a link there (``flwr-run.log`` -> a file of the operator's, ``checkpoints``
-> another folder) would have fedcoord append to, overwrite or prune files outside
the runs folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from task.config_values import ConfigError

CHECKPOINTS_DIR = "checkpoints"
# Files written in the run folder: SQLite's companions, the sweep's log, tracking.
WRITTEN_FILES: tuple[str, ...] = (
    "run.db-wal",
    "run.db-shm",
    "run.db-journal",
    "flwr-run.log",
    "tracking.json",
    ".tmp-tracking.json",
)


def find_run_entries_problem(run_dir: Path) -> str | None:
    """Why fedcoord must not write in ``run_dir``, or None: a link or odd file among its names."""
    for name in (CHECKPOINTS_DIR, *WRITTEN_FILES):
        try:
            mode = os.lstat(run_dir / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"{run_dir / name} cannot be read ({error.strerror or error})"
        wanted_dir = name == CHECKPOINTS_DIR
        if stat.S_ISLNK(mode) or (stat.S_ISDIR(mode) != wanted_dir):
            kind = (
                "a link" if stat.S_ISLNK(mode) else ("not a folder" if wanted_dir else "not a file")
            )
            return (
                f"{run_dir / name} is {kind}; fedcoord writes there, so it must be the run's "
                "own: remove it (or move the run folder's files back)"
            )
    return None


def check_run_entries(run_dir: Path) -> None:
    """Raise ConfigError naming the first link or odd file among the names fedcoord writes."""
    problem = find_run_entries_problem(run_dir)
    if problem is not None:
        raise ConfigError(problem)


def open_append_no_follow(path: Path) -> int:
    """A file descriptor appending to ``path``, created if missing, never through a link."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
