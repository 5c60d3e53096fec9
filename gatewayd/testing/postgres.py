"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary directory, a free port.

``PostgresCluster`` never uses a server that happens to run on the machine: it creates its own
cluster and removes it afterwards. The binaries come from ``PATH`` or Debian's
``/usr/lib/postgresql/<version>/bin`` (``apt-get install postgresql``). PostgreSQL refuses to
run as root, so under root the cluster belongs to the ``postgres`` system user (Debian's package
creates it; ``nobody`` otherwise) and the server runs as that user, so the temporary directory
(``TMPDIR``, /tmp by default) must be reachable for it; as a normal user it runs as that user.
Clients connect over TCP on 127.0.0.1 (``dsn``) or the unix socket in the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from gatewayd.testing.processes import signal_and_wait

__all__ = ["PostgresCluster", "find_postgres_bindir"]

_BINARIES = ("initdb", "postgres")


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: initdb's on PATH, else Debian's newest."""
    initdb = shutil.which("initdb")
    candidates = [Path(os.path.realpath(initdb)).parent] if initdb else []
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: [int(p) if p.isdigit() else 0 for p in Path(d).parent.name.split(".")],
    )
    candidates += [Path(directory) for directory in reversed(debian)]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in _BINARIES):
            return directory
    raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")


class PostgresCluster:
    """A private PostgreSQL server on 127.0.0.1:``port``; ``kill()``/``start()``/``restart()``.

    ``with PostgresCluster() as pg: psycopg.connect(pg.dsn)``. The superuser is ``postgres``;
    without ``password`` every connection is trusted, with one TCP clients must give it
    (scram-sha-256) while the unix socket stays trusted. ``settings`` are extra ``-c`` options;
    ``fsync`` is off by default (tests need speed, not power-loss safety).
    """

    user = "postgres"
    dbname = "postgres"

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        fsync: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        from gatewayd.testing import free_port  # not at import: gatewayd.testing imports us

        self.bindir = find_postgres_bindir()
        self.port = port or free_port()
        self.password = password
        self.settings = {"fsync": "on" if fsync else "off", **(settings or {})}
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None
        self._owner = _cluster_owner()

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "start() first"
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.directory is not None, "start() first"
        return self.directory

    @property
    def dsn(self) -> str:
        """libpq conninfo for TCP on 127.0.0.1 (without the password)."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={self.dbname}"

    @property
    def socket_dsn(self) -> str:
        """libpq conninfo for the unix socket (always trusted)."""
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={self.dbname}"

    @property
    def log_path(self) -> Path:
        """The server's own log (stdout and stderr): read it when a test fails."""
        assert self.directory is not None, "start() first"
        return self.directory / "server.log"

    def connect(self, **kwargs: Any) -> Any:
        """A ``psycopg.Connection`` as the superuser over the socket (autocommit by default)."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.socket_dsn, **kwargs)

    def initdb(self) -> None:
        """Create the cluster in a new temporary directory (``start()`` does it when needed)."""
        self.directory = Path(tempfile.mkdtemp(prefix="gatewayd-pg-"))
        self._give(self.directory)
        command = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user]
        command += ["-E", "UTF8", "--no-locale", "--no-sync"]
        if self.password is None:
            command += ["--auth=trust"]
        else:
            password_file = self.directory / "initdb.pw"
            password_file.write_text(self.password + "\n", encoding="utf-8")
            self._give(password_file)
            command += ["--auth-local=trust", "--auth-host=scram-sha-256"]
            command += [f"--pwfile={password_file}"]
        result = self._run(command)
        if self.password is not None:
            (self.directory / "initdb.pw").unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stdout.strip()}")

    def start(self, timeout: float = 30.0) -> PostgresCluster:
        """Start the server (after ``initdb`` the first time); returns once it takes queries."""
        if self.directory is None:
            self.initdb()
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        command += ["-p", str(self.port), "-k", str(self.socket_dir)]
        settings = {"listen_addresses": "127.0.0.1", "max_connections": "40", **self.settings}
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "ab") as log:
                self.process = self._popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                self._wait_ready(deadline)
                return self
            except _Retry:  # a killed server's children still held its shared memory
                time.sleep(0.1)
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (clients are disconnected, a checkpoint is written); data is kept."""
        self._signal(signal.SIGINT, timeout)

    def kill(self) -> None:
        """Immediate shutdown, as a crash: connections drop, no checkpoint, and the next
        ``start()`` runs crash recovery."""
        self._signal(signal.SIGQUIT, 10.0)

    def restart(self, timeout: float = 30.0) -> None:
        """``stop()`` then ``start()``: every client connection breaks."""
        self.stop(timeout)
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete the cluster."""
        self.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------------------

    def _wait_ready(self, deadline: float) -> None:
        import psycopg

        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                self.process = None
                log = self.log_path.read_text(errors="replace")[-2000:]
                if "is still in use" in log[-500:] and time.monotonic() < deadline:
                    raise _Retry
                raise RuntimeError(f"postgres exited at start; its log ends:\n{log}")
            try:
                psycopg.connect(self.socket_dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready on port {self.port}") from None
                time.sleep(0.05)

    def _signal(self, signum: int, timeout: float) -> None:
        process, self.process = self.process, None
        signal_and_wait(process, signum, timeout)  # killed, its children see the postmaster go

    def _give(self, path: Path) -> None:
        """Hand a path to the cluster's owner (only needed, and only possible, as root)."""
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.directory))
        if self._owner is not None:
            kwargs.update(user=self._owner.pw_uid, group=self._owner.pw_gid, extra_groups=[])
        return subprocess.Popen(
            command, cwd=self.directory, env=env, start_new_session=True, **kwargs
        )

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        process = self._popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stdout, _ = process.communicate()
        return subprocess.CompletedProcess(command, process.returncode, stdout)


class _Retry(Exception):
    """The server could not start yet; try again."""


def _cluster_owner() -> pwd.struct_passwd | None:
    """Who owns and runs the cluster when we are root (PostgreSQL refuses root); else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and there is no postgres or nobody user to run PostgreSQL")
