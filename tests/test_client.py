"""``gatewayd command``: argument parsing, config/token lookup and exit statuses, end to end.

The client is blocking, so each end-to-end call runs in a thread (``deferToThread``) while the
real reactor serves a real API site on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from gatewayd.api import listen_api
from gatewayd.client import (
    EXIT_API_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    api_section_from_config,
    command_main,
    parse_arguments,
    resolve_target,
)
from gatewayd.config_model import ApiSection
from gatewayd.testing import free_port
from tests.test_api import TOKEN, cabinet, command_counts, make_daemon

# --- argument parsing ---------------------------------------------------------------------------


def test_key_value_sends_strings_and_colon_equals_sends_json():
    assert parse_arguments(
        ["slot=3", "bank=0012", "force:=true", "slots:=[1, 2]", "note=a=b", 'name:="007"']
    ) == {
        "slot": "3",
        "bank": "0012",
        "force": True,
        "slots": [1, 2],
        "note": "a=b",
        "name": "007",
    }
    assert parse_arguments(["empty="]) == {"empty": ""}
    assert parse_arguments([]) == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["slot"], "expected key=value"),
        (["=3"], "expected key=value"),
        ([":=3"], "the key is empty"),
        (["slot=1", "slot:=2"], "'slot' is given twice"),
        (["slots:=[1,"], "'slots': not valid JSON"),
        (["slots:=" + "[" * 5000 + "]" * 5000], "'slots': JSON nested too deeply"),
        (["limit:=NaN"], "'limit': not valid JSON: NaN is not a JSON value"),
    ],
)
def test_bad_arguments_are_usage_errors(items, message):
    with pytest.raises(UsageError, match=message):
        parse_arguments(items)


def test_usage_errors_exit_2(capsys):
    assert command_main(["cabinets", "lend", "slot"]) == EXIT_USAGE
    assert "argument 'slot': expected key=value" in capsys.readouterr().err
    assert command_main([]) == EXIT_USAGE  # argparse: missing PLUGIN COMMAND
    assert "required" in capsys.readouterr().err
    assert command_main(["--api", "nohostport", "cabinets", "lend"]) == EXIT_USAGE
    assert 'expected "host:port"' in capsys.readouterr().err
    assert command_main(["--token-file", "/nonexistent/t", "cabinets", "lend"]) == EXIT_USAGE
    assert "cannot read the token file /nonexistent/t" in capsys.readouterr().err


# --- config file --------------------------------------------------------------------------------


def test_api_section_read_from_a_config_file(tmp_path):
    config = tmp_path / "gatewayd.yaml"
    config.write_text('api: {listen: "127.0.0.1:9999", token_file: api.token}\n')
    api = api_section_from_config(str(config))
    assert api.listen == "127.0.0.1:9999"
    assert Path(api.token_file) == Path("api.token")


def test_api_section_read_even_when_the_rest_of_the_config_is_refused(tmp_path):
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        "api:\n  listen: 127.0.0.1:9998\n"
        "plugins:\n  cab: {type: no-such-family, password: '${UNSET_GATEWAYD_TEST_VAR}'}\n"
    )
    assert api_section_from_config(str(config)).listen == "127.0.0.1:9998"


def test_unreadable_or_bad_config_is_a_usage_error(tmp_path, capsys):
    assert command_main(["-c", str(tmp_path / "missing.yaml"), "p", "c"]) == EXIT_USAGE
    assert "cannot read config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("api: {listen: 9000}\n")
    assert command_main(["-c", str(bad), "p", "c"]) == EXIT_USAGE
    assert 'api.listen: expected "host:port", got 9000' in capsys.readouterr().err


# --- end to end against a real listening API ------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    """A listening API with a token; yields (daemon, "127.0.0.1:PORT")."""
    from twisted.internet import reactor

    daemon = make_daemon(reactor, tmp_path, token=TOKEN)
    port = listen_api(daemon, ApiSection(listen="127.0.0.1:0", command_timeout=5), reactor)
    yield daemon, f"127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def run_client(*argv: str) -> defer.Deferred:
    return threads.deferToThread(command_main, list(argv))


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "api.token"
    path.write_text(TOKEN + "\n")
    return path


@pytest_twisted.inlineCallbacks
def test_success_prints_the_result_and_exits_0(api, token_file, capsys):
    daemon, address = api
    status = yield run_client(
        "--api",
        address,
        "--token-file",
        str(token_file),
        "cabinets",
        "lend",
        "slot=3",
        'bank:="0000000099"',
    )
    out, err = capsys.readouterr()
    assert status == EXIT_OK, err
    assert json.loads(out) == {"slot": 3, "bank": "0000000099"}
    assert out.startswith("{\n  ")  # pretty-printed
    assert command_counts(daemon) == {"lend:ok": 1}


@pytest_twisted.inlineCallbacks
def test_error_answer_exits_1_with_the_message_on_stderr(api, token_file, capsys):
    _, address = api
    status = yield run_client(
        "--api", address, "--token-file", str(token_file), "cabinets", "lend", "slot=12"
    )
    out, err = capsys.readouterr()
    assert status == EXIT_API_ERROR
    assert out == ""
    assert "error 400 bad_arguments: slot: Input should be less than or equal to 8" in err

    status = yield run_client("--api", address, "--token-file", str(token_file), "nope", "lend")
    assert status == EXIT_API_ERROR
    assert "error 404 not_found: unknown plugin 'nope'" in capsys.readouterr().err

    status = yield run_client(
        "--api", address, "--token-file", str(token_file), "cabinets", "refuse"
    )
    assert status == EXIT_API_ERROR
    assert "error 502 6A82: the card refused" in capsys.readouterr().err


@pytest_twisted.inlineCallbacks
def test_missing_token_explains_how_to_pass_it(api, capsys):
    _, address = api
    status = yield run_client("--api", address, "cabinets", "lend", "slot=1")
    err = capsys.readouterr().err
    assert status == EXIT_API_ERROR
    assert "error 401 unauthorized" in err and "--token-file" in err
    assert TOKEN not in err


@pytest_twisted.inlineCallbacks
def test_address_and_relative_token_file_from_the_config(api, tmp_path, capsys):
    _, address = api
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "secret.token").write_text(f"  {TOKEN}\n")
    config = tmp_path / "etc" / "gatewayd.yaml"
    config.write_text(f'api:\n  listen: "{address}"\n  token_file: secret.token\n')
    status = yield run_client("-c", str(config), "cabinets", "lend", "slot=2")
    out, err = capsys.readouterr()
    assert status == EXIT_OK, err
    assert json.loads(out)["slot"] == 2


@pytest_twisted.inlineCallbacks
def test_cli_namespace_is_accepted(api, token_file, capsys):
    _, address = api
    namespace = argparse.Namespace(
        config=None,
        api=address,
        token_file=str(token_file),
        timeout=70.0,
        plugin="cabinets",
        command="lend",
        arguments=["slot=4"],
    )
    status = yield threads.deferToThread(command_main, namespace)
    assert status == EXIT_OK
    assert json.loads(capsys.readouterr().out)["slot"] == 4


@pytest_twisted.inlineCallbacks
def test_unreachable_api_exits_3_naming_the_address(capsys):
    port = free_port()
    status = yield run_client("--api", f"127.0.0.1:{port}", "cabinets", "lend")
    err = capsys.readouterr().err
    assert status == EXIT_UNREACHABLE
    assert f"cannot reach the control API at http://127.0.0.1:{port}" in err


@pytest_twisted.inlineCallbacks
def test_client_timeout_exits_3(api, token_file, capsys):
    daemon, address = api
    status = yield run_client(
        "--api", address, "--token-file", str(token_file), "--timeout", "0.3", "cabinets", "hang"
    )
    err = capsys.readouterr().err
    assert status == EXIT_UNREACHABLE
    assert "no answer from the control API" in err and "may still have run" in err
    assert len(cabinet(daemon).pending) == 1
    cabinet(daemon).pending[0].callback(None)  # end the command (and its server-side timeout)


@pytest.mark.parametrize(
    ("given", "command_timeout", "expected"),
    [(None, 60, 70.0), (None, 0, None), (0, 60, None), (5, 60, 5.0)],
)
def test_client_timeout_follows_the_servers(tmp_path, given, command_timeout, expected):
    """Default: the server's 504 plus a margin; 0 on either side waits without limit."""
    config = tmp_path / "gatewayd.yaml"
    config.write_text(f'api: {{listen: "127.0.0.1:9999", command_timeout: {command_timeout}}}\n')
    args = argparse.Namespace(config=str(config), api=None, token_file=None, timeout=given)
    assert resolve_target(args).timeout == expected
    with pytest.raises(UsageError, match="--timeout must be 0"):
        resolve_target(
            argparse.Namespace(config=str(config), api=None, token_file=None, timeout=-1)
        )


def test_api_section_alone_expands_variables_and_names_bad_keys(tmp_path, monkeypatch):
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        'api:\n  listen: "127.0.0.1:${API_PORT}"\n'
        "plugins:\n  cab: {type: no-such-family}\n"  # the full load refuses the file
    )
    monkeypatch.setenv("API_PORT", "9997")
    assert api_section_from_config(str(config)).listen == "127.0.0.1:9997"
    monkeypatch.delenv("API_PORT")
    with pytest.raises(UsageError, match="api.listen: environment variable API_PORT is not set"):
        api_section_from_config(str(config))
    config.write_text("api:\n  listen: 9000\n  colour: red\nplugins: {cab: {type: nope}}\n")
    with pytest.raises(UsageError) as info:
        api_section_from_config(str(config))
    message = str(info.value)
    assert "api.listen: " in message and "api.colour: " in message
    assert "pydantic.dev" not in message
