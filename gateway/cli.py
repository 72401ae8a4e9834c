"""The `gateway` command (also `python -m gateway`).

    gateway run [-c conf/gateway.yaml]
    gateway pki init [--dir D] [--force] | gateway pki show [--dir D]
    gateway send --to HOST:PORT [--tls --cert C --key K --ca CA] FILE...
    gateway messages list [--json] [--limit N] [--status S] [--control-id ID] [--patient ID]
                          [--facility F] [--type T] [--since ISO] [--until ISO]
    gateway messages show ID [--json]
    gateway messages replay ID... | --status failed
    gateway translate FILE... [--sender FACILITY]
    gateway mappings check [--list] | test [--update] | export [--format csv] | reload
    gateway reload (facility registry, CRL and mapping set, checked first)
    gateway audit verify [--batch N] | show [--after SEQ] [--limit N] [--subject S] [--json]
    gateway retention run [--now ISO] [--json]
    gateway accounts hash [--stdin] (a console password's hash, for console.accounts)

The configuration is `-c FILE`, else $GATEWAY_CONFIG, else conf/gateway.yaml in the current
directory or in the project the package was installed from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import ssl
from datetime import datetime, timezone

from gateway import fhir_json
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.ingest.model import MessageStatus
from gateway.terminal import printable, printable_json

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        sys.exit(2)
    try:
        code = args.handler(args) or 0
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`gateway mappings export | head`): stop quietly, as cat does.
        # Python's own flush at exit would fail again, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a command its pipe stopped
    except KeyboardInterrupt:
        # Ctrl-C (`gateway send` waiting for an ACK): stop without a traceback.
        print(file=sys.stderr)
        code = 130  # 128 + SIGINT
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="configuration file (default conf/gateway.yaml)")
    parser = argparse.ArgumentParser(prog="gateway", parents=[common],
                                     description="Morocco's health information exchange gateway")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the gateway")
    run.add_argument("--sandbox", action="store_true",
                     help="also run the reference CNSS and shared-record peers (development)")
    sandbox = commands.add_parser("sandbox", parents=[common],
                                  help="run the reference CNSS and shared-record peers alone")
    sandbox.set_defaults(handler=_sandbox)
    run.set_defaults(handler=_run)

    pki = commands.add_parser("pki", help="development certificates").add_subparsers(metavar="ACTION")
    init = pki.add_parser("init", parents=[common], help="create the dev CA and certificates")
    init.add_argument("--dir", help="output directory (default: pki.dev_dir of the configuration)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=_pki("cmd_pki_init"))
    show = pki.add_parser("show", parents=[common], help="list certificates with their expiry")
    show.add_argument("--dir")
    show.set_defaults(handler=_pki("cmd_pki_show"))

    send = commands.add_parser("send", help="send HL7 v2 files over MLLP and print each ACK")
    send.add_argument("--to", required=True, metavar="HOST:PORT", type=_text)
    send.add_argument("--tls", action="store_true", help="use TLS (with --ca, --cert, --key)")
    send.add_argument("--ca", help="CA certificate that the server's certificate must chain to")
    send.add_argument("--cert", help="client certificate (PEM)")
    send.add_argument("--key", help="client private key (PEM)")
    send.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for each ACK")
    send.add_argument("--raw", action="store_true",
                      help="send each file's bytes as one frame, line endings untouched")
    send.add_argument("--json", action="store_true", help="one JSON object per message")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.set_defaults(handler=_send)

    messages = commands.add_parser("messages", help="stored messages").add_subparsers(metavar="ACTION")
    listing = messages.add_parser("list", parents=[common], help="newest messages first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=_positive, default=50)
    listing.add_argument("--status", choices=[status.value for status in MessageStatus])
    listing.add_argument("--control-id", type=_text, help="MSH-10, exactly")
    listing.add_argument("--patient", type=_text, help="a patient identifier: VALUE or SYSTEM|VALUE, exactly "
                                           "(the bundles' Patients; PID-3 of messages without one)")
    listing.add_argument("--facility", type=_text, help="a registry id, or MSH-4 whole or its first component")
    listing.add_argument("--type", type=_text, help="ADT, or ADT^A01")
    listing.add_argument("--since", type=_instant, help="received at or after (ISO 8601; UTC "
                                                        "without an offset)")
    listing.add_argument("--until", type=_instant, help="received before (ISO 8601)")
    listing.set_defaults(handler=_messages_list)
    detail = messages.add_parser("show", parents=[common], help="one message: metadata, text, ACK")
    detail.add_argument("id", type=_message_id)
    detail.add_argument("--json", action="store_true")
    detail.set_defaults(handler=_messages_show)
    replay = messages.add_parser("replay", parents=[common],
                                 help="translate stored messages again with the mappings on "
                                      "disk and send their dead letters again")
    replay.add_argument("ids", type=_message_id, nargs="*", metavar="ID")
    replay.add_argument("--status", choices=("failed", "received", "translated", "dead"),
                        help="every message of this status (dead: with a dead-letter delivery)")
    replay.add_argument("--mappings", metavar="DIR", help="mapping directory (default: mappings.directory)")
    replay.set_defaults(handler=_messages_replay)

    translate = commands.add_parser("translate", parents=[common],
                                    help="print the canonical FHIR bundle of each file (nothing is sent)")
    translate.add_argument("files", nargs="+", metavar="FILE")
    translate.add_argument("--sender", metavar="FACILITY", type=_text, help="registry id of the sending facility")
    translate.add_argument("--mappings", metavar="DIR", help="mapping directory (default: mappings.directory)")
    translate.set_defaults(handler=_translate)

    mappings = commands.add_parser("mappings", help="the mapping set").add_subparsers(metavar="ACTION")
    check = mappings.add_parser("check", parents=[common], help="validate every mapping file")
    check.add_argument("--list", action="store_true",
                       help="also list message types, maps, tables and transforms")
    test = mappings.add_parser("test", parents=[common], help="run the golden cases of mappings/tests")
    test.add_argument("--update", action="store_true", help="rewrite the expected outputs")
    export = mappings.add_parser("export", parents=[common],
                                 help="every map as rows of the v2-to-FHIR guide's tables")
    export.add_argument("--format", choices=("text", "csv", "tsv"), default="text")
    reload = mappings.add_parser("reload", parents=[common],
                                 help="check the set, then make the running gateway reload it (SIGHUP)")
    for action, handler in ((check, _mappings_check), (test, _mappings_test),
                            (export, _mappings_export), (reload, _mappings_reload)):
        action.add_argument("--mappings", metavar="DIR", help="mapping directory (default: mappings.directory)")
        action.set_defaults(handler=handler)
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(metavar="ACTION")
    verify = audit.add_parser("verify", parents=[common],
                              help="check the hash chain; name every altered, removed or inserted "
                                   "record (exit status 1 when the trail is not intact)")
    verify.add_argument("--batch", type=_positive, default=10_000, help="records read at a time")
    verify.set_defaults(handler=_audit("verify"))
    show = audit.add_parser("show", parents=[common], help="audit records, oldest first")
    show.add_argument("--after", type=_whole, default=0, metavar="SEQ")
    show.add_argument("--limit", type=_positive, default=100)
    show.add_argument("--subject", type=_text, help="only this subject (message/42, prescription/RX-...)")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(handler=_audit("show"))
    retention = commands.add_parser("retention", help="expiry of payloads, bundles and audit records"
                                    ).add_subparsers(metavar="ACTION")
    expire = retention.add_parser("run", parents=[common],
                                  help="expire what is older than the retention days now and print "
                                       "what was removed (the gateway also does it daily at run_at)")
    expire.add_argument("--now", metavar="ISO", help="the instant to count the days back from "
                                                       "(default: now; UTC unless an offset is given)")
    expire.add_argument("--json", action="store_true", help="the report as one JSON object")
    expire.set_defaults(handler=_retention_run)
    everything = commands.add_parser(
        "reload", parents=[common],
        help="check the configuration, facility registry, CRL and mapping set, then make the "
             "running gateway reload them (SIGHUP)")
    everything.set_defaults(handler=_reload)
    accounts = commands.add_parser("accounts", help="console accounts").add_subparsers(metavar="ACTION")
    hashing = accounts.add_parser("hash", help="print the scrypt hash of a console password, for "
                                               "console.accounts[].password_hash")
    hashing.add_argument("--stdin", action="store_true",
                         help="read the password from the first line of standard input instead of "
                              "asking for it twice")
    hashing.set_defaults(handler=_accounts_hash)
    return parser


def _accounts_hash(args) -> int:
    """The password is asked twice without echo (or read from standard input), never printed."""
    import getpass

    from gateway.console.passwords import MAX_PASSWORD, MIN_PASSWORD, hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("the two passwords differ; nothing hashed", file=sys.stderr)
            return 1
    if len(password) < MIN_PASSWORD:
        print(f"a console password needs at least {MIN_PASSWORD} characters", file=sys.stderr)
        return 1
    if len(password) > MAX_PASSWORD:  # the login form would cut it: that account could never log in
        print(f"a console password has at most {MAX_PASSWORD} characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def load(args) -> GatewayConfig:
    path = args.config or os.environ.get("GATEWAY_CONFIG")
    if not path:
        path = "conf/gateway.yaml"
        if not os.path.exists(path):
            path = os.path.join(_PROJECT_ROOT, "conf", "gateway.yaml")
    try:
        return load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def _run(args) -> int:
    from gateway.runner import run

    return run(load(args), sandbox=args.sandbox)


def _sandbox(args) -> int:
    from gateway.runner import run_sandbox

    return run_sandbox(load(args))


def _pki(name: str):
    def handler(args) -> int:
        from gateway import pki

        return getattr(pki, name)(load(args), args)

    return handler


def _audit(name: str):
    def handler(args) -> int:
        from gateway.audit import commands

        return getattr(commands, name)(load(args), args)

    return handler


def _retention_run(args) -> int:
    from gateway.retention import commands

    return commands.run(load(args), args)


def _send(args) -> int:
    from adapters.mllp.client import (MllpClient, MllpClientError, client_tls_context, control_id,
                                      describe, split_messages)

    host, _, port = args.to.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:2575
    # ASCII digits in range: a port over 65535 would otherwise wrap to another port, or fail
    # with a traceback.
    if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        print("--to must be HOST:PORT", file=sys.stderr)
        return 2
    tls = None
    if args.tls:
        if not args.ca:
            print("--tls needs --ca (and --cert/--key when the server requires a client certificate)",
                  file=sys.stderr)
            return 2
        if args.key and not args.cert:
            print("--key needs --cert", file=sys.stderr)
            return 2
        for option, name in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
            if name and (os.path.isdir(name) or not os.access(name, os.R_OK)):  # OpenSSL would raise
                reason = ("no such file" if not os.path.exists(name) else
                          "a directory" if os.path.isdir(name) else "not readable")
                print(f"cannot read {option} {name}: {reason}", file=sys.stderr)
                return 1
        try:
            tls = client_tls_context(args.ca, args.cert, args.key)
        except ssl.SSLError as error:
            # OpenSSL names no file: say which options were being loaded.
            given = " ".join(f"{o} {n}" for o, n in (("--ca", args.ca), ("--cert", args.cert),
                                                      ("--key", args.key)) if n)
            hint = " (without --key, the key must be in the --cert file)" if args.cert and not args.key else ""
            print(f"cannot load {given}: not a PEM certificate and matching key{hint}: {error}",
                  file=sys.stderr)
            return 1
    # Every file is read before anything is sent: a mistyped name sends none of the others.
    contents = []
    for path in args.files:
        try:
            with open(path, "rb") as handle:
                messages = split_messages(handle.read(), args.raw)
        except OSError as error:
            print(f"cannot read {path}: {error.strerror or error}", file=sys.stderr)
            return 1
        if not messages:  # else nothing is sent for it, and the exit status says all went well
            print(f"cannot send {path}: no message in it", file=sys.stderr)
            return 1
        contents.append((path, messages))
    failures = 0
    try:
        client = MllpClient(host, int(port), args.timeout, tls)
    except (OSError, UnicodeError) as error:  # UnicodeError: a host name IDNA cannot encode
        print(f"cannot connect to {args.to}: {error}", file=sys.stderr)
        return 1
    with client:
        for path, messages in contents:
            for number, message in enumerate(messages, 1):
                try:
                    reply = client.send(message)
                except (MllpClientError, OSError) as error:
                    hint = ""
                    if tls is not None and not args.cert and "CERTIFICATE_REQUIRED" in str(error):
                        hint = " (the server requires a client certificate: give --cert and --key)"
                    print(f"{path}#{number}: {error}{hint}", file=sys.stderr)
                    return 1
                summary = describe(reply.response)
                summary.update(file=path, message=number, ms=round(reply.seconds * 1000, 2))
                if reply.commit is not None:  # MLLP release 2: the server said whether it stored it
                    summary["commit"] = "ACK" if reply.commit else "NAK"
                if summary["msa1"] not in ("AA", "CA") or reply.commit is False:
                    failures += 1
                if args.json:
                    print(printable_json(json.dumps(summary, ensure_ascii=False)))
                else:  # the answer's text is the peer's: escaped (gateway.terminal)
                    answer = summary["msa1"] or (
                        "no answer, connection closed" if reply.response is None and reply.commit is None
                        else "no answer" if reply.response is None else "answer without MSA")
                    if reply.commit is False:
                        answer = f"commit NAK (not stored), {answer}"
                    print(printable(f"{path}#{number}: {answer} {summary['msa2'] or ''}".rstrip()))
                    for error in summary["errors"]:
                        print(printable(f"    {error}"))
                if reply.response is None:
                    return 1  # closed, or a bare NAK: whether a late answer follows is unknown
                expected = control_id(message)
                if summary["msa1"] in ("AA", "CA") and expected is not None and summary["msa2"] != expected:
                    # An ACK for another message (a second ACK, a late one) does not accept this
                    # one, and the answers no longer match the messages sent: stop.
                    print(f"{path}#{number}: the answer is for control id {summary['msa2']!r}, "
                          f"not {expected!r}; nothing more sent", file=sys.stderr)
                    return 1
    return 1 if failures else 0


_SQL_INTEGER_MAX = 2**63 - 1  # the largest LIMIT or id a database takes (Python's ints have none)


def _text(text: str) -> str:
    """A text to search or send: the shell may pass bytes that are not UTF-8, which Python
    holds as lone surrogates (surrogateescape) that no database, peer or file can take (file
    names keep them: a file system's names need not be UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not UTF-8 text (check the terminal's or the script's "
                                         "character set)") from None
    return text


