"""``gatewayd command PLUGIN COMMAND key=value ...``: one device command through the control API.

A plain blocking HTTP client (``http.client``, no Twisted, no proxy environment variables) so
it works from any shell on the box. Arguments: ``key=value`` sends the string ``"value"``
(the command's pydantic model converts ``"3"`` to an int where it wants one); ``key:=JSON``
sends parsed JSON (``slots:=[1,2]``, ``force:=true``, ``name:='"007"'``).

The API address and token come from ``--api``/``--token-file``, else from the ``api`` section
of the config file given with ``-c``, else ``127.0.0.1:8720`` without a token. ``gatewayd status``,
``tail`` and ``reload`` (``gatewayd.opscli``) find the API the same way, through
``add_target_arguments``, ``resolve_target``, ``request_api`` and ``print_api_error``.

Exit status: 0 the command succeeded (its result printed as JSON on stdout), 1 the API answered
an error (printed on stderr), 2 usage or local setup error, 3 the API could not be reached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from gatewayd.config_model import ApiSection
from gatewayd.jsonin import JsonInputError, loads_external
from gatewayd.schema import parse_host_port, split_host_port

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Target",
    "UsageError",
    "add_arguments",
    "add_target_arguments",
    "command_main",
    "open_api",
    "parse_arguments",
    "print_api_error",
    "request_api",
    "resolve_target",
    "run",
    "unreachable_message",
]

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_API = "127.0.0.1:8720"
#: Added to api.command_timeout so the server's own 504 arrives before the client gives up.
TIMEOUT_MARGIN = 10.0


class UsageError(Exception):
    """A bad command line or unusable local setup (exit status 2)."""


@dataclass
class Target:
    """Where to send the command: host, port, token (or None) and how long to wait."""

    host: str
    port: int
    token: str | None
    timeout: float | None  # None: wait without limit

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def add_target_arguments(
    parser: argparse.ArgumentParser,
    config_help: str = "gatewayd config file: API address and token_file",
    config_default: str | None = None,
) -> None:
    """Declare ``-c/--config``, ``--api`` and ``--token-file``: where the API is, which token."""
    parser.add_argument("-c", "--config", default=config_default, help=config_help)
    parser.add_argument("--api", metavar="HOST:PORT", help=f"control API address ({DEFAULT_API})")
    parser.add_argument("--token-file", help="file holding the API bearer token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options and positionals of ``gatewayd command``."""
    add_target_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for the answer (default api.command_timeout + 10; 0: no limit)",
    )
    parser.add_argument("plugin", help="plugin instance name from the config (e.g. cabinets)")
    parser.add_argument("command", help="command name (GET /api/v1/plugins lists them)")
    parser.add_argument(
        "arguments",
        nargs="*",
        metavar="key=value|key:=json",
        help="command arguments: key=value sends a string, key:=JSON sends parsed JSON",
    )


def parse_arguments(items: list[str]) -> dict[str, Any]:
    """``["slot=2", "on:=true"]`` → ``{"slot": "2", "on": True}``; UsageError names a bad one."""
    arguments: dict[str, Any] = {}
    for item in items:
        equals = item.find("=")
        if equals <= 0:
            raise UsageError(f"argument {item!r}: expected key=value or key:=json")
        as_json = item[equals - 1] == ":"
        key = item[: equals - 1] if as_json else item[:equals]
        text = item[equals + 1 :]
        if not key:
            raise UsageError(f"argument {item!r}: the key is empty")
        if key in arguments:
            raise UsageError(f"argument {key!r} is given twice")
        if as_json:
            try:
                arguments[key] = loads_external(text)
            except JsonInputError as exc:
                raise UsageError(f"argument {key!r}: {exc}") from None
        else:
            arguments[key] = text
    return arguments


def api_section_from_config(path: str) -> ApiSection:
    """The ``api`` section of a config file.

    ``gatewayd.config.load_config`` is used when it accepts the file; when it refuses it (a
    ``${VAR}`` only the service's environment has, a plugin not installed here), only the
    ``api`` section is read: the command needs nothing else.
    """
    try:
        from gatewayd.config import load_config  # type: ignore[attr-defined]
    except ImportError:
        load_config = None
    if load_config is not None:
        try:
            return load_config(Path(path)).api
        except Exception:  # fall back to the api section alone
            pass
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            document = yaml.safe_load(stream)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {exc}") from None
    section = (document or {}).get("api") if isinstance(document, dict) else None
    if isinstance(section, dict):
        section = {key: _expanded(path, key, value) for key, value in section.items()}
    try:
        return ApiSection.model_validate(section or {})
    except ValidationError as exc:
        raise UsageError(f"config {path}: {_api_problems(exc)}") from None
    except ValueError as exc:
        raise UsageError(f"config {path}: api: {exc}") from None


def _expanded(path: str, key: Any, value: Any) -> Any:
    """``${VAR}`` in one value of the api section, as the daemon would expand it."""
    if not isinstance(value, str):
        return value
    from gatewayd.config import VariableError, expand_variables

    try:
        return expand_variables(value, os.environ)
    except VariableError as exc:
        raise UsageError(f"config {path}: api.{key}: {exc}") from None


