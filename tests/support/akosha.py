"""The real Akosha 0.11.0 server for tests, run from its own Python 3.13 venv.

``AkoshaServer`` starts ``python -m akosha.mcp`` (uvicorn, one process) with:

* the environment Akosha needs to start offline and unauthenticated
  (``AKOSHA_SKIP_DHARA_REGISTRATION=1``, ``AUTH_ENABLED=false``), bound to
  127.0.0.1 on a port picked free at the first start and reused on restarts;
* a scrubbed environment: inherited ``AKOSHA_*``, ``JWT_*``, ``DHARA_*``,
  ``OTEL_*``/``OTLP_*``, ``MCP_*``, ``PYTEST_*`` ... variables are dropped, and
  ``HOME``, the XDG dirs, ``TMPDIR``, ``AKOSHA_DATA_PATH`` (and the warm/WAL
  paths derived from it) and the working directory all point inside ``workdir``.

Where Akosha 0.11 keeps data: memories pushed over MCP go to a DuckDB
**in-memory** database (``akosha.storage.create_hot_store`` always builds
``HotStore(":memory:")`` unless the pgvector backend is configured). Nothing is
written to disk, so **nothing survives ``stop()``/``kill()`` + ``start()``**:
every (re)start begins with an empty store. The data-path variables above only
keep any directory Akosha might create (warm store, WAL, caches) inside
``workdir``; none is created by the MCP server in practice.

How to know what Akosha holds: Akosha 0.11 has no read-back tool (its
``search_all_systems`` returns canned data, and ``query_local_traces`` reads a
*different* in-memory DuckDB than the ingestion tools), no delete tool, and no
counter of stored memories in ``/metrics`` or ``/health``. The only signal is the
duplicate-primary-key refusal when an id is stored again: see
:meth:`AkoshaServer.held_ids`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from mcp import Client
from mcp.types import CallToolResult, TextContent

from .process import HOST, ServerProcess, http_get, pick_free_port

__all__ = [
    "AKOSHA_VERSION",
    "DUPLICATE_KEY_MARKER",
    "EMBEDDING_DIM",
    "MAX_BATCH_ITEMS",
    "MAX_REQUEST_BODY_BYTES",
    "PROBE_SOURCE",
    "AkoshaError",
    "AkoshaServer",
    "build_script",
    "default_akosha_python",
    "default_venv",
    "minimal_memory",
    "pick_free_port",
    "repo_root",
    "tool_result",
]

AKOSHA_VERSION = "0.11.0"
#: Akosha's hot store column is ``FLOAT[384]``; any other length is refused.
EMBEDDING_DIM = 384
#: ``batch_store_memories`` refuses more items than this in one call.
MAX_BATCH_ITEMS = 1000
#: The MCP transport answers ``413`` to request bodies larger than this.
MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024
#: Substring of the per-memory error when the id is already stored, e.g.
#: ``Constraint Error: Duplicate key "conversation_id: X" violates primary key constraint.``
DUPLICATE_KEY_MARKER = "Duplicate key"
#: ``metadata.source`` (Akosha's system id) of the memories :meth:`held_ids` stores.
PROBE_SOURCE = "akosha-test-probe"

# Keep held_ids() requests well under the 4 MiB body limit.
_PROBE_BATCH_BYTES = 3 * 1024 * 1024
_ENV_PREFIXES_TO_DROP = (
    "AKOSHA_",
    "DHARA_",
    "JWT_",
    "MCP_",
    "OTEL_",
    "OTLP_",
    "ONEIRIC_",
    "MINIMAX_",
    "PYTEST_",
    "XDG_",
)
_ENV_KEYS_TO_DROP = ("AUTH_ENABLED", "ENVIRONMENT", "JWT_SECRET", "OTLP_ENDPOINT", "TMPDIR")


class AkoshaError(RuntimeError):
    """The server could not be started, died, or answered unexpectedly."""


def repo_root() -> Path:
    """The repository root (this file is ``<root>/tests/support/akosha.py``)."""
    return Path(__file__).resolve().parents[2]


def default_venv() -> Path:
    """``$AKOSHA_VENV``, else ``<repo>/.venv-akosha`` (same rule as the build script)."""
    override = os.environ.get("AKOSHA_VENV")
    # Absolute: Akosha is launched from another working directory (make passes a
    # relative path, as the build script takes it).
    return Path(override).expanduser().absolute() if override else repo_root() / ".venv-akosha"


def default_akosha_python() -> Path:
    """The Akosha venv's interpreter; it may not exist yet (see :func:`build_script`)."""
    return default_venv() / "bin" / "python"


def build_script() -> Path:
    """``scripts/build-akosha-venv.sh``: builds the venv once, then is instant."""
    return repo_root() / "scripts" / "build-akosha-venv.sh"


