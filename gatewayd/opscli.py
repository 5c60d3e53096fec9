"""``gatewayd status``, ``gatewayd tail`` and ``gatewayd reload``: the box from its own shell.

Blocking ``http.client`` like ``gatewayd command`` (``gatewayd.client``, whose API address and
token lookup they share: ``-c FILE``, ``--api``, ``--token-file``). Without ``-c`` or ``--api``,
``status`` and ``tail`` read ``/etc/gatewayd/gatewayd.yaml`` when it is readable, so on a box
with a token they work as typed.

Exit statuses, as ``systemctl status`` and ``gatewayd command`` use them: 0 ok, 1 warning,
degraded or an error answer from the API (printed), 2 usage or a bad config file, 3 the API
cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from gatewayd.client import (
    EXIT_API_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Target,
    UsageError,
    add_target_arguments,
    open_api,
    print_api_error,
    request_api,
    resolve_target,
    unreachable_message,
)

__all__ = [
    "add_reload_arguments",
    "add_status_arguments",
    "add_tail_arguments",
    "format_event",
    "reload_main",
    "status_main",
    "tail_main",
]

#: Seconds ``gatewayd status`` waits for the answer.
STATUS_TIMEOUT = 10.0
#: Seconds without a byte after which ``gatewayd tail`` gives up: the server sends a keepalive
#: every 15 s, so four missed ones mean the daemon is stuck or the network is gone.
TAIL_IDLE_TIMEOUT = 60.0


def _default_config() -> str:
    from gatewayd.cli import DEFAULT_CONFIG  # lazily: gatewayd.cli imports this module

    return DEFAULT_CONFIG


# --- arguments ----------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """``gatewayd status [-c FILE] [--api HOST:PORT] [--token-file FILE] [--json]``."""
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the /api/v1/status body")


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    """``gatewayd tail [-c FILE] [--plugin GLOB] [--type GLOB] [--device GLOB] [--json]``."""
    add_target_arguments(parser)
    parser.add_argument("--plugin", metavar="GLOB", help="only these plugin instances")
    parser.add_argument("--type", metavar="GLOB", help="only these event types (lend.*)")
    parser.add_argument("--device", metavar="GLOB", help="only these devices")
    parser.add_argument("--json", action="store_true", help="print each event's JSON envelope")


def add_reload_arguments(parser: argparse.ArgumentParser) -> None:
    """``gatewayd reload [-c FILE]``: the file is checked here before the daemon reads it."""
    default = _default_config()
    add_target_arguments(
        parser,
        config_help=f"the daemon's config file, checked before the reload (default: {default})",
        config_default=default,
    )


def _target(args: argparse.Namespace, timeout: float | None) -> Target:
    """Where the API is; ``status`` and ``tail`` fall back to the default config file when it
    is readable and neither ``-c`` nor ``--api`` was given."""
    if not args.config and not args.api and os.access(_default_config(), os.R_OK):
        args.config = _default_config()
    return dataclasses.replace(resolve_target(args), timeout=timeout)


def _answer(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- gatewayd status ----------------------------------------------------------------------------


def status_main(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """Print the box's status; 0 ok, 1 warning, degraded or an API refusal, 3 unreachable."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        target = _target(args, STATUS_TIMEOUT)
    except UsageError as exc:
        print(f"gatewayd status: {exc}", file=stderr)
        return EXIT_USAGE
    try:
        status, body = request_api(target, "GET", "/api/v1/status")
    except (OSError, http.client.HTTPException) as exc:
        print(f"gatewayd status: {unreachable_message(target, exc)}", file=stderr)
        return EXIT_UNREACHABLE
    answer = _answer(body)
    if status != 200 or not isinstance(answer, dict):
        print_api_error(status, answer, body, stderr)
        return EXIT_API_ERROR
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False), file=stdout)
    else:
        print(render_status(answer), file=stdout)
    return EXIT_OK if answer.get("status") == "ok" else EXIT_API_ERROR


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}min"
    if hours:
        return f"{hours}h {minutes}min"
    return f"{minutes}min {seconds}s" if minutes else f"{seconds}s"


