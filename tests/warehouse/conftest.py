"""A real PostgreSQL server for the scale-out tests: Debian's `postgresql` (scripts/setup.sh
installs it), started by the session on loopback with a fresh data folder and a free port, and
stopped at the end. It holds both the DuckLake catalog and the Dagster instance, as one server
would in a deployment (each in its own database).

PostgreSQL refuses to run as root, so as root (CI, these machines) the server runs as the
`postgres` user that the Debian package creates, in a folder under /tmp that user owns; as anyone
else, as that user."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

USER = "music"


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str

    def create_database(self, name: str) -> str:
        """Creates database `name`; returns its libpq connection string."""
        import psycopg2

        con = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        try:
            con.autocommit = True
            con.cursor().execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return f"dbname={name} host={self.host} port={self.port} user={self.user}"


def _program(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's `{name}` is not installed: scripts/setup.sh installs Debian's postgresql")
    return found


@pytest.fixture(scope="session")
def postgres():
    as_user: list[str] = []
    if os.geteuid() == 0:
        if subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.fail("running as root needs the `postgres` user (Debian's postgresql package creates it)")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="music-pg-"))
    if as_user:
        shutil.chown(root, user="postgres")
    data, port = root / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, cwd=root)  # noqa: E731
    done = run(_program("initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
    assert done.returncode == 0, done.stdout + done.stderr
    # fsync off: a test server's data need not survive a power cut; the sockets stay in its folder
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    done = run(_program("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    assert done.returncode == 0, done.stdout + done.stderr + (root / "server.log").read_text()
    try:
        yield Postgres("127.0.0.1", port, USER)
    finally:
        run(_program("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
