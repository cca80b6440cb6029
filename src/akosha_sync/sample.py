"""Generate Session-Buddy-shaped DuckDB databases for the demo, tests and benchmarks.

The generated ``reflection.duckdb`` and ``knowledge_graph.duckdb`` follow the schemas in
``/work/shared/reference/session-buddy-data.md``. After the bulk of the data has been
checkpointed into the database files, a few rows are written that stay *only* in the
sibling ``reflection.duckdb.wal``, the way a live Session-Buddy leaves them.

DuckDB 2.0 behaviour this module relies on (and that callers must respect):

* ``duckdb.connect(path)`` followed by ``close()`` checkpoints the WAL into the database
  file and deletes it, even if the connection only ran a ``SELECT``. To keep a WAL alive,
  run ``PRAGMA disable_checkpoint_on_shutdown`` on the writing connection. Raising
  ``checkpoint_threshold`` alone is not enough.
* Rows that live only in the WAL are visible to any later connection (WAL replay on
  open). Open with ``read_only=True`` to look at them without merging the WAL away.

Only ``duckdb`` and the standard library are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

__all__ = [
    "EMBEDDING_DIM",
    "KNOWLEDGE_GRAPH_DB",
    "REFLECTION_DB",
    "SAMPLE_EPOCH",
    "SOURCE_TYPES",
    "SampleInfo",
    "add_conversations",
    "create_sample_databases",
    "grow_to_size",
]

EMBEDDING_DIM = 384
REFLECTION_DB = "reflection.duckdb"
KNOWLEDGE_GRAPH_DB = "knowledge_graph.duckdb"
#: Default "now" of generated data, fixed so that output is deterministic by seed.
SAMPLE_EPOCH = datetime(2026, 11, 20, 18, 0, 0)
SOURCE_TYPES = ("claude_code", "crackerjack", "mahavishnu_workflow", "manual", "migration")

_MIB = 1024 * 1024

# --------------------------------------------------------------------------- schemas

_CONVERSATIONS_V2_DDL = """
CREATE TABLE conversations_v2 (
    id TEXT PRIMARY KEY,
    content TEXT NOT NULL,
    embedding FLOAT[384],
    category TEXT NOT NULL,
    subcategory TEXT,
    importance_score REAL DEFAULT 0.5,
    memory_tier TEXT DEFAULT 'long_term',
    access_count INTEGER DEFAULT 0,
    last_accessed TIMESTAMP,
    project TEXT,
    namespace TEXT DEFAULT 'default',
    timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    session_id TEXT,
    user_id TEXT DEFAULT 'default',
    searchable_content TEXT,
    reasoning TEXT,
    metadata VARCHAR,
    source_type TEXT CHECK (source_type IS NULL OR source_type IN
        ('claude_code', 'crackerjack', 'mahavishnu_workflow', 'manual', 'migration')),
    turn_parent_id TEXT,
    causal_parent_id TEXT
)
"""

_REFLECTIONS_V2_DDL = """
CREATE TABLE reflections_v2 (
    id TEXT PRIMARY KEY,
    content TEXT NOT NULL,
    embedding FLOAT[384],
    category TEXT NOT NULL,
    importance_score REAL,
    memory_tier TEXT,
    tags TEXT[],
    related_entities TEXT[],
    timestamp TIMESTAMP,
    project TEXT,
    namespace TEXT,
    access_count INTEGER,
    last_accessed TIMESTAMP,
    created_at TIMESTAMP,
    updated_at TIMESTAMP,
    insight_type TEXT,
    usage_count INTEGER,
    last_used_at TIMESTAMP,
    confidence_score REAL,
    fingerprint BLOB,
    subcategory TEXT,
    metadata JSON
)
"""

_LEGACY_CONVERSATIONS_DDL = """
CREATE TABLE conversations (
    id VARCHAR PRIMARY KEY,
    content TEXT NOT NULL,
    embedding FLOAT[384],
    project VARCHAR,
    timestamp TIMESTAMP,
    metadata JSON
)
"""

_LEGACY_REFLECTIONS_DDL = """
CREATE TABLE reflections (
    id VARCHAR PRIMARY KEY,
    content TEXT NOT NULL,
    embedding FLOAT[384],
    project VARCHAR,
    tags VARCHAR[],
    timestamp TIMESTAMP,
    metadata JSON
)
"""

# A few of the "many other tables" Session-Buddy keeps beside the ones a sync reads.
_EXTRA_REFLECTION_DDL = (
    """
    CREATE TABLE reflection_tags (
        reflection_id VARCHAR,
        tag VARCHAR,
        PRIMARY KEY (reflection_id, tag)
    )
    """,
    """
    CREATE TABLE session_links (
        id VARCHAR PRIMARY KEY,
        source_session_id VARCHAR NOT NULL,
        target_session_id VARCHAR NOT NULL,
        link_type VARCHAR NOT NULL,
        context TEXT DEFAULT '',
        created_at TIMESTAMP DEFAULT NOW(),
        metadata JSON
    )
    """,
)

_EXTRA_V2_DDL = (
    """
    CREATE TABLE memory_access_log (
        id TEXT PRIMARY KEY,
        memory_id TEXT,
        access_type TEXT,
        query_text TEXT,
        timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP
    )
    """,
    "CREATE INDEX idx_conversations_category ON conversations_v2(category, namespace)",
    "CREATE INDEX idx_conversations_timestamp ON conversations_v2(timestamp)",
)

_EXTRA_LEGACY_DDL = (
    "CREATE INDEX idx_conversations_project ON conversations(project)",
    "CREATE INDEX idx_conversations_timestamp ON conversations(timestamp)",
)

_KG_DDL = (
    """
    CREATE TABLE kg_entities (
        id VARCHAR PRIMARY KEY,
        name VARCHAR NOT NULL,
        entity_type VARCHAR NOT NULL,
        observations VARCHAR[],
        properties JSON,
        created_at TIMESTAMP,
        updated_at TIMESTAMP,
        metadata JSON,
        embedding FLOAT[384]
    )
    """,
    """
    CREATE TABLE kg_relationships (
        id VARCHAR PRIMARY KEY,
        from_entity VARCHAR NOT NULL,
        to_entity VARCHAR NOT NULL,
        relation_type VARCHAR NOT NULL,
        properties JSON,
        created_at TIMESTAMP,
        updated_at TIMESTAMP,
        metadata JSON
    )
    """,
)

# --------------------------------------------------------------------------- vocabulary

_PROJECTS = (
    "akosha",
    "session-buddy",
    "crackerjack",
    "mahavishnu",
    "acb",
    "fastblocks",
    "splashstand",
    "oneiric",
)
_CATEGORIES = ("facts", "preferences", "skills", "rules", "context", "claude_turn")
_SUBCATEGORIES = ("architecture", "testing", "tooling", "deployment", "debugging", None)
_TIERS = ("working", "short_term", "long_term", "long_term")
_REFLECTION_CATEGORIES = ("insight", "pattern", "decision", "lesson", "preference")
_INSIGHT_TYPES = ("pattern", "solution", "lesson", "warning", "preference")
_TAGS = (
    "python",
    "duckdb",
    "testing",
    "async",
    "performance",
    "refactor",
    "ci",
    "typing",
    "security",
    "sync",
    "embeddings",
    "docs",
)
_ENTITY_TYPES = ("project", "library", "concept", "person", "tool", "file", "decision", "bug")
_RELATION_TYPES = (
    "depends_on",
    "uses",
    "implements",
    "related_to",
    "authored_by",
    "fixes",
    "part_of",
    "supersedes",
)
_LIBS = (
    "duckdb",
    "pydantic",
    "httpx",
    "fastapi",
    "pytest",
    "msgspec",
    "onnxruntime",
    "uvicorn",
    "rclone",
    "structlog",
    "typer",
    "anyio",
)
_FILES = (
    "src/{p}/cli.py",
    "src/{p}/config.py",
    "src/{p}/storage/duckdb_store.py",
    "src/{p}/sync/uploader.py",
    "tests/test_{m}.py",
    "src/{p}/server/app.py",
    "pyproject.toml",
    "src/{p}/embeddings.py",
)
_MODULES = ("sync", "storage", "search", "cli", "server", "config", "graph", "reflection")
_ERRORS = (
    "IOException: Could not set lock on file",
    "ConstraintException: Duplicate key",
    "TimeoutError after 30s",
    "KeyError: 'embedding'",
    "BinderException: Referenced column not found",
    "ConnectionResetError: [Errno 104]",
    "AssertionError in test_round_trip",
    "TypeError: expected str, got NoneType",
)
_OPENERS = (
    "User asked how to {verb} the {module} module in {project}.",
    "Worked on {project}: the goal was to {verb} {lib} usage in {file}.",
    "Session focused on a failing check in {file} ({error}).",
    "Claude reviewed the {module} layer of {project} and proposed to {verb} it.",
    "Investigated why {lib} was slow when the {module} code ran on large inputs.",
    "Pair-programmed a change to {file} so that {project} can {verb} its {module} state.",
)
_SENTENCES = (
    "The root cause was {error}, raised when two processes touched the same file.",
    "We decided to {verb} the call sites and keep the public API unchanged.",
    "Benchmarks went from {n1} ms to {n2} ms after the change.",
    "Tests were added in {file}; coverage of {module} is now {pct}%.",
    "{lib} {ver} changed its defaults, so the config now pins them explicitly.",
    "The user prefers small focused commits and type hints on every public function.",
    "Follow-up: {verb} the retry logic and document the {module} invariants.",
    "A WAL file was left behind after the crash; copying it with the database fixed it.",
    "Ruff and mypy --strict pass; {n3} warnings were silenced with targeted ignores.",
    "Embeddings are 384-dimensional and normalised before cosine search.",
    "The fix touched {n3} files and removed {n1} lines of dead code.",
    "Open question: should {project} {verb} the {module} data before upload?",
    "Reverted an earlier attempt because it broke {file} on Python 3.11.",
    "Logged the decision in the knowledge graph under '{module}-{verb}'.",
)
_VERBS = (
    "refactor",
    "speed up",
    "simplify",
    "harden",
    "migrate",
    "test",
    "document",
    "parallelise",
    "cache",
    "validate",
)
_REASONINGS = (
    "Captures a recurring decision that future sessions should reuse.",
    "Explains a failure mode that is easy to hit again.",
    "Records a user preference about code style.",
    "Documents a performance trade-off with measured numbers.",
    None,
)
_ENTITY_NAMES = (
    "{lib}",
    "{project}",
    "{module} layer",
    "{file}",
    "{verb} {module}",
    "{error}",
)
_OBSERVATIONS = (
    "Used by {project} since version {ver}.",
    "Known issue: {error}.",
    "Maintainers decided to {verb} it in the next release.",
    "Mentioned in {n3} sessions this month.",
    "Owns the {module} code path in {file}.",
)

# Words for bulk (SQL-side) text in grow_to_size(): realistic enough, compresses like text.
# fmt: off
_BULK_WORDS = (
    "the", "a", "user", "asked", "claude", "to", "fix", "refactor", "test", "deploy", "migrate",
    "database", "schema", "query", "index", "embedding", "vector", "search", "sync", "upload",
    "wal", "checkpoint", "duckdb", "python", "async", "function", "class", "module", "error",
    "traceback", "timeout", "retry", "cache", "config", "settings", "project", "session",
    "reflection", "knowledge", "graph", "entity", "relation", "memory", "tier", "importance",
    "score", "token", "model", "prompt", "response", "latency", "benchmark", "pytest", "ruff",
    "mypy", "typing", "coverage", "commit", "branch", "merge", "review", "pull", "request",
    "api", "endpoint", "server", "client", "http", "json", "parse", "validate", "field",
    "column", "table", "row", "file", "path", "directory", "lock", "conflict", "resolution",
    "strategy", "because", "when", "then", "after", "before", "should", "could", "would", "we",
    "it", "this", "that", "with", "from", "into", "over", "for", "and", "or", "not", "but",
)
# fmt: on


# --------------------------------------------------------------------------- result type


@dataclass(frozen=True)
class SampleInfo:
    """What a generator produced.

    ``row_counts`` maps every generated table (of both databases) to the number of rows a
    fresh connection sees, *including* rows that live only in the WAL.
    ``wal_row_counts`` maps tables to the number of those rows that are only in
    ``reflection.duckdb.wal`` (not yet checkpointed into the database file).
    """

    data_dir: Path
    reflection_path: Path
    knowledge_graph_path: Path
    legacy: bool
    row_counts: dict[str, int]
    wal_row_counts: dict[str, int]
    wal_conversation_ids: tuple[str, ...]

    @property
    def reflection_wal_path(self) -> Path:
        """Path of the reflection database's write-ahead log."""
        return _wal_path(self.reflection_path)

    @property
    def knowledge_graph_wal_path(self) -> Path:
        """Path of the knowledge-graph database's write-ahead log."""
        return _wal_path(self.knowledge_graph_path)

    @property
    def wal_rows(self) -> int:
        """Total number of rows that exist only in the WAL."""
        return sum(self.wal_row_counts.values())

    @property
    def conversations_table(self) -> str:
        """``conversations`` (legacy) or ``conversations_v2``."""
        return "conversations" if self.legacy else "conversations_v2"

    @property
    def reflections_table(self) -> str:
        """``reflections`` (legacy) or ``reflections_v2``."""
        return "reflections" if self.legacy else "reflections_v2"


