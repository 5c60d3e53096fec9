"""Config loading: every error class with its exact ``file:line: path: message`` text.

Each test writes its config to a temporary file so the line numbers in the expected messages are
the lines of the text in the test. Plugin and sink types are ``tests.test_config:Fake...`` import
paths, so the tests do not depend on which plugins are installed.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from gatewayd import registry
from gatewayd.config import (
    ConfigError,
    VariableError,
    check_config_main,
    expand_variables,
    load_config,
)
from gatewayd.config_model import (
    ApiSection,
    GatewaySection,
    MatchConfig,
    ProcessorConfig,
    RouteConfig,
)
from gatewayd.plugin import Plugin
from gatewayd.schema import (
    ConfigModel,
    HostPort,
    LocalSinkConfig,
    PluginConfig,
    Secret,
    SinkConfig,
    UdpHostPort,
)
from gatewayd.sinks.base import Sink
from gatewayd.yamlnodes import YamlSyntaxError, format_path, load_yaml

PLUGIN = "tests.test_config:FakePlugin"
SINK = "tests.test_config:FakeSink"


class BrokerConfig(ConfigModel):
    host: str
    port: int = 1883
    username: str | None = None
    password: Secret | None = None


class FakePlugin(Plugin):
    """A plugin type for these tests only."""

    protocol = "fake"

    class Config(PluginConfig):
        listen: HostPort
        retries: int = 3
        mode: Literal["fast", "slow"] = "fast"
        broker: BrokerConfig | None = None
        auth_token: str | None = Field(None, min_length=8)
        pin: Secret | None = Field(None, min_length=6)
        limit: int | list[int] = 1


class FakeUdpPlugin(Plugin):
    """A plugin type listening on UDP (``listen``) and on TCP (``listen_admin``)."""

    protocol = "fake-udp"

    class Config(PluginConfig):
        listen: UdpHostPort
        listen_admin: HostPort = "127.0.0.1:0"


UDP_PLUGIN = "tests.test_config:FakeUdpPlugin"


class FakeSink(Sink):
    """A sink type for these tests only."""

    class Config(SinkConfig):
        path: str = "events.out"


class NotAPlugin:
    """Importable, but not a Plugin subclass."""


def write(tmp_path: Path, text: str, name: str = "gatewayd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {})
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def write_token(path: Path, text: str, mode: int = 0o600) -> Path:
    """A token file; 0600 unless told: anything looser is refused."""
    path.write_text(text)
    os.chmod(path, mode)
    return path


GOOD = f"""
gateway: {{id: edge-01, log_level: debug}}
api:
  listen: "127.0.0.1:8721"
  token_file: api.token
plugins:
  cabinets:
    type: {PLUGIN}
    listen: "0.0.0.0:9000"
    retries: 5
sinks:
  store: {{type: {SINK}, path: events.db, max_bytes: 64MiB}}
routes:
  - match: {{type: "lend.*"}}
    processors: [{{drop_raw: true}}]
    sinks: [store]
"""


# --- a good file ---------------------------------------------------------------------------------


def test_good_file_gives_validated_models(tmp_path: Path) -> None:
    write_token(tmp_path / "api.token", "a-token\n")
    path = write(tmp_path, GOOD)
    config = load_config(path, environ={})
    assert config.path == path
    assert isinstance(config.gateway, GatewaySection)
    assert config.gateway.id == "edge-01" and config.gateway.log_level == "debug"
    assert isinstance(config.api, ApiSection)
    assert config.api.listen == "127.0.0.1:8721"
    assert config.api.token_file == Path("api.token")  # left as written: the daemon resolves it
    cabinets = config.plugins["cabinets"]
    assert isinstance(cabinets, FakePlugin.Config)
    assert (cabinets.listen, cabinets.retries, cabinets.mode) == ("0.0.0.0:9000", 5, "fast")
    assert config.plugin_classes == {"cabinets": FakePlugin}
    store = config.sinks["store"]
    assert isinstance(store, FakeSink.Config)
    assert (store.path, store.max_bytes) == ("events.db", 64 * 1024 * 1024)
    assert config.sink_classes == {"store": FakeSink}
    assert len(config.routes) == 1 and isinstance(config.routes[0], RouteConfig)
    assert config.routes[0].match.type == "lend.*"
    assert config.routes[0].processors[0].drop_raw is True
    assert config.warnings == []


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\napi:\nplugins:\nsinks:\nroutes:\n")
    config = load_config(path, environ={})
    assert config.gateway == GatewaySection()
    assert config.api == ApiSection()
    assert (config.plugins, config.sinks, config.routes) == ({}, {}, [])


# --- one error of each class -------------------------------------------------------------------


def test_bad_value_uses_the_schemas_own_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          cabinets:
            type: {PLUGIN}
            listen: 9000
        """,
    )
    assert errors_of(path) == [f'{path}:4: plugins.cabinets.listen: expected "host:port", got 9000']


