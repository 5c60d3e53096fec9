"""A YAML loader that remembers the line of every mapping key and list item.

Config errors must name the line they are about (``gatewayd.yaml:14: plugins.cabinets.listen``),
but pyyaml's constructed dicts and lists forget where they came from, and it silently keeps the
last of two equal keys. This module composes the node tree with pyyaml's ``SafeLoader`` and
builds plain Python values from it itself, recording ``key path → line`` on the way and
reporting duplicate keys instead of dropping them.

A key path is a tuple of mapping keys and list indexes: ``("routes", 1, "sinks", 0)``. Mapping
keys are always strings, exactly as written (YAML 1.1 would turn ``on:`` into ``True``), and
timestamps are not recognised (``id: 2024-01-01`` is a string): config values are never dates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["KeyPath", "YamlDocument", "YamlSyntaxError", "format_path", "load_yaml"]

KeyPath = tuple[Any, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlSyntaxError(ValueError):
    """The text is not YAML we can read; ``line`` (1-based) is where the parser gave up."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass
class DuplicateKey:
    """A key given twice in one mapping; the later value is the one kept."""

    path: KeyPath
    line: int
    first_line: int


@dataclass
class YamlDocument:
    """Plain Python data (dict, list, scalars) plus the line of every key and list item."""

    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    duplicates: list[DuplicateKey] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int:
        """The line of ``path``, or of its deepest ancestor that is in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1


def format_path(path: KeyPath) -> str:
    """``("routes", 1, "sinks", 0)`` → ``routes[1].sinks[0]``; ``()`` → ``""``."""
    text = ""
    for element in path:
        if isinstance(element, int) and not isinstance(element, bool):
            text += f"[{element}]"
        else:
            text += f".{element}" if text else str(element)
    return text


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps: ``id: 2024-01-01`` stays the string it looks like
    (no config value is a date, and an impossible date would otherwise crash the parser)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def load_yaml(text: str) -> YamlDocument:
    """Parse one YAML document; raises YamlSyntaxError with the line of the problem."""
    try:
        loader = _ConfigLoader(text)
    except yaml.reader.ReaderError as exc:
        raise _reader_error(text, exc) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc) from None
        except yaml.reader.ReaderError as exc:
            raise _reader_error(text, exc) from None
        document = YamlDocument(data=None)
        if root is not None:
            document.lines[()] = _line(root)
            document.data = _Builder(loader, document).build(root, ())
        return document
    finally:
        loader.dispose()


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _reader_error(text: str, exc: yaml.reader.ReaderError) -> YamlSyntaxError:
    """A character YAML does not allow (control characters); the line is counted by hand."""
    line = text.count("\n", 0, exc.position) + 1
    return YamlSyntaxError(line, f"character U+{exc.character:04X} is not allowed ({exc.reason})")


def _syntax_error(exc: yaml.MarkedYAMLError) -> YamlSyntaxError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = exc.problem or "invalid YAML"
    if exc.context:
        message = f"{exc.context}: {message}"
    return YamlSyntaxError(line, message)


class _Builder:
    """Walks the composed node tree, building values and filling the document's line map."""

    def __init__(self, loader: yaml.SafeLoader, document: YamlDocument) -> None:
        self.loader = loader
        self.document = document
        self.active: set[int] = set()  # ids of the collections being built (alias loops)

    def build(self, node: Node, path: KeyPath) -> Any:
        if isinstance(node, ScalarNode):
            return self._construct(node)
        if id(node) in self.active:
            raise YamlSyntaxError(_line(node), "an alias refers to a node that contains it")
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
        finally:
            self.active.discard(id(node))
        raise YamlSyntaxError(_line(node), f"unexpected YAML node {node.id}")

    def _construct(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc) from None
        except (ValueError, TypeError, ArithmeticError) as exc:  # e.g. ``!!int x``, bad base64
            raise YamlSyntaxError(_line(node), f"cannot read {node.tag} value: {exc}") from None

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            raise YamlSyntaxError(_line(node), f"unsupported tag {node.tag!r} on a mapping")
        first_seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node)
            if key in first_seen:
                self.document.duplicates.append(
                    DuplicateKey(path + (key,), _line(key_node), first_seen[key])
                )
            else:
                first_seen[key] = _line(key_node)
        try:
            self.loader.flatten_mapping(node)  # resolves ``<<: *anchor`` merge keys
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc) from None
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node)
            # Later pairs win (explicit keys over merged ones, a duplicate over the first).
            self.document.lines[path + (key,)] = _line(key_node)
            result[key] = self.build(value_node, path + (key,))
        return result

    def _key(self, key_node: Node) -> str:
        """Keys are names: always the text as written (``on:`` is "on", ``1:`` is "1")."""
        if not isinstance(key_node, ScalarNode):
            raise YamlSyntaxError(_line(key_node), "a mapping key must be a plain value")
        return key_node.value

    def _sequence(self, node: SequenceNode, path: KeyPath) -> list[Any]:
        if node.tag != _SEQ_TAG:
            raise YamlSyntaxError(_line(node), f"unsupported tag {node.tag!r} on a list")
        items = []
        for index, item_node in enumerate(node.value):
            self.document.lines[path + (index,)] = _line(item_node)
            items.append(self.build(item_node, path + (index,)))
        return items
