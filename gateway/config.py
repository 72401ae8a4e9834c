"""The gateway's configuration: typed, validated at load, every error reported at once.

`load_config(path)` reads `conf/gateway.yaml` (or another file), the facility registry it
names, substitutes `${NAME}` from the environment (secrets never live in the files), applies
`GATEWAY_DB_URL`, and returns a frozen `GatewayConfig`. Any problem, anywhere, raises one
`ConfigError` listing every problem as `file:line: key.path: message`.

Relative paths in the files are resolved against the project root (the parent of `conf/`),
so `make run` works from a fresh clone whatever the current directory is.
"""
from __future__ import annotations

import difflib
import io
import ipaddress
import os
import re
import sys
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.mapping.fhir_schema import is_resource_type
from gateway.store.texts import has_control
from gateway.yaml_bounds import expansion_limit_passed
from gateway.yaml_loader import SafeLoader, reader_error_line


class ConfigError(Exception):
    """Configuration problems, all of them, as `file:line: key: message` lines."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class DatabaseConfig:
    # SQLAlchemy URL: sqlite:///var/gateway.sqlite or postgresql+psycopg://...; it may hold a
    # password (from the environment), so it stays out of repr() and therefore out of logs.
    url: str = field(repr=False)
    pool_size: int = 4  # threads (and connections) for general database work
    ingest_max_batch: int = 512  # most messages committed by one group commit


@dataclass(frozen=True)
class PkiConfig:
    ca: str  # CA certificate (PEM) that client certificates must chain to
    cert: str  # the gateway's own certificate (PEM)
    key: str  # the gateway's private key (PEM)
    dev_dir: str = "certs/dev"  # where `gateway pki init` writes the development PKI
    # Certificate revocation list (PEM or DER) of pki.ca; a client certificate listed there is
    # refused on every door. None: no CRL (development).
    crl: str | None = None
    # Ed25519 key that signs prescription QR payloads (`gateway pki init` creates it in
    # dev_dir); its public half is published at /v1/prescriptions/signing-key.
    prescription_key: str = "certs/dev/prescription-signing.key"


@dataclass(frozen=True)
class IdentityConfig:
    """How the gateway names itself in the MSH-3/MSH-4 of the ACKs it sends."""

    application: str = "MA_HIE_GATEWAY"
    facility: str = "MA_HIE"


@dataclass(frozen=True)
class MllpListenerConfig:
    name: str
    port: int
    interface: str = "127.0.0.1"
    tls: bool = False  # TLS with a client certificate required and checked against pki.ca
    max_frame_size: int = 16 * 1024 * 1024  # bytes; a larger frame closes the connection
    idle_timeout: float = 300.0  # seconds without a byte before the connection is closed
    frame_timeout: float = 60.0  # deadline for one frame, from its first byte to its end
    commit_blocks: bool = False  # MLLP release 2: send a commit ACK block after storing
    # Source addresses allowed to connect (CIDR); empty means any.
    allow_sources: tuple[str, ...] = ()
    # Accept messages from senders not in the facility registry (development only).
    accept_unknown_senders: bool = False
    processing_ids: tuple[str, ...] = ("P", "T", "D")  # MSH-11 values accepted
    # When the ACK leaves: once the message is stored (`commit`), or once it is also
    # translated (`translation`: a translation failure is answered AE/CE with an ERR).
    ack_after: str = "commit"


@dataclass(frozen=True)
class AstmListenerConfig:
    """An ASTM E1381/E1394 listener for lab analyzers (no MSH: the facility is configured)."""

    name: str
    port: int
    facility: str  # the registry id of the laboratory whose analyzers connect here
    interface: str = "127.0.0.1"
    allow_sources: tuple[str, ...] = ()  # source networks (CIDR) allowed to connect; empty: any
    max_frame_size: int = 64 * 1024  # bytes of one E1381 frame
    max_message_size: int = 16 * 1024 * 1024  # bytes of one whole transfer
    receive_timeout: float = 30.0  # seconds between frames once a transfer has started
    frame_timeout: float = 15.0  # seconds to receive one frame
    idle_timeout: float = 600.0  # seconds without a byte before the connection is closed


@dataclass(frozen=True)
class HttpsListenerConfig:
    """The HTTPS door: REST API under /v1/, SOAP under /soap/; client certificate required."""

    name: str
    port: int
    interface: str = "127.0.0.1"
    max_request_size: int = 16 * 1024 * 1024  # bytes; a larger body is refused with 413
    idle_timeout: float = 60.0  # seconds without a byte before the connection is closed
    # Deadline for one request, from its first byte to the end of its body (then 408), so that
    # a client that trickles bytes cannot hold a connection; 16 MiB at 140 KB/s.
    read_timeout: float = 120.0
    request_timeout: float = 30.0  # seconds to answer once the request is read (then 503)


@dataclass(frozen=True)
class AdminListenerConfig:
    """The operators' listener: the console at /, /metrics and /health/. Plain HTTP is for
    loopback in development; in production `tls: true` serves pki.cert/key (accounts log in,
    no client certificate is asked)."""

    name: str
    port: int = 8080
    interface: str = "127.0.0.1"
    tls: bool = False
    allow_sources: tuple[str, ...] = ()  # source networks (CIDR) allowed to connect; empty: any
    # Over plain HTTP, the names browsers may reach the console by besides IP addresses and
    # localhost: another name is a DNS rebinding (a web page whose name points at this port).
    hosts: tuple[str, ...] = ()


ROLES = ("viewer", "operator", "admin")  # each may do what the one before it may
# `gateway accounts hash` writes: scrypt$N$r$p$salt$hash (salt and hash unpadded base64url).
PASSWORD_HASH = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9_-]{16,})\$([A-Za-z0-9_-]{32,})")


@dataclass(frozen=True)
class ConsoleAccount:
    name: str  # the login
    role: str  # viewer | operator | admin
    password_hash: str = field(repr=False)  # from `gateway accounts hash`; never the password
    display_name: str | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """The console's accounts and sessions (sessions live in the database: any node serves)."""

    accounts: tuple[ConsoleAccount, ...] = ()
    session_idle_timeout: float = 1800.0  # seconds without a request before a new login
    session_max_age: float = 12 * 3600.0  # seconds after login, whatever the activity
    login_attempts: int = 5  # failed logins per account and address before a pause
    login_pause: float = 300.0  # seconds of that pause
    # The zone times are shown and searched in (IANA name): the operators' wall clock.
    timezone: str = "Africa/Casablanca"