def minimal_memory(
    memory_id: str,
    *,
    text: str | None = None,
    embedding: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``batch_store_memories`` item Akosha accepts (zero vector by default)."""
    vector = [0.0] * EMBEDDING_DIM if embedding is None else [float(x) for x in embedding]
    return {
        "memory_id": memory_id,
        "text": text if text is not None else f"akosha test memory {memory_id}",
        "embedding": vector,
        "metadata": dict(metadata) if metadata is not None else {"source": PROBE_SOURCE},
    }


def tool_result(result: CallToolResult) -> dict[str, Any]:
    """The dict a tool answered, from ``structured_content`` (else the JSON text).

    Akosha's tools (FastMCP 3.4) answer both: ``structured_content`` is the dict
    and ``content`` is one ``TextContent`` holding the same dict as compact JSON.
    A tool that raised comes back with ``is_error=True`` and the message as text.
    """
    text = "".join(c.text for c in result.content if isinstance(c, TextContent))
    if result.is_error:
        raise AkoshaError(f"tool error: {text}")
    if isinstance(result.structured_content, dict):
        return result.structured_content
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AkoshaError(f"tool answered neither structured content nor JSON: {text!r}") from exc
    if not isinstance(parsed, dict):
        raise AkoshaError(f"tool answered JSON that is not an object: {parsed!r}")
    return parsed


class AkoshaServer(ServerProcess):
    """One Akosha MCP server (``python -m akosha.mcp``) on a free loopback port.

    >>> with AkoshaServer(tmp_path) as akosha:
    ...     async with akosha.client() as client:
    ...         await client.call_tool("batch_store_memories", {"memories": [...]})

    ``env`` adds or overrides variables of the child's environment (e.g.
    ``{"JWT_SECRET": ...}`` to turn JWT auth on). ``startup_seconds`` is how
    long the last ``start()`` took until ``/health`` answered 200.

    ``restart()`` keeps the port and workdir, but Akosha 0.11 keeps memories in
    an in-memory DuckDB: the restarted server holds none of what was stored before.
    """

    _kill_process_group = True  # nothing uvicorn forked survives a kill

    def __init__(
        self,
        workdir: Path,
        python: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        mcp_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        super().__init__(
            self.workdir / "akosha.log", startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.python = Path(python) if python is not None else default_akosha_python()
        self.extra_env: dict[str, str] = dict(env or {})
        self.mcp_timeout = mcp_timeout

        self.data_dir = self.workdir / "data"
        self.home_dir = self.workdir / "home"
        self.tmp_dir = self.workdir / "tmp"
        self._port: int | None = None

    # ------------------------------------------------------------------ info
    @property
    def port(self) -> int:
        if self._port is None:
            raise AkoshaError("server was never started: no port yet")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The streamable-HTTP MCP endpoint, ``http://127.0.0.1:PORT/mcp``."""
        return f"{self.base_url}/mcp"

    @property
    def health_url(self) -> str:
        return f"{self.base_url}/health"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Launch Akosha and block until ``GET /health`` answers 200."""
        if self.is_running():
            raise AkoshaError(f"already running (pid {self.pid})")
        self._reap()
        if not self.python.is_file():
            raise AkoshaError(
                f"no Akosha interpreter at {self.python}; build the venv with {build_script()}"
            )
        for directory in (self.data_dir, self.home_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        fresh_port = self._port is None
        # A freshly picked port can be taken by someone else before uvicorn binds
        # it; on a first start, try another one. A restart keeps its port.
        attempts = 3 if fresh_port else 1
        for attempt in range(1, attempts + 1):
            if fresh_port:
                self._port = pick_free_port()
            try:
                began = time.monotonic()
                self._launch(
                    [str(self.python), "-m", "akosha.mcp"],
                    cwd=self.workdir,  # oneiric reads ./settings/*.yaml; DuckDB spills to ./.tmp
                    env=self._environment(),
                    header=f"\n===== akosha start {time.strftime('%H:%M:%S')} "
                    f"port {self.port} =====\n",
                    began=began,
                )
                return self
            except _PortInUse:
                if attempt == attempts:
                    raise AkoshaError(
                        f"port {self._port} was taken before Akosha could bind it; log tail "
                        f"({self.log_path}):\n{self.log_tail()}"
                    ) from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ plain HTTP
    def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "ok", "service": "akosha", "version": "0.9.5"}``."""
        status, body = http_get(self.health_url, timeout=5.0)
        if status != 200:
            raise AkoshaError(f"/health answered {status}: {body[:200]!r}")
        parsed = json.loads(body)
        if not isinstance(parsed, dict):
            raise AkoshaError(f"/health answered a non-object: {parsed!r}")
        return parsed

    def metrics_text(self) -> str:
        """``GET /metrics`` (Prometheus text; it has no stored-memory counter)."""
        status, body = http_get(self.metrics_url, timeout=5.0)
        if status != 200:
            raise AkoshaError(f"/metrics answered {status}")
        return body.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------- MCP
    def client(self) -> Client:
        """A new real MCP client (``mcp`` 2.x) for this server; use ``async with``."""
        return Client(self.url, read_timeout_seconds=self.mcp_timeout)

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Call one tool over a fresh MCP session; the tool's result dict."""
        async with self.client() as client:
            return tool_result(await client.call_tool(name, dict(arguments)))

    async def list_tools(self) -> dict[str, dict[str, Any]]:
        """Tool name -> input JSON schema, as the server lists them."""
        async with self.client() as client:
            listed = await client.list_tools()
        return {tool.name: dict(tool.input_schema) for tool in listed.tools}

    async def batch_store_memories(self, memories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``batch_store_memories``: ``{status, total, stored, failed, errors, stored_at}``."""
        return await self.call_tool(
            "batch_store_memories", {"memories": [dict(m) for m in memories]}
        )

    async def held_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` Akosha already held before this call.

        Each id is sent once more as a minimal memory (zero 384-float
        embedding, ``metadata.source == PROBE_SOURCE``); Akosha answers a held
        id with its duplicate-primary-key refusal.

        SIDE EFFECT: every id that was *not* held is stored by this call (as a
        probe memory), so afterwards Akosha holds all of ``ids`` and a second
        call reports them all as held. Akosha 0.11 has no delete tool, so this
        cannot be undone short of restarting the server (its store is
        in-memory). Call it once, after the code under test has finished
        pushing, and never for ids that code is still going to push.

        Raises :class:`AkoshaError` if an id fails for any reason other than a
        duplicate key.
        """
        unique = list(dict.fromkeys(ids))
        for memory_id in unique:
            if not isinstance(memory_id, str) or not memory_id:
                raise ValueError(f"memory ids must be non-empty strings, got {memory_id!r}")
        held: set[str] = set()
        if not unique:
            return held
        async with self.client() as client:
            for batch in _probe_batches(unique):
                answer = tool_result(
                    await client.call_tool("batch_store_memories", {"memories": batch})
                )
                errors = answer.get("errors") or []
                if "error" in answer and not errors:
                    raise AkoshaError(f"batch_store_memories refused the probe batch: {answer}")
                for error in errors:
                    memory_id, message = error.get("memory_id"), str(error.get("error"))
                    if DUPLICATE_KEY_MARKER not in message:
                        raise AkoshaError(f"probe of {memory_id!r} failed: {message}")
                    held.add(str(memory_id))
                if answer.get("stored", 0) + len(errors) != len(batch):
                    raise AkoshaError(f"unexpected answer to a {len(batch)}-item probe: {answer}")
        return held

    # ------------------------------------------------------------- internal
    def _environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.upper().startswith(_ENV_PREFIXES_TO_DROP) and key not in _ENV_KEYS_TO_DROP
        }
        env.update(
            {
                "AKOSHA_SKIP_DHARA_REGISTRATION": "1",
                "AUTH_ENABLED": "false",
                "MCP_HOST": HOST,
                "MCP_PORT": str(self.port),
                "AKOSHA_MCP_PORT": str(self.port),
                "HOME": str(self.home_dir),
                "XDG_DATA_HOME": str(self.home_dir / ".local" / "share"),
                "XDG_CACHE_HOME": str(self.home_dir / ".cache"),
                "XDG_CONFIG_HOME": str(self.home_dir / ".config"),
                "XDG_STATE_HOME": str(self.home_dir / ".local" / "state"),
                "TMPDIR": str(self.tmp_dir),
                "AKOSHA_DATA_PATH": str(self.data_dir),
                "AKOSHA_WARM_PATH": str(self.data_dir / "warm" / "warm.db"),
                "AKOSHA_WAL_PATH": str(self.data_dir / "wal"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _wait_ready(self, deadline: float) -> None:
        """Return once ``GET /health`` answers 200 with Akosha's service name."""
        last: str = "no answer yet"
        polls = self._polls(
            deadline,
            exited=self._exited_during_startup,
            timed_out=lambda: AkoshaError(
                f"Akosha not healthy after {self.startup_timeout:.0f}s (last: {last}); "
                f"log tail ({self.log_path}):\n{self.log_tail()}"
            ),
        )
        for _ in polls:
            try:
                status, body = http_get(self.health_url, timeout=1.0)
                if status == 200 and b'"akosha"' in body:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as exc:  # not listening yet
                last = repr(exc)

    def _exited_during_startup(self, code: int | None) -> Exception:
        if "address already in use" in self._current_run_log().lower():
            return _PortInUse()
        return AkoshaError(
            f"Akosha exited with code {code} during startup; log tail "
            f"({self.log_path}):\n{self.log_tail()}"
        )

    def _current_run_log(self) -> str:
        """The log written since the last start marker."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.rsplit("===== akosha start", 1)[-1]


class _PortInUse(Exception):
    """uvicorn could not bind the picked port."""


def _probe_batches(ids: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    """Probe memories in calls of at most MAX_BATCH_ITEMS items and ~3 MiB."""
    batch: list[dict[str, Any]] = []
    size = 0
    for memory_id in ids:
        memory = minimal_memory(memory_id, text="akosha-test held_ids probe")
        memory["metadata"] = {"source": PROBE_SOURCE, "type": "held_ids_probe"}
        item_size = len(json.dumps(memory, separators=(",", ":")).encode()) + 1
        if batch and (len(batch) >= MAX_BATCH_ITEMS or size + item_size > _PROBE_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(memory)
        size += item_size
    if batch:
        yield batch
