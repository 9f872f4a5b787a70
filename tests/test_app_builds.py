"""The warm worker runs exactly the app build whose bytes it checked.

Flower 1.42's SuperNode does not check that the hash, id and version the SuperLink
names for a task match the FAB bytes it sends. The worker must install and load by
the digest of those bytes, so a build installed earlier and revoked since is never
loaded in place of the allowed one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab

from deploy.apps import AppAllowList, fab_hash
from deploy.worker import AppRefusedError, ClientAppWorker

CLIENT = """
from pathlib import Path

from flwr.clientapp import ClientApp

Path({marker!r}).write_text("imported")
app = ClientApp()
"""
PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "buildapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "build_client:app"
clientapp = "build_client:app"

[tool.flwr.app.config]
"""


def build(folder: Path, marker: Path) -> bytes:
    """The FAB bytes of a one-module app whose import writes ``marker``."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "build_client.py").write_text(CLIENT.format(marker=str(marker)))
    return build_fab_from_disk(folder)


@pytest.fixture()
def builds(tmp_path, monkeypatch):
    """A revoked build installed the way Flower installs, and the allowed build beside it."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    revoked_marker, allowed_marker = tmp_path / "revoked-ran", tmp_path / "allowed-ran"
    revoked = build(tmp_path / "revoked", revoked_marker)
    allowed = build(tmp_path / "allowed", allowed_marker)
    install_from_fab(revoked, skip_prompt=True)  # an earlier run, allowed then
    return revoked, allowed, revoked_marker, allowed_marker


def test_a_build_named_by_another_hash_is_refused_and_nothing_loads(builds):
    # Prepare: only the new build is allowed now
    revoked, allowed, revoked_marker, allowed_marker = builds
    worker = ClientAppWorker("127.0.0.1:1", allowed=AppAllowList(frozenset({fab_hash(allowed)})))

    # Execute: allowed bytes, named by the revoked build's hash (task and FAB)
    with pytest.raises(AppRefusedError, match="not the SHA-256 of its bytes"):
        worker.verified_build(allowed, (fab_hash(revoked), fab_hash(revoked)))
    # ... and the revoked bytes under their own name
    with pytest.raises(AppRefusedError, match="refused app build"):
        worker.verified_build(revoked, (fab_hash(revoked), fab_hash(revoked)))

    # Assert
    assert not revoked_marker.exists() and not allowed_marker.exists()
    assert worker.loaded_fab_hash is None


def test_the_checked_build_is_installed_and_loaded_by_its_full_digest(builds):
    # Prepare
    revoked, allowed, revoked_marker, allowed_marker = builds
    digest = fab_hash(allowed)
    worker = ClientAppWorker("127.0.0.1:1", allowed=AppAllowList(frozenset({digest})))

    # Execute
    checked = worker.verified_build(allowed, (digest.upper(), digest))
    folder = worker._install(allowed, checked)
    worker._load_app("someone/buildapp", "1.0.0", checked, folder)

    # Assert: the allowed build's module ran, from a folder named by the full digest
    assert checked == digest and digest in folder.parts
    assert allowed_marker.exists() and not revoked_marker.exists()
    assert worker.loaded_fab_hash == digest
    # A second build is never loaded beside it in this process
    worker.allowed = AppAllowList(any_app=True)
    with pytest.raises(AppRefusedError, match="runs another build only in a fresh process"):
        worker.verified_build(revoked, (fab_hash(revoked),))


def test_the_superlink_never_inherits_flowers_internal_grpc_switches(tmp_path, monkeypatch):
    from deploy.superlink import SuperLinkSettings, superlink_env

    # Prepare: switches that would reopen the gRPC Control and Fleet APIs on all addresses
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    settings = SuperLinkSettings(
        certs_dir=tmp_path, state_dir=tmp_path / "state", flwr_home=tmp_path / "home"
    )

    # Execute
    env = superlink_env(settings)

    # Assert
    assert not [key for key in env if key.startswith("FLWR_INTERNAL_GRPC_")]
    assert env["FLWR_HOME"] == str(tmp_path / "home")


def test_a_build_that_fails_to_load_still_counts_as_loaded(tmp_path, monkeypatch):
    import deploy.worker as worker_module

    # Prepare: loading imports the build's modules, then fails
    def failing_loader(**_kwargs):  # noqa: ANN202
        def load(*_args):  # noqa: ANN202
            raise RuntimeError("attribute app not found")

        return load

    monkeypatch.setattr(worker_module, "get_load_client_app_fn", failing_loader)
    worker = ClientAppWorker("127.0.0.1:1", allowed=AppAllowList(any_app=True))

    # Execute
    with pytest.raises(RuntimeError):
        worker._load_app("someone/buildapp", "1.0.0", "a" * 64, tmp_path)

    # Assert: another build is never run warm beside that one's modules
    assert worker.loaded_fab_hash == "a" * 64
    with pytest.raises(AppRefusedError, match="only in a fresh process"):
        worker.verified_build(b"other bytes", ())
