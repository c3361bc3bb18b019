"""A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` as an unprivileged user, listening on
127.0.0.1 only, on a free port, in a temporary folder; removed at the end.

Needs Debian's `postgresql` package (binaries in /usr/lib/postgresql/<version>/bin) and `psycopg`;
`postgres_url()` skips the calling test with the reason when either is missing. As root (CI), the
cluster runs as the `postgres` user the Debian package creates (initdb refuses root).
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster and yield its SQLAlchemy URL (database `specdesk`); stop and delete it afterwards."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e .[postgres]")
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    user = "postgres" if as_root else getpass.getuser()
    prefix = ["runuser", "-u", user, "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="specdesk-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if as_root:
        shutil.chown(root, user)
        shutil.chown(sockets, user)
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "specdesk", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "specdesk", "specdesk")
            yield f"postgresql+psycopg://specdesk@127.0.0.1:{port}/specdesk"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL failed: {exc.cmd}: {exc.stderr.decode(errors='replace')}") from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)
