"""Tests for gateway.config: the shipped files load, and every mistake is reported at once."""
from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent

FACILITIES = """\
facilities:
  - id: "INPE-100001"
    name: "CHU Ibn Rochd Casablanca"
    type: hospital
    applications: [HIS_CHU]
    facilities: [CHU_IBN_ROCHD]
    charset_fallback: cp1256
"""

MINIMAL = """\
database:
  url: sqlite:///var/gateway.sqlite
pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
facilities: conf/facilities.yaml
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with a conf/ folder, made the current directory."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "facilities.yaml").write_text(FACILITIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = project / "conf" / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ or {})
    return caught.value.problems


def test_shipped_development_config_loads():
    """conf/gateway.yaml loads with SQLite under var/, both MLLP listeners and four facilities."""
    config = load_config(str(REPO / "conf" / "gateway.yaml"), {})
    assert config.root == str(REPO)
    assert config.database.url == f"sqlite:///{REPO}/var/gateway.sqlite"
    assert config.pki.ca == str(REPO / "certs" / "dev" / "ca.crt")
    assert [(m.name, m.port, m.interface, m.tls) for m in config.mllp] == [
        ("mllp-plain", 2575, "127.0.0.1", False), ("mllp-tls", 2576, "127.0.0.1", True)]
    assert config.mllp[0].accept_unknown_senders and config.mllp[0].allow_sources == ("127.0.0.0/8",)
    assert [s.type for s in config.senders] == ["hospital", "laboratory", "imaging", "pharmacy", "doctor"]
    assert config.https[0].port == 8443 and config.prescriptions.eligibility == "cnss"
    assert config.facility_types["pharmacy"].messages == ("RDS^O13", "CSV^*")
    hospital = config.senders[0]
    assert (hospital.applications, hospital.facilities, hospital.charset_fallback) == (
        ("HIS_CHU",), ("CHU_IBN_ROCHD",), "cp1256")


def test_shipped_production_example_loads_with_password_from_environment():
    """conf/production.example.yaml loads once the password and the peers' URLs are in the
    environment; its deliveries go to both national peers."""
    config = load_config(str(REPO / "conf" / "production.example.yaml"),
                         {"GATEWAY_DB_PASSWORD": "s3cret",
                          "SHARED_RECORD_URL": "https://record.example.ma/fhir",
                          "CNSS_FSE_URL": "https://fse.example.ma/",
                          "CONSOLE_NOC_HASH": NOC_HASH, "CONSOLE_ADMIN_HASH": NOC_HASH})
    assert [(d.name, d.kind) for d in config.destinations] == [
        ("shared-record", "fhir-record"), ("cnss", "cnss")]
    assert {name for route in config.routes for name in route.to} == {"shared-record", "cnss"}
    assert config.database.url == "postgresql+psycopg://gateway:s3cret@db.internal:5432/gateway"
    assert config.pki.key == "/etc/ma-hie-gateway/pki/gateway.key"
    plain = config.mllp[0]
    assert plain.interface == "0.0.0.0" and not plain.accept_unknown_senders
    assert plain.allow_sources and len(config.senders) == 5
    assert config.admin[0].tls and config.log_format == "json"
    assert [(a.name, a.role) for a in config.console.accounts] == [("noc", "operator"), ("dsi", "admin")]


NOC_HASH = "scrypt$32768$8$1$ZtCebQbdS7oUb_he6RqmkQ$REXwWX_puC3LsdMrZ5yZ_46z7ryYVqizU9quv5k9uY4"


def test_console_accounts_take_hashes_never_passwords_and_listener_ports_are_not_shared(project):
    write(project, """\
        database: {url: "sqlite:///var/g.sqlite"}
        pki: {ca: ca.crt, cert: g.crt, key: g.key}
        listeners:
          mllp: [{name: m, port: 2575}]
          admin: [{name: admin, port: 2575}]
        console:
          accounts:
            - {name: a, role: admin, password_hash: "hunter2"}
            - {name: b, role: root, password_hash: "%s"}
          timezone: Morocco/Rabat
        retention: {raw_payloads: 0, run_at: "25:00"}
        """ % NOC_HASH)
    with pytest.raises(ConfigError) as caught:
        load_config(str(project / "conf" / "gateway.yaml"))
    text = str(caught.value)
    assert "console.accounts[0].password_hash: must be a hash made by `gateway accounts hash`" in text
    assert "hunter2" not in text
    assert "console.accounts[1].role" in text
    assert "console.timezone: must be an IANA time zone such as Africa/Casablanca" in text
    assert "retention.raw_payloads" in text and "retention.run_at" in text
    assert "listeners.admin[0].port: 2575 is also another listener's port" in text


def test_every_mistake_is_reported_at_once_with_file_line_and_key_path(project):
    """Several mistakes in both files give one ConfigError listing each with its line and path."""
    write(project, """\
        node: {name: t}
        log_level: verbose
        database:
          url: sqlite:///var/g.sqlite
          pool_size: many
        pki: {ca: a.crt, cert: b.crt}
        listeners:
          mllp:
            - {name: one, port: 2575, allow_sources: [10.0.0.0/33]}
            - {name: two, port: abc, processing_ids: [P, X], interface: localhost}
            - {name: one, port: 2575}
        facilities: conf/facilities.yaml
        """)
    write(project, "facilities:\n  - {id: F-1, name: A, type: hopital}\n", "facilities.yaml")
    assert problems(project / "conf" / "gateway.yaml") == [
        "conf/gateway.yaml:2: log_level: must be one of debug, info, warn, error, got 'verbose'",
        "conf/gateway.yaml:5: database.pool_size: must be an integer between 1 and 256, got 'many'",
        "conf/gateway.yaml:6: pki.key: required key is missing",
        "conf/gateway.yaml:9: listeners.mllp[0].allow_sources[0]: must be an address or network "
        "in CIDR form, such as 10.20.0.0/16, got '10.0.0.0/33'",
        "conf/gateway.yaml:10: listeners.mllp[1].port: must be an integer between 1 and 65535, "
        "got 'abc'",
        "conf/gateway.yaml:10: listeners.mllp[1].processing_ids[1]: must be one of P, T, D, got 'X'",
        "conf/gateway.yaml:10: listeners.mllp[1].interface: must be an IP address such as "
        "127.0.0.1 or 0.0.0.0, got 'localhost'",
        "conf/gateway.yaml:11: listeners.mllp[2].name: name one is already used by listeners.mllp[0]",
        "conf/gateway.yaml:11: listeners.mllp[2].port: port 2575 is already used by listeners.mllp[0]",
        "conf/facilities.yaml:2: facilities[0].type: must be one of hospital, clinic, doctor, "
        "laboratory, imaging, pharmacy, got 'hopital' (did you mean 'hospital'?)",
    ]


def test_unknown_key_suggests_the_closest_known_key(project):
    """A misspelt key is reported as unknown with a did-you-mean for the nearest valid key."""
    path = write(project, MINIMAL + "listeners:\n  mllp:\n    - name: a\n      prot: 2575\n")
    assert problems(path) == [
        "conf/gateway.yaml:8: listeners.mllp[0].prot: unknown key (did you mean 'port'?)",
        "conf/gateway.yaml:7: listeners.mllp[0].port: required key is missing",
    ]


def test_key_written_twice_is_reported(project):
    """A key repeated in one mapping is an error pointing at the first occurrence."""
    path = write(project, MINIMAL + "log_level: info\nlog_level: debug\n")
    assert problems(path) == ["conf/gateway.yaml:6: log_level: duplicate key (first at line 5)"]


def test_environment_variables_are_substituted_with_defaults(project):
    """${NAME} takes the environment's value, ${NAME:-default} the default when unset."""
    path = write(project, """\
        node: {name: "${NODE}-${SITE:-casa}"}
        database: {url: "postgresql+psycopg://gw:${DB_PASSWORD}@db:5432/gw"}
        pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
        listeners:
          mllp:
            - name: plain
              port: ${MLLP_PORT:-2575}
        """)
    config = load_config(str(path), {"NODE": "gw", "DB_PASSWORD": "p4ss"})
    assert config.node_name == "gw-casa"
    assert config.database.url == "postgresql+psycopg://gw:p4ss@db:5432/gw"
    assert config.mllp[0].port == 2575  # an unquoted substitution is typed like YAML text