@dataclass(frozen=True)
class AuditExportConfig:
    """IHE ATNA export of the audit trail: RFC 5424 syslog over TLS (RFC 5425) to a collector,
    with pki.cert/key as client certificate and the collector checked against `ca`."""

    host: str
    port: int = 6514
    ca: str | None = None  # the collector's CA; default pki.ca
    source_id: str = "MA-HIE"  # AuditSourceIdentification
    enterprise_site: str = "MA"  # AuditEnterpriseSiteID
    queue_limit: int = 100_000  # records waiting for the collector; more are counted, not kept


@dataclass(frozen=True)
class AuditConfig:
    flush_interval: float = 0.2  # seconds between appends of the events gathered meanwhile
    export: AuditExportConfig | None = None


@dataclass(frozen=True)
class RetentionConfig:
    """How many days each kind of data is kept (None: forever), and when expiry runs. On
    PostgreSQL the kinds live in monthly partitions and expire a whole month at a time."""

    raw_payloads: int | None = None  # the bytes received (message_payloads)
    canonical: int | None = None  # the FHIR bundles made from them (canonical_bundles)
    audit: int | None = None  # the audit trail (audit_log)
    run_at: str = "03:00"  # local time of the daily run, HH:MM
    batch_size: int = 5000  # rows deleted per transaction (SQLite)


FACILITY_TYPES = ("hospital", "clinic", "doctor", "laboratory", "imaging", "pharmacy")

# The operations of the REST and SOAP doors a facility type may be allowed.
API_OPERATIONS = (
    "hl7v2.submit",            # POST /v1/hl7v2, SOAP SubmitHL7Message
    "fhir.submit",             # POST /v1/fhir
    "messages.read",           # GET /v1/messages/{id} (its own messages only)
    "reports.submit",          # SOAP SubmitReport (imaging reports)
    "prescriptions.qr",        # GET /v1/prescriptions/{id}/qr (the prescriber's own)
    "prescriptions.lookup",    # GET /v1/prescriptions/{id}, POST /v1/prescriptions/lookup
    "prescriptions.dispense",  # record a dispensation (RDS^O13, MedicationDispense)
    "prescriptions.perform",   # record acts performed against a prescription (labs, imaging)
)


@dataclass(frozen=True)
class FacilityTypeConfig:
    """What one type of facility may do: message types it may send (patterns as in routes:
    'ADT^*', 'ORU^R01', 'ASTM', 'CSV^profile', '*') and API operations (API_OPERATIONS)."""

    messages: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()


_COMMON_OPERATIONS = ("hl7v2.submit", "fhir.submit", "messages.read")
# Used for the types that facilities.yaml's `types:` section leaves out.
DEFAULT_FACILITY_TYPES: dict[str, FacilityTypeConfig] = {
    "hospital": FacilityTypeConfig(("*",), _COMMON_OPERATIONS + ("reports.submit", "prescriptions.qr")),
    "clinic": FacilityTypeConfig(("*",), _COMMON_OPERATIONS + ("reports.submit", "prescriptions.qr")),
    "doctor": FacilityTypeConfig(
        ("ADT^*", "ORM^O01", "OML^O21", "RDE^O11", "OMP^O09", "MDM^*", "DFT^P03", "VXU^V04"),
        _COMMON_OPERATIONS + ("prescriptions.qr",)),
    "laboratory": FacilityTypeConfig(
        ("ORU^R01", "OUL^*", "ORL^*", "ASTM", "DFT^P03"),
        _COMMON_OPERATIONS + ("prescriptions.lookup", "prescriptions.perform")),
    "imaging": FacilityTypeConfig(
        ("ORU^R01", "MDM^*", "DFT^P03"),
        _COMMON_OPERATIONS + ("reports.submit", "prescriptions.lookup", "prescriptions.perform")),
    "pharmacy": FacilityTypeConfig(
        ("RDS^O13", "CSV^*"),
        _COMMON_OPERATIONS + ("prescriptions.lookup", "prescriptions.dispense")),
}


@dataclass(frozen=True)
class SenderConfig:
    """One facility of the registry (conf/facilities.yaml)."""

    id: str  # INPE or establishment code; also the name of its dev certificate
    name: str
    type: str  # hospital, clinic, doctor, laboratory, imaging, pharmacy
    applications: tuple[str, ...] = ()  # MSH-3 values it uses (empty: any)
    facilities: tuple[str, ...] = ()  # MSH-4 values it uses
    # Certificate binding: the subject (RFC 4514 text, e.g. "CN=INPE-100001,O=MA HIE facility")
    # and/or the SHA-256 fingerprint (hex, colons optional) of its client certificate. Neither:
    # a certificate whose common name is the facility id (the development PKI's naming).
    certificate_subject: str | None = None
    certificate_sha256: str | None = None
    # Source networks (CIDR) it may send from over plain MLLP; empty: those of the listener.
    allow_sources: tuple[str, ...] = ()
    mappings: str | None = None  # its folder under mappings/senders/ (default: its id)
    charset_fallback: str | None = None  # Python codec tried when MSH-18 is wrong, e.g. cp1256
    timezone: str = "Africa/Casablanca"
    # HL7 conformance validation (hl7apy, strict) before translation: off, warn (problems
    # stored as warnings of the translation) or reject (the translation fails).
    validation: str = "off"


@dataclass(frozen=True)
class PrescriptionsConfig:
    """The e-prescription flow."""

    validity_days: int = 90  # a prescription may be dispensed until this many days after issue
    # Check AMO eligibility at this CNSS destination (a `destinations:` name of kind cnss)
    # before accepting a dispensation or an act; None: no check.
    eligibility: str | None = None
    eligibility_timeout: float = 10.0  # seconds; no answer is a refusal to retry (AE)


@dataclass(frozen=True)
class MappingsConfig:
    directory: str = "mappings"  # the mapping set; relative to the project root

@dataclass(frozen=True)
class RetryConfig:
    """Backoff between attempts (exponential with full jitter) and when to give up."""

    base: float = 1.0  # seconds before the second attempt (on average half, with jitter)
    factor: float = 2.0
    cap: float = 300.0  # the longest wait between two attempts
    max_attempts: int | None = None  # None: until max_age
    max_age: float = 7 * 86400.0  # seconds after the first attempt: then a dead letter

    def policy(self):
        """The delivery retry policy these settings describe (ValueError if inconsistent)."""
        from gateway.delivery.retry import RetryPolicy

        return RetryPolicy(self.base, self.factor, self.cap, "full", self.max_attempts, self.max_age)


