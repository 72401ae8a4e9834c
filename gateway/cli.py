"""The `gateway` command (also `python -m gateway`).

    gateway run [-c conf/gateway.yaml]
    gateway pki init [--dir D] [--force] | gateway pki show [--dir D]
    gateway send --to HOST:PORT [--tls --cert C --key K --ca CA] FILE...
    gateway messages list [--json] [--limit N] [--status S] [--control-id ID]
    gateway messages show ID [--json]

The configuration is `-c FILE`, else $GATEWAY_CONFIG, else conf/gateway.yaml in the current
directory or in the project the package was installed from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from gateway.config import ConfigError, GatewayConfig, load_config

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args.handler(args) or 0)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="configuration file (default conf/gateway.yaml)")
    parser = argparse.ArgumentParser(prog="gateway", parents=[common],
                                     description="Morocco's health information exchange gateway")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the gateway")
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
    send.add_argument("--to", required=True, metavar="HOST:PORT")
    send.add_argument("--tls", action="store_true", help="use TLS (with --ca, --cert, --key)")
    send.add_argument("--ca", help="CA certificate that the server's certificate must chain to")
    send.add_argument("--cert", help="client certificate (PEM)")
    send.add_argument("--key", help="client private key (PEM)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    send.add_argument("--raw", action="store_true",
                      help="send each file's bytes as one frame, line endings untouched")
    send.add_argument("--json", action="store_true", help="one JSON object per message")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.set_defaults(handler=_send)

    messages = commands.add_parser("messages", help="stored messages").add_subparsers(metavar="ACTION")
    listing = messages.add_parser("list", parents=[common], help="newest messages first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--status", help="received, rejected or ignored")
    listing.add_argument("--control-id")
    listing.set_defaults(handler=_messages_list)
    detail = messages.add_parser("show", parents=[common], help="one message: metadata, text, ACK")
    detail.add_argument("id", type=int)
    detail.add_argument("--json", action="store_true")
    detail.set_defaults(handler=_messages_show)
    return parser


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

    return run(load(args))


def _pki(name: str):
    def handler(args) -> int:
        from gateway import pki

        return getattr(pki, name)(load(args), args)

    return handler


def _send(args) -> int:
    from adapters.mllp.client import (MllpClient, MllpClientError, client_tls_context, describe,
                                      split_messages)

    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit():
        print("--to must be HOST:PORT", file=sys.stderr)
        return 2
    tls = None
    if args.tls:
        if not args.ca:
            print("--tls needs --ca (and --cert/--key when the server requires a client certificate)",
                  file=sys.stderr)
            return 2
        tls = client_tls_context(args.ca, args.cert, args.key)
    failures = 0
    try:
        client = MllpClient(host, int(port), args.timeout, tls)
    except OSError as error:
        print(f"cannot connect to {args.to}: {error}", file=sys.stderr)
        return 1
    with client:
        for path in args.files:
            with open(path, "rb") as handle:
                data = handle.read()
            for number, message in enumerate(split_messages(data, args.raw), 1):
                try:
                    reply = client.send(message)
                except (MllpClientError, OSError) as error:
                    print(f"{path}#{number}: {error}", file=sys.stderr)
                    return 1
                summary = describe(reply.response)
                summary.update(file=path, message=number, ms=round(reply.seconds * 1000, 2))
                if summary["msa1"] not in ("AA", "CA"):
                    failures += 1
                if args.json:
                    print(json.dumps(summary, ensure_ascii=False))
                else:
                    answer = summary["msa1"] or ("no answer, connection closed" if reply.response is None
                                                 else "answer without MSA")
                    print(f"{path}#{number}: {answer} {summary['msa2'] or ''}".rstrip())
                    for error in summary["errors"]:
                        print(f"    {error}")
                if reply.response is None:
                    return 1
    return 1 if failures else 0


def _database(args):
    from gateway.store.database import Database, create_gateway_engine, migrate

    config = load(args)
    engine = create_gateway_engine(config.database.url, 1)
    migrate(engine)
    return Database(engine, reactor=None, threads=1)


def _messages_list(args) -> int:
    from gateway.store.queries import list_messages

    database = _database(args)
    rows = database.run_now(list_messages, args.limit, args.status, args.control_id)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict(), ensure_ascii=False))
        return 0
    print(f"{'id':>8}  {'received (UTC)':<26} {'status':<9} {'ack':<3} {'type':<10} "
          f"{'sender':<28} control id")
    for row in rows:
        sender = f"{row.sending_application or ''}/{row.sending_facility or ''}"
        print(f"{row.id:>8}  {row.received_at[:26]:<26} {row.status:<9} {row.ack_code or '-':<3} "
              f"{row.message_type or '-':<10} {sender[:28]:<28} {row.control_id or '-'}")
    return 0


def _messages_show(args) -> int:
    from gateway.store.queries import get_message

    database = _database(args)
    detail = database.run_now(get_message, args.id)
    if detail is None:
        print(f"no message {args.id}", file=sys.stderr)
        return 1
    data = detail.as_dict()
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    text, ack = data.pop("text"), data.pop("ack")
    for key, value in data.items():
        print(f"{key:>22}: {value}")
    print("\n--- message" + (" (truncated)" if detail.truncated else "") + " ---")
    print(text.replace("\r", "\n").rstrip("\n"))
    print("\n--- ACK sent ---")
    print(ack.replace("\r", "\n").rstrip("\n") if ack else "(none)")
    return 0
