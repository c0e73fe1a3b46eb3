"""A real ``infercore serve +recipe=iris`` process on loopback, shared by the e2e tests.

The server starts once per session, is polled (bounded) until ``/v2/health/ready`` answers
200, and is stopped with SIGTERM at the end; a non-zero exit code fails the session. The
helpers are in ``e2e_support``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    ARTIFACT_WAIT_S,
    INFERCORE,
    IRIS_ONNX,
    READY_WAIT_S,
    STOP_WAIT_S,
    Launcher,
    Server,
    start_server,
    stop_server,
    wait_for_artifact,
    wait_ready,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """While the artifact is still being built, give the first e2e test time to wait for it.

    pytest-timeout (``timeout`` in pyproject.toml) counts fixture set-up, and the session
    fixture may wait up to ``ARTIFACT_WAIT_S`` for the artifact.
    """
    if IRIS_ONNX.is_file():
        return
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.timeout(ARTIFACT_WAIT_S + READY_WAIT_S + 120))


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="session")
def iris_onnx() -> Path:
    wait_for_artifact(IRIS_ONNX, ARTIFACT_WAIT_S)
    return IRIS_ONNX


@pytest.fixture(scope="session")
def iris_server(iris_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    assert INFERCORE.is_file(), f"the console script is missing: {INFERCORE}"
    log = tmp_path_factory.mktemp("iris-server") / "server.log"
    server = start_server(["+recipe=iris"], log)
    try:
        wait_ready(server)
        yield server
    finally:
        code = stop_server(server)
    assert code is not None, f"the server ignored SIGTERM for {STOP_WAIT_S:.0f} s and was killed"
    assert code == 0, f"the server exited with {code} after SIGTERM:\n{server.log_text()}"
    for leak in ("Traceback", "Task exception was never retrieved"):
        assert leak not in server.log_text(), server.log_text()