def test_wrong_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          cabinets:
            type: {PLUGIN}
            listen: "0.0.0.0:9000"
            retries: abc
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.cabinets.retries: expected an integer, got 'abc'"
    ]


def test_number_where_a_string_is_expected_suggests_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - match: {device: 860000000000001}\n")
    assert errors_of(path) == [
        f"{path}:2: routes[0].match.device: expected a string, got 860000000000001 "
        "(put it in quotes)"
    ]


def test_literal_lists_the_choices(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          cabinets:
            type: {PLUGIN}
            listen: "0.0.0.0:9000"
            startup_error_behavior: fail
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.cabinets.startup_error_behavior: "
        "expected one of 'error', 'retry', 'ignore', got 'fail'"
    ]


def test_yaml_boolean_word_for_a_choice_suggests_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, f"sinks:\n  store: {{type: {SINK}, overflow: no}}\n")
    assert errors_of(path) == [
        f"{path}:2: sinks.store.overflow: expected one of 'drop_oldest', 'drop_newest', "
        "got false (put it in quotes)"
    ]


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        gateway: {{id: edge-01}}
        plugins:
          cabinets:
            type: {PLUGIN}
        """,
    )
    assert errors_of(path) == [f"{path}:3: plugins.cabinets.listen: required key missing"]


def test_missing_nested_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          heating:
            type: {PLUGIN}
            listen: "0.0.0.0:9000"
            broker:
              port: 1883
        """,
    )
    assert errors_of(path) == [f"{path}:5: plugins.heating.broker.host: required key missing"]


def test_unknown_key_with_and_without_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          cabinets:
            type: {PLUGIN}
            lisen: "0.0.0.0:9000"
            colour: blue
        """,
    )
    assert errors_of(path) == [
        f"{path}:4: plugins.cabinets.lisen: unknown key (did you mean 'listen'?)",
        f"{path}:5: plugins.cabinets.colour: unknown key",
    ]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway: {id: a}\nroute: []\n")
    assert errors_of(path) == [f"{path}:2: route: unknown key (did you mean 'routes'?)"]


def test_unknown_key_in_core_section(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  tokenfile: /etc/gatewayd/api.token\n")
    assert errors_of(path) == [f"{path}:2: api.tokenfile: unknown key (did you mean 'token_file'?)"]


def test_route_naming_an_unknown_sink(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sinks:
          store: {{type: {SINK}}}
        routes:
          - {{match: {{type: "*"}}, sinks: [store]}}
          - {{match: {{protocol: powerbank}}, sinks: [north]}}
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: routes[1].sinks[0]: no sink named 'north' (sinks: store)"
    ]


def test_route_naming_a_sink_when_there_are_none(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - sinks:\n      - store\n")
    assert errors_of(path) == [f"{path}:3: routes[0].sinks[0]: no sink named 'store' (sinks: none)"]


def test_plugin_type_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {registry.PLUGIN_GROUP: {"example": None, "powerbank": None}}
    monkeypatch.setattr(registry, "available", lambda group: installed.get(group, {}))
    path = write(
        tmp_path,
        """
        plugins:
          cabinets:
            type: foo
            listen: "0.0.0.0:9000"
        """,
    )
    assert errors_of(path) == [
        f"{path}:3: plugins.cabinets.type: no installed plugin type 'foo' "
        "(installed: example, powerbank)"
    ]


def test_sink_type_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "available", lambda group: {})
    path = write(tmp_path, "sinks:\n  north: {type: kafka}\n")
    assert errors_of(path) == [
        f"{path}:2: sinks.north.type: no installed sink type 'kafka' (installed: none)"
    ]


def test_type_that_is_not_a_plugin_class(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins:\n  x:\n    type: tests.test_config:NotAPlugin\n")
    assert errors_of(path) == [
        f"{path}:3: plugins.x.type: 'tests.test_config:NotAPlugin' is not a gatewayd plugin class"
    ]


def test_type_missing_or_not_a_string(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        plugins:
          a: {listen: "0.0.0.0:1"}
          b: {type: 5}
          c: just-a-string
        """,
    )
    assert errors_of(path) == [
        f"{path}:2: plugins.a.type: required key missing",
        f"{path}:3: plugins.b.type: expected a plugin type name, got 5",
        f"{path}:4: plugins.c: expected a mapping with at least 'type', got 'just-a-string'",
    ]


