"""The repository on PostgreSQL (the multi-node history store), through the same SQLAlchemy URL setting:
every repository test that needs only a repository runs here again, on a throwaway cluster
(tests/postgres.py), plus what only a server database shows: concurrent writers from many threads.

Skipped, with the reason, where PostgreSQL or psycopg is not installed.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from specdesk.db import ChatRepository, Role, make_engine
from tests.db import test_agent_scoping, test_repository
from tests.postgres import postgres_cluster

pytestmark = pytest.mark.timeout(300)

CASES: list[Callable[[ChatRepository], Any]] = [
    fn
    for module in (test_repository, test_agent_scoping)
    for name, fn in vars(module).items()
    if name.startswith("test_") and list(inspect.signature(fn).parameters) == ["repo"]
]
_database_ids = itertools.count()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture
def pg_repo(server_url: str) -> Iterator[ChatRepository]:
    """A repository on a fresh, empty database of the cluster (schema created by make_engine)."""
    name = f"t{next(_database_ids)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine = make_engine(server_url.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield ChatRepository(engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name}"))
        admin.dispose()


def test_the_repository_tests_found_something_to_rerun() -> None:
    assert len(CASES) >= 10, [c.__name__ for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}")
def test_repository_on_postgres(case: Callable[[ChatRepository], Any], pg_repo: ChatRepository) -> None:
    case(pg_repo)


def test_concurrent_writers_get_distinct_positions(pg_repo: ChatRepository) -> None:
    # Positions are read-then-written: on PostgreSQL the conversation's row lock makes writers take turns.
    conversation = pg_repo.create_conversation("busy")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(10):
                pg_repo.add_message(conversation.id, Role.USER, f"writer {n} message {i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    positions = [m.position for m in pg_repo.get_conversation(conversation.id).messages]
    assert sorted(positions) == list(range(40))
