"""Fixtures: a real SQLite file per test (WAL and locking only behave for real on files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from specdesk.db import ChatRepository, make_engine


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "specdesk.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{db_path}")
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> ChatRepository:
    return ChatRepository(engine)