def _rate(value: float | None, unit: str) -> str:
    return "" if value is None else f", {value:g} {unit}/s"


def render_status(status: dict[str, Any]) -> str:
    """One screen, like ``systemctl status``: the box, its config, each plugin, each sink."""
    word = status.get("status")
    mark = {"ok": "●", "warning": "!"}.get(word, "×")
    uptime = _duration(status.get("uptime_seconds"))
    lines = [
        f"{mark} gatewayd {status.get('gateway')}: {word}",
        f"     Version: {status.get('version')}",
        f"      Active: since {status.get('started_at')}; up {uptime}",
    ]
    lines.extend(f"     Warning: {warning}" for warning in status.get("warnings") or [])
    config = status.get("config") or {}
    if config:
        lines.append(f"      Config: {config.get('path')}, loaded {config.get('loaded_at')}")
        last = config.get("last_reload")
        if isinstance(last, dict) and not last.get("ok", True):
            lines.append(f"      Reload: FAILED at {last.get('at')}; the running config is kept:")
            lines.extend(f"        {error}" for error in last.get("errors") or [])
    plugins = status.get("plugins") or {}
    lines.append(f"     Plugins: {len(plugins)}")
    for name, plugin in plugins.items():
        online = plugin.get("devices_online")
        rates = plugin.get("rates") or {}
        lines.append(
            f"       {name} ({plugin.get('type')}): {plugin.get('state')}, "
            f"{'?' if online is None else online} devices online, "
            f"{plugin.get('restarts', 0)} restarts{_rate(rates.get('events'), 'events')}"
        )
        if plugin.get("error"):
            lines.append(f"         last error: {plugin['error']}")
    sinks = status.get("sinks") or {}
    lines.append(f"       Sinks: {len(sinks)}")
    for name, sink in sinks.items():
        age = sink.get("oldest_age_seconds")
        oldest = f" (oldest {_duration(age)})" if age is not None else ""
        lines.append(
            f"       {name} ({sink.get('type')}): {sink.get('state')}, "
            f"{sink.get('queued')} queued{oldest}{_rate(sink.get('delivery_rate'), 'delivered')}"
        )
        queue = sink.get("queue") or {}
        if queue.get("error"):
            lines.append(f"         queue failing: {queue['error']}")
        if sink.get("warning"):
            lines.append(f"         warning: {sink['warning']}")
        if sink.get("last_error"):
            healed = sink.get("recovered_at")
            when = f" at {sink['last_error_at']}" if sink.get("last_error_at") else ""
            note = f" (recovered {healed})" if healed else ""
            lines.append(f"         last error{when}: {sink['last_error']}{note}")
    return "\n".join(lines)


# --- gatewayd tail ------------------------------------------------------------------------------


def format_event(envelope: dict[str, Any]) -> str:
    """``HH:MM:SS.mmm plugin type device data``: the time local, the data as compact JSON."""
    try:
        moment = datetime.fromisoformat(envelope["ts"]).astimezone()
        clock = moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    except (KeyError, TypeError, ValueError):
        clock = str(envelope.get("ts"))
    data = json.dumps(envelope.get("data"), separators=(",", ":"), ensure_ascii=False)
    device = envelope.get("device") or "-"
    return f"{clock} {envelope.get('plugin')} {envelope.get('type')} {device} {data}"


