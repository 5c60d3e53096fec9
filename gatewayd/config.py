"""Loading and validating the YAML config file, with errors an operator can act on.

Every problem is reported as ``FILE:LINE: key.path: message`` and all problems of a file are
reported together (``ConfigError``). The steps, in order:

1. Parse with pyyaml, keeping the line of every key (``gatewayd.yamlnodes``); a YAML syntax error
   stops here, since the structure is unknown. Duplicate keys are errors.
2. ``${VAR}`` and ``${VAR:-default}`` are replaced in every string value (``$${`` is a literal
   ``${``). The result is always a string; the schema converts it (``"1883"`` → ``1883`` for an
   integer field), so ``port: ${MQTT_PORT}`` works.
3. ``X_file: path`` sets ``X`` to the file's content when the section's model has a field ``X``
   but none called ``X_file`` (a relative path is taken from the config file's directory).
4. ``gateway``, ``api`` and each route are validated against the core's models
   (``gatewayd.config_model``); each ``plugins.<name>`` and ``sinks.<name>`` against the
   ``Config`` model of the class its ``type`` names (``gatewayd.registry``). Every section is
   validated on its own so one bad section does not hide the errors of the next.
5. Routes may only name sinks that exist; a sink no route uses is a warning. A plugin's or
   sink's ``Config`` may add warnings of its own with a ``config_warnings()`` method.

Secret values (fields typed ``gatewayd.schema.Secret``, keys named like ``password``, ``token``,
``secret``, ``key``, values read from ``*_file``) are never part of a message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from inspect import isclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from gatewayd import registry
from gatewayd.config_explain import (
    MISSING,
    Problem,
    alternatives,
    annotation_at,
    data_path,
    describe,
    explain,
    field_keys,
    holds_secret,
    is_model,
    merge,
    value_at,
)
from gatewayd.config_model import ApiSection, Config, GatewaySection, RouteConfig
from gatewayd.files import NotPrivateError, read_private_text
from gatewayd.plugin import Plugin
from gatewayd.schema import (
    PluginConfig,
    SinkConfig,
    is_loopback,
    listeners,
    read_secret,
    split_host_port,
)
from gatewayd.sinks.base import Sink
from gatewayd.yamlnodes import KeyPath, YamlDocument, YamlSyntaxError, format_path, load_yaml

__all__ = [
    "SECTIONS",
    "ConfigError",
    "VariableError",
    "check_config_main",
    "expand_variables",
    "load_config",
    "summarize",
]

#: The top-level keys of a config file, in the order the documentation shows them.
SECTIONS = ("gateway", "api", "plugins", "sinks", "routes")

INSTANCE_NAME = re.compile(r"[A-Za-z0-9_\-]+")

#: Key names whose values are treated as secrets even when the schema does not say so.
_SECRET_NAME = re.compile(
    r"pass(word|wd|phrase)|secret|token|credential|private|(^|_)(key|psk)s?$", re.IGNORECASE
)


class ConfigError(Exception):
    """All errors of one config file; str() is one line per error, ``file:line: key.path: msg``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(self.errors)


class VariableError(ValueError):
    """A ``${...}`` reference that cannot be replaced; the message names the variable."""


# --- ${VAR} substitution -------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$(\$?)\{([^}]*)(\}?)")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def expand_variables(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``text``; ``$${`` stays a literal ``${``.

    ``${VAR:-default}`` uses the default when VAR is unset or empty (as the shell does);
    ``${VAR}`` with VAR unset raises VariableError. Defaults cannot contain ``}`` or references.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, inner, closed = match.groups()
        if escaped:
            return "${" + inner + closed
        if not closed:
            raise VariableError("unterminated ${ (write $${ for a literal ${)")
        reference = _VARIABLE.fullmatch(inner)
        if reference is None:
            raise VariableError("malformed ${...} reference (write $${ for a literal ${)")
        name, default = reference.groups()
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise VariableError(f"environment variable {name} is not set")
            return default
        return value

    return _REFERENCE.sub(replace, text)


# --- checking one file ---------------------------------------------------------------------------


@dataclass
class _Issue:
    line: int
    path: KeyPath
    message: str