def test_undefined_environment_variable_is_an_error_naming_the_key(project):
    """A ${NAME} with no such variable and no default is reported at its key."""
    path = write(project, """\
        database:
          url: "postgresql+psycopg://gw:${DB_PASSWORD}@db:5432/gw"
        pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
        """)
    assert problems(path) == [
        "conf/gateway.yaml:2: database.url: environment variable DB_PASSWORD is not set "
        "(set it, or write ${DB_PASSWORD:-default})"]


def test_gateway_db_url_overrides_database_url(project):
    """GATEWAY_DB_URL replaces database.url, whose own variables are then not needed."""
    path = write(project, """\
        database:
          url: "postgresql+psycopg://gw:${DB_PASSWORD}@db:5432/gw"
          pool_size: 2
        pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
        """)
    config = load_config(str(path), {"GATEWAY_DB_URL": "postgresql+psycopg://o@other:5432/x"})
    assert config.database.url == "postgresql+psycopg://o@other:5432/x"
    assert config.database.pool_size == 2


def test_invalid_gateway_db_url_is_reported_without_its_password(project):
    """A GATEWAY_DB_URL for another database is an error that hides the password."""
    path = write(project, MINIMAL)
    assert problems(path, {"GATEWAY_DB_URL": "mysql://gw:s3cret@db/gw"}) == [
        "GATEWAY_DB_URL (environment): database.url: must be a sqlite or postgresql URL, "
        "got 'mysql://gw:***@db/gw'"]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
