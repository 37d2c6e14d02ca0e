"""Fixtures: the real daemon on a loopback port, on SQLite and on PostgreSQL.

PostgreSQL tests use the server named by MAILFLOWR_TEST_POSTGRES_URL (for
example postgresql+psycopg://postgres@127.0.0.1:5432/test); each gateway gets
a fresh database there.  Without the variable, or without a reachable server,
those tests are skipped with the reason, unless MAILFLOWR_TEST_REQUIRE_POSTGRES=1
(as in CI), where they fail instead.

With pytest-xdist installed the suite runs in two worker processes (``-n 0`` or
``-p no:xdist`` runs it in one).  Each worker takes loopback ports from a range of
its own, its own databases, temporary directories and Dovecot; a test that restarts
the PostgreSQL server runs alone (``exclusive_postgres``).
"""

from __future__ import annotations

import atexit
import collections
import compileall
import contextlib
import fcntl
import functools
import os
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from hypothesis import settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from gateway.store import database
from gateway.store.repository import Store
from tests.dns_server import ZoneServer

ROOT = Path(__file__).resolve().parent.parent
PG_ENV = "MAILFLOWR_TEST_POSTGRES_URL"
PG_REQUIRED = os.environ.get("MAILFLOWR_TEST_REQUIRE_POSTGRES") == "1"
# CI installs every system peer (promtool, systemd-analyze, ...): there a missing one fails.
PEERS_REQUIRED = os.environ.get("MAILFLOWR_TEST_REQUIRE_PEERS") == "1"
BACKENDS = ["sqlite", "postgresql"]
# Under pytest-xdist: this worker's name ("gw0", "gw1", ...) and how many there are.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
DEFAULT_WORKERS = 2  # the CI machine's cores; the tests wait on daemons as much as they compute

# tests/test_fuzz.py: 100 examples a test in the suite; `make fuzz` runs the long profile.
settings.register_profile("long", max_examples=5000, print_blob=True)

BASE_CONFIG: dict[str, Any] = {
    "smtp": {
        "hostname": "mx.gateway.test",
        "max_message_size": 200_000,
        "max_recipients": 5,
        "max_errors": 10,
        "idle_timeout": "30s",
        "shutdown_timeout": "10s",
    },
    "pipeline": {"poll_interval": "0.5s", "parse_timeout": "10s"},
    "metrics": {"listen": None},
    "logging": {"level": "INFO"},
    "tenants": {
        "acme": {
            "name": "Acme",
            "domains": ["acme.test", "acme-mail.test"],
            "addresses": ["support@acme.test", "billing@acme.test", "info@acme-mail.test"],
        },
        "globex": {"name": "Globex", "domains": ["globex.test"], "catch_all": True},
    },
}


@functools.cache
def empty_zone() -> ZoneServer:
    """A DNS server for the whole test run that knows no name (NXDOMAIN for all)."""
    return ZoneServer({})


