"""Export files on disk: private to their agent, gone with their conversation and at exit.

Layout: a 0700 root from ``tempfile.mkdtemp``, one 0700 folder per agent (named by a hash, so a login
name never becomes a path), files created 0600 with an unguessable random part in their name. Copies
made elsewhere (the web framework serves a copy from its own cache) are registered with
``remove_with`` and deleted with the originals.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

_Key = tuple[str | None, int]  # (agent, conversation id)


class ExportFiles:
    """One folder tree of exports for the process. Thread-safe."""

    def __init__(self, parent: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="specdesk-export-", dir=parent))  # mode 0700
        self._files: dict[_Key, list[Path]] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _remove_all, self.root, self._files)  # also at exit

    def write(self, agent: str | None, conversation_id: int, kind: str, body: str) -> Path:
        """Write one export of the conversation as UTF-8 text; returns its path."""
        name = "local" if agent is None else hashlib.sha256(agent.encode("utf-8")).hexdigest()[:24]
        folder = self.root / name
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"conversation-{conversation_id}-{secrets.token_urlsafe(16)}.{kind}"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(body)
        self.remove_with(agent, conversation_id, path)
        return path

    def remove_with(self, agent: str | None, conversation_id: int, path: Path) -> None:
        """Delete `path` (a copy of an export) when the conversation's exports are forgotten."""
        with self._lock:
            self._files.setdefault((agent, conversation_id), []).append(path)

    def forget(self, agent: str | None, conversation_id: int) -> None:
        """Delete every export of the conversation and every copy registered with it."""
        with self._lock:
            paths = self._files.pop((agent, conversation_id), [])
        _remove_paths(paths)

    def close(self) -> None:
        """Delete everything now (shutdown); also happens at interpreter exit."""
        self._finalizer()


def _remove_paths(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # a copy's own folder, once empty


def _remove_all(root: Path, files: dict[_Key, list[Path]]) -> None:
    _remove_paths([path for paths in files.values() for path in paths])
    shutil.rmtree(root, ignore_errors=True)