class _FileChecker:
    """Validates one parsed config file, collecting every error and warning with its line."""

    def __init__(self, path: Path, document: YamlDocument, environ: Mapping[str, str]) -> None:
        self.path = path
        self.name = str(path)
        self.document = document
        self.environ = environ
        self.errors: list[_Issue] = []
        self.warnings: list[_Issue] = []
        #: Paths already reported (bad ${VAR}, unreadable *_file): their other errors are noise.
        self.reported: set[KeyPath] = set()
        #: Paths whose value came from a secret file: never shown.
        self.secret_paths: set[KeyPath] = set()

    # reporting

    def error(self, path: KeyPath, message: str) -> None:
        self.errors.append(_Issue(self.document.line_of(path), path, message))

    def warn(self, path: KeyPath, message: str) -> None:
        self.warnings.append(_Issue(self.document.line_of(path), path, message))

    def format(self, issues: list[_Issue]) -> list[str]:
        lines = []
        for issue in sorted(issues, key=lambda issue: issue.line):
            where = format_path(issue.path)
            location = f"{self.name}:{issue.line}:"
            lines.append(
                f"{location} {where}: {issue.message}" if where else f"{location} {issue.message}"
            )
        return lines

    def _already_reported(self, path: KeyPath) -> bool:
        return any(path[: len(bad)] == bad for bad in self.reported)

    # the whole file

    def check(self) -> Config:
        data = self.document.data
        expected = f"a mapping with the keys {', '.join(SECTIONS)}"
        if data is None:
            raise ConfigError([f"{self.name}:1: the file is empty; expected {expected}"])
        if not isinstance(data, dict):
            line = self.document.line_of(())
            raise ConfigError([f"{self.name}:{line}: expected {expected}, got {describe(data)}"])
        for duplicate in self.document.duplicates:
            message = f"duplicate key (first given on line {duplicate.first_line})"
            self.errors.append(_Issue(duplicate.line, duplicate.path, message))
        data = self._substitute(data, ())
        for key in data:
            if key not in SECTIONS:
                unknown = {"type": "extra_forbidden", "loc": (key,)}
                self.error((key,), explain(unknown, False, SECTIONS).text())

        gateway = self._validate(GatewaySection, _section(data, "gateway", {}), ("gateway",))
        api = self._validate(ApiSection, _section(data, "api", {}), ("api",))
        if api is not None:
            self._check_api(api)
        plugins, plugin_classes = self._instances(
            data, "plugins", registry.PLUGIN_GROUP, Plugin, PluginConfig
        )
        sinks, sink_classes = self._instances(data, "sinks", registry.SINK_GROUP, Sink, SinkConfig)
        routes = self._routes(data)
        if gateway is not None:
            self._check_clashes(gateway, api, plugins, sinks)
        self._check_fleet(plugins, sinks)

        if self.errors:
            raise ConfigError(self.format(self.errors))
        assert gateway is not None and api is not None and routes is not None
        config = Config(
            path=self.path,
            gateway=gateway,
            api=api,
            plugins=plugins,
            sinks=sinks,
            routes=routes,
            plugin_classes=plugin_classes,
            sink_classes=sink_classes,
        )
        config.warnings = self.format(self.warnings)  # type: ignore[attr-defined]
        return config

    def _check_fleet(self, plugins: dict[str, Any], sinks: dict[str, Any]) -> None:
        """``fleet: true`` needs the fleet's box statuses, which an mqtt sink (gatewayd's own
        topics, not ``format: thingsboard``) reads: refuse it without one."""
        if fleet_sink(sinks) is not None:
            return
        for name, section in plugins.items():
            if getattr(section, "fleet", False):
                self.error(
                    ("plugins", name, "fleet"),
                    "fleet: true needs an mqtt sink (format: gatewayd) to the fleet's broker, "
                    "where the boxes' statuses say which boxes are live; none is configured",
                )

    def _check_api(self, api: ApiSection) -> None:
        """What would stop the daemon only after its plugins started: an unreadable or empty
        token file, one that group or others could read, and an API open to the network
        without a token."""
        if api.token_file is not None:
            path = self.path.parent / api.token_file  # an absolute path stays as it is
            try:
                token = read_private_text(path).strip()
            except NotPrivateError as exc:  # the same check, and message, as the ESAM key file
                self.error(("api", "token_file"), str(exc))
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not UTF-8 text"
                self.error(("api", "token_file"), f"cannot read {path}: {reason}")
            else:
                if not token:
                    self.error(("api", "token_file"), f"{path} is empty")
        elif api.enabled and not is_loopback(split_host_port(api.listen)[0]):
            self.error(
                ("api", "listen"),
                f"the control API on {api.listen} would take device commands from the network "
                'without a token: set api.token_file, or listen on loopback ("127.0.0.1:8720")',
            )

    def _check_clashes(
        self,
        gateway: GatewaySection,
        api: ApiSection | None,
        plugins: dict[str, Any],
        sinks: dict[str, Any],
    ) -> None:
        """Two listeners on one port of one transport (a UDP and a TCP listener may share
        one: see ``schema.listeners``), two sinks writing one file, a sink writing a queue file:
        each would fail (or corrupt data) only once the daemon runs."""
        found: list[tuple[KeyPath, str, str]] = []  # (key path, transport, address)
        if api is not None and api.enabled:
            found.append((("api", "listen"), "tcp", api.listen))
        for name, model in plugins.items():
            for key, transport, address in listeners(model):
                found.append((("plugins", name, key), transport, address))
        for index, (path, transport, address) in enumerate(found):
            for earlier_path, earlier_transport, earlier in found[:index]:
                if transport == earlier_transport and _same_port(address, earlier):
                    where = format_path(earlier_path)
                    self.error(
                        path, f"{address} is also {where}'s {transport.upper()} address ({earlier})"
                    )
                    break
        state_dir = self.path.parent / gateway.state_dir  # as the daemon resolves them
        queue_files = {(state_dir / "queues" / f"{name}.db").resolve() for name in sinks}
        written: dict[Path, str] = {}
        for name, model in sinks.items():
            given = getattr(model, "path", None)
            if not isinstance(given, str | Path):
                continue
            target = (state_dir / given).resolve()
            if target in queue_files:
                self.error(("sinks", name, "path"), f"{target} is a sink's queue file")
            elif target in written:
                self.error(("sinks", name, "path"), f"{target} is also sinks.{written[target]}'s")
            else:
                written[target] = name

    # step 2: ${VAR}

    def _substitute(self, value: Any, path: KeyPath) -> Any:
        if isinstance(value, str):
            try:
                return expand_variables(value, self.environ)
            except VariableError as exc:
                self.error(path, str(exc))
                self.reported.add(path)
                return value
        if isinstance(value, dict):
            return {key: self._substitute(item, path + (key,)) for key, item in value.items()}
        if isinstance(value, list):
            return [self._substitute(item, path + (index,)) for index, item in enumerate(value)]
        return value

    # step 3: X_file secrets

    def _secret_files(self, model: type[BaseModel], data: Any, path: KeyPath) -> Any:
        """``data`` with every ``X_file`` the model does not declare replaced by ``X``."""
        if not isinstance(data, dict):
            return data
        keys = field_keys(model)
        result = dict(data)
        for key, value in data.items():
            if not (isinstance(key, str) and key.endswith("_file")) or key in keys:
                continue
            target = key.removesuffix("_file")
            if target not in keys:
                continue  # an unknown key: validation says so
            del result[key]
            key_path, target_path = path + (key,), path + (target,)
            self.reported.add(target_path)  # a missing target is this key's problem
            if target in data:
                self.error(key_path, f"give either {target} or {key}, not both")
                continue
            if not isinstance(value, str) or not value:
                self.error(key_path, f"expected the path of a file, got {describe(value)}")
                continue
            file = Path(value) if Path(value).is_absolute() else self.path.parent / value
            try:
                result[target] = read_secret(file)
            except OSError as exc:
                self.error(key_path, f"cannot read {file}: {exc.strerror or exc}")
                continue
            except UnicodeDecodeError:
                self.error(key_path, f"cannot read {file}: not UTF-8 text")
                continue
            self.reported.discard(target_path)
            self.secret_paths.add(target_path)
            self.document.lines[target_path] = self.document.line_of(key_path)
        for key, value in list(result.items()):
            name = keys.get(key) if isinstance(key, str) else None
            if name is not None:
                annotation = model.model_fields[name].annotation
                result[key] = self._secret_files_below(annotation, value, path + (key,))
        return result

    def _secret_files_below(self, annotation: Any, value: Any, path: KeyPath) -> Any:
        options = alternatives(annotation)
        models = [alt for alt in options if is_model(alt)]
        if isinstance(value, dict) and len(models) == 1:
            return self._secret_files(models[0], value, path)
        for alternative in options:
            origin, args = get_origin(alternative), get_args(alternative)
            if origin in (list, Sequence) and args and isinstance(value, list):
                return [
                    self._secret_files_below(args[0], item, path + (index,))
                    for index, item in enumerate(value)
                ]
            if origin in (dict, Mapping) and len(args) == 2 and isinstance(value, dict):
                return {
                    key: self._secret_files_below(args[1], item, path + (key,))
                    for key, item in value.items()
                }
        return value

    # step 4: validation

    def _validate(self, model: type[BaseModel], data: Any, path: KeyPath) -> Any:
        """The validated model, or None after reporting every error of this section."""
        data = self._secret_files(model, data, path)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            self._report(exc, model, data, path)
            return None

    def _report(
        self, exc: ValidationError, model: type[BaseModel], data: Any, base: KeyPath
    ) -> None:
        """Turn every error of one section into a located message (union branches merged)."""
        problems: dict[KeyPath, list[Problem]] = {}
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            relative = data_path(data, loc, error["type"] == "missing")
            path = base + relative
            if self._already_reported(path):
                continue
            choices: list[str] = []
            if error["type"] == "extra_forbidden":
                parent = [
                    alt for alt in alternatives(annotation_at(model, loc[:-1])) if is_model(alt)
                ]
                present = value_at(data, relative[:-1])
                if parent:
                    choices = [
                        key
                        for key in field_keys(parent[0])
                        if not (isinstance(present, dict) and key in present)
                    ]
            problems.setdefault(path, []).append(
                explain(error, self._is_secret(model, loc, path), choices)
            )
        # ``lisen: ...`` (did you mean 'listen'?) already explains why ``listen`` is missing.
        typos = {
            path[:-1] + (problem.suggestion,)
            for path, found in problems.items()
            for problem in found
            if problem.suggestion
        }
        for path, found in problems.items():
            if path in typos and all(p.head == MISSING for p in found):
                continue
            self.error(path, merge(found))

    def _is_secret(self, model: type[BaseModel], loc: Sequence[Any], path: KeyPath) -> bool:
        if path in self.secret_paths or holds_secret(annotation_at(model, loc)):
            return True
        names = [element for element in path if isinstance(element, str)]
        if not names or names[-1].endswith("_file"):  # the path of a secret is not secret
            return False
        return _SECRET_NAME.search(names[-1]) is not None

    def _instances(
        self, data: dict[Any, Any], section: str, group: str, base: type, base_config: type
    ) -> tuple[dict[str, Any], dict[str, type]]:
        """Validate ``plugins`` or ``sinks``: each entry against its own type's ``Config``."""
        kind = section.removesuffix("s")
        models: dict[str, Any] = {}
        classes: dict[str, type] = {}
        entries = _section(data, section, {})
        if not isinstance(entries, dict):
            self.error(
                (section,),
                f"expected a mapping of {kind} name to settings, got {describe(entries)}",
            )
            return models, classes
        for name, entry in entries.items():
            path = (section, name)
            if not (isinstance(name, str) and INSTANCE_NAME.fullmatch(name)):
                self.error(path, f"bad {kind} name {str(name)!r}: use letters, digits, _ and -")
            if not isinstance(entry, dict):
                self.error(path, f"expected a mapping with at least 'type', got {describe(entry)}")
                continue
            if "type" not in entry:
                self.error(path + ("type",), "required key missing")
                continue
            type_name = entry["type"]
            if not isinstance(type_name, str):
                self.error(
                    path + ("type",), f"expected a {kind} type name, got {describe(type_name)}"
                )
                continue
            try:
                cls = registry.load(group, type_name)
            except registry.RegistryError as exc:
                self.error(path + ("type",), str(exc))
                continue
            model = getattr(cls, "Config", None)
            if not (
                isclass(cls)
                and issubclass(cls, base)
                and isclass(model)
                and issubclass(model, base_config)
            ):
                self.error(path + ("type",), f"{type_name!r} is not a gatewayd {kind} class")
                continue
            validated = self._validate(model, entry, path)
            if validated is not None and isinstance(name, str):
                models[name] = validated
                classes[name] = cls
                # A model may add warnings: config_warnings() → [(key path, message), ...].
                for key, message in getattr(validated, "config_warnings", list)():
                    self.warn(path + tuple(key), message)
        return models, classes

    def _routes(self, data: dict[Any, Any]) -> list[RouteConfig] | None:
        """Validate ``routes``; every sink a route names must exist. Warns of unused sinks."""
        routes = _section(data, "routes", [])
        if not isinstance(routes, list):
            self.error(("routes",), f"expected a list of routes, got {describe(routes)}")
            return None
        sinks = _section(data, "sinks", {})
        # When ``sinks`` itself is broken (already reported), sink names are not checked.
        sink_names = [n for n in sinks if isinstance(n, str)] if isinstance(sinks, dict) else None
        used: set[str] = set()
        validated = []
        for index, route in enumerate(routes):
            validated.append(self._validate(RouteConfig, route, ("routes", index)))
            named = route.get("sinks") if isinstance(route, dict) else None
            for position, sink in enumerate(named if isinstance(named, list) else []):
                if not isinstance(sink, str):
                    continue
                used.add(sink)
                if sink_names is not None and sink not in sink_names:
                    known = ", ".join(sink_names) or "none"
                    self.error(
                        ("routes", index, "sinks", position),
                        f"no sink named {sink!r} (sinks: {known})",
                    )
        for name in sink_names or []:
            if name not in used:
                self.warn(("sinks", name), "not used by any route, so it receives no events")
        return validated if all(route is not None for route in validated) else None