def tail_main(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """Print events as they are routed until Ctrl-C (0) or the daemon ends the stream (1)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        target = _target(args, TAIL_IDLE_TIMEOUT)
    except UsageError as exc:
        print(f"gatewayd tail: {exc}", file=stderr)
        return EXIT_USAGE
    filters = {k: getattr(args, k) for k in ("plugin", "type", "device") if getattr(args, k)}
    path = "/api/v1/events/stream" + (f"?{urlencode(filters)}" if filters else "")
    connection = None
    try:
        connection, response = open_api(target, "GET", path, accept="text/event-stream")
        if response.status != 200:
            body = response.read()
            print_api_error(response.status, _answer(body), body, stderr)
            return EXIT_API_ERROR
        return _print_stream(response, args.json, stdout, stderr)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # | head: the reader is gone, nothing to say
        return EXIT_OK
    except TimeoutError:
        print(
            f"gatewayd tail: nothing from {target.address} for {TAIL_IDLE_TIMEOUT:g} s", file=stderr
        )
        return EXIT_UNREACHABLE
    except (OSError, http.client.HTTPException) as exc:
        print(f"gatewayd tail: {unreachable_message(target, exc)}", file=stderr)
        return EXIT_UNREACHABLE
    finally:
        if connection is not None:
            connection.close()


def _print_stream(response: Any, as_json: bool, stdout: Any, stderr: Any) -> int:
    """Read Server-Sent Events line by line; print each event, stop at an error or the end."""
    kind, data = "message", []
    while True:
        line = response.readline()
        if not line:
            print("gatewayd tail: the daemon closed the stream", file=stderr)
            return EXIT_API_ERROR
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text:
            field, _, value = text.partition(":")
            if field == "event":
                kind = value.strip()
            elif field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            continue  # comments (": keepalive") and other fields are not printed
        if not data:
            kind = "message"
            continue
        payload, is_error = "\n".join(data), kind == "error"
        kind, data = "message", []
        envelope = _answer(payload.encode("utf-8"))
        if is_error:
            reason = envelope.get("reason") if isinstance(envelope, dict) else payload
            print(f"gatewayd tail: the daemon ended the stream: {reason}", file=stderr)
            return EXIT_API_ERROR
        if isinstance(envelope, dict):
            print(payload if as_json else format_event(envelope), file=stdout, flush=True)


# --- gatewayd reload ----------------------------------------------------------------------------


def reload_main(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """Check the config file here, then ask the daemon to reload it; 0 applied, 1 refused by
    the daemon or an API error, 2 the file is bad (the daemon is not asked), 3 unreachable."""
    from gatewayd.config import ConfigError, load_config

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=stderr)
        print("gatewayd reload: the config has errors; the daemon was not asked", file=stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"gatewayd reload: cannot read {args.config}: {exc.strerror or exc}", file=stderr)
        return EXIT_USAGE
    try:
        target = resolve_target(args, config.api)
    except UsageError as exc:
        print(f"gatewayd reload: {exc}", file=stderr)
        return EXIT_USAGE
    try:
        status, body = request_api(target, "POST", "/api/v1/reload", {})
    except (OSError, http.client.HTTPException) as exc:
        print(f"gatewayd reload: {unreachable_message(target, exc)}", file=stderr)
        return EXIT_UNREACHABLE
    answer = _answer(body)
    outcome = answer.get("reload") if isinstance(answer, dict) else None
    if status == 200 and isinstance(outcome, dict):
        print(render_reload(outcome), file=stdout)
        return EXIT_OK
    if status == 422 and isinstance(outcome, dict):
        print("gatewayd reload: the daemon refused the config; it runs on unchanged:", file=stderr)
        for error in outcome.get("errors") or []:
            print(f"  {error}", file=stderr)
        return EXIT_API_ERROR
    print_api_error(status, answer, body, stderr)
    return EXIT_API_ERROR


def render_reload(outcome: dict[str, Any]) -> str:
    """What a reload applied: plugins and sinks added, changed, removed; routes; what waits for
    a restart."""
    applied = outcome.get("applied") or {}
    lines = []
    for part in ("plugins", "sinks"):
        changes = applied.get(part) or {}
        for verb in ("added", "changed", "removed"):
            names = changes.get(verb) or []
            if names:
                lines.append(f"  {part} {verb}: {', '.join(names)}")
    if applied.get("routes"):
        lines.append("  routes: replaced")
    restart = outcome.get("needs_restart") or []
    if restart:
        lines.append(f"  not applied until a restart: {', '.join(restart)}")
    head = f"reloaded at {outcome.get('at')}" + ("" if lines else ": nothing changed")
    return "\n".join([head, *lines])
