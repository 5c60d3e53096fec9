"""``gatewayd new-plugin NAME``: write a separate, pip-installable plugin package to start from.

Why: a plugin author should begin from code that already follows the plugin API (``init()``,
``frame_in()``/``frame_out()``, ``handling``, ``guard``, acknowledging after durability, a
construct codec, a simulator, tests with the kit), passes its tests and lints clean, instead of
copying a built-in plugin and pruning it. The generated package is ``gatewayd-NAME`` with the
module ``gatewayd_NAME`` and the entry point ``NAME`` in the group ``gatewayd.plugins``.

Templates are plain files under ``templates/`` rendered with ``string.Template`` (``${name}``;
a literal dollar is ``$$``): ``common/`` is the skeleton every package gets, one folder per
transport holds its plugin, simulator, tests and sample section, and ``text/`` or ``binary/``
the codec the transport uses. They are ``.tmpl`` files, so ruff never lints them unrendered; the
test of this command lints what they render to.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

__all__ = ["TRANSPORTS", "ScaffoldError", "add_arguments", "check_name", "generate", "main"]

#: Transport -> the codec family its frames use (``text`` lines or a ``binary`` struct).
TRANSPORTS: dict[str, str] = {"tcp": "text", "udp": "binary", "mqtt": "binary", "serial": "text"}

NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
MAX_NAME = 24
#: Plugin types that ship with gatewayd: a package of the same name would shadow one of them.
BUILT_IN = frozenset({"example", "powerbank", "esam", "heating", "generic"})

#: (template, path in the package); ``{package}`` is replaced by the module name.
COMMON_FILES = [
    ("common/pyproject.toml.tmpl", "pyproject.toml"),
    ("common/gitignore.tmpl", ".gitignore"),
    ("common/package_init.py.tmpl", "{package}/__init__.py"),
    ("common/conftest.py.tmpl", "conftest.py"),
]
TRANSPORT_FILES = [
    ("plugin.py.tmpl", "{package}/plugin.py"),
    ("simulator.py.tmpl", "{package}/simulator.py"),
    ("test_plugin.py.tmpl", "tests/test_plugin.py"),
]
CODEC_FILES = [
    ("codec.py.tmpl", "{package}/codec.py"),
    ("test_codec.py.tmpl", "tests/test_codec.py"),
]


class ScaffoldError(Exception):
    """A name or target the generator refuses; the message says why (exit status 2)."""


@dataclass(frozen=True)
class Names:
    """Every spelling of the plugin's name the templates use."""

    name: str  # weather, my_meter: entry point, config type, protocol, simulator family
    Name: str  # Weather, MyMeter: class name prefix
    package: str  # gatewayd_weather
    dist: str  # gatewayd-weather
    transport: str

    @classmethod
    def of(cls, name: str, transport: str) -> Names:
        camel = "".join(part.capitalize() for part in name.split("_"))
        return cls(name, camel, f"gatewayd_{name}", f"gatewayd-{name}", transport)


def check_name(name: str) -> str:
    """``name`` if it can be an entry point, a config type and part of a module name; else
    ScaffoldError saying what is allowed."""
    if not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ScaffoldError(
            f"invalid plugin name {name!r}: use lower-case letters, digits and single "
            f"underscores, starting with a letter, at most {MAX_NAME} characters "
            "(for example weather or my_meter)"
        )
    if keyword.iskeyword(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: it is a Python keyword")
    if name in BUILT_IN:
        raise ScaffoldError(f"invalid plugin name {name!r}: gatewayd has a plugin of that name")
    return name


def _template(path: str) -> Template:
    return Template((resources.files(__package__) / "templates" / path).read_text("utf-8"))


def render(path: str, values: dict[str, str]) -> str:
    """One template with ``values``; a placeholder without a value is a KeyError (a bug here)."""
    return _template(path).substitute(values)


def generate(name: str, transport: str = "tcp", target: Path | None = None) -> list[Path]:
    """Write the package for plugin ``name`` over ``transport`` into ``target`` (default
    ``./gatewayd-NAME``); returns the files written. Refuses (ScaffoldError) a bad name, an
    unknown transport and a target that exists and is not an empty directory."""
    check_name(name)
    if transport not in TRANSPORTS:
        raise ScaffoldError(
            f"unknown transport {transport!r} (choose from {', '.join(TRANSPORTS)})"
        )
    names = Names.of(name, transport)
    target = Path(target) if target is not None else Path(f"gatewayd-{name}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} exists and is not empty; not overwriting it")
    values = {key: getattr(names, key) for key in ("name", "Name", "package", "dist", "transport")}
    values["sample_plugin"] = render(f"{transport}/sample_plugin.yaml.tmpl", values)
    sample = render("common/sample.yaml.tmpl", values)
    values["sample"] = sample.rstrip("\n")
    values["transport_notes"] = render(f"{transport}/readme.md.tmpl", values).rstrip("\n")
    codec = TRANSPORTS[transport]
    files = [(render(t, values), p) for t, p in COMMON_FILES]
    files += [(render(f"{transport}/{t}", values), p) for t, p in TRANSPORT_FILES]
    files += [(render(f"{codec}/{t}", values), p) for t, p in CODEC_FILES]
    files += [(sample, "sample.yaml"), (render("common/README.md.tmpl", values), "README.md")]
    written = []
    for text, relative in files:
        path = target / relative.format(package=names.package)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gatewayd new-plugin``."""
    parser.add_argument("name", metavar="NAME", help="plugin name: weather, my_meter ...")
    parser.add_argument(
        "--transport", choices=list(TRANSPORTS), default="tcp", help="how devices reach it"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write it (default: ./gatewayd-NAME)"
    )


def main(args: argparse.Namespace) -> int:
    """``gatewayd new-plugin``: 0 written, 2 refused (the reason on stderr)."""
    try:
        written = generate(args.name, args.transport, args.dir)
    except ScaffoldError as exc:
        print(f"gatewayd new-plugin: {exc}", file=sys.stderr)
        return 2
    root = written[0].parent
    print(f"wrote {len(written)} files to {root}")
    print(f"next: pip install -e {root} && cd {root} && python -m pytest  (see its README.md)")
    return 0
