"""Engine setup: SQLite pragmas, transaction control for threads, schema creation at start.

Any SQLAlchemy URL works; the SQLite-specific parts only switch on for ``sqlite`` URLs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import QueuePool

from specdesk.db.migrations import upgrade_schema

# How long a writer waits for another writer's lock before SQLite gives up with "database is locked".
BUSY_TIMEOUT_MS = 10_000
# Execution option read by the "begin" listener below; see writer().
_BEGIN_OPTION = "specdesk_sqlite_begin"


def make_engine(url: str, *, create_schema: bool = True, echo: bool = False) -> Engine:
    """Create an engine for ``url`` ready for a threaded server, and bring its schema up to date.

    For SQLite files: WAL journal, ``busy_timeout``, ``synchronous=NORMAL`` and ``foreign_keys=ON`` on
    every new connection; connections may cross threads; the parent directory is created. An
    in-memory SQLite URL gets a single connection, one thread at a time, so every thread sees the same database.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        # The pool hands connections to whichever Gradio worker thread asks; the driver's own
        # same-thread check would reject that even though the pool never shares one concurrently.
        kwargs["connect_args"] = {"check_same_thread": False}
        if _is_memory(parsed):
            # One connection is the one database, handed to one thread at a time: a StaticPool shared it with
            # every thread at once, and their transactions interleaved (lost writes, "cannot start a
            # transaction within a transaction"). The others wait for it, as for a file's write lock.
            kwargs.update(poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=BUSY_TIMEOUT_MS / 1000)
        else:
            _make_parent_dir(parsed)
            kwargs.update(pool_size=8, max_overflow=16, pool_timeout=30)
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if is_sqlite:
        _install_sqlite_listeners(engine)
    if create_schema:
        upgrade_schema(writer(engine))
    return engine


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take SQLite's write lock up front.

    A deferred transaction that reads and then writes can fail with "database is locked" without
    waiting (SQLITE_BUSY_SNAPSHOT: its read snapshot went stale), and its read-then-write (e.g. next
    message position) is racy. ``BEGIN IMMEDIATE`` waits on ``busy_timeout`` instead. Harmless on
    other databases, where the option is ignored.
    """
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def _install_sqlite_listeners(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 driver (its legacy mode skips BEGIN before
        # SELECT and DDL); the "begin" listener emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor vice versa
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable in WAL mode except on power loss
            cursor.execute("PRAGMA foreign_keys=ON")  # off by default per connection: cascades need it
        finally:
            cursor.close()
        # SQLite's built-in lower() folds ASCII only; ILIKE compiles to lower(x) LIKE lower(y), so
        # replacing it makes conversation search find "Müller" when the agent types "MÜLLER".
        dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _unicode_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _is_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or url.query.get("mode") == "memory"


def _make_parent_dir(url: URL) -> None:
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (uri=true): the path follows the scheme
        database = database[len("file:") :].split("?", 1)[0]
    Path(database).parent.mkdir(parents=True, exist_ok=True)
