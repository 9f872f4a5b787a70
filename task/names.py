"""The valid names of datasets, models, partitioners and runs, without importing torch.

Config parsing, the CLI and the dashboard read these; the modules that implement
them import them from here, so there is one list (and one rule) of each.
"""

from pathlib import Path

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
MODEL_NAMES: tuple[str, ...] = ("simple-cnn", "resnet18", "mobilenet-v2")
PARTITIONER_NAMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "shard")
# Local training on CUDA: arithmetic precision, and one SGD step captured as a CUDA graph.
PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16")
CUDA_GRAPH_CHOICES: tuple[str, ...] = ("auto", "on", "off")

# A run name is one folder directly under the runs directory, typed in shells and URLs.
RUN_NAME_MAX_CHARS = 100
RUN_NAME_HINT = (
    "a run name is one folder name: at most 100 characters, not starting with '.' or '-', "
    "without '..', '/', '\\' or control characters"
)


class RunNameError(ValueError):
    """A run name that is not one plain folder name directly under the runs directory."""


def find_run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory, or None when it can.

    One rule for the run-config, the CLI and the dashboard: a name that is empty,
    longer than :data:`RUN_NAME_MAX_CHARS`, starts with ``.`` (``.``, ``..``, hidden
    folders) or ``-`` (read as an option), or holds ``..`` (``exp..1`` too: one
    rule that needs no thought about where ``..`` is harmless), a path separator
    or a control character is refused.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if len(name) > RUN_NAME_MAX_CHARS:
        return f"is {len(name)} characters long, more than {RUN_NAME_MAX_CHARS}"
    if name[0] in ".-":
        return f"starts with {name[0]!r}"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if ".." in name:
        return "holds '..'"
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in name):
        return "holds a control character"
    return None


def validate_run_name(name: str) -> str:
    """Return ``name`` when it can name a run directory.

    Raises
    ------
    RunNameError
        Saying why not, and what a run name may be.
    """
    problem = find_run_name_problem(name)
    if problem is not None:
        raise RunNameError(
            f"invalid run name {str(name)[:RUN_NAME_MAX_CHARS]!r}: it {problem}; {RUN_NAME_HINT}"
        )
    return name


def find_run_dir_problem(runs_dir: Path, name: str) -> str | None:
    """Why ``runs_dir / name`` is not a run directory of ``runs_dir``, or None.

    Checks the name (:func:`find_run_name_problem`), then that the folder, if it
    exists, is not a link that leads out of the runs directory.
    """
    problem = find_run_name_problem(name)
    if problem is not None:
        return f"invalid run name {name[:RUN_NAME_MAX_CHARS]!r}: it {problem}; {RUN_NAME_HINT}"
    candidate = runs_dir / name
    if not candidate.is_symlink():
        return None
    try:
        inside = candidate.resolve().parent == runs_dir.resolve()
    except (OSError, RuntimeError):  # a loop of links
        inside = False
    return (
        None if inside else f"run {name!r} in {runs_dir} is a link out of the runs folder; refused"
    )