@dataclass(frozen=True)
class DestinationConfig:
    """A peer the gateway delivers to, over HTTPS with the gateway's client certificate."""

    name: str
    kind: str  # fhir-record (the shared record) | cnss (care sheets, SOAP)
    url: str  # https://host:port/path
    connect_timeout: float = 5.0
    response_timeout: float = 30.0  # the whole request, until the answer is read
    concurrency: int = 16  # requests in flight to this destination from one node
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Most deliveries (messages) in one request: fhir-record batches them in one transaction
    # (None: gateway.delivery.destinations.RECORD_BATCH_SIZE); cnss sends one care sheet each.
    batch_size: int | None = None


@dataclass(frozen=True)
class RouteMatch:
    """What a route matches: every key given must match; in a key, any value may."""

    message_types: tuple[str, ...] = ()  # 'ORU^R01', 'ADT^*', 'ASTM', '*'
    senders: tuple[str, ...] = ()  # facility ids of the registry
    sender_types: tuple[str, ...] = ()  # hospital, laboratory, ...
    resources: tuple[str, ...] = ()  # FHIR resource types present in the canonical bundle
    codes: tuple[str, ...] = ()  # 'system|code' or 'code', anywhere in a coding of the bundle


@dataclass(frozen=True)
class RouteConfig:
    name: str
    to: tuple[str, ...]  # destination names
    when: RouteMatch = field(default_factory=RouteMatch)


@dataclass(frozen=True)
class DeliveryConfig:
    """The outbox workers of this node."""

    lease: float = 60.0  # seconds a node holds a delivery it is sending (then another may)
    poll_interval: float = 0.5  # seconds between looks at the outbox when idle
    claim_batch: int = 256  # most deliveries claimed at once


@dataclass(frozen=True)
class SandboxPeerConfig:
    """One reference peer: where it listens and keeps its data. Its certificate is
    `sandbox-<kind>.crt/.key` in pki.dev_dir, and it serves only the gateway's certificate."""

    port: int
    store: str  # its SQLite file
    interface: str = "127.0.0.1"
    validate: bool = True  # the shared record's input validation (off only for benchmarks)


@dataclass(frozen=True)
class SandboxConfig:
    record: SandboxPeerConfig | None = None  # the shared record (FHIR R4 REST, base /fhir)
    cnss: SandboxPeerConfig | None = None  # CNSS (SOAP)


@dataclass(frozen=True)
class GatewayConfig:
    path: str  # the file it was loaded from
    root: str  # project root; relative paths are resolved against it
    database: DatabaseConfig
    pki: PkiConfig
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    mllp: tuple[MllpListenerConfig, ...] = ()
    astm: tuple[AstmListenerConfig, ...] = ()
    https: tuple[HttpsListenerConfig, ...] = ()
    senders: tuple[SenderConfig, ...] = ()
    # What each facility type may do (facilities.yaml `types:`, over DEFAULT_FACILITY_TYPES).
    facility_types: Mapping[str, FacilityTypeConfig] = field(
        default_factory=lambda: dict(DEFAULT_FACILITY_TYPES))
    prescriptions: PrescriptionsConfig = field(default_factory=PrescriptionsConfig)
    # The mapping set; None (no `mappings:` section) runs ingest only: messages stay 'received'.
    mappings: MappingsConfig | None = None
    destinations: tuple[DestinationConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    admin: tuple[AdminListenerConfig, ...] = ()
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    node_name: str = "gateway-1"
    log_level: str = "info"
    log_format: str = "json"  # json (one JSON object per line) | text (for a terminal)
    # Where `gateway run` writes its process id, for `gateway mappings reload` (SIGHUP).
    pid_file: str = "var/gateway.pid"

    def resolve(self, path: str) -> str:
        """`path` from the files, made absolute against the project root."""
        return os.path.normpath(os.path.join(self.root, path))


# --------------------------------------------------------------------------------------------
# Loading and validation.
#
# The files are composed into YAML nodes (which keep their line numbers) and walked by small
# checkers, one per kind of value. A checker takes (reader, node, key path) and returns the
# value, or records a problem and returns _INVALID; nothing stops at the first problem.
# --------------------------------------------------------------------------------------------

_INVALID: Any = object()  # a checker's answer when it recorded a problem
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DB_URL_VARIABLE = "GATEWAY_DB_URL"


class _Reader:
    """Reads the config files as YAML nodes and collects problems as `file:line: path: msg`."""

    def __init__(self, root: str, environ: Mapping[str, str]):
        self.root = root
        self.environ = environ
        self.problems: list[str] = []
        # Values that come from outside the files, by key path (_INVALID if they were wrong).
        self.overrides: dict[str, Any] = {}
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()

    def fail(self, node: yaml.Node, path: str, message: str) -> Any:
        mark = node.start_mark
        self.problems.append(f"{mark.name}:{mark.line + 1}: {path or '(top level)'}: {message}")
        return _INVALID

    def read(self, file: str) -> Any:
        """The root node of `file` (empty mapping if empty), or _INVALID; raises OSError."""
        name = _display(file)
        with open(file, "rb") as f:
            data = f.read()
        try:
            stream = io.StringIO(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            self.problems.append(f"{name}: not UTF-8 text (byte {e.start}); save it as UTF-8")
            return _INVALID
        stream.name = name  # PyYAML puts the stream's name in every node's mark
        try:
            node = yaml.compose(stream, Loader=SafeLoader)
        except yaml.reader.ReaderError as e:  # no mark: the line from its position
            line = reader_error_line(stream.getvalue(), e)
            self.problems.append(f"{name}:{line}: character #x{e.character:04x} is not allowed "
                                 "(a control character)")
            return _INVALID
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            self.problems.append(f"{name}:{mark.line + 1}: YAML syntax error: {e.problem}")
            return _INVALID
        except yaml.YAMLError as e:
            self.problems.append(f"{name}: YAML error: {e}")
            return _INVALID
        except RecursionError:  # PyYAML composes nested collections recursively
            self.problems.append(f"{name}: YAML nested too deeply to read")
            return _INVALID
        if node is None:
            start = yaml.Mark(name, 0, 0, 0, None, None)
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], start)
        limit = expansion_limit_passed(node)
        if limit is not None:
            self.problems.append(f"{name}: its aliases (*name) repeat their anchors' contents to "
                                 f"more than {limit} values; write fewer aliases")
            return _INVALID
        return node

    def value(self, node: yaml.ScalarNode, path: str) -> Any:
        """The scalar's Python value, with `${NAME}` and `${NAME:-default}` substituted."""
        if node.tag == "tag:yaml.org,2002:str" and "${" in node.value:
            undefined: list[str] = []

            def substitute(match: re.Match) -> str:
                name, default = match.groups()
                value = self.environ.get(name)
                if default is not None and not value:
                    return default
                if value is None:
                    undefined.append(name)
                    return ""
                return value

            text = _VARIABLE.sub(substitute, node.value)
            if undefined:
                names = ", ".join(undefined)
                return self.fail(node, path, f"environment variable {names} is not set "
                                 f"(set it, or write ${{{undefined[0]}:-default}})")
            # An unquoted `${PORT}` takes the type of its text, as if written in the file.
            tag = (self._resolver.resolve(yaml.ScalarNode, text, (True, False))
                   if node.style is None else node.tag)
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            return self.fail(node, path, f"cannot read this value: {getattr(e, 'problem', e)}")
        except (ValueError, KeyError, TypeError, AttributeError):
            # An explicit tag the text does not fit (`!!int abc`, `!!bool maybe`): PyYAML's
            # constructors then raise plain Python errors.
            return self.fail(node, path, f"cannot read this value: {node.value!r} is not a {node.tag}")