def test_an_in_memory_sqlite_database_is_refused(project, url):
    """Every thread of the gateway would open its own empty in-memory database (and the engine
    could not even be made: a TypeError at start): refused with the reason."""
    path = write(project, MINIMAL)
    found = problems(path, {"GATEWAY_DB_URL": url})
    assert len(found) == 1 and found[0].startswith(
        "GATEWAY_DB_URL (environment): database.url: must name a SQLite file (an in-memory database "
        "keeps nothing"), found


def test_relative_paths_are_resolved_against_the_project_root(project, tmp_path_factory):
    """A relative sqlite file and PKI paths resolve against conf/'s parent, not the cwd."""
    path = write(project, MINIMAL)
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(str(path), {})
    assert config.root == str(project) and config.path == str(path)
    assert config.database.url == f"sqlite:///{project}/var/gateway.sqlite"
    assert config.pki.cert == str(project / "certs" / "gw.crt")
    assert config.pki.dev_dir == str(project / "certs" / "dev")


def test_facility_errors_carry_the_registry_file_name_and_line(project):
    """Problems in the facility registry name that file and the line of the faulty value."""
    write(project, """\
        facilities:
          - id: "INPE-1"
            name: A
            type: hospital
          - id: "INPE-1"
            name: B
            type: clinic
            charset_fallback: cp9999
            timezone: Africa/Casablanka
          - {id: 100003, name: C, type: doctor, applications: HIS}
          - {id: "INPE-100004-ORGANISATION-AVEC-UN-IDENTIFIANT-BEAUCOUP-BEAUCOUP-TROP-LONG", name: D, type: doctor}
        """, "facilities.yaml")
    assert problems(write(project, MINIMAL)) == [
        "conf/facilities.yaml:8: facilities[1].charset_fallback: must be a Python codec name "
        "such as cp1256 or latin-1, got 'cp9999'",
        "conf/facilities.yaml:9: facilities[1].timezone: must be an IANA time zone such as "
        "Africa/Casablanca, got 'Africa/Casablanka'",
        "conf/facilities.yaml:10: facilities[2].id: must be a non-empty string, got 100003 "
        "(put it in quotes)",
        "conf/facilities.yaml:10: facilities[2].applications: must be a list, got a value",
        "conf/facilities.yaml:11: facilities[3].id: must be at most 64 characters, without "
        "control characters, got 'INPE-100004-ORGANISATION-AVEC-UN-IDENTIFIANT-BEAUCOUP-BEAUCOUP-TROP-LONG'",
        "conf/facilities.yaml:5: facilities[1].id: id INPE-1 is already used by facilities[0]",
    ]


