"""A real PostgreSQL server for tests and benches, started from the installed binaries.

``initdb`` and ``pg_ctl`` run as the ``postgres`` user (through ``runuser`` when we
are root; PostgreSQL refuses to run as root) in a temporary directory, listening on
a Unix socket in that directory only (no TCP port), and stopped by ``stop()``.
``missing()`` names what is absent, for a clean skip. Used by the ``postgresql``
fixture in tests/conftest.py and by bench/storage_overhead.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

BINDIRS = ("/usr/local/bin", "/usr/local/pgsql/bin", "/usr/lib/postgresql/15/bin")


def _binary(name: str) -> Optional[str]:
    for directory in BINDIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def missing() -> Optional[str]:
    """Why a server cannot be started here, or None."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if _binary(name) is None:
            return f"PostgreSQL binary {name} not found (looked in {', '.join(BINDIRS)} and PATH)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 not installed (pip install mergekit-rlvr[search])"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    return None


class PostgresServer:
    """One server in a fresh temporary directory: ``start()``, ``url(db)``, ``stop()``."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="mkr-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.user = "postgres"
        self.started = False
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)  # the socket lives here: clients of any user connect

    def _run(self, argv: List[str], **kwargs):
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        proc = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=120, **kwargs)
        if proc.returncode != 0:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {proc.stderr[-2000:]}{proc.stdout[-1000:]}\n{log}")
        return proc

    def start(self) -> "PostgresServer":
        self._run([_binary("initdb"), "-D", self.data, "-U", self.user, "-A", "trust", "-E", "UTF8",
                   "--no-sync", "--no-instructions"])
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=100"
        self._run([_binary("pg_ctl"), "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start"])
        self.started = True
        return self

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(dbname="postgres", user=self.user, host=self.root)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def url(self, db: str = "postgres") -> str:
        """SQLAlchemy URL over the Unix socket."""
        return f"postgresql+psycopg2://{self.user}@/{db}?host={self.root}"

    def stop(self) -> None:
        if self.started:
            try:
                self._run([_binary("pg_ctl"), "-D", self.data, "-w", "-t", "60", "-m", "immediate", "stop"])
            finally:
                self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