def test_bad_instance_name(tmp_path: Path) -> None:
    path = write(tmp_path, f'plugins:\n  "my plugin": {{type: {PLUGIN}, listen: "a:1"}}\n')
    assert errors_of(path) == [
        f"{path}:2: plugins.my plugin: bad plugin name 'my plugin': use letters, digits, _ and -"
    ]


def test_section_of_the_wrong_shape(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway: edge-01\nplugins: [a, b]\nroutes: {sinks: [x]}\n")
    assert errors_of(path) == [
        f"{path}:1: gateway: expected a mapping, got 'edge-01'",
        f"{path}:2: plugins: expected a mapping of plugin name to settings, got a list",
        f"{path}:3: routes: expected a list of routes, got a mapping",
    ]


def test_model_level_error_points_at_the_list_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sinks: {{store: {{type: {SINK}}}}}
        routes:
          - sinks: [store]
            processors:
              - drop_raw: true
              - {{keep_data: [a], drop_raw: true}}
        """,
    )
    assert errors_of(path) == [
        f"{path}:6: routes[0].processors[1]: a processor has exactly one of keep_data, "
        "drop_data, drop_raw"
    ]


def test_union_errors_are_merged_into_one_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          p:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            limit: lots
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.p.limit: expected an integer or a list, got 'lots'"
    ]


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        gateway:
          id: edge-01
          log_level: info
          id: edge-02
        """,
    )
    assert errors_of(path) == [f"{path}:4: gateway.id: duplicate key (first given on line 2)"]


def test_yaml_syntax_error_is_the_only_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        gateway:
          id: edge-01
        bogus: 1
        plugins:
          a: [1, 2
        """,
    )
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:")
    assert ": YAML syntax error: " in error
    assert "bogus" not in error


def test_yaml_syntax_error_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  id: edge-01\n  log_level: info: debug\n")
    assert errors_of(path) == [f"{path}:3: YAML syntax error: mapping values are not allowed here"]


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert errors_of(path) == [
        f"{path}:1: the file is empty; expected a mapping with the keys "
        "gateway, api, plugins, sinks, routes"
    ]


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- gateway\n- api\n")
    assert errors_of(path) == [
        f"{path}:1: expected a mapping with the keys gateway, api, plugins, sinks, routes, "
        "got a list"
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert errors_of(path) == [f"{path}: cannot read the config file: No such file or directory"]


# --- several errors at once ----------------------------------------------------------------------


def test_all_errors_of_a_file_are_reported_sorted_by_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        gateway: {{id: edge-01, log_level: loud}}
        api:
          listen: 8720
        plugins:
          cabinets:
            type: {PLUGIN}
            listen: 9000
            retries: many
          heating:
            type: {PLUGIN}
            listen: "0.0.0.0:1883"
            broker: {{host: broker.local, port: none}}
        sinks:
          store: {{type: {SINK}, overflow: block}}
        routes:
          - {{match: {{type: "*"}}, sinks: [store, north]}}
          - {{drop: maybe}}
        extra: 1
        """,
    )
    assert errors_of(path) == [
        f"{path}:1: gateway.log_level: expected one of 'debug', 'info', 'warn', 'error', "
        "'critical', got 'loud'",
        f'{path}:3: api.listen: expected "host:port", got 8720',
        f'{path}:7: plugins.cabinets.listen: expected "host:port", got 9000',
        f"{path}:8: plugins.cabinets.retries: expected an integer, got 'many'",
        f"{path}:12: plugins.heating.broker.port: expected an integer, got 'none'",
        f"{path}:14: sinks.store.overflow: expected one of 'drop_oldest', 'drop_newest', "
        "got 'block'",
        f"{path}:16: routes[0].sinks[1]: no sink named 'north' (sinks: store)",
        f"{path}:17: routes[1].drop: expected true or false, got 'maybe'",
        f"{path}:18: extra: unknown key",
    ]


# --- ${VAR} substitution -----------------------------------------------------------------------