_ANY_IPV4 = {"", "0.0.0.0"}
_ANY_IPV6 = {"::"}  # dual-stack on Linux: it takes the port on IPv4 addresses too


def _same_port(one: str, other: str) -> bool:
    """Whether two listen addresses would take the same port: the same host, or a wildcard
    and a host it covers (0.0.0.0 every IPv4 address, :: every address)."""
    (host, port), (other_host, other_port) = split_host_port(one), split_host_port(other)
    if port != other_port or port == 0:
        return False
    host, other_host = _canonical_host(host), _canonical_host(other_host)
    if host == other_host:
        return True
    for wildcard, covered in ((host, other_host), (other_host, host)):
        if wildcard in _ANY_IPV6 or (wildcard in _ANY_IPV4 and ":" not in covered):
            return True
    return False


def _canonical_host(host: str) -> str:
    """One spelling per address: localhost is 127.0.0.1, ``0:0::0`` is ``::``."""
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:  # a host name
        return host


def _section(data: dict[Any, Any], key: str, default: Any) -> Any:
    """A top-level section; an empty section (``api:`` with nothing after it) is the default."""
    value = data.get(key)
    return default if value is None else value


# --- public entry points -------------------------------------------------------------------------


def fleet_sink(sinks: Mapping[str, Any]) -> str | None:
    """The sink that reads the fleet's box statuses for ``fleet: true`` plugins: the first mqtt
    sink (by name) on gatewayd's own topics; None when there is none."""
    for name in sorted(sinks):
        section = sinks[name]
        if getattr(section, "type", None) == "mqtt" and getattr(section, "format", None) == (
            "gatewayd"
        ):
            return name
    return None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate the config file at ``path``; raises ConfigError.

    ``environ`` (default ``os.environ``) supplies ``${VAR}`` values. The returned Config has a
    ``warnings`` attribute: ``file:line: path: message`` lines that do not stop the daemon.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        document = load_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError([f"{path}:{exc.line}: YAML syntax error: {exc.message}"]) from None
    return _FileChecker(path, document, os.environ if environ is None else environ).check()


def summarize(config: Config) -> str:
    """``2 plugins (cabinets: powerbank, ...), 1 sink (store: sqlite), 2 routes``."""

    def count(number: int, noun: str) -> str:
        return f"{number} {noun}{'s' * (number != 1)}"

    def listing(models: Mapping[str, Any]) -> str:
        return " (" + ", ".join(f"{name}: {m.type}" for name, m in models.items()) + ")"

    plugins = count(len(config.plugins), "plugin") + (
        listing(config.plugins) * bool(config.plugins)
    )
    sinks = count(len(config.sinks), "sink") + (listing(config.sinks) * bool(config.sinks))
    return f"{plugins}, {sinks}, {count(len(config.routes), 'route')}"


def check_config_main(path: str | Path) -> int:
    """``gatewayd check-config``: print ``FILE: ok (...)`` and return 0, or the errors and 2."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        count = len(exc.errors)
        print(f"{path}: {count} error{'s' * (count != 1)}", file=sys.stderr)
        return 2
    for warning in getattr(config, "warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok: {summarize(config)}")
    return 0
