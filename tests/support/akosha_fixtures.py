"""pytest plugin: the real Akosha server as fixtures.

Load it once, from ``tests/conftest.py`` (or a test module when no conftest does)::

    pytest_plugins = ["support.akosha_fixtures"]

Fixtures:

* ``akosha_python`` (session): the Akosha venv's interpreter. When the venv is
  not built yet, runs ``scripts/build-akosha-venv.sh`` (~45 s cold, instant once
  its stamp file exists). Honors ``$AKOSHA_VENV`` like the script.
* ``akosha`` (session): one server shared by the whole run. Memory ids are
  global in Akosha, so each test must use ids of its own (e.g. a uuid prefix);
  never kill or restart this one.
* ``private_akosha`` (function): a server of the test's own, for tests that
  ``kill()``/``restart()`` it or need an empty store.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.akosha import AKOSHA_VERSION, AkoshaServer, build_script, default_venv

__all__ = ["akosha", "akosha_python", "private_akosha"]

_BUILD_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def akosha_python() -> Path:
    """Path to the Akosha venv's python, building the venv first if needed."""
    venv = default_venv()
    python = venv / "bin" / "python"
    if (venv / f".built-{AKOSHA_VERSION}").is_file() and python.is_file():
        return python
    script = build_script()
    env = dict(os.environ, AKOSHA_VENV=str(venv), AKOSHA_VERSION=AKOSHA_VERSION)
    try:
        done = subprocess.run(
            ["bash", str(script)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish in {_BUILD_TIMEOUT_S}s")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-30:])
        pytest.fail(f"{script} failed with code {done.returncode}:\n{tail}")
    if not python.is_file():
        pytest.fail(f"{script} succeeded but {python} does not exist")
    return python


@pytest.fixture(scope="session")
def akosha(akosha_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AkoshaServer]:
    """One Akosha server for the whole session (use unique memory ids per test)."""
    server = AkoshaServer(tmp_path_factory.mktemp("akosha"), python=akosha_python)
    with server:
        yield server


@pytest.fixture
def private_akosha(akosha_python: Path, tmp_path: Path) -> Iterator[AkoshaServer]:
    """An Akosha server of this test's own: free to kill, restart or fill."""
    server = AkoshaServer(tmp_path / "akosha", python=akosha_python)
    with server:
        yield server
