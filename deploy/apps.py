"""Which app builds a SuperNode runs: the allow-list its operator gives.

An app build (FAB) is named by the SHA-256 of its bytes, Flower's "FAB hash".
``flwr run APP`` builds the FAB deterministically (sorted files, fixed
timestamps), so ``python -m deploy app-hash APP`` run on the code a node's
operator reviewed gives the hash the SuperLink will send for that code, and any
change to any file of the app gives another.

The warm ClientApp worker (deploy/worker.py) hashes the FAB bytes it receives
itself, before anything is installed or imported, and refuses a build that is
not listed.
"""

from __future__ import annotations

import hashlib
import io
import re
import string
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from deploy.checks import DeployError

FAB_HASH_LENGTH = 64


def fab_hash(content: bytes) -> str:
    """The FAB hash of an app build: SHA-256 of its bytes, in hex."""
    return hashlib.sha256(content).hexdigest()


def parse_app_hash(text: str) -> str:
    """An ``--allow-app`` value: a full FAB hash, 64 hex digits (any case).

    Raises
    ------
    DeployError
        For anything else, a shortened hash included (8 digits are easy to match).
    """
    value = text.strip().lower()
    if len(value) != FAB_HASH_LENGTH or not set(value) <= set(string.hexdigits.lower()):
        raise DeployError(
            f"--allow-app {text!r} is not a FAB hash (64 hex digits); print the hash of the "
            "app you reviewed with: python -m deploy app-hash APP_DIR"
        )
    return value


def app_hash(app_dir: Path) -> str:
    """The FAB hash ``flwr run APP_DIR`` would send, built the way Flower builds it.

    Raises
    ------
    DeployError
        If the folder is not a Flower app Flower can build.
    """
    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415 - imports typer, click

    folder = app_dir.expanduser().resolve()
    if not (folder / "pyproject.toml").is_file():
        raise DeployError(f"{folder} is not a Flower app: it has no pyproject.toml")
    try:
        return fab_hash(build_fab_from_disk(folder))
    except (ValueError, OSError) as error:
        raise DeployError(f"cannot build the app in {folder}: {error}") from error


@dataclass(frozen=True)
class AppAllowList:
    """The app builds a node runs: ``hashes``, or every build when ``any_app``."""

    hashes: frozenset[str] = frozenset()
    any_app: bool = False

    def allows_hash(self, digest: str) -> bool:
        """Whether a build announced as ``digest`` may be run (its bytes are checked later)."""
        return self.any_app or digest.lower() in self.hashes

    def find_app_problem(self, content: bytes) -> str | None:
        """Why the build with these bytes must not run here, or None when it may."""
        digest = fab_hash(content)
        if self.allows_hash(digest):
            return None
        return (
            f"refused app build {digest}: this node runs only the builds its operator allowed "
            f"({len(self.hashes)} listed); after reviewing that code, start the node with "
            f"--allow-app {digest}"
        )

    def arguments(self) -> list[str]:
        """The worker's command-line arguments for this list."""
        if self.any_app:
            return ["--allow-any-app"]
        return [argument for digest in sorted(self.hashes) for argument in ("--allow-app", digest)]

    def describe(self) -> str:
        """One phrase for the node's start-up line."""
        if self.any_app:
            return "any app build the SuperLink sends (--allow-any-app)"
        return "app builds " + ", ".join(digest[:12] for digest in sorted(self.hashes))


class AppRefusedError(Exception):
    """The task's app build is not on this node's allow-list."""


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_build_names(content: bytes, digest: str) -> None:
    """Refuse a build whose publisher, name or version could not be a plain folder name.

    Flower names the install folder after them: ``1.0.0/../../x`` would put it
    outside the builds folder.

    Raises
    ------
    AppRefusedError
        Naming the field and value.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            project = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise AppRefusedError(f"refused app build {digest}: unreadable ({error})") from None
    fields = {
        "publisher": project.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher"),
        "name": project.get("project", {}).get("name"),
        "version": project.get("project", {}).get("version"),
    }
    for field_name, value in fields.items():
        if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
            raise AppRefusedError(
                f"refused app build {digest}: its {field_name} {str(value)[:60]!r} is not a plain "
                "name (letters, digits, . _ -)"
            )
