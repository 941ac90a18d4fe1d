"""A throwaway PostgreSQL server for the test suite.

``python tests/tools/pgserver.py run -- CMD [ARGS...]`` creates a fresh cluster in a
temporary directory, starts it on a free port of 127.0.0.1 (loopback only, never on
another interface), creates the database ``zcells_test`` and runs CMD with
``ZCELLS_TEST_POSTGRES_URL`` naming it. Whatever CMD does (fails, gets Ctrl-C or
SIGTERM), the server is stopped and the directory removed afterwards, and the script
exits with CMD's exit code.

PostgreSQL refuses to run as root, so as root the server tools run as the ``postgres``
system user (or ``nobody``) through runuser, setpriv or su; otherwise they run as
ourselves. If no server binaries are found and we are root, the Debian package
``postgresql`` is installed with apt-get.

The same file is a small library for pytest: ``create_database`` and ``drop_database``
manage extra databases on the server named by a test URL. Only the standard library is
imported at module level; psycopg is imported by the functions that need it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

URL_ENV = "ZCELLS_TEST_POSTGRES_URL"
DB_USER = "zcells"
TEST_DB = "zcells_test"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
READY_SECONDS = 60


class PgServerError(Exception):
    """The server could not be found, installed or started."""


def _say(message: str) -> None:
    print(f"pgserver: {message}", file=sys.stderr, flush=True)


def _search_bindir() -> Path | None:
    def complete(d: Path) -> bool:
        return all(os.access(d / tool, os.X_OK) for tool in SERVER_TOOLS)

    found: list[tuple[tuple[int, ...], Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        version = d.parent.name.split(".")
        if all(part.isdigit() for part in version) and complete(d):
            found.append((tuple(map(int, version)), d))
    if found:
        return max(found)[1]
    on_path = shutil.which("pg_ctl")
    if on_path and complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    return None


def find_bindir() -> Path:
    """Return the directory holding initdb, pg_ctl and postgres; as root, install them."""
    bindir = _search_bindir()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _say("PostgreSQL not found; installing the Debian package 'postgresql'")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
        for cmd in (["apt-get", "update", "-qq"], install):
            if subprocess.run(cmd, env=env, stdout=sys.stderr, check=False).returncode:
                raise PgServerError(f"'{shlex.join(cmd)}' failed")
        bindir = _search_bindir()
    if bindir is None:
        raise PgServerError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the "
            "Debian package 'postgresql' (sudo apt-get install postgresql) or put its bin "
            "directory on PATH"
        )
    return bindir


def _server_user() -> str | None:
    """The user to run the server as, or None for ourselves (when we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    raise PgServerError("running as root, but there is neither a 'postgres' nor a 'nobody' user")


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    if user is None:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *cmd]
    if shutil.which("setpriv"):
        entry = pwd.getpwnam(user)
        ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        return ["setpriv", *ids, *cmd]
    return ["su", "-s", "/bin/sh", user, "-c", shlex.join(cmd)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One cluster in its own temporary directory, driven by the PostgreSQL tools.

    Signals that arrive while a tool runs are recorded in ``pending`` and acted on when it
    has finished, so that no half-started postmaster escapes the cleanup.
    """

    def __init__(self, bindir: Path, user: str | None, pending: list[int]) -> None:
        self.bindir, self.user, self.pending = bindir, user, pending
        self.dir = Path(tempfile.mkdtemp(prefix="zcells-pg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data, self.log = self.dir / "data", self.dir / "log"
        self.port, self.version = 0, "?"

    def tool(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        exe = self.bindir / name
        cmd = _as_user(self.user, [str(exe) if exe.exists() else name, *args])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        done = subprocess.run(
            cmd, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if self.pending:
            raise SystemExit(128 + self.pending[0])
        return done

    def must(self, name: str, *args: str) -> None:
        done = self.tool(name, *args)
        if done.returncode:
            raise PgServerError(f"{name} failed:\n{done.stdout}{done.stderr}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def client_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER]

    def start(self) -> None:
        if m := re.search(r"\) (\d+(?:\.\d+)*)", self.tool("postgres", "--version").stdout):
            self.version = m.group(1)
        initdb = ["-D", str(self.data), "-A", "trust", "-U", DB_USER, "--encoding=UTF8"]
        self.must("initdb", *initdb, "--no-locale")
        for _attempt in range(5):
            self.port = _free_port()
            self.log.unlink(missing_ok=True)
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {shlex.quote(str(self.dir))}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                " -c max_connections=200"
            )
            pg_ctl = ["start", "-w", "-t", str(READY_SECONDS), "-D", str(self.data)]
            if self.tool("pg_ctl", *pg_ctl, "-l", str(self.log), "-o", options).returncode == 0:
                break
            if "already in use" not in self.log_tail():
                raise PgServerError("pg_ctl start failed")
            _say(f"port {self.port} was taken; trying another")
        else:
            raise PgServerError("no free port after 5 attempts")
        deadline = time.monotonic() + READY_SECONDS
        while (self.bindir / "pg_isready").exists():
            if self.tool("pg_isready", *self.client_args(), "-d", "postgres").returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PgServerError(f"server not ready after {READY_SECONDS} s")
            time.sleep(0.2)
        self.must("createdb", *self.client_args(), TEST_DB)

    def stop(self) -> None:
        """Stop the server if it runs (fast, else by force) and remove the directory."""
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists():
            stop = ["stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"]
            try:
                stopped = self.tool("pg_ctl", *stop, timeout=40).returncode == 0
            except subprocess.TimeoutExpired:
                stopped = False
            if not stopped and pidfile.exists():
                with contextlib.suppress(ProcessLookupError, ValueError, IndexError):
                    # the backends notice that their postmaster died and exit too
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
        _say(f"PostgreSQL at 127.0.0.1:{self.port} stopped, {self.dir} removed")


def run(command: list[str]) -> int:
    """Run command against a fresh server, always clean up, and return its exit code."""
    pending: list[int] = []
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in caught:
        signal.signal(signum, lambda signum, _frame: pending.append(signum))
    server: Server | None = None
    try:
        server = Server(find_bindir(), _server_user(), pending)
        server.start()
        url = f"postgresql+psycopg://{DB_USER}@127.0.0.1:{server.port}/{TEST_DB}"
        _say(f"PostgreSQL {server.version} at 127.0.0.1:{server.port} ({server.dir})")
        child = subprocess.Popen(command, env={**os.environ, URL_ENV: url})

        def forward(signum: int, _frame: FrameType | None) -> None:
            child.send_signal(signum)

        # Ctrl-C reaches the child directly (same process group): we just outlive it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, forward)
        for early in pending:  # arrived between the last tool and Popen
            child.send_signal(early)
        code = child.wait()
        return 128 - code if code < 0 else code
    except SystemExit as exc:
        _say(f"interrupted during startup ({exc.code})")
        raise
    except (PgServerError, OSError, subprocess.SubprocessError) as exc:
        _say(f"startup failed: {exc}")
        if server is not None:
            _say(f"server log ({server.log}):\n{server.log_tail()}")
        return 1
    finally:
        for signum in caught:  # cleanup is bounded, so let nothing cut it short
            signal.signal(signum, signal.SIG_IGN)
        pending.clear()
        if server is not None:
            server.stop()


def server_admin_url(test_url: str) -> str:
    """The URL of the ``postgres`` maintenance database on test_url's server."""
    return urlunsplit(urlsplit(test_url)._replace(path="/postgres"))


def _maintenance(test_url: str, statement: str, name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: must match {NAME_RE.pattern}")
    import psycopg
    from psycopg import sql

    parts = urlsplit(server_admin_url(test_url))
    libpq_url = urlunsplit(parts._replace(scheme=parts.scheme.split("+")[0]))
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


def create_database(test_url: str, name: str) -> str:
    """Create database name on test_url's server and return its SQLAlchemy URL."""
    _maintenance(test_url, "CREATE DATABASE {}", name)
    return urlunsplit(urlsplit(test_url)._replace(scheme="postgresql+psycopg", path=f"/{name}"))


def drop_database(test_url: str, name: str) -> None:
    """Drop database name on test_url's server, closing its connections first."""
    _maintenance(test_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def main(argv: list[str]) -> int:
    command = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    if argv[:1] != ["run"] or not command:
        print("usage: pgserver.py run -- CMD [ARGS...]", file=sys.stderr)
        return 2
    return run(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