def test_missing_facility_registry_is_reported_at_its_key(project):
    """A facilities path that cannot be read is reported at the line that names it."""
    (project / "conf" / "facilities.yaml").unlink()
    assert problems(write(project, MINIMAL)) == [
        "conf/gateway.yaml:4: facilities: cannot read conf/facilities.yaml: "
        "No such file or directory"]


def test_yaml_syntax_error_is_reported_with_its_line(project):
    """Broken YAML gives a single problem with the file and line of the syntax error."""
    path = write(project, "database:\n  url: [unclosed\npki: {}\n")
    [problem] = problems(path)
    assert problem.startswith("conf/gateway.yaml:3: YAML syntax error:")


def test_gateway_identity_must_fit_in_an_ack(project):
    """identity.application/facility go into MSH-3/MSH-4 of every ACK: a field separator or a
    line end (here from the environment) would break every ACK, a non-ASCII letter stopped
    the gateway at start; each is reported at its key."""
    path = write(project, MINIMAL + 'identity: {application: "${APP}", facility: "Hôpital"}\n')
    found = problems(path, {"APP": "MA|HIE\rGW"})
    assert [p.split(": must")[0] for p in found] == [
        "conf/gateway.yaml:5: identity.application", "conf/gateway.yaml:5: identity.facility"]
    assert all("without the HL7 separators" in p for p in found)
    config = load_config(str(write(project, MINIMAL + "identity: {application: GW^2.16.504^ISO}\n")), {})
    assert config.identity.application == "GW^2.16.504^ISO"  # an HD with its components


