"""The ``gatewayd`` command line: run, check-config, demo, simulate, decode, command, status, tail,
reload, fleet (status, tail and reload live in ``gatewayd.opscli``).

Installed plugins add to it: their simulators become ``gatewayd simulate FAMILY``, their decoders
``gatewayd decode FORMAT``, and ``Plugin.register_cli`` may add whole subcommands.
Exit status: 0 ok, 1 runtime failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd import __version__, client, opscli
from gatewayd.registry import PLUGIN_GROUP, load_all
from gatewayd.schema import seconds_argument

DEFAULT_CONFIG = "/etc/gatewayd/gatewayd.yaml"


def demo_config_path() -> Path:
    """etc/demo.yaml beside the source tree, else the copy installed under share/gatewayd."""
    here = Path(__file__).resolve().parent.parent / "etc" / "demo.yaml"
    if here.exists():
        return here
    return Path(sys.prefix) / "share" / "gatewayd" / "demo.yaml"


def build_parser(plugins: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="gatewayd: device plugins, durable event routing and a control API, "
        "driven by one config file.",
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file (exit 0 ok, 2 bad)")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="the daemon plus every plugin's simulator, on loopback")
    demo.add_argument("-c", "--config", default=None, help="default: the bundled demo.yaml")
    demo.add_argument(
        "--state-dir",
        default=None,
        help="default: a new temporary directory, removed on exit (a directory given is kept)",
    )
    demo.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the temporary state directory on exit (its path is printed at start)",
    )
    demo.add_argument(
        "--duration", type=seconds_argument, default=None, help="stop after N seconds"
    )
    demo.set_defaults(func=cmd_demo)

    simulate = sub.add_parser("simulate", help="run one family's device simulator")
    families = simulate.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for plugin_class in plugins.values():
        simulator = plugin_class.simulator
        if simulator is not None:
            fam = families.add_parser(
                simulator.family,
                help=(simulator.__doc__ or "").split("\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            )
            simulator.add_arguments(fam)
            fam.add_argument(
                "--duration", type=seconds_argument, default=None, help="stop after N seconds"
            )
            fam.add_argument(
                "--json",
                action="store_true",
                help="print the summary at exit as one JSON line (the only line on stdout)",
            )
            fam.set_defaults(func=cmd_simulate, simulator=simulator)

    decoders = {fmt: fn for cls in plugins.values() for fmt, fn in cls.decoders.items()}
    decode = sub.add_parser("decode", help="decode one frame for a field engineer")
    decode.add_argument("format", choices=sorted(decoders) or ["none"])
    decode.add_argument("data")
    decode.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a decoder setting named like the plugin's config key, e.g. -o bcd_decimals=2 "
        "for cjt188 and hygw (repeatable)",
    )
    decode.set_defaults(func=cmd_decode, decoders=decoders)

    command = sub.add_parser("command", help="call a plugin command through the control API")
    client.add_arguments(command)
    command.set_defaults(func=cmd_command)

    status = sub.add_parser("status", help="the daemon at a glance (exit 0 ok, 1 degraded, 3 down)")
    opscli.add_status_arguments(status)
    status.set_defaults(func=opscli.status_main)

    tail = sub.add_parser("tail", help="print events as they are routed, until Ctrl-C")
    opscli.add_tail_arguments(tail)
    tail.set_defaults(func=opscli.tail_main)

    reload = sub.add_parser("reload", help="check the config file, then have the daemon apply it")
    opscli.add_reload_arguments(reload)
    reload.set_defaults(func=opscli.reload_main)

    fleet = sub.add_parser("fleet", help="the boxes behind an MQTT broker: devices, boxes, command")
    from gatewayd.fleet.cli import add_arguments as add_fleet_arguments

    add_fleet_arguments(fleet)
    fleet.set_defaults(func=cmd_fleet)

    new_plugin = sub.add_parser("new-plugin", help="write a new plugin package to start from")
    from gatewayd import scaffold

    scaffold.add_arguments(new_plugin)
    new_plugin.set_defaults(func=scaffold.main)

    for plugin_class in plugins.values():
        plugin_class.register_cli(sub)
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    from gatewayd.config import check_config_main

    return check_config_main(args.config)


def _load_or_report(path: str | Path) -> Any:
    from gatewayd.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None
    except OSError as exc:
        print(f"{path}: cannot read config: {exc.strerror or exc}", file=sys.stderr)
        return None
    for warning in getattr(config, "warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    from gatewayd.runner import run_daemon

    return run_daemon(config)


def cmd_demo(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config or demo_config_path())
    if config is None:
        return 2
    temporary = args.state_dir is None
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="gatewayd-demo-")).resolve()

    def demo_state(loaded: Any) -> None:  # at start and on every reload
        loaded.gateway.state_dir = state_dir

    demo_state(config)
    from gatewayd.runner import run_daemon

    removed = temporary and not args.keep_state
    note = " (removed on exit; --keep-state keeps it)" if removed else ""
    print(f"gatewayd demo: state in {state_dir}{note}", file=sys.stderr, flush=True)
    try:
        return run_daemon(config, demo=True, duration=args.duration, config_overrides=demo_state)
    finally:
        if removed:  # never a --state-dir the user gave: it may hold their data
            shutil.rmtree(state_dir, ignore_errors=True)


def cmd_simulate(args: argparse.Namespace) -> int:
    from gatewayd.runner import run_simulator

    return run_simulator(args.simulator, args, duration=args.duration)


def cmd_decode(args: argparse.Namespace) -> int:
    decoder = args.decoders.get(args.format)
    if decoder is None:
        print(f"no decoder for {args.format!r}", file=sys.stderr)
        return 2
    try:
        options = decoder_options(decoder, args.option)
    except ValueError as exc:
        print(f"gatewayd decode {args.format}: {exc}", file=sys.stderr)
        return 2
    try:
        result = decoder(args.data, **options)
    except ValueError as exc:  # every protocol error derives from ValueError
        reason = getattr(exc, "reason", None)
        print(
            f"invalid {args.format} frame" + (f" ({reason})" if reason else "") + f": {exc}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0


def decoder_options(decoder: Callable[..., Any], given: list[str]) -> dict[str, Any]:
    """``-o NAME=VALUE`` settings as keyword arguments of ``decoder``: its parameters after the
    data typed ``int``, ``str`` or a ``Literal`` of them, each value converted to that type."""
    if not given:
        return {}
    accepted = _decoder_settings(decoder)
    options: dict[str, Any] = {}
    for item in given:
        name, equals, text = item.partition("=")
        if not equals:
            raise ValueError(f"-o {item!r}: expected NAME=VALUE")
        if name not in accepted:
            raise ValueError(f"no option {name!r} (options: {', '.join(accepted) or 'none'})")
        if name in options:
            raise ValueError(f"-o {name} is given more than once")
        options[name] = _setting_value(name, accepted[name], text)
    return options


def _decoder_settings(decoder: Callable[..., Any]) -> dict[str, Any]:
    """Name → type of the settings ``decoder`` takes; none when it cannot be introspected."""
    try:
        hints = typing.get_type_hints(decoder)
        parameters = list(inspect.signature(decoder).parameters.values())[1:]
    except Exception:  # a partial, a C function, a name only imported for type checkers
        return {}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    settings = {}
    for parameter in parameters:
        hint = hints.get(parameter.name)
        literal = typing.get_origin(hint) is typing.Literal
        if parameter.kind in keyword and (hint in (int, str) or literal):
            settings[parameter.name] = hint
    return settings


def _setting_value(name: str, hint: Any, text: str) -> Any:
    if hint is str:
        return text
    if hint is int:
        value = _strict_int(text)
        if value is None:
            raise ValueError(f"-o {name}: expected a whole number, got {text!r}")
        return value
    choices = typing.get_args(hint)
    for choice in choices:
        if (str(choice) == text) if isinstance(choice, str) else (_strict_int(text) == choice):
            return choice
    listed = " or ".join(str(choice) for choice in choices)
    raise ValueError(f"-o {name}: expected {listed}, got {text!r}")


def _strict_int(text: str) -> int | None:
    """A whole number written in ASCII digits with an optional minus; None otherwise."""
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() else None


def cmd_command(args: argparse.Namespace) -> int:
    return client.command_main(args)


def cmd_fleet(args: argparse.Namespace) -> int:
    from gatewayd.fleet.cli import fleet_main

    return fleet_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(load_all(PLUGIN_GROUP))
    args = parser.parse_args(argv)
    return args.func(args)
