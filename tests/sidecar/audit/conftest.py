"""A real PostgreSQL server for the store tests, started from Debian's binaries (scripts/setup.sh installs them).

As root, initdb and the server run as the ``postgres`` user (PostgreSQL refuses to run as
root). The server listens on 127.0.0.1 on a free port with its socket in a temp dir; each
test gets a fresh database.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile

import pytest

from sidecar.testing import free_port


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PostgresServer:
    def __init__(self, bindir: str):
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="audit-pg-")
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.root, "data")
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        out = subprocess.run(self._as + list(args), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {out.stdout}\n{out.stderr}")

    def start(self) -> "PostgresServer":
        self._run(f"{self.bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "audit", "--no-sync")
        return self.resume()

    def resume(self) -> "PostgresServer":
        """Start the server on its data directory (again, after :meth:`halt`)."""
        self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-w", "-t", "60", "-l", os.path.join(self.root, "log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on", "start")
        return self

    def halt(self) -> None:
        """Stop the server, keeping its data: the store is down."""
        self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://audit@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        import psycopg

        name = f"audit_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def _require_postgres() -> str:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (scripts/setup.sh installs Debian's postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install -e '.[dev]')")
    return bindir


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer(_require_postgres()).start()
    yield server
    server.stop()


@pytest.fixture
def own_postgres_server():
    """A server of this test's own, which the test may take down."""
    server = PostgresServer(_require_postgres()).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server):
    return postgres_server.new_database()