def test_aliases_that_repeat_a_list_many_times_are_refused_at_once(project):
    """A registry of a few hundred lines whose aliases repeat one long list for every facility
    (billion laughs) is refused in well under a second instead of holding the loading (and a
    reload, in the running gateway) for minutes and gigabytes; moderate aliases still load."""
    names = ",".join(["*n"] * 20_000)
    lines = [f"facilities:\n  - {{id: F0, name: n, type: hospital, facilities: &all [&n CHU,{names}]}}"]
    lines += [f"  - {{id: F{i}, name: n, type: hospital, facilities: *all}}" for i in range(1, 500)]
    (project / "conf" / "facilities.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    [problem] = problems(write(project, MINIMAL))
    assert time.monotonic() - started < 5
    assert problem.startswith("conf/facilities.yaml: its aliases (*name) repeat")

    (project / "conf" / "facilities.yaml").write_text(
        "facilities:\n  - {id: A, name: a, type: hospital, allow_sources: &lan [10.1.0.0/16]}\n"
        "  - {id: B, name: b, type: clinic, allow_sources: *lan}\n")
    config = load_config(str(write(project, MINIMAL)), {})
    assert [s.allow_sources for s in config.senders] == [("10.1.0.0/16",)] * 2


def test_yaml_nested_too_deeply_is_a_problem_not_a_crash(project):
    """Collections nested thousands deep are reported as a problem of the file (PyYAML reads
    them recursively), not raised as a RecursionError (nor a crash of libyaml's composer)."""
    path = write(project, MINIMAL + "node: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert problems(path) == ["conf/gateway.yaml: YAML nested too deeply to read"]


def test_a_certificate_bound_to_two_facilities_is_refused(project):
    """One fingerprint or subject (as normalised) for two facilities: the registry would give
    the certificate to the last one, silently."""
    fingerprint = ":".join(["AB"] * 32)
    (project / "conf" / "facilities.yaml").write_text(textwrap.dedent(f"""\
        facilities:
          - {{id: A, name: a, type: hospital, certificate_sha256: "{fingerprint}",
              certificate_subject: "CN=INPE-1,O=MA HIE facility"}}
          - {{id: B, name: b, type: hospital, certificate_sha256: "{"ab" * 32}"}}
          - {{id: C, name: c, type: clinic, certificate_subject: "CN=INPE-1,O=MA HIE facility"}}
        """))
    assert problems(write(project, MINIMAL)) == [
        "conf/facilities.yaml: facilities[1].certificate_sha256: also the certificate of facility A",
        "conf/facilities.yaml: facilities[2].certificate_subject: also the certificate of facility A"]


def test_an_msh3_msh4_pair_naming_two_facilities_is_refused(project):
    """On plain MLLP a message whose MSH-3/MSH-4 two facilities claim went to the first in
    the file, with its rights and its charset: silently another facility's. Told apart by
    `applications`, two facilities may share an MSH-4 name."""
    (project / "conf" / "facilities.yaml").write_text(textwrap.dedent("""\
        facilities:
          - {id: A, name: a, type: hospital, facilities: [GRP]}
          - {id: B, name: b, type: laboratory, facilities: [GRP], applications: [LIS]}
          - {id: C, name: c, type: clinic, facilities: [GRP, CLI]}
          - {id: D, name: d, type: laboratory, facilities: [LAB], applications: [LIS, HIS]}
          - {id: E, name: e, type: laboratory, facilities: [LAB], applications: [HIS]}
        """))
    assert problems(write(project, MINIMAL)) == [
        "conf/facilities.yaml: facilities[2]: MSH-4 'GRP' with any MSH-3 also names facility A: "
        "give each its own `applications`",
        "conf/facilities.yaml: facilities[4]: MSH-4 'LAB' with MSH-3 'HIS' also names facility D: "
        "give each its own `applications`"]


def test_missing_config_file_is_an_error():
    """A config path that does not exist raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read"):
        load_config("/nonexistent/conf/nowhere.yaml", {})


def test_facility_identity_types_and_doors_are_checked(project):
    """Certificate bindings, source networks, a facility's mapping folder, the types' rights,
    the HTTPS listener's port and the eligibility destination are each checked, all at once."""
    (project / "mappings" / "senders" / "INPE-1").mkdir(parents=True)
    write(project, """\
        types:
          pharmacy:
            messages: ["RDS^O13", "rds"]
            operations: [prescriptions.lookup, prescriptions.steal]
          dentist: {messages: ["*"]}
        facilities:
          - id: "INPE-1"
            name: A
            type: hospital
            certificate_sha256: "AB:CD"
            mappings: INPE-1
          - id: "INPE-2"
            name: B
            type: pharmacy
            certificate_subject: "not a subject"
            allow_sources: [10.0.0.0/33]
            mappings: INPE-9
        """, "facilities.yaml")
    found = problems(write(project, MINIMAL + textwrap.dedent("""\
        mappings: {directory: mappings}
        listeners:
          mllp: [{name: m, port: 2575}]
          https: [{name: h, port: 2575}]
        destinations: [{name: record, kind: fhir-record, url: "https://record/fhir"}]
        prescriptions: {eligibility: record}
        """)))
    expected = [
        "conf/facilities.yaml:3: types.pharmacy.messages[1]: must be a message type pattern",
        "conf/facilities.yaml:4: types.pharmacy.operations[1]: must be one of",
        "conf/facilities.yaml:5: types.dentist: unknown key",
        "conf/facilities.yaml:10: facilities[0].certificate_sha256: must be a SHA-256 fingerprint",
        "conf/facilities.yaml:15: facilities[1].certificate_subject: must be a certificate subject",
        "conf/facilities.yaml:16: facilities[1].allow_sources[0]: must be an address or network",
        "conf/gateway.yaml: listeners.https[0].port: 2575 is also an MLLP listener's port",
        "conf/gateway.yaml: prescriptions.eligibility: 'record' is not a destination of kind cnss",
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in found), (start, found)
    assert len(found) == len(expected), found
    # With those fixed, a mapping folder that does not exist is named.
    write(project, """\
        facilities:
          - {id: "INPE-1", name: A, type: hospital, mappings: INPE-1,
             certificate_sha256: "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89"}
          - {id: "INPE-2", name: B, type: pharmacy, mappings: INPE-9}
        """, "facilities.yaml")
    assert problems(write(project, MINIMAL + "mappings: {directory: mappings}\n")) == [
        "conf/facilities.yaml: facilities[1].mappings: 'INPE-9' is not a folder of mappings/senders"]
    config = load_config(str(write(project, MINIMAL)), {})
    assert config.senders[0].certificate_sha256 == "abcdef0123456789" * 4


def test_a_destination_may_set_its_batch_size(project):
    """destinations[].batch_size: how many deliveries a shared-record request carries (the
    adapter's default when absent); a CNSS destination takes one care sheet per request."""
    from gateway.delivery.destinations import RECORD_BATCH_SIZE, destination_for

    config = load_config(str(write(project, MINIMAL + textwrap.dedent("""\
        destinations:
          - {name: record, kind: fhir-record, url: "https://record/fhir", batch_size: 200}
          - {name: other, kind: fhir-record, url: "https://other/fhir"}
        """))), {})
    assert [d.batch_size for d in config.destinations] == [200, None]
    assert [destination_for(d).batch_size for d in config.destinations] == [200, RECORD_BATCH_SIZE]
    assert problems(write(project, MINIMAL + textwrap.dedent("""\
        destinations:
          - {name: record, kind: fhir-record, url: "https://record/fhir", batch_size: 0}
        """))) == ["conf/gateway.yaml:6: destinations[0].batch_size: must be an integer between 1 "
                   "and 1000, got 0"]
    assert problems(write(project, MINIMAL + textwrap.dedent("""\
        destinations:
          - {name: cnss, kind: cnss, url: "https://cnss/", batch_size: 5}
        """))) == ["conf/gateway.yaml: destinations[0].batch_size: cnss takes one care sheet per "
                   "request (1)"]


def test_a_delivery_attempt_must_end_within_the_lease(project):
    """connect_timeout + response_timeout must stay under delivery.lease: past the lease
    another node sends the same deliveries while the first still waits for the answer."""
    destination = 'destinations:\n  - {name: record, kind: fhir-record, url: "https://record/fhir", %s}\n'
    assert problems(write(project, MINIMAL + destination % "response_timeout: 55")) == [
        "conf/gateway.yaml: destinations[0].response_timeout: connect_timeout + response_timeout "
        "(60 s) must be less than delivery.lease (60 s)"]
    longer = load_config(str(write(project, MINIMAL + destination % "response_timeout: 90"
                                   + "delivery: {lease: 120}\n")), {})
    assert (longer.destinations[0].response_timeout, longer.delivery.lease) == (90, 120)
    assert load_config(str(write(project, MINIMAL + destination % "response_timeout: 30")), {})


def test_values_that_would_crash_the_load_are_reported_with_their_line(project):
    """An explicit tag the text does not fit, a zone name that is a folder of the zone
    database, a NUL in a file path, an unclosed IPv6 bracket or a bad port in a URL, a
    codec that is no character set, an endless duration: each a problem with its line, all
    at once, never an exception out of load_config."""
    write(project, """\
        facilities:
          - {id: "INPE-1", name: A, type: hospital, timezone: Africa, charset_fallback: base64}
          - {id: "INPE-2", name: !!int abc, type: clinic, charset_fallback: "cp\\0"}
        """, "facilities.yaml")
    found = problems(write(project, """\
        database: {url: "sqlite:///var/g.sqlite", pool_size: !!int many}
        pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
        facilities: conf/facilities.yaml
        routes: "conf/r\\0.yaml"
        destinations:
          - {name: a, kind: fhir-record, url: "https://[::1/fhir"}
          - {name: b, kind: fhir-record, url: "https://record:99999/fhir", retry: {factor: 1%s}}
        delivery: {lease: .inf, poll_interval: !!float soon}
        console: {accounts: [], session_max_age: 1.0e+400, login_attempts: !!bool maybe}
        """ % ("0" * 400)))
    assert [p.split(": ")[0] + ": " + p.split(": ")[1] for p in found] == [
        "conf/gateway.yaml:1: database.pool_size",
        "conf/facilities.yaml:2: facilities[0].timezone",
        "conf/facilities.yaml:2: facilities[0].charset_fallback",
        "conf/facilities.yaml:3: facilities[1].name",
        "conf/facilities.yaml:3: facilities[1].charset_fallback",
        "conf/gateway.yaml:4: routes",
        "conf/gateway.yaml:6: destinations[0].url",
        "conf/gateway.yaml:7: destinations[1].url",
        "conf/gateway.yaml:7: destinations[1].retry.factor",
        "conf/gateway.yaml:8: delivery.lease",
        "conf/gateway.yaml:8: delivery.poll_interval",
        "conf/gateway.yaml:9: console.session_max_age",
        "conf/gateway.yaml:9: console.login_attempts",
    ]
    assert found[0].endswith("cannot read this value: 'many' is not a tag:yaml.org,2002:int")
    assert "got 'base64'" in found[2] and "got inf" in found[9]


def test_a_control_character_is_reported_at_its_line_and_a_tag_is_not_ignored(project):
    """A NUL or an ESC was reported without a line, as libyaml's byte position; a tag on a
    mapping or a list (`!!set`, `!!python/object:...`) was silently ignored."""
    assert problems(write(project, MINIMAL + "node:\n  name: d\x1bv\n")) == [
        "conf/gateway.yaml:6: character #x001b is not allowed (a control character)"]
    assert problems(write(project, MINIMAL + textwrap.dedent("""\
        node: !!python/object:os.system {name: x}
        retention: !!set {raw_payloads}
        """))) == [
        "conf/gateway.yaml:5: node: must be a mapping of keys, got one tagged "
        "tag:yaml.org,2002:python/object:os.system",
        "conf/gateway.yaml:6: retention: must be a mapping of keys, got one tagged tag:yaml.org,2002:set"]


def test_a_facility_mappings_folder_is_one_folder_of_senders(project):
    """`..`, `.` or `INPE-1/segments` are folders, so they passed, but the mapping set has a
    layer only for each folder of senders/: the facility silently got the shared maps."""
    (project / "mappings" / "senders" / "INPE-1" / "segments").mkdir(parents=True)
    write(project, "facilities:\n" + "".join(
        f'  - {{id: "INPE-{n}", name: N{n}, type: clinic, mappings: "{folder}"}}\n'
        for n, folder in enumerate(("INPE-1", "..", ".", "INPE-1/segments", str(project))))
        , "facilities.yaml")
    assert problems(write(project, MINIMAL + "mappings: {directory: mappings}\n")) == [
        f"conf/facilities.yaml: facilities[{n}].mappings: {folder!r} is not a folder of mappings/senders"
        for n, folder in ((1, ".."), (2, "."), (3, "INPE-1/segments"), (4, str(project)))]


def test_an_error_in_the_registry_does_not_unregister_its_facilities(project):
    """One mistake in facilities.yaml added a false problem for each ASTM listener and route
    naming a facility of it: 'is not in the facility registry'."""
    write(project, FACILITIES + "    timezone: Africa/Casablanka\n", "facilities.yaml")
    (project / "conf" / "routes.yaml").write_text(
        "routes:\n  - {name: r, to: [record], when: {senders: [INPE-100001]}}\n")
    assert problems(write(project, MINIMAL + textwrap.dedent("""\
        listeners:
          astm: [{name: lab, port: 40001, facility: "INPE-100001"}]
        destinations: [{name: record, kind: fhir-record, url: "https://record/fhir"}]
        routes: conf/routes.yaml
        """))) == ["conf/facilities.yaml:8: facilities[0].timezone: must be an IANA time zone such as "
                   "Africa/Casablanca, got 'Africa/Casablanka'"]
