"""A tiny schema migrator so a newer SpecDesk can open a database file written by an older one.

At every start, inside one write transaction:

1. create the tables and indexes that are missing (a fresh file gets the whole current schema);
2. add the columns an older file lacks — additive changes need no hand-written step, which is why
   every NOT NULL column in db/models.py carries a constant ``server_default``;
3. run the versioned steps above the version stored in ``schema_version``, in order, for changes that
   are not purely additive (renames, backfills, splitting a column).

A fresh database is stamped with the latest version without running the steps: it already has the
current shape. A database with tables but no ``schema_version`` row predates versioning: version 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, insert, inspect, select, update
from sqlalchemy.schema import CreateColumn

from specdesk.db.demo_models import DEMO_ORDERS, DemoOrder
from specdesk.db.models import Base, Conversation, Message, schema_version


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version after this step; steps run in increasing order
    description: str
    apply: Callable[[Connection], None]


def _baseline(conn: Connection) -> None:
    # Version 1 is the first released schema; steps 1-2 above already bring any older file to it.
    pass


def _conversation_owner(conn: Connection) -> None:
    # conversations.agent (nullable, indexed) is added by the additive pass; existing rows stay
    # unowned (NULL), which only an unscoped (login off) console lists. The version bump matters on
    # its own: an older SpecDesk, which knows nothing of owners and would show every agent everything,
    # now refuses this file (SchemaTooNewError) instead of opening it.
    pass


def _tool_calls(conn: Connection) -> None:
    # messages.tool_calls / tool_call_id and the demo tables are added by the additive pass (and the demo
    # orders seeded with their table). The bump matters again: an older SpecDesk cannot read "tool" messages.
    pass


def _ids_never_reused(conn: Connection) -> None:
    # SQLite hands out max(id) + 1, so the newest conversation's id, once deleted, went to the next one and a
    # tab still showing the deleted conversation wrote into the new one. AUTOINCREMENT (db/models.py) never
    # reuses an id, and needs the table rebuilt. Other databases' sequences never reuse one.
    if conn.dialect.name != "sqlite":
        return
    for table in (Base.metadata.tables[Conversation.__tablename__], Base.metadata.tables[Message.__tablename__]):
        ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table.name,))
        if "AUTOINCREMENT" not in (ddl.scalar() or "").upper():
            _rebuild_sqlite_table(conn, table)  # the parent first


def _rebuild_sqlite_table(conn: Connection, table: Table) -> None:
    """Recreate `table` in its current definition with every row, inside the migration's transaction.

    With legacy_alter_table the rename leaves the references of other tables (messages -> conversations,
    feedback -> messages) naming the table recreated under the old name; so dropping the renamed one, whose
    rows are copied already, deletes nothing through ON DELETE CASCADE."""
    old, quote = f"_old_{table.name}", conn.dialect.identifier_preparer.quote
    conn.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        for index in table.indexes:  # index names are the database's: free them for the new table's
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {quote(str(index.name))}")
        conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} RENAME TO {quote(old)}")
        table.create(conn)
        columns = ", ".join(quote(c.name) for c in table.columns)
        conn.exec_driver_sql(f"INSERT INTO {quote(table.name)} ({columns}) SELECT {columns} FROM {quote(old)}")
        conn.exec_driver_sql(f"DROP TABLE {quote(old)}")
    finally:
        conn.exec_driver_sql("PRAGMA legacy_alter_table = OFF")


_NO_DELIVERY = {"carrier": "", "tracking_number": "", "estimated_delivery": ""}  # an order not shipped yet

# Append new steps here, never edit or reorder released ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline schema", _baseline),
    Migration(2, "conversations.agent: the owning agent's login name", _conversation_owner),
    Migration(3, "tool calls on messages; demo orders, tickets and handovers", _tool_calls),
    Migration(4, "conversation and message ids never reused (SQLite AUTOINCREMENT)", _ids_never_reused),
)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer SpecDesk than this one; refusing to guess its shape."""


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return max((m.version for m in migrations), default=0)


def upgrade_schema(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database behind ``engine`` to the current schema; returns the version it ends at.

    make_engine passes ``specdesk.db.session.writer(engine)`` so that, on SQLite, two processes starting at
    once take turns (BEGIN IMMEDIATE) instead of both creating tables.
    """
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions)), f"migration versions must strictly increase: {versions}"
    target = latest_version(migrations)
    with engine.connect() as conn, _sqlite_foreign_keys_off(conn), conn.begin():
        existing = set(inspect(conn).get_table_names())
        is_fresh = Base.metadata.tables["conversations"].name not in existing
        Base.metadata.create_all(conn)  # checkfirst: only the missing tables (and their indexes)
        _add_missing_columns(conn, existing)
        _create_missing_indexes(conn)
        if DemoOrder.__tablename__ not in existing:  # created just now: the demo tools' data
            conn.execute(insert(DemoOrder), [{**_NO_DELIVERY, **order} for order in DEMO_ORDERS])
        stored = conn.scalar(select(schema_version.c.version))
        if stored is None:
            stored = target if is_fresh else 0
            conn.execute(insert(schema_version).values(version=stored))
        if stored > target:
            raise SchemaTooNewError(
                f"database schema version {stored} is newer than this app's {target}; upgrade SpecDesk"
            )
        for migration in migrations:
            if migration.version > stored:
                migration.apply(conn)
                conn.execute(update(schema_version).values(version=migration.version))
        if conn.dialect.name == "sqlite" and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
            raise RuntimeError("the schema upgrade would break references between rows; the file is left as it was")
        return target


@contextmanager
def _sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    # A rebuilt table (migration 4) drops its old copy: with foreign keys on, that would cascade into the rows
    # that reference it. Switched off outside any transaction (inside one the pragma does nothing), on after;
    # upgrade_schema checks every reference before it commits.
    raw: Any = conn.connection.dbapi_connection if conn.dialect.name == "sqlite" else None
    if raw is not None:
        raw.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = ON")


def current_version(engine: Engine) -> int | None:
    """The version stored in the database, or None when it has never been stamped."""
    with engine.connect() as conn:
        if "schema_version" not in inspect(conn).get_table_names():
            return None
        return conn.scalar(select(schema_version.c.version))


def _add_missing_columns(conn: Connection, existing_tables: set[str]) -> None:
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue  # just created with every column
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable and column.server_default is None:
                raise RuntimeError(
                    f"cannot add NOT NULL column {table.name}.{column.name} without a server_default; "
                    "give it one or write a versioned migration"
                )
            # CreateColumn renders "name TYPE DEFAULT ... NOT NULL" with the dialect's quoting.
            ddl = CreateColumn(column).compile(dialect=conn.dialect)
            table_name = conn.dialect.identifier_preparer.quote(table.name)
            conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {ddl}")


def _create_missing_indexes(conn: Connection) -> None:
    # create_all skips indexes of tables that already existed; an older file may lack newer ones.
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)