def test_env_substitution(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        gateway:
          id: "${{SITE}}-${{NUMBER:-01}}"
          state_dir: "${{STATE:-/var/lib/gatewayd}}"
        plugins:
          heating:
            type: {PLUGIN}
            listen: "${{HOST}}:${{PORT}}"
            retries: ${{RETRIES}}
            broker:
              host: "${{BROKER:-localhost}}"
              username: "$${{literal}} and $$HOME"
              password: "${{MQTT_PASSWORD}}"
        """,
    )
    environ = {
        "SITE": "edge",
        "STATE": "",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "RETRIES": "7",
        "MQTT_PASSWORD": "pa$$word",
    }
    config = load_config(path, environ=environ)
    assert config.gateway.id == "edge-01"  # default used when unset
    assert str(config.gateway.state_dir) == "/var/lib/gatewayd"  # ... and when empty
    heating = config.plugins["heating"]
    assert heating.listen == "0.0.0.0:9000"
    assert heating.retries == 7  # substituted as a string, converted by the schema
    assert heating.broker.host == "localhost"
    assert heating.broker.username == "${literal} and $$HOME"
    assert heating.broker.password.get_secret_value() == "pa$$word"  # values are not re-expanded


def test_missing_environment_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          heating:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            retries: "${{RETRIES}}"
            broker:
              host: localhost
              password: "${{HEATING_MQTT_PASSWORD}}"
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.heating.retries: environment variable RETRIES is not set",
        f"{path}:8: plugins.heating.broker.password: "
        "environment variable HEATING_MQTT_PASSWORD is not set",
    ]


def test_malformed_reference(tmp_path: Path) -> None:
    path = write(tmp_path, 'gateway:\n  id: "${1x}"\n  state_dir: "/x/${OPEN"\n')
    assert errors_of(path) == [
        f"{path}:2: gateway.id: malformed ${{...}} reference (write $${{ for a literal ${{)",
        f"{path}:3: gateway.state_dir: unterminated ${{ (write $${{ for a literal ${{)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("${A}", "a"),
        ("x${A}y${B}z", "xaybz"),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY}", ""),
        ("${UNSET:-}", ""),
        ("$${A}", "${A}"),
        ("$$${A}", "$${A}"),
        ("$A $ {A}", "$A $ {A}"),
        ("${A:-x y:z}", "a"),
    ],
)
def test_expand_variables(text: str, expected: str) -> None:
    assert expand_variables(text, {"A": "a", "B": "b", "EMPTY": ""}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${NOPE}", "environment variable NOPE is not set"),
        ("${", "unterminated ${ (write $${ for a literal ${)"),
        ("${A B}", "malformed ${...} reference (write $${ for a literal ${)"),
    ],
)
def test_expand_variables_errors(text: str, message: str) -> None:
    with pytest.raises(VariableError) as caught:
        expand_variables(text, {})
    assert str(caught.value) == message


# --- secrets ------------------------------------------------------------------------------------


def test_password_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "mqtt").write_text("s3cret-pw\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
        plugins:
          heating:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: localhost, password_file: secrets/mqtt}}
        """,
    )
    config = load_config(path, environ={})
    broker = config.plugins["heating"].broker
    assert broker.password.get_secret_value() == "s3cret-pw"
    assert "s3cret" not in repr(config.plugins["heating"])