def _display(file: str) -> str:
    """How a file is named in problems: relative to the current directory when inside it."""
    relative = os.path.relpath(file)
    return file if relative.startswith("..") else relative


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a value")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "an empty value" if value is None else repr(value)


def _did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


Check = Callable[[_Reader, yaml.Node, str], Any]


# -- Scalars: a converter takes the Python value and returns it (possibly normalised) or
# -- raises _Invalid; _scalar() turns it into a checker.

class _Invalid(ValueError):
    """A converter's refusal: `must ...` message, optional hint, and how to show the value."""

    def __init__(self, message: str, hint: str = "", got: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.got = message, hint, got

    def describe(self, value: Any) -> str:
        got = self.got if self.got is not None else _show(value)
        return f"{self.message}, got {got}{self.hint}"


def _scalar(convert: Callable[[Any], Any]) -> Check:
    def check(reader: _Reader, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return reader.fail(node, path, f"must be a single value, got {_describe(node)}")
        value = reader.value(node, path)
        if value is _INVALID:
            return value
        try:
            return convert(value)
        except _Invalid as e:
            return reader.fail(node, path, e.describe(value))
    return check


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    quote = " (put it in quotes)" if isinstance(value, (int, float)) else ""
    raise _Invalid("must be a non-empty string", quote)


def _integer(low: int, high: int | None = None) -> Check:
    def integer(value: Any) -> int:
        if (isinstance(value, int) and not isinstance(value, bool)
                and low <= value and (high is None or value <= high)):
            return value
        bounds = f"between {low} and {high}" if high is not None else f"of at least {low}"
        raise _Invalid(f"must be an integer {bounds}")
    return _scalar(integer)


# The longest duration: 100 years. `.inf` or 1e300 seconds would pass a `> 0` check and then
# fail at run time, where the value becomes a timedelta (a lease, a session's age).
_MAX_SECONDS = 100 * 365 * 86400


def _seconds(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= _MAX_SECONDS:
        return float(value)
    raise _Invalid(f"must be a number of seconds greater than 0 and at most {_MAX_SECONDS}")


def _factor(value: Any) -> float:
    # Not .inf, nor an integer too large for a float (float() would raise OverflowError).
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and 1 <= value <= sys.float_info.max:
        return float(value)
    raise _Invalid("must be a number, 1 or more")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("must be true or false")


def _one_of(*choices: str) -> Check:
    def one_of(value: Any) -> str:
        if value in choices:
            return value
        raise _Invalid(f"must be one of {', '.join(choices)}", _did_you_mean(value, choices))
    return _scalar(one_of)


def _facility_id(value: Any) -> str:
    """A facility's id: stored with each of its messages and records (64 characters at most)."""
    text = _text(value)
    if len(text) > 64 or has_control(text):
        raise _Invalid("must be at most 64 characters, without control characters")
    return text


def _hl7_name(value: Any) -> str:
    """How the gateway names itself in MSH-3/MSH-4 of every ACK: the ACK is ASCII, and a field
    separator, repetition, escape or subcomponent character or a line end would break it for
    every sender ('^' separates the components of an HD, as in NAME^OID^ISO)."""
    text = _text(value)
    if not text.isascii() or not text.isprintable() or any(c in text for c in "|~\\&"):
        raise _Invalid("must be printable ASCII without the HL7 separators | ~ \\ & (it goes into "
                       "MSH-3/MSH-4 of every ACK)")
    return text


def _fingerprint(value: Any) -> str:
    """A SHA-256 fingerprint, as lowercase hex without separators."""
    text = _text(value).replace(":", "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise _Invalid("must be a SHA-256 fingerprint: 64 hex digits, colons allowed",
                       "`openssl x509 -in FACILITY.crt -noout -fingerprint -sha256` prints it")
    return text


def _subject(value: Any) -> str:
    from cryptography import x509

    text = _text(value)
    try:
        x509.Name.from_rfc4514_string(text)
    except ValueError as error:
        raise _Invalid(f"must be a certificate subject in RFC 4514 form such as "
                       f"'CN=INPE-100001,O=MA HIE facility' ({error})") from None
    return text


def _message_pattern(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(_MESSAGE_PATTERN, text):
        raise _Invalid("must be a message type pattern (ORU^R01, ADT^*, ADT, ASTM, CSV^profile, *)")
    return text


_MESSAGE_PATTERN = r"\*|[A-Z][A-Z0-9]{2}(\^(\*|[A-Z0-9]{3}))?|ASTM|CSV(\^[\w*-]+)?"


def _validation_level(value: Any) -> str:
    # YAML 1.1 reads a bare `off` as false.
    if value is False:
        return "off"
    if value in ("off", "warn", "reject"):
        return value
    raise _Invalid("must be one of off, warn, reject", _did_you_mean(value, ("off", "warn", "reject")))


_validation = _scalar(_validation_level)


def _ip_address(value: Any) -> str:
    try:
        ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        raise _Invalid("must be an IP address such as 127.0.0.1 or 0.0.0.0") from None
    return value


def _cidr(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(value if isinstance(value, str) else "", strict=False))
    except ValueError:
        raise _Invalid("must be an address or network in CIDR form, such as 10.20.0.0/16") from None


_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def _host_name(value: Any) -> str:
    name = _text(value).lower()
    if not _HOST_NAME.fullmatch(name):
        raise _Invalid("must be a DNS name, such as console.gateway.sante.ma (no port, no scheme)")
    return name


def _codec(value: Any) -> str:
    try:
        # Decoding, not only looking up: base64, rot13 or zlib are codecs but no character
        # set, and a message's bytes would then fail to decode with a LookupError.
        b"\0".decode(_text(value))
    except UnicodeDecodeError:  # a character set, that cannot read this byte alone (utf-16)
        pass
    except (LookupError, ValueError, _Invalid):  # ValueError: a NUL or lone surrogate in the name
        raise _Invalid("must be a Python codec name such as cp1256 or latin-1") from None
    return value


def _timezone(value: Any) -> str:
    try:
        zoneinfo.ZoneInfo(_text(value))
    # OSError: a name that is a folder of the zone database (`Africa`) or too long a file name.
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise _Invalid("must be an IANA time zone such as Africa/Casablanca") from None
    return value


def _database_url(value: Any) -> str:
    """A SQLAlchemy URL for SQLite or PostgreSQL; problems never echo the password."""
    example = "sqlite:///var/gateway.sqlite or postgresql+psycopg://user:${PASSWORD}@host/db"
    try:
        url = make_url(_text(value))
    except (ArgumentError, ValueError):
        raise _Invalid(f"must be a database URL such as {example}",
                       got="text that is not a URL") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise _Invalid("must be a sqlite or postgresql URL",
                       _did_you_mean(url.get_backend_name(), ("sqlite", "postgresql")),
                       got=repr(url.render_as_string(hide_password=True)))
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Each of the gateway's threads would open its own empty database: nothing kept.
        raise _Invalid("must name a SQLite file (an in-memory database keeps nothing, and each "
                       f"thread would see its own): {example}", got=repr(str(url)))
    return value


# -- Containers.

def _list_of(item: Check, unique: tuple[str, ...] = ()) -> Check:
    """A list whose items pass `item`; `unique` names attributes no two items may share."""

    def check(reader: _Reader, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            return reader.fail(node, path, f"must be a list, got {_describe(node)}")
        if node.tag != yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG:
            return reader.fail(node, path, f"must be a list, got one tagged {node.tag}")
        before = len(reader.problems)
        values = [item(reader, n, f"{path}[{i}]") for i, n in enumerate(node.value)]
        for attribute in unique:
            # Compared as written, so that a duplicate shows even in an item with other errors.
            first: dict[str, str] = {}
            for i, item_node in enumerate(node.value):
                key_node = _value_node(item_node, attribute)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                item_path = f"{path}[{i}]"
                if key_node.value in first:
                    reader.fail(key_node, f"{item_path}.{attribute}",
                                f"{attribute} {key_node.value} is already used by "
                                f"{first[key_node.value]}")
                first.setdefault(key_node.value, item_path)
        return tuple(values) if len(reader.problems) == before else _INVALID

    return check


def _value_node(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value node of `key` in a mapping node, or None."""
    for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else ():
        if key_node.value == key:
            return value_node
    return None


def _mapping(required: tuple[str, ...] = (), **checks: Check) -> Check:
    """A mapping with the given keys, returned as a dict of the valid values present."""

    def check(reader: _Reader, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            return reader.fail(node, path, f"must be a mapping of keys, got {_describe(node)}")
        if node.tag != yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG:
            # `!!set {a, b}`, `!!python/object:...`: a tag would otherwise be ignored.
            return reader.fail(node, path, f"must be a mapping of keys, got one tagged {node.tag}")
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                reader.fail(key_node, path, "keys must be plain names")
                continue
            key = key_node.value
            keypath = _join(path, key)
            if key in lines:
                reader.fail(key_node, keypath, f"duplicate key (first at line {lines[key]})")
                continue
            lines[key] = key_node.start_mark.line + 1
            if key not in checks:
                hint = _did_you_mean(key, checks) or f" (expected one of: {', '.join(checks)})"
                reader.fail(key_node, keypath, f"unknown key{hint}")
            elif keypath not in reader.overrides:
                value = checks[key](reader, value_node, keypath)
                if value is not _INVALID:
                    values[key] = value
        for key in checks:
            keypath = _join(path, key)
            if keypath in reader.overrides:
                if reader.overrides[keypath] is not _INVALID:
                    values[key] = reader.overrides[keypath]
            elif key in required and key not in lines:
                reader.fail(node, keypath, "required key is missing")
        return values

    return check


def _record(cls: type, **checks: Check) -> Check:
    """A mapping built into the dataclass `cls`; its fields without a default are required."""
    required = tuple(f.name for f in fields(cls)
                     if f.default is MISSING and f.default_factory is MISSING)
    mapping = _mapping(required, **checks)

    def check(reader: _Reader, node: yaml.Node, path: str) -> Any:
        before = len(reader.problems)
        values = mapping(reader, node, path)
        # A required value may also be missing because its override was wrong.
        if len(reader.problems) > before or not set(required) <= set(values):
            return _INVALID
        return cls(**values)

    return check


# -- The schema.

_TEXT = _scalar(_text)
_PORT = _integer(1, 65535)
_SECONDS = _scalar(_seconds)
_BOOLEAN = _scalar(_boolean)

_SENDER = _record(
    SenderConfig,
    id=_scalar(_facility_id),
    name=_TEXT,
    type=_one_of(*FACILITY_TYPES),
    applications=_list_of(_TEXT),
    facilities=_list_of(_TEXT),
    charset_fallback=_scalar(_codec),
    timezone=_scalar(_timezone),
    validation=_validation,
    certificate_subject=_scalar(_subject),
    certificate_sha256=_scalar(_fingerprint),
    allow_sources=_list_of(_scalar(_cidr)),
    mappings=_TEXT,
)

_FACILITY_TYPE = _record(FacilityTypeConfig, messages=_list_of(_scalar(_message_pattern)),
                         operations=_list_of(_one_of(*API_OPERATIONS)))
_FACILITY_REGISTRY = _mapping(
    ("facilities",), facilities=_list_of(_SENDER, unique=("id",)),
    types=_mapping(**{kind: _FACILITY_TYPE for kind in FACILITY_TYPES}))


@dataclass(frozen=True)
class _Located:
    """A value read from another file, with that file and its node (for later checks)."""

    file: str
    node: yaml.Node
    value: Any
    others: Mapping[str, Any] = field(default_factory=dict)  # the file's other keys


def _file_of(key: str, contents: Check) -> Check:
    """A path to another YAML file (relative to the project root) whose `key` list is read and
    checked in turn; the value is `_Located(file, node, that list)`."""

    def check(reader: _Reader, node: yaml.Node, path: str) -> Any:
        relative = _TEXT(reader, node, path)
        if relative is _INVALID:
            return relative
        file = os.path.normpath(os.path.join(reader.root, relative))
        try:
            document = reader.read(file)
        except OSError as e:
            return reader.fail(node, path, f"cannot read {_display(file)}: {e.strerror}")
        except ValueError:  # open() refuses a NUL in the path
            return reader.fail(node, path, "must be a file path without NUL characters")
        if document is _INVALID:
            return document
        before = len(reader.problems)
        values = contents(reader, document, "")
        if len(reader.problems) > before:
            return _INVALID
        return _Located(file, document, values.get(key, ()),
                        {name: value for name, value in values.items() if name != key})

    return check


_facility_registry = _file_of("facilities", _FACILITY_REGISTRY)


_MLLP_LISTENER = _record(
    MllpListenerConfig,
    name=_TEXT,
    port=_PORT,
    interface=_scalar(_ip_address),
    tls=_BOOLEAN,
    max_frame_size=_integer(1024),
    idle_timeout=_SECONDS,
    frame_timeout=_SECONDS,
    commit_blocks=_BOOLEAN,
    allow_sources=_list_of(_scalar(_cidr)),
    accept_unknown_senders=_BOOLEAN,
    processing_ids=_list_of(_one_of("P", "T", "D")),
    ack_after=_one_of("commit", "translation"),
)

_ASTM_LISTENER = _record(
    AstmListenerConfig,
    name=_TEXT,
    port=_PORT,
    facility=_TEXT,
    interface=_scalar(_ip_address),
    allow_sources=_list_of(_scalar(_cidr)),
    max_frame_size=_integer(256),
    max_message_size=_integer(1024),
    receive_timeout=_SECONDS,
    frame_timeout=_SECONDS,
    idle_timeout=_SECONDS,
)

_HTTPS_LISTENER = _record(
    HttpsListenerConfig,
    name=_TEXT,
    port=_PORT,
    interface=_scalar(_ip_address),
    max_request_size=_integer(1024),
    idle_timeout=_SECONDS,
    read_timeout=_SECONDS,
    request_timeout=_SECONDS,
)


_ADMIN_LISTENER = _record(
    AdminListenerConfig,
    name=_TEXT,
    port=_PORT,
    interface=_scalar(_ip_address),
    tls=_BOOLEAN,
    allow_sources=_list_of(_scalar(_cidr)),
    hosts=_list_of(_scalar(_host_name)),
)


def _password_hash(value: Any) -> str:
    text = _text(value)
    if not PASSWORD_HASH.fullmatch(text):
        raise _Invalid("must be a hash made by `gateway accounts hash` (scrypt$N$r$p$salt$hash), "
                       "never a password", got="another text")
    return text


def _clock_time(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", text):
        raise _Invalid("must be a time of day as HH:MM", got=text)
    return text


_ACCOUNT = _record(ConsoleAccount, name=_TEXT, role=_one_of(*ROLES),
                   password_hash=_scalar(_password_hash), display_name=_TEXT)
_CONSOLE = _record(ConsoleConfig, accounts=_list_of(_ACCOUNT, unique=("name",)),
                   session_idle_timeout=_SECONDS, session_max_age=_SECONDS,
                   login_attempts=_integer(1, 1000), login_pause=_SECONDS,
                   timezone=_scalar(_timezone))
_AUDIT = _record(AuditConfig, flush_interval=_SECONDS, export=_record(
    AuditExportConfig, host=_TEXT, port=_PORT, ca=_TEXT, source_id=_TEXT,
    enterprise_site=_TEXT, queue_limit=_integer(1)))
_DAYS = _integer(1, 36500)
_RETENTION = _record(RetentionConfig, raw_payloads=_DAYS, canonical=_DAYS, audit=_DAYS,
                     run_at=_scalar(_clock_time), batch_size=_integer(1, 1_000_000))


def _https_url(value: Any) -> str:
    text = _text(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a port that is no number or out of range)
    except ValueError:  # also an unclosed IPv6 bracket (https://[::1)
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise _Invalid("must be an https:// URL with a host and a valid port (deliveries use "
                       "mutual TLS)", got=text)
    return text


_RETRY = _record(RetryConfig, base=_SECONDS, factor=_scalar(_factor), cap=_SECONDS,
                 max_attempts=_integer(1), max_age=_SECONDS)
_DESTINATION = _record(
    DestinationConfig,
    name=_TEXT,
    kind=_one_of("fhir-record", "cnss"),
    url=_scalar(_https_url),
    connect_timeout=_SECONDS,
    response_timeout=_SECONDS,
    concurrency=_integer(1, 1024),
    retry=_RETRY,
    batch_size=_integer(1, 1000),
)
_ROUTE = _record(
    RouteConfig,
    name=_TEXT,
    to=_list_of(_TEXT),
    when=_record(RouteMatch, message_types=_list_of(_TEXT), senders=_list_of(_TEXT),
                 sender_types=_list_of(_one_of(*FACILITY_TYPES)),
                 resources=_list_of(_TEXT), codes=_list_of(_TEXT)),
)
_ROUTES_FILE = _mapping(("routes",), routes=_list_of(_ROUTE, unique=("name",)))


_routes_file = _file_of("routes", _ROUTES_FILE)


_SANDBOX_PEER = _record(SandboxPeerConfig, port=_PORT, store=_TEXT,
                        interface=_scalar(_ip_address), validate=_BOOLEAN)

_GATEWAY = _mapping(
    ("database", "pki"),
    node=_mapping(name=_TEXT),
    log_level=_one_of("debug", "info", "warn", "error"),
    log_format=_one_of("json", "text"),
    database=_record(DatabaseConfig, url=_scalar(_database_url), pool_size=_integer(1, 256),
                     ingest_max_batch=_integer(1, 100_000)),
    pki=_record(PkiConfig, ca=_TEXT, cert=_TEXT, key=_TEXT, dev_dir=_TEXT, crl=_TEXT,
                prescription_key=_TEXT),
    identity=_record(IdentityConfig, application=_scalar(_hl7_name), facility=_scalar(_hl7_name)),
    listeners=_mapping(mllp=_list_of(_MLLP_LISTENER, unique=("name", "port")),
                       astm=_list_of(_ASTM_LISTENER, unique=("name", "port")),
                       https=_list_of(_HTTPS_LISTENER, unique=("name", "port")),
                       admin=_list_of(_ADMIN_LISTENER, unique=("name", "port"))),
    console=_CONSOLE,
    audit=_AUDIT,
    retention=_RETENTION,
    facilities=_facility_registry,
    mappings=_record(MappingsConfig, directory=_TEXT),
    destinations=_list_of(_DESTINATION, unique=("name",)),
    routes=_routes_file,
    delivery=_record(DeliveryConfig, lease=_SECONDS, poll_interval=_SECONDS,
                     claim_batch=_integer(1, 10_000)),
    sandbox=_record(SandboxConfig, record=_SANDBOX_PEER, cnss=_SANDBOX_PEER),
    prescriptions=_record(PrescriptionsConfig, validity_days=_integer(1, 3650),
                          eligibility=_TEXT, eligibility_timeout=_SECONDS),
    pid_file=_TEXT,
)


def _absolute_path(path: str, root: str) -> str:
    return os.path.normpath(os.path.join(root, path))


def _absolute_database_url(url_text: str, root: str) -> str:
    """A relative SQLite file in the URL made absolute against `root`; other URLs unchanged."""
    url = make_url(url_text)
    database = url.database
    if (url.get_backend_name() != "sqlite" or not database or database == ":memory:"
            or database.startswith("file:") or os.path.isabs(database)):
        return url_text
    return url.set(database=_absolute_path(database, root)).render_as_string(hide_password=False)


def _registered(values: dict) -> set[str]:
    located = values.get("facilities")
    return {sender.id for sender in located.value} if located else set()


def _listener_problems(path: str, values: dict, registered: set[str] | None) -> list[str]:
    """Across listener kinds: names and ports not shared; an ASTM listener's facility known.

    (Within one kind, the list checker already refuses duplicates.)
    """
    problems = []
    listeners = values.get("listeners", {})
    mllp = listeners.get("mllp", ())
    names = {listener.name for listener in mllp}
    ports = {listener.port for listener in mllp}
    # Each kind against the kinds before it: HTTPS against MLLP, then ASTM and admin against all.
    for kind, other in (("https", "an MLLP listener's"), ("astm", "another listener's"),
                        ("admin", "another listener's")):
        for index, listener in enumerate(listeners.get(kind, ())):
            where = f"{_display(path)}: listeners.{kind}[{index}]"
            if listener.name in names:
                problems.append(f"{where}.name: {listener.name!r} is also {other} name")
            if listener.port in ports:
                problems.append(f"{where}.port: {listener.port} is also {other} port")
            if kind == "astm" and registered is not None and listener.facility not in registered:
                problems.append(f"{where}.facility: {listener.facility!r} is not in the facility "
                                "registry" + _did_you_mean(listener.facility, sorted(registered)))
        names |= {listener.name for listener in listeners.get(kind, ())}
        ports |= {listener.port for listener in listeners.get(kind, ())}
    return problems


def _prescription_problems(path: str, values: dict) -> list[str]:
    """The eligibility check names a CNSS destination."""
    prescriptions = values.get("prescriptions")
    if prescriptions is None or prescriptions.eligibility is None:
        return []
    kinds = {d.name: d.kind for d in values.get("destinations", ())}
    name = prescriptions.eligibility
    if kinds.get(name) != "cnss":
        cnss = sorted(n for n, kind in kinds.items() if kind == "cnss")
        return [f"{_display(path)}: prescriptions.eligibility: {name!r} is not a destination of "
                f"kind cnss" + _did_you_mean(name, cnss)]
    return []


def _sender_mapping_problems(root: str, values: dict) -> list[str]:
    """A facility's `mappings:` names a folder of the mapping set's senders/."""
    located, mappings = values.get("facilities"), values.get("mappings")
    if located is None or mappings is None:
        return []
    senders = os.path.join(_absolute_path(mappings.directory, root), "senders")
    problems = []
    for index, facility in enumerate(located.value):
        # One folder of senders/, as the mapping set reads them: `..`, `/tmp` or `F1/segments`
        # are folders too, but no sender's layer (its messages would get the shared maps).
        name = facility.mappings
        if name and (name in (".", "..") or "/" in name or os.sep in name
                     or not os.path.isdir(os.path.join(senders, name))):
            problems.append(f"{_display(located.file)}: facilities[{index}].mappings: "
                            f"{facility.mappings!r} is not a folder of {_display(senders)}")
    return problems


def _certificate_problems(values: dict) -> list[str]:
    """No certificate is bound to two facilities: the registry would silently give it to the
    last one (fingerprints are compared as normalised, subjects as RFC 4514 prints them)."""
    from cryptography import x509

    located = values.get("facilities")
    if located is None:
        return []
    problems = []
    bound: dict[tuple[str, str], str] = {}
    for index, facility in enumerate(located.value):
        keys = []
        if facility.certificate_sha256:
            keys.append(("certificate_sha256", facility.certificate_sha256))
        if facility.certificate_subject:
            subject = x509.Name.from_rfc4514_string(facility.certificate_subject).rfc4514_string()
            keys.append(("certificate_subject", subject))
        for key in keys:
            if key in bound:
                problems.append(f"{_display(located.file)}: facilities[{index}].{key[0]}: also "
                                f"the certificate of facility {bound[key]}")
            bound.setdefault(key, facility.id)
    return problems


def _header_problems(values: dict) -> list[str]:
    """No MSH-3/MSH-4 pair names two facilities: on plain MLLP the registry would give its
    messages to the first in the file, silently (the other's rights, charset, sources). Two
    facilities sharing an MSH-4 name are told apart by their `applications`; one with none
    takes the MSH-3 values the other does not list."""
    located = values.get("facilities")
    if located is None:
        return []
    problems = []
    seen: dict[tuple[str, str | None], str] = {}  # (MSH-4, MSH-3 or None: any) -> facility id
    for index, facility in enumerate(located.value):
        for name in facility.facilities or (facility.id,):
            for application in facility.applications or (None,):
                other = seen.get((name, application))
                if other is not None and other != facility.id:
                    which = f"MSH-3 {application!r}" if application else "any MSH-3"
                    problems.append(f"{_display(located.file)}: facilities[{index}]: MSH-4 {name!r} with "
                                    f"{which} also names facility {other}: give each its own "
                                    "`applications`")
                seen.setdefault((name, application), facility.id)
    return problems


def _destination_problems(path: str, values: dict) -> list[str]:
    """Destination settings that are each valid but do not fit together: a retry cap below
    its base, an attempt that may outlast the delivery lease."""
    problems = []
    lease = (values.get("delivery") or DeliveryConfig()).lease
    for index, destination in enumerate(values.get("destinations", ())):
        try:
            destination.retry.policy()
        except ValueError as error:
            problems.append(f"{_display(path)}: destinations[{index}].retry: {error}")
        attempt = destination.connect_timeout + destination.response_timeout
        if attempt >= lease:
            # Past the lease another node takes the deliveries and sends them again while the
            # first still waits: a patient's writes could then reach the peer out of order.
            problems.append(f"{_display(path)}: destinations[{index}].response_timeout: "
                            f"connect_timeout + response_timeout ({attempt:g} s) must be less "
                            f"than delivery.lease ({lease:g} s)")
        if destination.kind == "cnss" and destination.batch_size not in (None, 1):
            problems.append(f"{_display(path)}: destinations[{index}].batch_size: cnss takes one "
                            "care sheet per request (1)")
    return problems


def _names_written(node: yaml.Node | None) -> set[str]:
    """The `name:` of each item of a list node, as written (for a list with errors)."""
    items = node.value if isinstance(node, yaml.SequenceNode) else ()
    names = (_value_node(item, "name") for item in items)
    return {n.value for n in names if isinstance(n, yaml.ScalarNode)}


def _route_problems(path: str, values: dict, destinations: set[str] | None = None,
                    registered: set[str] | None = None) -> list[str]:
    """Routes name known destinations, registered senders and FHIR resource types.
    `destinations`: the names written, when the destinations section has errors;
    `registered`: the registry's ids, None when it has errors (senders are then not checked)."""
    located = values.get("routes")
    if located is None:
        return []
    problems = []
    if destinations is None:
        destinations = {d.name for d in values.get("destinations", ())}
    for index, route in enumerate(located.value):
        where = f"{_display(located.file)}: routes[{index}]"
        for name in route.to:
            if name not in destinations:
                problems.append(f"{where}.to: {name!r} is not a destination of {_display(path)}"
                                + _did_you_mean(name, sorted(destinations)))
        for sender in route.when.senders:
            if registered is not None and sender not in registered:
                problems.append(f"{where}.when.senders: {sender!r} is not in the facility "
                                "registry" + _did_you_mean(sender, sorted(registered)))
        for resource in route.when.resources:
            if not is_resource_type(resource):
                problems.append(f"{where}.when.resources: {resource!r} is not a FHIR R4 resource type")
        for pattern in route.when.message_types:
            if not re.fullmatch(_MESSAGE_PATTERN, pattern):
                problems.append(f"{where}.when.message_types: {pattern!r} is not a message type "
                                "pattern (ORU^R01, ADT^*, ADT, ASTM, CSV^profile, *)")
    return problems


def _audit_paths(audit: AuditConfig | None, root: str) -> AuditConfig | None:
    if audit is None or audit.export is None or audit.export.ca is None:
        return audit
    return replace(audit, export=replace(audit.export, ca=_absolute_path(audit.export.ca, root)))


def _sandbox_paths(sandbox: SandboxConfig | None, root: str) -> SandboxConfig | None:
    if sandbox is None:
        return None
    return SandboxConfig(**{
        kind: replace(peer, store=_absolute_path(peer.store, root)) if peer else None
        for kind, peer in (("record", sandbox.record), ("cnss", sandbox.cnss))})


def load_config(path: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load, validate and resolve the configuration at `path`; raise ConfigError if wrong.

    `environ` (default os.environ) supplies `${NAME}` values and `GATEWAY_DB_URL`, which
    replaces database.url. The project root is the parent of the config file's directory.
    """
    environ = os.environ if environ is None else environ
    path = os.path.abspath(path)
    root = os.path.dirname(os.path.dirname(path))
    reader = _Reader(root, environ)

    if db_url := environ.get(DB_URL_VARIABLE):
        try:
            reader.overrides["database.url"] = _database_url(db_url)
        except _Invalid as e:
            reader.overrides["database.url"] = _INVALID
            reader.problems.append(f"{DB_URL_VARIABLE} (environment): database.url: "
                                   f"{e.describe(db_url)}")

    try:
        node = reader.read(path)
    except OSError as e:
        raise ConfigError([f"{_display(path)}: cannot read: {e.strerror}"]) from None
    values = _GATEWAY(reader, node, "") if node is not _INVALID else _INVALID
    if values is not _INVALID and "mappings" not in values:
        for index, listener in enumerate(values.get("listeners", {}).get("mllp", ())):
            if listener.ack_after == "translation":
                reader.problems.append(f"{_display(path)}: listeners.mllp[{index}].ack_after: "
                                       "translation needs a mappings: section")
    if values is not _INVALID:
        # A registry with an error is reported where it is wrong; the listeners and routes that
        # name its facilities are not told that they are not in it.
        registered = _registered(values) if "facilities" in values \
            or _value_node(node, "facilities") is None else None
        reader.problems.extend(_listener_problems(path, values, registered))
        # A destinations section with an error is reported where it is wrong; the routes and
        # the eligibility check that name its destinations are not told they do not exist.
        named = "destinations" in values or _value_node(node, "destinations") is None
        reader.problems.extend(_route_problems(
            path, values, None if named else _names_written(_value_node(node, "destinations")), registered))
        reader.problems.extend(_destination_problems(path, values))
        if named:
            reader.problems.extend(_prescription_problems(path, values))
        reader.problems.extend(_sender_mapping_problems(root, values))
        reader.problems.extend(_certificate_problems(values))
        reader.problems.extend(_header_problems(values))
    if reader.problems:
        raise ConfigError(reader.problems)

    database, pki = values["database"], values["pki"]
    optional = {
        "identity": values.get("identity"),
        "mllp": values.get("listeners", {}).get("mllp"),
        "astm": values.get("listeners", {}).get("astm"),
        "https": values.get("listeners", {}).get("https"),
        "admin": values.get("listeners", {}).get("admin"),
        "console": values.get("console"),
        "audit": _audit_paths(values.get("audit"), root),
        "retention": values.get("retention"),
        "log_format": values.get("log_format"),
        "senders": values["facilities"].value if "facilities" in values else None,
        "facility_types": ({**DEFAULT_FACILITY_TYPES, **values["facilities"].others.get("types", {})}
                           if "facilities" in values else None),
        "prescriptions": values.get("prescriptions"),
        "node_name": values.get("node", {}).get("name"),
        "log_level": values.get("log_level"),
        "pid_file": values.get("pid_file"),
        "destinations": values.get("destinations"),
        "routes": values["routes"].value if "routes" in values else None,
        "delivery": values.get("delivery"),
        "sandbox": _sandbox_paths(values.get("sandbox"), root),
    }
    if "mappings" in values:
        optional["mappings"] = replace(values["mappings"],
                                       directory=_absolute_path(values["mappings"].directory, root))
    return GatewayConfig(
        path=path,
        root=root,
        database=replace(database, url=_absolute_database_url(database.url, root)),
        pki=replace(pki, **{f: _absolute_path(getattr(pki, f), root)
                            for f in ("ca", "cert", "key", "dev_dir", "crl", "prescription_key")
                            if getattr(pki, f) is not None}),
        **{name: value for name, value in optional.items() if value is not None},
    )