def _positive(text: str) -> int:
    """A whole number of at least 1 (a huge one meaning "all")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return min(value, _SQL_INTEGER_MAX)


def _whole(text: str) -> int:
    """A whole number, brought within what a database compares (after a huge one: nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    return max(-_SQL_INTEGER_MAX, min(value, _SQL_INTEGER_MAX))


def _message_id(text: str) -> int:
    """A message id: a whole number that a database can hold."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _SQL_INTEGER_MAX:
        raise argparse.ArgumentTypeError(f"not a message id: {text!r}")
    return value


def _seconds(text: str) -> float:
    """A duration above 0 that a socket takes (0 would mean non-blocking, NaN and inf fail)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0 and at most 86400: {text!r}")
    return value


def _instant(text: str) -> datetime:
    """An ISO 8601 date or date-time; UTC when it names no offset."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _database(args):
    from gateway.store.database import Database, create_gateway_engine, migrate

    config = load(args)
    engine = create_gateway_engine(config.database.url, 1)
    migrate(engine)
    return Database(engine, reactor=None, threads=1)


def _messages_list(args) -> int:
    from gateway.store.queries import MessageFilter, is_patient_search, list_messages

    if args.patient is not None and not is_patient_search(args.patient):
        print("--patient is VALUE or SYSTEM|VALUE, with a value after the bar", file=sys.stderr)
        return 2
    database = _database(args)
    search = MessageFilter(args.control_id, args.patient, args.facility,
                           args.type.upper() if args.type else None, args.status, args.since, args.until)
    rows = database.run_now(list_messages, args.limit, search=search)
    if args.json:
        for row in rows:
            print(printable_json(json.dumps(row.as_dict(), ensure_ascii=False)))
        return 0
    print(f"{'id':>8}  {'received (UTC)':<26} {'status':<10} {'ack':<3} {'type':<10} "
          f"{'sender':<28} control id")
    for row in rows:
        # The MSH fields are the sender's: escaped before being cut to their column's width.
        sender = printable(f"{row.sending_application or ''}/{row.sending_facility or ''}")
        print(f"{row.id:>8}  {row.received_at[:26]:<26} {row.status:<10} "
              f"{printable(row.ack_code or '-'):<3} {printable(row.message_type or '-'):<10} "
              f"{sender[:28]:<28} {printable(row.control_id or '-')}")
    return 0


def _messages_show(args) -> int:
    from gateway.store.queries import deliveries_of, get_message

    database = _database(args)
    detail = database.run_now(get_message, args.id)
    if detail is None:
        print(f"no message {args.id}", file=sys.stderr)
        return 1
    data = detail.as_dict()
    data.update(_translation_of(database, args.id))
    data["deliveries"] = [d.as_dict() for d in database.run_now(deliveries_of, args.id)]
    if args.json:
        print(printable_json(fhir_json.dumps(data).decode("utf-8")))
        return 0
    text, ack, bundle = data.pop("text"), data.pop("ack"), data.pop("bundle", None)
    outgoing = data.pop("deliveries")
    for key, value in data.items():
        if key.startswith("translation_") and value in (None, []):
            continue
        print(printable(f"{key:>26}: {value}"))
    # Everything below is the sender's text (or made from it): escaped, but each segment on a
    # line of its own, as before.
    print("\n--- message" + (" (truncated)" if detail.truncated else "") + " ---")
    print(printable(text.replace("\r", "\n").rstrip("\n"), lines=True))
    print("\n--- ACK sent ---")
    print(printable(ack.replace("\r", "\n").rstrip("\n"), lines=True) if ack else "(none)")
    if bundle is not None:
        print("\n--- FHIR bundle ---")
        print(printable_json(fhir_json.dumps(bundle, indent=True).decode("utf-8")))
    if outgoing:
        print("\n--- deliveries ---")
    for delivery in outgoing:
        when = delivery["finished_at"] or f"next attempt {delivery['next_attempt_at']}"
        print(printable(f"{delivery['destination']}: {delivery['status']} after {delivery['attempts']} "
                        f"attempt(s), {when}; key {delivery['idempotency_key']}"))
        for attempt in delivery["history"]:
            code = f" HTTP {attempt['code']}" if attempt["code"] is not None else ""
            # The reason may quote the peer's answer.
            print(printable(f"  {attempt['attempted_at']} {attempt['node']}: {attempt['outcome']}{code}"
                            + (f" ({attempt['reason']})" if attempt["reason"] else "")))
    return 0


def _translation_of(database, message_id: int) -> dict:
    from gateway.store.translations import get_translation

    stored = database.run_now(get_translation, message_id)
    if stored is None:
        return {"translation_status": None, "mapping_version": None, "bundle": None}
    return stored.as_dict()


# -- Translation ---------------------------------------------------------------------------


def _mapping_directory(args, config: GatewayConfig) -> str:
    if getattr(args, "mappings", None):
        return os.path.abspath(args.mappings)
    if config.mappings is not None:
        return config.mappings.directory
    return config.resolve("mappings")


def _load_mappings(args, config: GatewayConfig):
    """The mapping set, or None after printing every problem on stderr."""
    from gateway.mapping.mapping_set import MappingSet
    from gateway.mapping.source import MappingErrors

    directory = _mapping_directory(args, config)
    try:
        return MappingSet.load(directory)
    except MappingErrors as errors:
        for problem in errors.problems:
            print(problem, file=sys.stderr)
        print(f"{len(errors.problems)} problem(s) in {directory}", file=sys.stderr)
        return None


def _translate(args) -> int:
    from datetime import datetime, timezone

    from adapters.mllp.client import split_messages
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    config = load(args)
    if args.sender and args.sender not in {sender.id for sender in config.senders}:
        print(f"--sender {args.sender}: not in the facility registry", file=sys.stderr)
        return 2
    mappings = _load_mappings(args, config)
    if mappings is None:
        return 1
    translator = Translator(mappings, config.senders)
    failures = 0
    for path in args.files:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            print(f"{path}: {error.strerror}", file=sys.stderr)
            failures += 1
            continue
        # A file of several ER7 messages (each MSH starts one) gives a bundle each, named
        # FILE#n: read whole, the messages after the first were left out without a word.
        pieces = split_messages(data) if data.lstrip(b"\xef\xbb\xbf\r\n \t").startswith(b"MSH") else []
        named = [(f"{path}#{n}", piece) for n, piece in enumerate(pieces, 1)] if len(pieces) > 1 \
            else [(path, data)]
        for name, piece in named:
            record = translator.translate(Pending(None, None, piece, None, None, args.sender,
                                                  datetime.now(timezone.utc)))
            for warning in record.warnings:
                print(printable(f"{name}: warning: {warning}"), file=sys.stderr)
            if record.failed:
                failures += 1
                where = f"{record.error_location}: " if record.error_location else ""
                print(printable(f"{name}: {where}{record.error_reason} (HL7 error {record.error_code})"),
                      file=sys.stderr)
                continue
            if record.bundle is None:  # not translated by design (a query, an acknowledgement)
                print(printable(f"{name}: {record.error_reason}"), file=sys.stderr)
                continue
            # Still valid JSON with the same value (a file's text reaches the bundle).
            print(printable_json(fhir_json.dumps(record.bundle).decode("utf-8")))
    return 1 if failures else 0


def _messages_replay(args) -> int:
    """Translate again; the translation's deliveries are enqueued again with it: a dead letter
    is reopened (same idempotency key), changed content goes out under a new key."""
    import getpass

    from gateway.audit.chain import AuditEvent
    from gateway.audit.trail import AuditTrail
    from gateway.delivery.routes import Router
    from gateway.store.outbox import dead_message_ids
    from gateway.store.translations import message_ids, messages_by_id
    from gateway.translation.service import TranslationWorker
    from gateway.translation.translator import Translator

    if bool(args.ids) == bool(args.status):
        print("give message ids or --status (failed, received, translated or dead)", file=sys.stderr)
        return 2
    config = load(args)
    mappings = _load_mappings(args, config)
    if mappings is None:
        return 1
    database = _database(args)
    if args.ids:
        ids = list(dict.fromkeys(args.ids))  # an id given twice is replayed (and counted) once
    elif args.status == "dead":
        ids = database.run_now(dead_message_ids)
    else:
        ids = database.run_now(message_ids, args.status)
    router = Router(config.routes, config.senders) if config.routes else None
    translator = Translator(mappings, config.senders, router)
    trail = AuditTrail(database.engine, config.node_name)
    try:
        step = _prescription_flow(config, database)
    except ValueError as error:  # the signing key
        print(error, file=sys.stderr)
        return 2
    # Stored as the running gateway stores translations: through the e-prescription flow (a
    # refused dispensation stays refused, not routed to CNSS; a prescription keeps its id), each
    # with its audit record.
    worker = TranslationWorker(database.engine, translator, lambda f, *a: f(*a), step=step, audit=trail)
    actor = f"cli:{getpass.getuser()}"
    failures = 0
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        found = database.run_now(messages_by_id, chunk)
        missing = sorted(set(chunk) - {item.message_id for item in found})
        for message_id in missing:
            print(f"{message_id}: no stored message that can be translated "
                  "(refused and ignored messages cannot)", file=sys.stderr)
        failures += len(missing)
        job = worker.translate_now(found)
        if job.error is not None:
            print(f"storing the translations failed: {job.error}", file=sys.stderr)
            return 1
        results = list(zip(found, job.results))
        trail.append([AuditEvent("delivery.replayed", actor, "failure" if record.failed else "success",
                                 f"message/{item.message_id}", "cli",
                                 {"via": "gateway messages replay", "mapping_version": mappings.version})
                      for item, record in results])
        for item, record in results:
            if record.failed:
                failures += 1
                where = f" {record.error_location}:" if record.error_location else ""
                print(printable(f"{item.message_id}: failed{where} {record.error_reason}"))
            else:
                print(f"{item.message_id}: translated")
    print(f"{len(ids) - failures} of {len(ids)} translated with mapping set {mappings.version}",
          file=sys.stderr)
    return 1 if failures else 0


def _prescription_flow(config: GatewayConfig, database):
    """The e-prescription step as the running gateway has it. It asks CNSS for AMO rights
    through the reactor, which this command then runs in a thread of its own."""
    import threading

    from twisted.internet import reactor

    from adapters.hl7v2.ack import AckBuilder, Sender
    from gateway.prescriptions.service import PrescriptionService

    builder = AckBuilder(Sender(config.identity.application.encode("ascii"),
                                config.identity.facility.encode("ascii")))
    service = PrescriptionService(config, database, builder, reactor)
    if service.eligibility is not None:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, name="reactor",
                         daemon=True).start()
    return service.flow


def _mappings_check(args) -> int:
    config = load(args)
    mappings = _load_mappings(args, config)
    if mappings is None:
        return 1
    directory = _mapping_directory(args, config)
    if args.list:
        from pathlib import Path

        from gateway.mapping.transforms import load_all

        root = Path(directory)
        print("message types:")
        for message_type in mappings.message_types():
            print(f"  {message_type:<12} {mappings.message_map(message_type).name}")
        for kind, title in (("messages", "message maps"), ("segments", "segment maps"),
                            ("datatypes", "datatype maps"), ("tables", "tables")):
            names = sorted(str(p.relative_to(root).with_suffix("")).replace(f"{kind}/", "", 1)
                           for p in root.glob(f"**/{kind}/*.yaml")
                           if "tests" not in p.relative_to(root).parts)
            print(f"{title}:")
            for name in names:
                print(f"  {name}")
        print("transforms:")
        for name, transform in sorted(load_all().items()):
            print(f"  {name:<20} {transform.description}")
    print(f"mapping set {mappings.version}: {mappings.files} files, "
          f"{len(mappings.message_types())} message types, OK")
    return 0


def _mappings_test(args) -> int:
    from pathlib import Path

    from gateway.mapping.golden import (differences, expected_bundle, find_cases, stable,
                                        translate_case, warning_differences, write_expected)
    from gateway.mapping.validation import bundle_problems

    config = load(args)
    mappings = _load_mappings(args, config)
    if mappings is None:
        return 1
    root = Path(_mapping_directory(args, config)) / "tests"
    cases = find_cases(root) if root.is_dir() else []
    failed = 0
    for case in cases:
        name = case.relative_to(root)
        try:
            if args.update:
                print(f"wrote {write_expected(mappings, case).relative_to(root)}")
                continue
            translation = translate_case(mappings, case)
            bundle = translation.bundle
            actual = stable(bundle)
        except Exception as error:  # TranslationError, InputError: the case fails with its reason
            failed += 1
            print(f"FAIL {name}: {error}")
            continue
        expected_path = case.with_suffix(".json")
        try:
            if not expected_path.exists():
                problems = [f"no expected output {expected_path.name} (run with --update)"]
            else:
                problems = list(differences(expected_bundle(expected_path), actual))
            problems += warning_differences(case, translation.warnings)
        except (OSError, ValueError) as error:  # an expected file that is not JSON, or not UTF-8
            problems = [f"cannot read the expected output: {error}"]
        problems += [f"FHIR: {problem}" for problem in bundle_problems(bundle)]
        if problems:
            failed += 1
            print(f"FAIL {name}")
            for problem in problems:
                print(f"    {problem}")
        else:
            print(f"ok   {name}")
    if not args.update:
        print(f"{len(cases) - failed} of {len(cases)} golden cases pass", file=sys.stderr)
    return 1 if failed else 0


def _mappings_export(args) -> int:
    import csv

    from gateway.mapping.export import COLUMNS, export_rows

    config = load(args)
    if _load_mappings(args, config) is None:
        return 1
    rows = [row.values() for row in export_rows(_mapping_directory(args, config))]
    if args.format in ("csv", "tsv"):
        # Every value quoted: with "\n" lines, Python's csv leaves a lone "\r" unquoted, which
        # cuts the row in two for any reader.
        writer = csv.writer(sys.stdout, delimiter="," if args.format == "csv" else "\t",
                            lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        return 0
    widths = [max([len(column)] + [len(row[n]) for row in rows]) for n, column in enumerate(COLUMNS)]
    for row in [COLUMNS, *rows]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    return 0


def _mappings_reload(args) -> int:
    config = load(args)
    mappings = _load_mappings(args, config)
    if mappings is None:
        print("not reloaded: the running gateway keeps its mapping set", file=sys.stderr)
        return 1
    if _signal_reload(config) != 0:
        return 1
    print(f"gateway asked to reload mapping set {mappings.version}; see its log")
    return 0


def _reload(args) -> int:
    """Everything a running gateway reloads on SIGHUP, checked here first so that a mistake
    is reported to the operator instead of only in the gateway's log."""
    from gateway.tls import TlsConfigError, load_crl

    config = load(args)  # the configuration and the facility registry (exit 2 if wrong)
    if config.pki.crl is not None:
        try:
            load_crl(config.pki.crl, config.pki.ca)
        except TlsConfigError as error:  # unreadable, not ours, badly signed: say which
            print(f"not reloaded: pki.crl: {error}", file=sys.stderr)
            return 1
    if config.mappings is not None and _load_mappings(args, config) is None:
        print("not reloaded: the running gateway keeps its configuration", file=sys.stderr)
        return 1
    if _signal_reload(config) != 0:
        return 1
    print(f"gateway asked to reload its facility registry ({len(config.senders)} facilities)"
          + (", CRL" if config.pki.crl else "") + (" and mapping set" if config.mappings else "")
          + "; see its log")
    return 0


def _signal_reload(config: GatewayConfig) -> int:
    import signal

    pid_file = config.resolve(config.pid_file)
    try:
        with open(pid_file, encoding="ascii") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        print(f"no running gateway: cannot read {pid_file}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no running gateway: process {pid} of {pid_file} is gone", file=sys.stderr)
        return 1
    print(f"gateway pid {pid}: SIGHUP sent")
    return 0