def gateway_with_rules(make_gateway: Any, tmp_path: Path, relay: Any, rules: str,
                       overrides: dict[str, Any] | None = None) -> Gateway:
    """A gateway running ``rules`` as policies/workflows.yaml, sending copies to the
    ``relay`` sink, with a metrics port; ``overrides`` as for make_gateway."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "workflows.yaml").write_text(rules)
    return make_gateway(_merge({
        "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
        "policies": {"directory": str(policies)},
        "delivery": {"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none",
                     "poll_interval": "0.2s"},
    }, overrides or {}))


@functools.cache
def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random(os.getpid())
_PORT_BASE = 20000


def _worker_ports() -> range:
    """This worker's share of the ports between 20000 and the ephemeral range: the
    workers of a parallel run never pick the same port in the moment between finding
    it free and the daemon binding it."""
    low = _ephemeral_low()
    index = int(WORKER[2:]) if WORKER[2:].isdigit() else 0
    share = (low - _PORT_BASE) // max(WORKERS, 1)
    start = _PORT_BASE + index % max(WORKERS, 1) * share
    return range(start, start + share)


_GIVEN: collections.deque[int] = collections.deque(maxlen=256)  # free_port's last ports


def free_port() -> int:
    """A loopback port free now, for a daemon to bind a moment later.  Taken below the
    kernel's ephemeral range: a port from that range can be given to an outgoing
    connection (a database, DNS or SMTP client) in that moment, and the daemon then
    fails to bind it.  Each xdist worker takes its ports from a range of its own, and
    never gives out a port it gave out lately: one free now is free again a moment
    later, until a daemon binds it (a test's SMTP and metrics ports were once the same)."""
    ports = _worker_ports()
    for _ in range(200 if len(ports) > 100 else 0):
        port = _PORTS.choice(ports)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _GIVEN.append(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def postgres_server_url() -> str:
    url = os.environ.get(PG_ENV)
    why = None
    if not url:
        why = f"PostgreSQL tests need {PG_ENV}=postgresql+psycopg://USER@HOST:PORT/DB"
    else:
        try:
            engine = create_engine(url, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            engine.dispose()
        except Exception as exc:  # any failure to reach it means "no PostgreSQL here"
            why = f"PostgreSQL at {PG_ENV} unreachable: {str(exc).splitlines()[0]}"
    if why:
        if PG_REQUIRED:
            pytest.fail(why)
        pytest.skip(MISSING + why)
    assert url is not None
    return url


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy and return that value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


MISSING = "missing peer: "  # how a skip for a peer begins, for the list at the end


def peer_missing(why: str) -> NoReturn:
    """Skip a test whose system peer is not here; in CI, where .ci/run installs every
    peer, fail instead."""
    if PEERS_REQUIRED:
        pytest.fail(why)
    pytest.skip(MISSING + why)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """At the end of the run, each missing peer (PostgreSQL, a tool, a Perl module) and
    how many tests it kept from running, so a short run is never mistaken for a pass."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reason = str(longrepr[2]).removeprefix("Skipped: ")
            if reason.startswith(MISSING):
                missing[reason[len(MISSING):]] = missing.get(reason[len(MISSING):], 0) + 1
    if missing:
        terminalreporter.section("missing peers: these tests did not run")
        for why, count in sorted(missing.items()):
            terminalreporter.line(f"{count:5d}  {why}")


def need_tool(tool: str, package: str) -> str:
    """The path of a system tool a test talks to; skip (fail in CI) without it."""
    path = shutil.which(tool)
    if path is None:
        peer_missing(f"{tool} is not installed (Debian package {package})")
    return path


def need_perl_module(module: str, package: str) -> str:
    """perl, with a module an interoperability test runs; skip (fail in CI) without it."""
    perl = need_tool("perl", "perl")
    if subprocess.run([perl, f"-M{module}", "-e", "1"], capture_output=True).returncode != 0:
        peer_missing(f"Perl's {module} is not installed (Debian package {package})")
    return perl


class PostgresDatabase:
    """A throwaway database on the test server (a copy of ``template`` when given)."""

    def __init__(self, server_url: str, template: str | None = None) -> None:
        self.server_url = server_url
        self.name = f"mailflowr_test_{WORKER or 'main'}_{uuid.uuid4().hex[:12]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"{copy}'))
        admin.dispose()
        self.url = make_url(server_url).set(database=self.name).render_as_string(
            hide_password=False
        )

    def drop(self) -> None:
        admin = create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        admin.dispose()


def _patiently(job: Any) -> Any:
    """``job()``, again while the server restarts (a test restarts it, and a background
    job does not hold it shared as a test does)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return job()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _PostgresCopies:
    """Copies of the template database, each made while the test before runs, and
    dropped while the next one runs: a CREATE and a DROP DATABASE cost about a second
    a test, waiting on the server's disk."""

    def __init__(self) -> None:
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postgres-copies")
        self.spare: dict[str, Future[PostgresDatabase]] = {}
        self.templates: list[PostgresDatabase] = []  # dropped last, at exit
        atexit.register(self.close)

    def take(self, server_url: str, template: str) -> PostgresDatabase:
        spare = self.spare.pop(template, None)
        pg = spare.result() if spare is not None else PostgresDatabase(server_url, template)
        self.spare[template] = self.jobs.submit(
            _patiently, lambda: PostgresDatabase(server_url, template))
        return pg

    def drop_later(self, pg: PostgresDatabase) -> None:
        self.jobs.submit(_patiently, pg.drop)

    def close(self) -> None:
        """After every job: drop the spare copies, then the templates."""
        self.jobs.shutdown(wait=True)
        spares = [f.result() for f in self.spare.values() if f.exception() is None]
        self.spare.clear()
        for pg in [*spares, *self.templates]:
            _patiently(pg.drop)
        self.templates.clear()


_COPIES = _PostgresCopies()


@functools.cache
def _upgraded_template(backend: str) -> str:
    """A database at the current schema, made once per run, that tests start from as a
    copy: the daemon's own upgrade at start is tested on its own (test_durability)."""
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="mailflowr-template-")
        atexit.register(shutil.rmtree, folder, True)
        url = f"sqlite:///{folder}/gateway.db"
        name = f"{folder}/gateway.db"
    else:
        pg = PostgresDatabase(postgres_server_url())
        _COPIES.templates.append(pg)
        url, name = pg.url, pg.name
    engine = database.create(url, pool_size=1)
    database.upgrade(engine)
    engine.dispose()
    return name


def database_url(backend: str, directory: Path, cleanups: list[Any],
                 fresh: bool = False) -> str:
    """A database of its own for a test: empty when ``fresh``, else at the current schema."""
    template = None if fresh else _upgraded_template(backend)
    if backend == "sqlite":
        if template is not None:
            shutil.copyfile(template, directory / "gateway.db")
        return f"sqlite:///{directory / 'gateway.db'}"
    server_url = postgres_server_url()
    pg = (_COPIES.take(server_url, template) if template is not None
          else PostgresDatabase(server_url))
    cleanups.append(functools.partial(_COPIES.drop_later, pg))
    return pg.url


class Gateway:
    """``mailflowr-gateway serve`` as a child process with its own config."""

    def __init__(self, directory: Path, db_url: str, overrides: dict[str, Any] | None = None):
        self.directory = directory
        self.db_url = db_url
        self.port = free_port()
        config = _merge(BASE_CONFIG, overrides or {})
        if not config.get("delivery", {}).get("dns_servers"):
            # SPF and DMARC look up every inbound sender: never on the public DNS
            config = _merge(config, {"delivery": {"dns_servers": [empty_zone().address]}})
        config = _merge(config, {"smtp": {"listen": f"127.0.0.1:{self.port}"},
                                 "database": {"url": db_url}})
        if "directory" not in config.get("policies", {}):
            # the gateway refuses to run without a policy: say "no rules" as an operator would
            policies = directory / "policies"
            policies.mkdir(exist_ok=True)
            if not any(policies.iterdir()):
                (policies / "workflows.yaml").write_text("tenants: {}\n")
        self.config = config
        self.config_path = directory / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: Store | None = None

    def cli(self, *args: str, check: bool = False, env: dict[str, str] | None = None,
            timeout: float = 60, input: bytes | None = None,
            ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config_path)],
            capture_output=True, timeout=timeout, cwd=self.directory, input=input,
            env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed: {result.stderr.decode()}")
        return result

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Gateway:
        if (not database.is_sqlite(self.db_url)
                and database.current_revision(self.store.engine) != database.HEAD):
            self.cli("db", "upgrade", check=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30, port: int | None = None) -> None:
        """Until the SMTP listener (or the one on ``port``) greets."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port or self.port), timeout=1) as s:
                    s.recv(100)
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"gateway did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the daemon and its processes at once, as a crash of the machine
        or systemd's final kill of the unit's control group."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def children(self) -> dict[int, str]:
        """The daemon's processes by pid, with their names (``comm``): its children
        (the zygote) and theirs, down the tree."""
        assert self.proc is not None
        parent, name = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError):
                pid, rest = stat.read_text().split(" (", 1)
                comm, fields = rest.rsplit(") ", 1)
                parent[int(pid)], name[int(pid)] = int(fields.split()[1]), comm
        found: dict[int, str] = {}
        for pid in parent:
            up = parent[pid]
            while up > 1 and up != self.proc.pid:
                up = parent.get(up, 0)
            if up == self.proc.pid:
                found[pid] = name[pid]
        return found

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._store is not None:
            self._store.engine.dispose()
            self._store = None

    @property
    def store(self) -> Store:
        """A Store on the same database, for reading what the daemon wrote."""
        if self._store is None:
            self._store = Store(database.create(self.db_url, pool_size=2))
        return self._store

    def smtp(self, **kw: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=kw.pop("timeout", 30), **kw)

    def messages(self, **kw: Any) -> list[dict[str, Any]]:
        return self.store.list_messages(**kw)

    def wait_processed(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.messages()
            if len(rows) >= count and all(r["status"] != "received" for r in rows):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"not processed in {timeout}s: {[r['status'] for r in rows]}")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A test CA and a certificate for mx.gateway.test and 127.0.0.1 (trustme)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mx.gateway.test", "127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    chain, key = directory / "chain.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    return ca, chain, key


def client_context(ca: Any) -> Any:
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def need_dovecot() -> str:
    """The dovecot binary (Debian package dovecot-imapd); skip (fail in CI) without it."""
    path = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists()
                                       else None)
    if path is None or not Path("/usr/lib/dovecot/imap").exists():
        peer_missing("Dovecot is not installed (Debian package dovecot-imapd)")
    return path


@pytest.fixture(scope="session")
def dovecot_server(tls_files) -> Iterator[Any]:
    """One Dovecot for the test run; each test takes logins of its own (``user()``)."""
    from tests.dovecot import Dovecot

    server = Dovecot(need_dovecot(), tls_files[0]).start()
    yield server
    server.close()


@pytest.fixture
def dovecot(dovecot_server) -> Any:
    assert dovecot_server.proc is not None and dovecot_server.proc.poll() is None, \
        dovecot_server.log()
    return dovecot_server


@pytest.fixture
def own_dovecot(tls_files) -> Iterator[Any]:
    """A Dovecot of the test's own, which it may stop and start (not yet started)."""
    from tests.dovecot import Dovecot

    server = Dovecot(need_dovecot(), tls_files[0])
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        RawClient.opened.pop().close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses a database runs on SQLite and on PostgreSQL, except those
    marked ``sqlite_only`` (what they check does not depend on the database: protocol
    replies, mail authentication, input checks) and those that name their backends."""
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "backend" in ([n.strip() for n in names.split(",")] if isinstance(names, str)
                         else names):
            return
    only = metafunc.definition.get_closest_marker("sqlite_only") is not None
    metafunc.parametrize("backend", ["sqlite"] if only else BACKENDS, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Two xdist workers unless ``-n`` says otherwise (``-n 0`` runs in one process);
    the suite mostly waits on its daemons, so it takes half the time.  A default here
    rather than in addopts, so that ``-p no:xdist`` and a venv without pytest-xdist still
    run it.  pytest-xdist gives ``--pdb`` one process."""
    if (not config.pluginmanager.hasplugin("xdist") or WORKER
            or config.option.numprocesses is not None or config.option.usepdb):
        return
    config.option.numprocesses = DEFAULT_WORKERS
    if config.option.dist == "no":
        config.option.dist = "loadgroup"  # as "load"; a module's xdist_group in one worker


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the gateway's modules once: the tests start its daemon and command line
    some thousand times, and where PYTHONDONTWRITEBYTECODE is set each start would
    compile them all again."""
    if not WORKER:
        compileall.compile_dir(ROOT / "gateway", quiet=1)


def _postgres_locks() -> tuple[Path, Path]:
    """The files that order access to the PostgreSQL server among the test processes of
    this machine (every worker, every run): a gate, and the server itself."""
    url = make_url(os.environ.get(PG_ENV) or "postgresql://127.0.0.1:5432/test")
    stem = f"mailflowr-test-postgres-{url.host or 'local'}-{url.port or 5432}"
    folder = Path(tempfile.gettempdir())
    return folder / f"{stem}.gate.lock", folder / f"{stem}.lock"


def _flock(path: Path, operation: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
    fcntl.flock(fd, operation)
    return fd


@pytest.fixture(autouse=True)
def _postgres_server_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test on PostgreSQL uses the server shared with the other workers' tests; one
    marked ``exclusive_postgres`` (it restarts the server) has it alone, so that no
    other test loses its connections to the restart.  The gate keeps tests that come
    later from overtaking one waiting for the server alone."""
    exclusive = request.node.get_closest_marker("exclusive_postgres") is not None
    callspec = getattr(request.node, "callspec", None)
    on_postgres = callspec is not None and callspec.params.get("backend") == "postgresql"
    if not (exclusive or on_postgres) or not os.environ.get(PG_ENV):
        yield
        return
    gate_path, server_path = _postgres_locks()
    gate = _flock(gate_path, fcntl.LOCK_EX)
    held = [gate]
    try:
        held.append(_flock(server_path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH))
        if not exclusive:
            os.close(held.pop(0))
        yield
    finally:
        for fd in held:
            os.close(fd)


@pytest.fixture
def make_gateway(tmp_path: Path, backend: str) -> Iterator[Any]:
    """Factory: make_gateway(overrides) -> a started Gateway on the test's backend."""
    made: list[Gateway] = []
    cleanups: list[Any] = []

    def make(overrides: dict[str, Any] | None = None, start: bool = True,
             db_url: str | None = None, fresh: bool = False) -> Gateway:
        directory = tmp_path / f"gw{len(made)}"
        directory.mkdir()
        url = db_url or database_url(backend, directory, cleanups, fresh)
        gw = Gateway(directory, url, overrides)
        made.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in made:
        gw.close()
    for cleanup in cleanups:
        cleanup()


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[Store]:
    """A Store on a fresh, upgraded database of the test's backend (no daemon)."""
    cleanups: list[Any] = []
    url = database_url(backend, tmp_path, cleanups)
    engine = database.create(url)
    database.upgrade(engine)
    s = Store(engine)
    s.sync_tenants({"acme": "Acme", "globex": "Globex"})
    yield s
    engine.dispose()
    for c in cleanups:
        c()


@pytest.fixture
def gateway(make_gateway: Any) -> Any:
    return make_gateway()


@pytest.fixture
def relay() -> Iterator[Any]:
    """A real downstream SMTP server (tests.sink), e.g. for delivery.relay."""
    from tests.sink import Sink

    sink = Sink()
    yield sink
    sink.stop()


@pytest.fixture
def sinks() -> Iterator[list[Any]]:
    """Two downstream servers: a relay and a destination."""
    from tests.sink import Sink

    made = [Sink(), Sink()]
    yield made
    for s in made:
        s.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The /metrics text of a gateway and its samples by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = http_get(port, "/metrics")[1]
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return body, out


def value(values: dict[Any, float], name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def metrics_port(gw: Gateway) -> int:
    return int(gw.config["metrics"]["listen"].rsplit(":", 1)[1])


def settled(gw: Gateway, name: str, expected: float, timeout: float = 10.0,
            **labels: str) -> dict[Any, float]:
    """The gateway's samples once ``name{labels}`` reads ``expected``.  The delivery
    metrics come from the delivery process, which reports them four times a second,
    so they may trail the copy at the relay by that much."""
    deadline = time.monotonic() + timeout
    while True:
        _, found = samples(metrics_port(gw))
        if value(found, name, **labels) == expected:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} {labels} is {value(found, name, **labels)}, "
                                 f"not {expected}")
        time.sleep(0.1)


def simple_message(subject: str = "hello", body: str = "Hello there.\r\n",
                   sender: str = "alice@sender.test", to: str = "support@acme.test") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@sender.test>\r\n"
        f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n{body}"
    ).encode()


class RawClient:
    """A plain socket, for bytes no SMTP library would send."""

    opened: list[RawClient] = []  # closed after each test by the autouse fixture

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        RawClient.opened.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One whole reply (all lines of a multi-line one)."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; had {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: bytes | str) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def start_data(self, sender: str = "a@sender.test", rcpt: str = "support@acme.test") -> str:
        """Greeting, EHLO, MAIL, RCPT and DATA, each checked; returns the DATA reply."""
        assert self.reply().startswith("220 ")
        assert self.command("EHLO client.test").startswith("250")
        assert self.command(f"MAIL FROM:<{sender}>").startswith("250")
        assert self.command(f"RCPT TO:<{rcpt}>").startswith("250")
        return self.command("DATA")

    def closed(self, timeout: float = 5) -> bool:
        """True when the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()