def test_secret_file_path_may_use_a_variable(tmp_path: Path) -> None:
    (tmp_path / "mqtt").write_text("from-credentials", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
        plugins:
          heating:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: h, password_file: "${{CREDENTIALS_DIRECTORY}}/mqtt"}}
        """,
    )
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.plugins["heating"].broker.password.get_secret_value() == "from-credentials"


def test_secret_file_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          a:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: h, password_file: missing.txt}}
          b:
            type: {PLUGIN}
            listen: "0.0.0.0:2"
            broker: {{host: h, password: x, password_file: missing.txt}}
          c:
            type: {PLUGIN}
            listen: "0.0.0.0:3"
            broker: {{host: h, username_file: 5}}
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.a.broker.password_file: cannot read {tmp_path}/missing.txt: "
        "No such file or directory",
        f"{path}:9: plugins.b.broker.password_file: give either password or password_file, "
        "not both",
        f"{path}:13: plugins.c.broker.username_file: expected the path of a file, got 5",
    ]


def test_a_declared_file_field_is_left_to_the_model(tmp_path: Path) -> None:
    write_token(tmp_path / "api.token", "a-token\n")
    path = write(tmp_path, "api:\n  token_file: api.token\n")
    assert load_config(path, environ={}).api.token_file == Path("api.token")  # not its content


def test_the_api_token_file_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    write_token(tmp_path / "empty.token", "\n")
    path = write(tmp_path, "api:\n  token_file: missing.token\n")
    assert errors_of(path) == [
        f"{path}:2: api.token_file: cannot read {tmp_path}/missing.token: No such file or directory"
    ]
    path = write(tmp_path, "api:\n  token_file: empty.token\n")
    assert errors_of(path) == [f"{path}:2: api.token_file: {tmp_path}/empty.token is empty"]


def _mode_message(path: Path, mode: int) -> str:
    return f"{path} has mode {mode:04o}; it must be 0600 or stricter (chmod 600 {path})"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700], ids=lambda m: f"{m:04o}")
def test_a_token_file_others_could_read_is_refused(tmp_path: Path, mode: int) -> None:
    token = write_token(tmp_path / "api.token", "a-token\n", mode)
    path = write(tmp_path, "api:\n  listen: 127.0.0.1:8720\n  token_file: api.token\n")
    assert errors_of(path) == [f"{path}:3: api.token_file: {_mode_message(token, mode)}"]
    os.chmod(token, 0o400)  # read-only for the daemon's user is stricter, and fine
    assert load_config(path, environ={}).api.token_file == Path("api.token")


def test_a_token_file_is_judged_through_a_symlink_by_its_target(tmp_path: Path) -> None:
    target = write_token(tmp_path / "real.token", "a-token\n", 0o644)
    link = tmp_path / "api.token"
    link.symlink_to(target)  # the link itself is 0777: what counts is the file read
    path = write(tmp_path, "api:\n  token_file: api.token\n")
    assert errors_of(path) == [f"{path}:2: api.token_file: {_mode_message(link, 0o644)}"]
    os.chmod(target, 0o600)
    assert load_config(path, environ={}).api.token_file == Path("api.token")


def test_the_token_file_check_is_the_esam_key_file_check(tmp_path: Path) -> None:
    """One check, one message: the ESAM key file's, after its ``key file`` prefix."""
    from gatewayd.plugins.esam.keys import KeyFileError, load_key_file

    secret = write_token(tmp_path / "secret", "a-token\n", 0o644)
    path = write(tmp_path, f"api:\n  token_file: {secret}\n")
    (error,) = errors_of(path)
    with pytest.raises(KeyFileError) as refused:
        load_key_file(secret)
    prefix = f"{path}:2: api.token_file: "
    assert error.startswith(prefix)
    assert str(refused.value) == "key file " + error.removeprefix(prefix)


