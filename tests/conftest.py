"""Shared fixtures: databases (SQLite and a real PostgreSQL), the dev PKI, configurations,
and an in-process gateway on free ports.

PostgreSQL comes from GATEWAY_TEST_PG_URL (default: the local server, database gateway_test,
created if missing; with pytest-xdist's workers, gateway_test_gw0, gateway_test_gw1, ...).
When it is unreachable, PostgreSQL tests are skipped, unless GATEWAY_REQUIRE_PG=1 (as in CI),
where they fail.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CORPUS = os.path.join(SHARED, "corpus")
BENCH = os.path.join(SHARED, "bench")

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/gateway_test")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs workers side by side: one database each
    PG_URL += "_" + os.environ["PYTEST_XDIST_WORKER"]
REQUIRE_PG = os.environ.get("GATEWAY_REQUIRE_PG") == "1"

_pg_ready: bool | str | None = None  # True, or the reason it is not


def _ensure_pg_database() -> bool | str:
    """Create the test database if missing; True when usable, else the reason."""
    global _pg_ready
    if _pg_ready is not None:
        return _pg_ready
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL)
    try:
        with psycopg.connect(host=url.host or "127.0.0.1", port=url.port or 5432,
                             user=url.username or "postgres", password=url.password,
                             dbname="postgres", autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (url.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{url.database}"')
        _pg_ready = True
    except Exception as error:  # unreachable server, refused login
        _pg_ready = f"PostgreSQL at {url.render_as_string(hide_password=True)} unavailable: {error}"
    return _pg_ready


def reset_pg() -> None:
    """An empty public schema in the test database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def pg_url_or_skip() -> str:
    ready = _ensure_pg_database()
    if ready is not True:
        if REQUIRE_PG:
            pytest.fail(f"GATEWAY_REQUIRE_PG=1 but {ready}")
        pytest.skip(ready)
    reset_pg()
    return PG_URL


@pytest.fixture
def pg_url() -> str:
    """A URL to an empty PostgreSQL test database."""
    return pg_url_or_skip()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    return pg_url_or_skip()


@pytest.fixture
def engine(db_url):
    """The database of `db_url` (SQLite and PostgreSQL), migrated; disposed after the test."""
    from gateway.store.database import create_gateway_engine, migrate

    engine = create_gateway_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def mapping_code_cache(tmp_path_factory):
    """Compiled mapping code (gateway.mapping.code_cache) kept for this run only, shared by the
    gateway processes the tests start (they inherit the environment), never in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory) -> str:
    """A development PKI (CA, gateway, sandbox peers, two facilities) in a temporary folder."""
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("pki"))
    init_dev_pki(directory, ["INPE-100001", "INPE-100002"])
    return directory


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory) -> str:
    """Another CA, with a facility certificate (ROGUE-1) the gateway's CA never signed."""
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("foreign-pki"))
    init_dev_pki(directory, ["ROGUE-1"])
    return directory


@pytest.fixture
def observe():
    """`observe(config)` -> Deferred of a gateway started in this process with its events and
    metrics recorded (observability_support.Observed); stopped after the test."""
    import pytest_twisted

    from observability_support import start_observed, stop_observed

    started = []
    yield lambda config: start_observed(config, started)
    for observed in started:
        pytest_twisted.blockon(stop_observed(observed))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> str:
    """The HTTPS door tests' PKI: one facility of each kind and a certificate of a facility
    the registry does not know (doors_support.PKI_NAMES). A module may define its own."""
    from doors_support import PKI_NAMES
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("doors-pki"))
    init_dev_pki(directory, PKI_NAMES)
    return directory


@pytest.fixture(scope="session")
def repo_mappings():
    """The repository's mapping set (mappings/), loaded once for the whole run: loading
    compiles every map, and translating never changes the set."""
    from gateway.mapping.mapping_set import MappingSet

    return MappingSet.load(os.path.join(ROOT, "mappings"))


@pytest.fixture
def make_config(dev_pki, tmp_path):
    """Build a GatewayConfig for tests: the shipped dev config with the given overrides.

    `make_config(db_url, mllp=[dict(...)], senders=[...])`: listeners default to port 0 (a
    free port), so tests never collide.
    """
    from gateway.config import (DatabaseConfig, GatewayConfig, MllpListenerConfig, PkiConfig,
                                SenderConfig)

    def make(db_url: str, mllp: list[dict] | None = None, senders: list[SenderConfig] | None = None,
             **database) -> GatewayConfig:
        listeners = mllp if mllp is not None else [dict(name="mllp-test", port=0,
                                                         accept_unknown_senders=True)]
        return GatewayConfig(
            path=os.path.join(ROOT, "conf", "gateway.yaml"), root=ROOT,
            database=DatabaseConfig(url=db_url, **database),
            pki=PkiConfig(ca=os.path.join(dev_pki, "ca.crt"), cert=os.path.join(dev_pki, "gateway.crt"),
                          key=os.path.join(dev_pki, "gateway.key"), dev_dir=dev_pki,
                          prescription_key=os.path.join(dev_pki, "prescription-signing.key")),
            mllp=tuple(MllpListenerConfig(**{"port": 0, **spec}) for spec in listeners),
            senders=tuple(senders or ()),
        )

    return make


@pytest.fixture
def running_gateway():
    """Start a gateway service tree in this process (pytest-twisted's reactor); returns
    `start(config)` -> Deferred of {listener name: port}. Stopped after the test."""
    import pytest_twisted
    from twisted.internet import defer, reactor

    from gateway.service import build_service
    from process_support import listening_port

    services = []

    @defer.inlineCallbacks
    def start(config):
        service = build_service(config, reactor)
        service.startService()
        services.append(service)
        ports = {}
        for listener in config.mllp + config.astm + config.https + config.admin:
            port = yield listening_port(service.getServiceNamed(listener.name))
            ports[listener.name] = port.getHost().port
        return ports

    yield start
    for service in services:
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


@pytest.fixture
def peers(make_config, dev_pki, tmp_path):
    """The sandbox peers (shared record, CNSS) on free ports in this process; see
    delivery_support.Peers."""
    from delivery_support import start_peers, stop_peers

    started = start_peers(make_config, dev_pki, tmp_path)
    yield started
    stop_peers(started)


def corpus_path(*parts: str) -> str:
    return os.path.join(CORPUS, *parts)


def replace_listeners(config, **changes):
    """A copy of `config` whose MLLP listeners have `changes` applied."""
    return dataclasses.replace(config, mllp=tuple(dataclasses.replace(l, **changes) for l in config.mllp))


sys.path.insert(0, BENCH)  # hl7msgs: the benchmark's realistic ADT^A01 and ORU^R01