# --------------------------------------------------------------------------- helpers


def _wal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".wal")


def _prepare_dir(data_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    reflection = data_dir / REFLECTION_DB
    kg = data_dir / KNOWLEDGE_GRAPH_DB
    existing = [p for db in (reflection, kg) for p in (db, _wal_path(db)) if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing)
        raise FileExistsError(f"refusing to replace existing database files: {names}")
    for p in existing:
        p.unlink()
    return reflection, kg


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _normalise(vec: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


class _Gen:
    """Deterministic producer of realistic-looking Session-Buddy rows."""

    def __init__(self, seed: int | str, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now
        # One centroid per project: rows of a project have similar embeddings, so
        # cosine search over the sample gives meaningful neighbours.
        topic_rng = random.Random(f"topics-{seed}")
        self.centroids = {
            p: [topic_rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIM)] for p in _PROJECTS
        }

    def pick(self, items: Sequence[Any]) -> Any:
        return items[self.rng.randrange(len(items))]

    def embedding(self, project: str) -> list[float]:
        c = self.centroids[project]
        g = self.rng.gauss
        return _normalise([x + 0.8 * g(0.0, 1.0) for x in c])

    def fill(self, template: str, project: str) -> str:
        r = self.rng
        module = self.pick(_MODULES)
        return template.format(
            project=project,
            module=module,
            verb=self.pick(_VERBS),
            lib=self.pick(_LIBS),
            file=self.pick(_FILES).format(p=project.replace("-", "_"), m=module),
            error=self.pick(_ERRORS),
            n1=r.randrange(40, 2000),
            n2=r.randrange(5, 400),
            n3=r.randrange(2, 30),
            pct=r.randrange(55, 100),
            ver=f"{r.randrange(0, 3)}.{r.randrange(0, 30)}",
        )

    def text(self, project: str, sentences: tuple[int, int] = (2, 7)) -> str:
        parts = [self.fill(self.pick(_OPENERS), project)]
        for _ in range(self.rng.randint(*sentences)):
            parts.append(self.fill(self.pick(_SENTENCES), project))
        return " ".join(parts)

    def timestamp(self, days: int = 28) -> datetime:
        delta = timedelta(seconds=self.rng.randrange(days * 86400))
        return (self.now - delta).replace(microsecond=0)

    def session_id(self, project: str, when: datetime) -> str:
        return f"{project}-{when:%Y%m%d-%H%M%S}-{self.rng.getrandbits(24):06x}"


@dataclass
class _Conversation:
    id: str
    content: str
    embedding: list[float]
    project: str
    timestamp: datetime
    session_id: str
    row: tuple[Any, ...]  # values for the target table, in column order


def _conversations(
    gen: _Gen, count: int, legacy: bool, start: datetime | None = None
) -> list[_Conversation]:
    """Rows grouped in sessions of a few turns; turn_parent_id chains each session."""
    out: list[_Conversation] = []
    rng = gen.rng
    while len(out) < count:
        project = gen.pick(_PROJECTS)
        when = gen.timestamp() if start is None else start
        session = gen.session_id(project, when)
        previous: str | None = None
        for _ in range(min(rng.randint(1, 6), count - len(out))):
            cid = _uuid(rng)
            content = gen.text(project)
            emb = gen.embedding(project)
            meta = {
                "tokens": rng.randrange(200, 9000),
                "model": gen.pick(("claude-sonnet", "claude-opus", "claude-haiku")),
                "tool_calls": rng.randrange(0, 12),
                "cwd": f"/home/dev/projects/{project}",
            }
            row: tuple[Any, ...]
            if legacy:
                meta |= {"session_id": session, "type": "conversation"}
                row = (cid, content, emb, project, when, json.dumps(meta))
            else:
                accessed = rng.random() < 0.6
                row = (
                    cid,
                    content,
                    emb,
                    gen.pick(_CATEGORIES),
                    gen.pick(_SUBCATEGORIES),
                    round(rng.uniform(0.1, 1.0), 3),
                    gen.pick(_TIERS),
                    rng.randrange(1, 40) if accessed else 0,
                    when + timedelta(hours=rng.randrange(1, 200)) if accessed else None,
                    project,
                    "default" if rng.random() < 0.9 else f"team-{project}",
                    when,
                    session,
                    "default",
                    content.lower(),
                    gen.pick(_REASONINGS),
                    json.dumps(meta),
                    gen.pick((*SOURCE_TYPES, "claude_code", "claude_code", None)),
                    previous,
                    out[rng.randrange(len(out))].id if out and rng.random() < 0.2 else None,
                )
            out.append(_Conversation(cid, content, emb, project, when, session, row))
            previous = cid
            when += timedelta(seconds=rng.randrange(30, 900))
    return out


def _reflections(
    gen: _Gen,
    count: int,
    legacy: bool,
    entity_names: Sequence[str],
    start: datetime | None = None,
) -> list[tuple[Any, ...]]:
    rng = gen.rng
    rows: list[tuple[Any, ...]] = []
    for _ in range(count):
        project = gen.pick(_PROJECTS)
        when = gen.timestamp(42) if start is None else start
        content = gen.text(project, (1, 4))
        emb = gen.embedding(project)
        tags = sorted(rng.sample(_TAGS, rng.randint(1, 4)))
        rid = _uuid(rng)
        if legacy:
            meta = {"source": "reflect_on_past", "author": "claude"}
            rows.append((rid, content, emb, project, tags, when, json.dumps(meta)))
            continue
        related = sorted(rng.sample(list(entity_names), min(len(entity_names), rng.randint(0, 3))))
        used = rng.random() < 0.5
        rows.append(
            (
                rid,
                content,
                emb,
                gen.pick(_REFLECTION_CATEGORIES),
                round(rng.uniform(0.2, 1.0), 3),
                gen.pick(_TIERS),
                tags,
                related,
                when,
                project,
                "default",
                rng.randrange(0, 25),
                when + timedelta(hours=rng.randrange(1, 300)) if used else None,
                when,
                when + timedelta(minutes=rng.randrange(0, 5000)) if used else None,
                gen.pick(_INSIGHT_TYPES),
                rng.randrange(0, 15) if used else 0,
                when + timedelta(hours=rng.randrange(1, 300)) if used else None,
                round(rng.uniform(0.4, 0.99), 3),
                hashlib.sha256(content.encode()).digest(),
                gen.pick(_SUBCATEGORIES),
                json.dumps({"source": "store_reflection", "session_tags": tags[:2]}),
            )
        )
    return rows


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert rows column-wise: one statement, each column passed as a list and unnested.

    Several times faster than ``executemany`` (which runs one INSERT per row).
    """
    if not rows:
        return
    columns = [list(col) for col in zip(*rows, strict=True)]
    select = ", ".join("unnest(?)" for _ in columns)
    conn.execute(f"INSERT INTO {table} SELECT {select}", columns)


def _reflection_tag_rows(rows: Sequence[tuple[Any, ...]], legacy: bool) -> list[tuple[str, str]]:
    tag_index = 4 if legacy else 6
    return [(r[0], tag) for r in rows for tag in r[tag_index]]


def _table_names(conn: duckdb.DuckDBPyConnection) -> list[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_type = 'BASE TABLE' ORDER BY table_name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def _count_rows(path: Path) -> dict[str, int]:
    """Row counts of every table, from a read-only connection (keeps the WAL intact)."""
    conn = _connect(path, read_only=True)
    try:
        counts: dict[str, int] = {}
        for name in _table_names(conn):
            row = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()
            counts[name] = int(row[0]) if row else 0
        return counts
    finally:
        conn.close()


def _conversations_table(conn: duckdb.DuckDBPyConnection) -> tuple[str, bool]:
    names = _table_names(conn)
    if "conversations_v2" in names:
        return "conversations_v2", False
    if "conversations" in names:
        return "conversations", True
    raise ValueError("no conversations_v2 or conversations table in reflection database")


def _connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(path), read_only=read_only)
    # No progress bar: long bulk statements would print it to the terminal.
    conn.execute("SET enable_progress_bar = false")
    return conn


def _open_for_wal(path: Path) -> duckdb.DuckDBPyConnection:
    """Open ``path`` so that what is committed stays in the WAL after ``close()``."""
    conn = _connect(path)
    # Required: without it close() checkpoints and deletes the WAL.
    conn.execute("PRAGMA disable_checkpoint_on_shutdown")
    # Defensive: never auto-checkpoint, never bypass the WAL for large commits.
    for setting in (
        "SET checkpoint_threshold = '1TB'",
        "SET auto_checkpoint_skip_wal_threshold = 1099511627776",
    ):
        with contextlib.suppress(duckdb.Error):  # setting renamed in a later DuckDB
            conn.execute(setting)
    return conn


def _verify_wal(path: Path, table: str, expected_rows: int) -> None:
    wal = _wal_path(path)
    if not wal.exists() or wal.stat().st_size == 0:
        raise RuntimeError(f"expected uncheckpointed rows in {wal}, but it is missing or empty")
    seen = _count_rows(path).get(table, -1)
    if seen != expected_rows:
        raise RuntimeError(
            f"{table}: a fresh connection sees {seen} rows, expected {expected_rows}"
        )
    if not wal.exists():  # pragma: no cover - read-only connections must not merge the WAL
        raise RuntimeError(f"{wal} disappeared after a read-only connection")


# --------------------------------------------------------------------------- schema setup

_Grow = Callable[[duckdb.DuckDBPyConnection], None]


def _create_reflection_schema(conn: duckdb.DuckDBPyConnection, legacy: bool) -> None:
    if legacy:
        statements: tuple[str, ...] = (
            _LEGACY_CONVERSATIONS_DDL,
            _LEGACY_REFLECTIONS_DDL,
            *_EXTRA_REFLECTION_DDL,
            *_EXTRA_LEGACY_DDL,
        )
    else:
        statements = (
            _CONVERSATIONS_V2_DDL,
            _REFLECTIONS_V2_DDL,
            *_EXTRA_REFLECTION_DDL,
            *_EXTRA_V2_DDL,
        )
    for sql in statements:
        conn.execute(sql)


def _fill_knowledge_graph(
    path: Path, gen: _Gen, entities: int, relations: int, grow: _Grow | None = None
) -> list[str]:
    """Create and fill the knowledge graph (``grow`` adds bulk rows); returns entity names."""
    rng = gen.rng
    ent_rows: list[tuple[Any, ...]] = []
    names: list[str] = []
    for i in range(entities):
        project = gen.pick(_PROJECTS)
        etype = (
            _ENTITY_TYPES[i % len(_ENTITY_TYPES)]
            if i < len(_ENTITY_TYPES)
            else gen.pick(_ENTITY_TYPES)
        )
        name = gen.fill(gen.pick(_ENTITY_NAMES), project)
        if name in names:
            name = f"{name} #{i}"
        names.append(name)
        created = gen.timestamp(60)
        observations = [
            gen.fill(gen.pick(_OBSERVATIONS), project) for _ in range(rng.randint(0, 4))
        ]
        ent_rows.append(
            (
                _uuid(rng),
                name,
                etype,
                observations,
                json.dumps({"project": project, "confidence": round(rng.uniform(0.5, 1), 2)}),
                created,
                created + timedelta(hours=rng.randrange(0, 500)),
                json.dumps({"source": gen.pick(("auto_extract", "manual", "reflection"))}),
                gen.embedding(project) if rng.random() < 0.65 else None,
            )
        )
    rel_rows: list[tuple[Any, ...]] = []
    for _ in range(relations if entities >= 2 else 0):
        a, b = rng.sample(range(entities), 2)
        created = max(ent_rows[a][5], ent_rows[b][5]) + timedelta(minutes=rng.randrange(1, 900))
        rel_rows.append(
            (
                _uuid(rng),
                ent_rows[a][0],
                ent_rows[b][0],
                gen.pick(_RELATION_TYPES),
                json.dumps({"weight": round(rng.uniform(0.1, 1.0), 3)}),
                created,
                created,
                json.dumps({"source": "auto_extract"}),
            )
        )
    conn = _connect(path)
    try:
        for sql in _KG_DDL:
            conn.execute(sql)
        _insert(conn, "kg_entities", ent_rows)
        _insert(conn, "kg_relationships", rel_rows)
        if grow is not None:
            grow(conn)
        conn.execute("CHECKPOINT")
    finally:
        conn.close()
    return names


def _fill_reflection(
    path: Path,
    gen: _Gen,
    legacy: bool,
    conversations: int,
    reflections: int,
    entity_names: Sequence[str],
    grow: _Grow | None = None,
) -> None:
    rng = gen.rng
    convs = _conversations(gen, conversations, legacy)
    convs.sort(key=lambda c: c.timestamp)
    refl = _reflections(gen, reflections, legacy, entity_names)
    sessions = sorted({c.session_id for c in convs})
    links: list[tuple[Any, ...]] = []
    for i in range(1, min(len(sessions), 6)):
        links.append(
            (
                _uuid(rng),
                sessions[i - 1],
                sessions[i],
                gen.pick(("continuation", "reference", "related")),
                "Picked up where the previous session stopped.",
                gen.timestamp(),
                json.dumps({"auto": True}),
            )
        )
    conn = _connect(path)
    try:
        _create_reflection_schema(conn, legacy)
        _insert(conn, "conversations" if legacy else "conversations_v2", [c.row for c in convs])
        _insert(conn, "reflections" if legacy else "reflections_v2", refl)
        _insert(conn, "reflection_tags", _reflection_tag_rows(refl, legacy))
        _insert(conn, "session_links", links)
        if not legacy and convs:
            log = [
                (
                    _uuid(rng),
                    gen.pick(convs).id if rng.random() < 0.8 else None,
                    gen.pick(("search", "retrieve", "promote", "demote")),
                    gen.fill("how did we {verb} the {module} code", gen.pick(_PROJECTS)),
                    gen.timestamp(),
                )
                for _ in range(min(20, len(convs)))
            ]
            _insert(conn, "memory_access_log", log)
        if grow is not None:
            grow(conn)
        conn.execute("CHECKPOINT")
    finally:
        conn.close()


def _append_wal(
    path: Path,
    gen: _Gen,
    conversations: int,
    reflections: int,
    entity_names: Sequence[str],
    checkpoint: bool,
) -> tuple[list[str], dict[str, int]]:
    """Append rows to the reflection database; unless ``checkpoint``, they stay in the WAL."""
    conn = _open_for_wal(path) if not checkpoint else _connect(path)
    try:
        table, legacy = _conversations_table(conn)
        last = conn.execute(f"SELECT max(timestamp) FROM {table}").fetchone()
        start = last[0] if last and isinstance(last[0], datetime) else gen.now
        convs = _conversations(gen, conversations, legacy, start + timedelta(minutes=7))
        refl = _reflections(gen, reflections, legacy, entity_names, start + timedelta(minutes=11))
        tags = _reflection_tag_rows(refl, legacy)
        conn.execute("BEGIN TRANSACTION")
        _insert(conn, table, [c.row for c in convs])
        _insert(conn, "reflections" if legacy else "reflections_v2", refl)
        _insert(conn, "reflection_tags", tags)
        conn.execute("COMMIT")
        expected = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        if checkpoint:
            conn.execute("CHECKPOINT")
    finally:
        conn.close()
    counts = {
        table: len(convs),
        "reflections" if legacy else "reflections_v2": len(refl),
        "reflection_tags": len(tags),
    }
    if not checkpoint and (convs or refl):
        _verify_wal(path, table, int(expected[0]) if expected else -1)
    return [c.id for c in convs], {k: v for k, v in counts.items() if v}


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _info(
    data_dir: Path,
    reflection: Path,
    kg: Path,
    wal_counts: dict[str, int],
    wal_ids: Sequence[str],
) -> SampleInfo:
    counts = _count_rows(reflection)
    legacy = "conversations_v2" not in counts
    counts |= _count_rows(kg)
    return SampleInfo(
        data_dir=data_dir,
        reflection_path=reflection,
        knowledge_graph_path=kg,
        legacy=legacy,
        row_counts=counts,
        wal_row_counts=dict(wal_counts),
        wal_conversation_ids=tuple(wal_ids),
    )


# --------------------------------------------------------------------------- public API


def create_sample_databases(
    data_dir: Path,
    *,
    conversations: int = 200,
    reflections: int = 50,
    entities: int = 40,
    relations: int = 60,
    wal_conversations: int = 5,
    seed: int = 0,
    legacy: bool = False,
    now: datetime | None = None,
    overwrite: bool = False,
) -> SampleInfo:
    """Create ``reflection.duckdb`` and ``knowledge_graph.duckdb`` in ``data_dir``.

    ``conversations``/``reflections``/``entities``/``relations`` rows are checkpointed into
    the database files; then ``wal_conversations`` more conversations (and, if that is
    non-zero, two reflections) are committed but left only in ``reflection.duckdb.wal``.
    Content is deterministic for a given ``seed`` (timestamps are relative to ``now``,
    default :data:`SAMPLE_EPOCH`). ``legacy=True`` creates the legacy ``conversations``/
    ``reflections`` tables instead of the ``_v2`` ones. Existing database files in
    ``data_dir`` are only replaced when ``overwrite=True`` (else ``FileExistsError``).
    """
    _check_counts(
        conversations=conversations,
        reflections=reflections,
        entities=entities,
        relations=relations,
        wal_conversations=wal_conversations,
    )
    data_dir = Path(data_dir)
    reflection, kg = _prepare_dir(data_dir, overwrite)
    gen = _Gen(seed, now or SAMPLE_EPOCH)
    names = _fill_knowledge_graph(kg, gen, entities, relations)
    _fill_reflection(reflection, gen, legacy, conversations, reflections, names)
    wal_ids: list[str] = []
    wal_counts: dict[str, int] = {}
    if wal_conversations:
        wal_gen = _Gen(f"{seed}-wal", now or SAMPLE_EPOCH)
        wal_ids, wal_counts = _append_wal(
            reflection,
            wal_gen,
            wal_conversations,
            2 if wal_conversations > 1 else 1,
            names,
            checkpoint=False,
        )
    return _info(data_dir, reflection, kg, wal_counts, wal_ids)


def add_conversations(
    data_dir: Path, count: int, *, seed: int, checkpoint: bool = False
) -> list[str]:
    """Append ``count`` conversations to ``data_dir/reflection.duckdb``; return their ids.

    Works on ``conversations_v2`` or, in a legacy database, ``conversations``. The new
    rows are timestamped after the newest existing one. Unless ``checkpoint`` is true
    they stay only in the WAL (existing WAL content is kept too); with ``checkpoint``
    everything, including an older WAL, is merged into the database file.
    Repeated calls with the same seed give distinct ids.
    """
    _check_counts(count=count)
    path = Path(data_dir) / REFLECTION_DB
    if not path.exists():
        raise FileNotFoundError(path)
    existing = _count_rows(path)
    table = "conversations_v2" if "conversations_v2" in existing else "conversations"
    gen = _Gen(f"{seed}-add-{existing.get(table, 0)}", SAMPLE_EPOCH)
    ids, _ = _append_wal(path, gen, count, 0, (), checkpoint=checkpoint)
    return ids


# --------------------------------------------------------------------------- bulk growth


def _sql_list(items: Sequence[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _sql_ts(ts: datetime) -> str:
    return f"TIMESTAMP '{ts:%Y-%m-%d %H:%M:%S}'"


def _sql_embedding(key: str, seed: int) -> str:
    """384 floats in [-1, 1] from hash() of (row, dim): deterministic, unlike random()
    under parallel execution. Normalised afterwards in :func:`_bulk_source`."""
    return (
        f"list_transform(range({EMBEDDING_DIM}), lambda d: "
        f"((hash(i, d, {seed}, '{key}') % 2000001)::DOUBLE / 1000000.0 - 1.0)::FLOAT)"
    )


def _sql_text(key: str, seed: int, min_words: int, spread: int) -> str:
    return (
        f"array_to_string(list_transform(range({min_words} + "
        f"(hash(i, '{key}-len', {seed}) % {spread})::BIGINT), "
        f"lambda x: w[1 + (hash(i, x, '{key}', {seed}) % len(w))::BIGINT]), ' ') || '.'"
    )


def _pick(options: Sequence[str], key: str, seed: int) -> str:
    return f"{_sql_list(options)}[1 + (hash(i, '{key}', {seed}) % {len(options)})::BIGINT]"


def _ago(key: str, seed: int, now: datetime, days: int) -> str:
    return f"({_sql_ts(now)} - to_seconds((hash(i, '{key}', {seed}) % {days * 86400})::BIGINT))"


def _bulk_source(start: int, n: int, select: str, seed: int, emb_key: str) -> str:
    """Wrap a SELECT list over ``raw``/``v``/``n`` with generated row number ``i``."""
    return f"""
        WITH src AS (SELECT i, {_sql_list(_BULK_WORDS)} AS w
                     FROM range({start}, {start + n}) r(i)),
        raw AS (SELECT *, {_sql_embedding(emb_key, seed)} AS v FROM src),
        nrm AS (SELECT *, sqrt(list_dot_product(v, v)) AS n FROM raw)
        SELECT {select} FROM nrm
    """


def _bulk_conversations(
    conn: duckdb.DuckDBPyConnection, legacy: bool, start: int, n: int, seed: int, now: datetime
) -> None:
    emb = "list_transform(v, lambda x: (x / n)::FLOAT)"
    cid = f"md5('bulk-conv-{seed}-' || i)::UUID::VARCHAR"
    project = _pick(_PROJECTS, "project", seed)
    ts = _ago("ts", seed, now, 90)
    meta = (
        "json_object('tokens', (hash(i, 'tok') % 9000)::INTEGER, 'model', 'claude-sonnet', "
        "'bulk', true)"
    )
    if legacy:
        select = f"{cid}, {_sql_text('c', seed, 40, 90)}, {emb}, {project}, {ts}, {meta}"
        table = "conversations"
    else:
        source_types = _sql_list(SOURCE_TYPES)
        select = f"""
            {cid},
            {_sql_text("c", seed, 40, 90)} AS content,
            {emb},
            {_pick(_CATEGORIES, "cat", seed)},
            {_pick([s for s in _SUBCATEGORIES if s], "sub", seed)},
            ((hash(i, 'imp', {seed}) % 1000)::DOUBLE / 1000.0)::REAL,
            {_pick(_TIERS, "tier", seed)},
            (hash(i, 'acc', {seed}) % 40)::INTEGER,
            {ts} + INTERVAL 2 HOUR,
            {project},
            'default',
            {ts},
            'bulk-session-{seed}-' || (i // 5),
            'default',
            lower(content),
            CASE WHEN i % 3 = 0 THEN {_sql_text("r", seed, 8, 20)} END,
            {meta}::VARCHAR,
            {source_types}[1 + (hash(i, 'src', {seed}) % {len(SOURCE_TYPES)})::BIGINT],
            CASE WHEN i % 5 <> 0 THEN md5('bulk-conv-{seed}-' || (i - 1))::UUID::VARCHAR END,
            NULL
        """
        table = "conversations_v2"
    conn.execute(f"INSERT INTO {table} {_bulk_source(start, n, select, seed, 'ce')}")


def _bulk_reflections(
    conn: duckdb.DuckDBPyConnection, legacy: bool, start: int, n: int, seed: int, now: datetime
) -> None:
    emb = "list_transform(v, lambda x: (x / n)::FLOAT)"
    rid = f"md5('bulk-refl-{seed}-' || i)::UUID::VARCHAR"
    project = _pick(_PROJECTS, "rproject", seed)
    ts = _ago("rts", seed, now, 90)
    tags = f"[{_pick(_TAGS, 'tag1', seed)}, {_pick(_TAGS, 'tag2', seed)}]"
    if legacy:
        select = (
            f"{rid}, {_sql_text('rc', seed, 25, 60)}, {emb}, {project}, {tags}, {ts}, "
            "json_object('bulk', true)"
        )
        table = "reflections"
    else:
        select = f"""
            {rid},
            {_sql_text("rc", seed, 25, 60)} AS content,
            {emb},
            {_pick(_REFLECTION_CATEGORIES, "rcat", seed)},
            ((hash(i, 'rimp', {seed}) % 1000)::DOUBLE / 1000.0)::REAL,
            {_pick(_TIERS, "rtier", seed)},
            {tags},
            [{_pick(_LIBS, "rel", seed)}],
            {ts},
            {project},
            'default',
            (hash(i, 'racc', {seed}) % 25)::INTEGER,
            {ts} + INTERVAL 3 HOUR,
            {ts},
            {ts} + INTERVAL 1 HOUR,
            {_pick(_INSIGHT_TYPES, "itype", seed)},
            (hash(i, 'use', {seed}) % 15)::INTEGER,
            {ts} + INTERVAL 5 HOUR,
            ((hash(i, 'conf', {seed}) % 600)::DOUBLE / 1000.0 + 0.4)::REAL,
            unhex(sha256(content))::BLOB,
            {_pick([s for s in _SUBCATEGORIES if s], "rsub", seed)},
            json_object('bulk', true)
        """
        table = "reflections_v2"
    conn.execute(f"INSERT INTO {table} {_bulk_source(start, n, select, seed, 're')}")


def _bulk_entities(
    conn: duckdb.DuckDBPyConnection, start: int, n: int, seed: int, now: datetime
) -> None:
    ts = _ago("ets", seed, now, 120)
    select = f"""
        md5('bulk-ent-{seed}-' || i)::UUID::VARCHAR,
        {_pick(_LIBS, "ename", seed)} || ' ' || {_pick(_MODULES, "emod", seed)} || ' #' || i,
        {_pick(_ENTITY_TYPES, "etype", seed)},
        list_transform(range((hash(i, 'nobs', {seed}) % 5)::BIGINT),
            lambda k: array_to_string(list_transform(range(8 + k * 3),
                lambda x: w[1 + (hash(i, k, x, {seed}) % len(w))::BIGINT]), ' ')),
        json_object('project', {_pick(_PROJECTS, "eproj", seed)}),
        {ts},
        {ts} + INTERVAL 6 HOUR,
        json_object('source', 'bulk'),
        CASE WHEN hash(i, 'hasemb', {seed}) % 10 < 7
             THEN list_transform(v, lambda x: (x / n)::FLOAT) END
    """
    conn.execute(f"INSERT INTO kg_entities {_bulk_source(start, n, select, seed, 'ee')}")


def _bulk_relations(
    conn: duckdb.DuckDBPyConnection, start: int, n: int, seed: int, now: datetime, entities: int
) -> None:
    ts = _ago("rlts", seed, now, 120)
    ent = "md5('bulk-ent-{seed}-' || ((hash(i, '{k}', {seed}) % {m})::BIGINT))::UUID::VARCHAR"
    conn.execute(
        f"""
        INSERT INTO kg_relationships
        SELECT md5('bulk-rel-{seed}-' || i)::UUID::VARCHAR,
               {ent.format(seed=seed, k="from", m=max(entities, 1))},
               {ent.format(seed=seed, k="to", m=max(entities, 1))},
               {_pick(_RELATION_TYPES, "rtype", seed)},
               json_object('weight', (hash(i, 'wt') % 1000)::DOUBLE / 1000.0),
               {ts}, {ts}, json_object('source', 'bulk')
        FROM range({start}, {start + n}) r(i)
        """
    )


def _add_reflection_units(
    conn: duckdb.DuckDBPyConnection, legacy: bool, start: int, n: int, seed: int, now: datetime
) -> None:
    """Units ``[start, start + n)``: one conversation each, one reflection per four."""
    if n > 0:
        _bulk_conversations(conn, legacy, start, n, seed, now)
        _bulk_reflections(conn, legacy, start // 4, (start + n) // 4 - start // 4, seed, now)


def _add_kg_units(
    conn: duckdb.DuckDBPyConnection, start: int, n: int, seed: int, now: datetime
) -> None:
    """Units ``[start, start + n)``: one entity each, three relationships per two."""
    if n > 0:
        _bulk_entities(conn, start, n, seed, now)
        rel_start, rel_end = start * 3 // 2, (start + n) * 3 // 2
        _bulk_relations(conn, rel_start, rel_end - rel_start, seed, now, start + n)


# Size of the small base sample grow_to_size() starts from.
_GROW_BASE = {"conversations": 20, "reflections": 5, "entities": 10, "relations": 15}
# First guesses of checkpointed bytes per unit (measured with DuckDB 2.0.1).
_EST_REFLECTION_UNIT = 2300.0
_EST_KG_UNIT = 1900.0
_MAX_PROBE_BYTES = 16 * _MIB


def _build_grown(
    reflection: Path,
    kg: Path,
    *,
    legacy: bool,
    seed: int,
    now: datetime,
    reflection_units: int,
    kg_units: int,
) -> None:
    """Base sample plus bulk units, written with a single checkpoint per database.

    One checkpoint keeps the files free of the blocks that every extra checkpoint
    leaves behind (rewritten row groups and indexes), so their size is predictable.
    """

    def bulk(add: Callable[[duckdb.DuckDBPyConnection], None]) -> _Grow:
        def run(conn: duckdb.DuckDBPyConnection) -> None:
            # Keep bulk appends in memory until the checkpoint: with optimistic writes,
            # appends of more than a row group are written twice and the first copy
            # stays in the file as free blocks (a 280 MB database became a 510 MB file).
            conn.execute("SET enable_optimistic_write = false")
            # ALPRD packs the FLOAT[384] column by a ratio that drifts with the row count
            # (~86% of raw at 50k rows, ~100% at 100k), which made file size nonlinear
            # in the rows; without it the size per row stays constant.
            conn.execute("SET disabled_compression_methods = 'alprd'")
            add(conn)

        return run

    gen = _Gen(seed, now)
    names = _fill_knowledge_graph(
        kg,
        gen,
        _GROW_BASE["entities"],
        _GROW_BASE["relations"],
        grow=bulk(lambda conn: _add_kg_units(conn, 0, kg_units, seed, now)),
    )
    _fill_reflection(
        reflection,
        gen,
        legacy,
        _GROW_BASE["conversations"],
        _GROW_BASE["reflections"],
        names,
        grow=bulk(lambda conn: _add_reflection_units(conn, legacy, 0, reflection_units, seed, now)),
    )


def _probe_units(missing_bytes: int, est_per_unit: float) -> int:
    """Units for the calibration probe: about the missing size, at most 16 MiB."""
    return max(int(min(missing_bytes, _MAX_PROBE_BYTES) / est_per_unit), 100)


def _calibrated_build(
    which: str,
    path: Path,
    target_bytes: int,
    scratch: Path,
    *,
    legacy: bool,
    seed: int,
    now: datetime,
) -> None:
    """Build one database of about ``target_bytes`` (``which``: reflection or kg).

    Units are calibrated on probe files in ``scratch``; each attempt is a fresh build with
    a single checkpoint. Appending to a finished file instead is no good: a checkpoint
    after an append rewrites the last row group, and the old copy stays behind as free
    blocks (a 5.8 MiB file became 10.8 MiB after adding 2% more rows).
    """
    est = _EST_REFLECTION_UNIT if which == "reflection" else _EST_KG_UNIT

    def build(dest: Path, units: int) -> int:
        other = scratch / "companion.duckdb"
        for stale in (dest, _wal_path(dest), other, _wal_path(other)):
            stale.unlink(missing_ok=True)
        if which == "reflection":
            _build_grown(
                dest, other, legacy=legacy, seed=seed, now=now, reflection_units=units, kg_units=0
            )
        else:
            _build_grown(
                other, dest, legacy=legacy, seed=seed, now=now, reflection_units=0, kg_units=units
            )
        return dest.stat().st_size

    probe = scratch / "probe.duckdb"
    base = build(probe, 0)
    missing = target_bytes - base
    if missing <= 0:
        build(path, 0)
        return
    units = _probe_units(missing, est)
    grown = build(probe, units)
    per_unit = (grown - base) / units if grown > base else est
    units = max(int(missing / per_unit), 1)
    for _ in range(3):
        size = build(path, units)
        if abs(size - target_bytes) <= 0.05 * target_bytes or size <= base:
            break
        per_unit = (size - base) / units
        units = max(int(missing / per_unit), 1)


def grow_to_size(
    data_dir: Path,
    reflection_mb: float,
    knowledge_graph_mb: float,
    *,
    seed: int = 0,
    wal_conversations: int = 5,
    legacy: bool = False,
    now: datetime | None = None,
    overwrite: bool = False,
) -> SampleInfo:
    """Create sample databases whose files are about ``reflection_mb``/``knowledge_graph_mb``.

    Sizes are MiB of the ``.duckdb`` files (the WAL comes on top). A small base sample
    (as :func:`create_sample_databases` makes) is completed with rows generated in bulk
    by SQL inside DuckDB: four conversations per reflection, three relationships per two
    entities (70% with an embedding). The number of rows is calibrated on throw-away
    probe files (in the system temp dir), so each file is written with one checkpoint
    and lands within ~5% of its target (targets below the ~1-3 MiB base sample give the
    base sample). Finally ``wal_conversations`` conversations are left only in the WAL.
    """
    if reflection_mb < 0 or knowledge_graph_mb < 0:
        raise ValueError("target sizes must be >= 0")
    _check_counts(wal_conversations=wal_conversations)
    data_dir = Path(data_dir)
    when = now or SAMPLE_EPOCH
    reflection, kg = _prepare_dir(data_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="akosha-sample-probe-") as tmp:
        for which, path, mb in (
            ("reflection", reflection, reflection_mb),
            ("kg", kg, knowledge_graph_mb),
        ):
            _calibrated_build(
                which, path, int(mb * _MIB), Path(tmp), legacy=legacy, seed=seed, now=when
            )

    wal_ids: list[str] = []
    wal_counts: dict[str, int] = {}
    if wal_conversations:
        wal_gen = _Gen(f"{seed}-grow-wal", when)
        wal_ids, wal_counts = _append_wal(
            reflection, wal_gen, wal_conversations, 1, (), checkpoint=False
        )
    return _info(data_dir, reflection, kg, wal_counts, wal_ids)