def _api_problems(exc: ValidationError) -> str:
    from gatewayd.plugin import describe_validation_error

    return "; ".join(f"api.{part}" for part in describe_validation_error(exc).split("; "))


def resolve_target(args: argparse.Namespace, api: ApiSection | None = None) -> Target:
    """Address, token and timeout from the options and the config file (or its ``api``
    section, when the caller has loaded it already).

    A relative ``api.token_file`` is taken from the config file's directory, as the daemon does;
    ``--token-file`` from the current directory. The token is the file's text, stripped.
    Without a ``--timeout`` option: api.command_timeout + 10 s.
    """
    if api is None:
        api = api_section_from_config(args.config) if args.config else ApiSection()
    listen = args.api or api.listen
    try:
        host, port = split_host_port(parse_host_port(listen))
    except ValueError as exc:
        raise UsageError(f"--api: {exc}") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening on all: use loopback
    token_file: Path | None = None
    if args.token_file:
        token_file = Path(args.token_file)
    elif api.token_file is not None:
        token_file = Path(args.config).parent / api.token_file
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"the token file {token_file} is not UTF-8 text") from None
    given = getattr(args, "timeout", None)
    if given is not None and given < 0:
        raise UsageError(f"--timeout must be 0 (no limit) or more, got {given:g}")
    if given is not None:
        timeout = given or None
    else:  # api.command_timeout 0: the server never answers 504, so neither side gives up
        timeout = api.command_timeout + TIMEOUT_MARGIN if api.command_timeout else None
    return Target(host, port, token or None, timeout)


def open_api(
    target: Target,
    method: str,
    path: str,
    body: Any = None,
    accept: str = "application/json",
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one request (``body``, when given, as JSON) with the token; returns the connection
    and its response, unread (a stream is read as it comes). OSError when unreachable."""
    headers = {"Accept": accept}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    connection = http.client.HTTPConnection(target.host, target.port, timeout=target.timeout)
    try:
        connection.request(method, path, body=payload, headers=headers)
        return connection, connection.getresponse()
    except BaseException:
        connection.close()
        raise


def request_api(target: Target, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request to the API; returns (HTTP status, body). OSError when unreachable."""
    connection, response = open_api(target, method, path, body)
    try:
        return response.status, response.read()
    finally:
        connection.close()


def call_api(
    target: Target, plugin: str, command: str, arguments: dict[str, Any]
) -> tuple[int, bytes]:
    """POST the command; returns (HTTP status, body). OSError when the API cannot be reached."""
    path = f"/api/v1/plugins/{quote(plugin, safe='')}/commands/{quote(command, safe='')}"
    return request_api(target, "POST", path, arguments)


def unreachable_message(target: Target, exc: BaseException) -> str:
    """Why the API could not be reached, for stderr (exit status 3)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"cannot reach the control API at http://{target.address}: "
        f"{reason or type(exc).__name__} (is gatewayd running? is api.listen this address?)"
    )


def report(status: int, body: bytes, stdout: Any, stderr: Any) -> int:
    """Print the result (stdout) or the error (stderr); returns the exit status."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status == 200 and isinstance(answer, dict) and answer.get("ok") is True:
        print(json.dumps(answer.get("result"), indent=2, ensure_ascii=False), file=stdout)
        return EXIT_OK
    print_api_error(status, answer, body, stderr)
    return EXIT_API_ERROR


def print_api_error(status: int, answer: Any, body: bytes, stderr: Any) -> None:
    """An error answer on stderr: its code and message (and how to pass a token after 401)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        print(f"error {status} {error.get('code')}: {error.get('message')}", file=stderr)
        if status == 401:
            print(
                "hint: pass --token-file FILE, or -c CONFIG to use its api.token_file", file=stderr
            )
    else:
        text = body.decode("utf-8", "replace").strip()[:500]
        print(f"error {status}: unexpected answer: {text}", file=stderr)


def run(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """Run ``gatewayd command`` for parsed options; returns the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        arguments = parse_arguments(args.arguments)
        target = resolve_target(args)
    except UsageError as exc:
        print(f"gatewayd command: {exc}", file=stderr)
        return EXIT_USAGE
    try:
        status, body = call_api(target, args.plugin, args.command, arguments)
    except TimeoutError:
        print(
            f"gatewayd command: no answer from the control API at {target.address} within "
            f"{target.timeout:g} s; the command may still have run",
            file=stderr,
        )
        return EXIT_UNREACHABLE
    except (OSError, http.client.HTTPException) as exc:
        print(f"gatewayd command: {unreachable_message(target, exc)}", file=stderr)
        return EXIT_UNREACHABLE
    return report(status, body, stdout, stderr)


def command_main(argv_args: list[str] | argparse.Namespace) -> int:
    """Entry point of ``gatewayd command``: parse ``argv_args``, run, return the exit status.

    ``gatewayd.cli`` may hand over its already parsed Namespace (same option names) instead.
    """
    if isinstance(argv_args, argparse.Namespace):
        return run(argv_args)
    parser = argparse.ArgumentParser(
        prog="gatewayd command",
        description="Send a command to a plugin through the gatewayd control API.",
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv_args)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(command_main(sys.argv[1:]))