def test_check_config_refuses_a_token_file_others_could_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = write_token(tmp_path / "api.token", "a-token\n", 0o644)
    path = write(tmp_path, GOOD)
    assert check_config_main(str(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: api.token_file: {_mode_message(token, 0o644)}\n" in err
    assert "a-token" not in err


def test_an_api_open_to_the_network_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, 'api:\n  listen: "0.0.0.0:8720"\n')
    assert errors_of(path) == [
        f"{path}:2: api.listen: the control API on 0.0.0.0:8720 would take device commands from "
        'the network without a token: set api.token_file, or listen on loopback ("127.0.0.1:8720")'
    ]
    path = write(tmp_path, 'api:\n  listen: "0.0.0.0:8720"\n  enabled: false\n')
    assert load_config(path, environ={}).api.enabled is False


def test_secrets_are_never_echoed(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("12345", encoding="utf-8")  # too short for the schema
    path = write(
        tmp_path,
        f"""
        plugins:
          a:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: h, password: 918273645}}
            auth_token: tok
            pin_file: pin
          b:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: h, password: [hunter2]}}
        """,
    )
    errors = errors_of(path)
    assert errors == [
        f"{path}:5: plugins.a.broker.password: expected a string "
        "(the value is secret and not shown)",
        f"{path}:6: plugins.a.auth_token: expected at least 8 characters "
        "(the value is secret and not shown)",
        f"{path}:7: plugins.a.pin: expected at least 6 characters "
        "(the value is secret and not shown)",
        f"{path}:11: plugins.b.broker.password: expected a string "
        "(the value is secret and not shown)",
    ]
    text = "\n".join(errors)
    for secret in ("918273645", "tok'", "12345", "hunter2"):
        assert secret not in text


def test_misspelt_secret_key_does_not_echo_the_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          a:
            type: {PLUGIN}
            listen: "0.0.0.0:1"
            broker: {{host: h, pasword: hunter2}}
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: plugins.a.broker.pasword: unknown key (did you mean 'password'?)"
    ]


# --- warnings and the check-config command --------------------------------------------------------


def test_unused_sink_is_a_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sinks:
          store: {{type: {SINK}}}
          north: {{type: {SINK}, path: north.out}}
        routes:
          - sinks: [store]
        """,
    )
    config = load_config(path, environ={})
    assert config.warnings == [
        f"{path}:3: sinks.north: not used by any route, so it receives no events"
    ]


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_token(tmp_path / "api.token", "a-token\n")
    path = write(tmp_path, GOOD)
    assert check_config_main(str(path)) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok: 1 plugin (cabinets: {PLUGIN}), 1 sink (store: {SINK}), 1 route\n"
    assert err == ""


def test_check_config_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"sinks:\n  store: {{type: {SINK}}}\n")
    assert check_config_main(path) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok: 0 plugins, 1 sink (store: {SINK}), 0 routes\n"
    assert (
        err == f"warning: {path}:2: sinks.store: not used by any route, so it receives no events\n"
    )


def test_check_config_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "gateway: {id: ''}\napi: {enabled: maybe}\n")
    assert check_config_main(path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:1: gateway.id: expected at least 1 character, got ''",
        f"{path}:2: api.enabled: expected true or false, got 'maybe'",
        f"{path}: 2 errors",
    ]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main(tmp_path / "nope.yaml") == 2
    assert "cannot read the config file" in capsys.readouterr().err


# --- the line-keeping YAML loader ---------------------------------------------------------------


def test_yaml_lines_of_keys_and_items() -> None:
    document = load_yaml(
        textwrap.dedent(
            """\
            a: 1
            base: &b {x: 1, y: 2}
            c:
              <<: *b
              y: 3
            routes:
              - {sinks: [store,
                   north]}
              - on: yes
            """
        )
    )
    assert document.data == {
        "a": 1,
        "base": {"x": 1, "y": 2},
        "c": {"x": 1, "y": 3},
        "routes": [{"sinks": ["store", "north"]}, {"on": True}],
    }
    assert document.lines[("c", "y")] == 5
    assert document.lines[("c", "x")] == 2  # merged from the anchor
    assert document.lines[("routes", 0, "sinks", 1)] == 8
    assert document.lines[("routes", 1)] == 9
    assert document.line_of(("routes", 1, "missing", "deeper")) == 9
    assert document.duplicates == []


def test_yaml_dates_stay_strings() -> None:
    assert load_yaml("id: 2024-01-01\nbad: 2024-13-45\n").data == {
        "id": "2024-01-01",
        "bad": "2024-13-45",
    }


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: [1", 1),
        ("a: 1\n---\nb: 2\n", 2),
        ("a: !env x", 1),
        ("a:\n  b: !!int x", 2),
        ("a: &x [*x]", 1),
        ("a:\n  ? [1]\n  : 2\n", 2),
    ],
)
def test_yaml_errors_have_lines(text: str, line: int) -> None:
    with pytest.raises(YamlSyntaxError) as caught:
        load_yaml(text)
    assert caught.value.line == line


def test_format_path() -> None:
    assert format_path(("routes", 1, "sinks", 0)) == "routes[1].sinks[0]"
    assert format_path(("plugins", "cabinets", "listen")) == "plugins.cabinets.listen"
    assert format_path(()) == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!,?|>'\"#%@ \n\t01.~$")), max_size=60))
def test_yaml_loader_raises_only_its_own_error(text: str) -> None:
    try:
        document = load_yaml(text)
    except YamlSyntaxError as exc:
        assert exc.line >= 1
    else:
        for line in document.lines.values():
            assert 1 <= line <= text.count("\n") + 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_load_config_raises_only_config_error(tmp_path_factory: pytest.TempPathFactory, text: str):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert all(line.startswith(f"{path}") for line in exc.errors)


_KEYS = st.sampled_from(
    [
        "gateway",
        "api",
        "plugins",
        "sinks",
        "routes",
        "type",
        "listen",
        "match",
        "sinks",
        "id",
        "broker",
        "password",
        "password_file",
        "host",
        "port",
        "drop",
        "processors",
        "keep_data",
        "p1",
        "store",
        PLUGIN,
        SINK,
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from([PLUGIN, SINK, "0.0.0.0:1", "${X}", "${X:-1}", "$${", "*", "store"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=25,
)


_INSTANCE = st.one_of(
    _VALUES,
    st.fixed_dictionaries(
        {"type": st.sampled_from([PLUGIN, SINK, "tests.test_config:Nope", "example"])},
        optional={"listen": _VALUES, "broker": _VALUES, "password_file": _SCALARS, "x": _VALUES},
    ),
)
_CONFIGS = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=6),
    st.fixed_dictionaries(
        {},
        optional={
            "gateway": _VALUES,
            "api": _VALUES,
            "plugins": st.dictionaries(st.sampled_from(["p1", "p 2"]), _INSTANCE, max_size=2),
            "sinks": st.dictionaries(st.sampled_from(["store", "north"]), _INSTANCE, max_size=2),
            "routes": st.lists(
                st.one_of(_VALUES, st.dictionaries(_KEYS, _VALUES, max_size=3)), max_size=3
            ),
        },
    ),
)


@settings(max_examples=300, deadline=None)
@given(_CONFIGS)
def test_structured_fuzz_reports_only_located_errors(
    tmp_path_factory: pytest.TempPathFactory, data: dict
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert exc.errors
        for line in exc.errors:
            assert re.match(rf"{re.escape(str(path))}:\d+: \S", line), line


# --- etc/gatewayd.yaml documents every key with its default -------------------------------------

REFERENCE = Path(__file__).resolve().parent.parent / "etc" / "gatewayd.yaml"
BUILTIN_SINKS = {
    "stdout": "gatewayd.sinks.stdout:StdoutSink",
    "jsonl": "gatewayd.sinks.jsonl:JsonlSink",
    "sqlite": "gatewayd.sinks.sqlite:SqliteSink",
    "mqtt": "gatewayd.sinks.mqtt:MqttSink",
    "http": "gatewayd.sinks.http:HttpSink",
    "postgresql": "gatewayd.sinks.postgresql:PostgresqlSink",
}


def _reference() -> tuple[dict, str]:
    text = REFERENCE.read_text(encoding="utf-8")
    return load_yaml(text).data, text


def _documented(text: str, key: str) -> bool:
    """``key:`` appears as a key, active or in a comment."""
    return re.search(rf"^\s*(#\s*)?(- )?{re.escape(key)}:", text, re.MULTILINE) is not None


def test_reference_config_core_sections_hold_every_key_at_its_default() -> None:
    data, _ = _reference()
    assert set(data["gateway"]) == set(GatewaySection.model_fields)
    assert GatewaySection.model_validate(data["gateway"]) == GatewaySection()
    assert set(data["api"]) == set(ApiSection.model_fields)
    assert ApiSection.model_validate(data["api"]) == ApiSection()
    (route,) = data["routes"]
    assert set(route) == set(RouteConfig.model_fields)
    assert set(route["match"]) == set(MatchConfig.model_fields)
    store = data["sinks"]["store"]  # a local sink: its retry_max default is LocalSinkConfig's
    common = {key: store[key] for key in LocalSinkConfig.model_fields}
    assert LocalSinkConfig.model_validate(common) == LocalSinkConfig(type="sqlite")


def test_reference_config_sqlite_sink_at_its_defaults() -> None:
    sink = pytest.importorskip("gatewayd.sinks.sqlite").SqliteSink
    data, _ = _reference()
    store = data["sinks"]["store"]
    assert set(store) == set(sink.Config.model_fields)
    assert sink.Config.model_validate(store) == sink.Config(type="sqlite")


def test_reference_config_documents_processors() -> None:
    _, text = _reference()
    for key in ProcessorConfig.model_fields:
        assert _documented(text, key), key


def test_reference_config_example_plugin_at_its_defaults() -> None:
    plugin = pytest.importorskip("gatewayd.plugins.example").ThermometerPlugin
    data, _ = _reference()
    section = data["plugins"]["thermometers"]
    assert set(section) == set(plugin.Config.model_fields)
    assert plugin.Config.model_validate(section) == plugin.Config(type="example")


@pytest.mark.parametrize("sink_type", sorted(BUILTIN_SINKS))
def test_reference_config_documents_builtin_sink(sink_type: str) -> None:
    module_name, _, class_name = BUILTIN_SINKS[sink_type].partition(":")
    sink = getattr(pytest.importorskip(module_name), class_name)
    _, text = _reference()
    assert _documented(text, "type") and f"type: {sink_type}" in text
    for key in set(sink.Config.model_fields) - set(SinkConfig.model_fields):
        assert _documented(text, key), f"{sink_type}.{key} is not in etc/gatewayd.yaml"


def test_reference_config_loads(capsys: pytest.CaptureFixture[str]) -> None:
    for module_name in {path.partition(":")[0] for path in BUILTIN_SINKS.values()}:
        pytest.importorskip(module_name)
    config = load_config(REFERENCE, environ={})
    assert config.warnings == []
    assert check_config_main(REFERENCE) == 0


def test_sink_timeouts_delays_and_sizes_that_cannot_work_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sinks:
          store:
            type: {SINK}
            path: events.db
            write_timeout: 0
            retry_initial: 5s
            retry_max: 1s
            max_bytes: 0
            max_age: .nan
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: sinks.store.write_timeout: expected a duration more than 0, got 0",
        f"{path}:7: sinks.store.retry_max: must be at least retry_initial (5 s)",
        f"{path}:8: sinks.store.max_bytes: must be more than 0 (a queue that holds nothing "
        "loses everything)",
        f"{path}:9: sinks.store.max_age: expected a duration >= 0, got nan",
    ]


@pytest.mark.parametrize(
    ("one", "other", "clash"),
    [
        ("0.0.0.0:9000", "127.0.0.2:9000", True),
        ("0.0.0.0:9000", "[::1]:9000", False),  # another address family
        ("[::]:9000", "127.0.0.1:9000", True),  # dual-stack
        ("localhost:9000", "127.0.0.1:9000", True),
        ("127.0.0.1:9000", "127.0.0.2:9000", False),
        ("0.0.0.0:9000", "0.0.0.0:9001", False),
        ("[0:0:0:0:0:0:0:0]:9000", "127.0.0.1:9000", True),  # :: spelled out
        ("[::1]:9000", "[0:0:0:0:0:0:0:1]:9000", True),
    ],
)
def test_which_listen_addresses_share_a_port(one: str, other: str, clash: bool) -> None:
    from gatewayd.config import _same_port

    assert _same_port(one, other) is clash and _same_port(other, one) is clash


def test_clashing_listeners_and_sink_files_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        gateway: {{state_dir: state}}
        api: {{listen: "127.0.0.1:8720"}}
        plugins:
          a: {{type: {PLUGIN}, listen: "0.0.0.0:8720"}}
          b: {{type: {PLUGIN}, listen: "127.0.0.1:9000"}}
          c: {{type: {PLUGIN}, listen: "127.0.0.2:9000"}}
        sinks:
          one: {{type: {SINK}, path: events.db}}
          two: {{type: {SINK}, path: {tmp_path}/state/events.db}}
          three: {{type: {SINK}, path: queues/one.db}}
        routes:
          - {{match: {{type: "*"}}, sinks: [one, two, three]}}
        """,
    )
    state = tmp_path / "state"
    assert errors_of(path) == [
        f"{path}:4: plugins.a.listen: 0.0.0.0:8720 is also api.listen's TCP address "
        "(127.0.0.1:8720)",
        f"{path}:9: sinks.two.path: {state}/events.db is also sinks.one's",
        f"{path}:10: sinks.three.path: {state}/queues/one.db is a sink's queue file",
    ]


