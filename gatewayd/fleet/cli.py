"""``gatewayd fleet devices|boxes|command``: the fleet as the broker shows it, from any shell.

``devices`` lists every box's retained claim (plugin, device, gateway, online, since), ``boxes``
every box's status, ``command PLUGIN COMMAND key=value key:=JSON ...`` sends one command to the
box that holds the device (``FleetClient.command``) and prints its answer as JSON.

The device is ``--device ID``, else the value of the one argument named ``device``, ``imei`` or
``gw_id`` (the example, power-bank and heating plugins' device arguments). Exit status: 0 ok
(a 2xx answer), 1 an error answer, no answer in time, or the broker unreachable (on stderr),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gatewayd.client import UsageError, parse_arguments
from gatewayd.fleet.client import Answer, CommandTimeout, FleetClient, FleetError
from gatewayd.schema import parse_host_port, split_host_port

__all__ = ["DEVICE_ARGUMENTS", "add_arguments", "device_of", "fleet_main", "run"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_BROKER = "127.0.0.1:1883"
#: Argument names that identify the device, when ``--device`` is not given.
DEVICE_ARGUMENTS = ("device", "imei", "gw_id")


def _common(parser: argparse.ArgumentParser) -> None:
    """Options every ``fleet`` subcommand takes: where the broker is and how to log in."""
    parser.add_argument(
        "--broker", default=DEFAULT_BROKER, metavar="HOST:PORT", help=f"default {DEFAULT_BROKER}"
    )
    parser.add_argument("--username", help="MQTT user name")
    parser.add_argument("--password-file", help="file holding the MQTT password")
    parser.add_argument("--ca-file", help="speak TLS, trusting this CA file")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system CAs")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``gatewayd fleet``'s subcommands on ``parser``."""
    sub = parser.add_subparsers(
        dest="fleet_command", required=True, metavar="devices|boxes|command"
    )
    devices = sub.add_parser("devices", help="list every box's devices (retained presence)")
    _common(devices)
    devices.add_argument("--online", action="store_true", help="only devices online")
    boxes = sub.add_parser("boxes", help="list every box and its status")
    _common(boxes)
    command = sub.add_parser("command", help="send a command to the box holding a device")
    _common(command)
    command.add_argument(
        "--device", help="the device id (default: a device=/imei=/gw_id= argument)"
    )
    command.add_argument("--id", dest="request_id", help="request id (default: a new uuid4)")
    command.add_argument("plugin", help="plugin instance name (as in the presence topics)")
    command.add_argument("command", help="command name")
    command.add_argument(
        "arguments",
        nargs="*",
        metavar="key=value|key:=json",
        help="command arguments: key=value sends a string, key:=JSON sends parsed JSON",
    )


def device_of(arguments: dict[str, Any], given: str | None) -> str:
    """The device a command is for: ``given``, else the one device-naming argument."""
    if given:
        return given
    named = {k: v for k, v in arguments.items() if k in DEVICE_ARGUMENTS}
    if len(named) != 1 or not isinstance(next(iter(named.values())), str | int):
        names = "/".join(f"{k}=" for k in DEVICE_ARGUMENTS)
        problem = "more than one" if len(named) > 1 else "no usable"
        raise UsageError(f"{problem} {names} argument: say which device with --device ID")
    return str(next(iter(named.values())))


def make_client(args: argparse.Namespace) -> FleetClient:
    """A FleetClient for the options (not connected yet); UsageError for bad ones."""
    try:
        host, port = split_host_port(parse_host_port(args.broker))
    except ValueError as exc:
        raise UsageError(f"--broker: {exc}") from None
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be more than 0, got {args.timeout:g}")
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the password file {args.password_file}: {exc}") from None
    tls: Any = None
    if args.ca_file or args.tls:
        import ssl

        try:
            tls = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca-file {args.ca_file}: {exc}") from None
    return FleetClient(
        host, port, username=args.username, password=password, tls=tls, timeout=args.timeout
    )


def _printable(value: str) -> str:
    """A device or gateway id safe for a terminal line (control characters escaped)."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _table(rows: list[list[str]], out: Any) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def show_devices(client: FleetClient, args: argparse.Namespace, out: Any) -> int:
    claims = client.devices(online_only=args.online)
    if args.json:
        print(json.dumps([c.to_dict() for c in claims], indent=2, ensure_ascii=False), file=out)
        return EXIT_OK
    rows = [["PLUGIN", "DEVICE", "GATEWAY", "ONLINE", "SINCE"]]
    for c in claims:
        online = "yes" if c.online else "no"
        rows.append([_printable(c.plugin), _printable(c.device), c.gateway, online, c.since])
    _table(rows, out)
    return EXIT_OK


def show_boxes(client: FleetClient, args: argparse.Namespace, out: Any) -> int:
    boxes = client.boxes()
    if args.json:
        print(json.dumps([b.to_dict() for b in boxes], indent=2, ensure_ascii=False), file=out)
        return EXIT_OK
    online = [c.gateway for c in client.devices(online_only=True)]
    rows = [["GATEWAY", "STATUS", "DEVICES"]]
    for box in boxes:
        rows.append([_printable(box.gateway), box.word, str(online.count(box.gateway))])
    _table(rows, out)
    return EXIT_OK


def send_command(
    client: FleetClient,
    args: argparse.Namespace,
    arguments: dict[str, Any],
    device: str,
    out: Any,
    err: Any,
) -> int:
    try:
        answer: Answer = client.command(
            args.plugin, args.command, device, arguments, request_id=args.request_id
        )
    except CommandTimeout as exc:
        print(f"gatewayd fleet command: {exc}", file=err)
        return EXIT_ERROR
    print(json.dumps(answer.body, indent=2, ensure_ascii=False), file=out)
    if len(answer.sent_to) > 1:
        print(
            f"gatewayd fleet command: the device moved from {answer.sent_to[0]} to "
            f"{answer.sent_to[-1]}; sent again there with the same id",
            file=err,
        )
    if answer.ok:
        return EXIT_OK
    error = answer.error or {}
    where = f" (box {answer.gateway})" if answer.gateway else ""
    print(f"error {answer.status} {error.get('code')}{where}: {error.get('message')}", file=err)
    return EXIT_ERROR


def run(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """Run ``gatewayd fleet ...`` for parsed options; returns the exit status."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        arguments: dict[str, Any] = {}
        device = ""
        if args.fleet_command == "command":
            arguments = parse_arguments(args.arguments)
            device = device_of(arguments, args.device)
        client = make_client(args)
    except UsageError as exc:
        print(f"gatewayd fleet {args.fleet_command}: {exc}", file=err)
        return EXIT_USAGE
    try:
        client.connect(timeout=args.timeout)
    except FleetError as exc:
        print(f"gatewayd fleet {args.fleet_command}: {exc}", file=err)
        return EXIT_ERROR
    try:
        if args.fleet_command == "devices":
            return show_devices(client, args, out)
        if args.fleet_command == "boxes":
            return show_boxes(client, args, out)
        return send_command(client, args, arguments, device, out, err)
    except FleetError as exc:
        print(f"gatewayd fleet {args.fleet_command}: {exc}", file=err)
        return EXIT_ERROR
    finally:
        client.close()


def fleet_main(argv: list[str] | argparse.Namespace) -> int:
    """Entry point: ``gatewayd.cli`` hands over its parsed Namespace, or parse ``argv`` here."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    parser = argparse.ArgumentParser(prog="gatewayd fleet", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)