def test_a_udp_listener_may_share_its_port_with_a_tcp_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        api: {{listen: "127.0.0.1:18720"}}
        plugins:
          datagrams: {{type: {UDP_PLUGIN}, listen: "127.0.0.1:18720", listen_admin: "[::1]:9000"}}
          lines: {{type: {PLUGIN}, listen: "[::1]:9000"}}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    # the only clash: two TCP listeners on [::1]:9000, one of them a listen_* key
    assert caught.value.errors == [
        f"{path}:4: plugins.lines.listen: [::1]:9000 is also plugins.datagrams.listen_admin's "
        "TCP address ([::1]:9000)"
    ]


def test_two_udp_listeners_on_one_port_are_refused_naming_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        plugins:
          first: {{type: {UDP_PLUGIN}, listen: "0.0.0.0:5683"}}
          second: {{type: {UDP_PLUGIN}, listen: "127.0.0.1:5683"}}
        """,
    )
    assert errors_of(path) == [
        f"{path}:3: plugins.second.listen: 127.0.0.1:5683 is also plugins.first.listen's "
        "UDP address (0.0.0.0:5683)"
    ]


def test_listeners_name_each_listen_key_with_its_transport() -> None:
    from gatewayd.schema import listeners

    config = FakeUdpPlugin.Config(type="x", listen="127.0.0.1:1", listen_admin="127.0.0.1:2")
    assert listeners(config) == [
        ("listen", "udp", "127.0.0.1:1"),
        ("listen_admin", "tcp", "127.0.0.1:2"),
    ]
    assert listeners(FakePlugin.Config(type="x", listen="127.0.0.1:3")) == [
        ("listen", "tcp", "127.0.0.1:3")
    ]


@pytest.mark.parametrize(("given", "expected"), [("64k", 65536), ("1MiB", 1048576), (2048, 2048)])
def test_api_max_body_bytes_takes_size_suffixes(given: object, expected: int) -> None:
    assert ApiSection(max_body_bytes=given).max_body_bytes == expected


def test_api_max_body_bytes_keeps_its_lower_bound_with_a_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "api: {max_body_bytes: 0.5k}\n")
    assert errors_of(path) == [f"{path}:1: api.max_body_bytes: expected a value >= 1024, got 512"]
