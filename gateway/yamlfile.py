"""Load a sysadmin-edited YAML file safely, remembering where each key stands.

PyYAML's ``safe_load`` keeps the last of two duplicate keys without a word and
forgets line numbers, so validation errors could not say ``file:line``.  This
module composes the node tree itself (safe constructors only), refuses
duplicate keys, anchors past a small budget and oversized files, and returns
the data with a map from key path to line number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 50

KeyPath = tuple[str | int, ...]


@dataclass
class YamlDocument:
    """The loaded data of one file and the line of every key and list item."""

    path: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, key_path: KeyPath) -> int:
        """The line of ``key_path``, or of its nearest ancestor that has one."""
        path = tuple(key_path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def where(self, key_path: KeyPath) -> str:
        return f"{self.path}:{self.line_of(key_path)}"


class YamlFileError(Exception):
    """A file that is not acceptable YAML; ``str()`` is ``file:line: message``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


class _Builder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict[KeyPath, int] = {}
        self.aliases = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, key_path: KeyPath) -> Any:
        self.lines.setdefault(key_path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YamlFileError(
                        self.path, key_node.start_mark.line + 1, "merge keys (<<) are not supported"
                    )
                key = self.build(key_node, (*key_path, "<key>"))
                if not isinstance(key, str | int | bool | float):
                    raise YamlFileError(
                        self.path, key_node.start_mark.line + 1, "a key must be a plain scalar"
                    )
                if key in result:
                    raise YamlFileError(
                        self.path, key_node.start_mark.line + 1, f"duplicate key {key!r}"
                    )
                self.lines[(*key_path, str(key))] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, (*key_path, str(key)))
            self.lines.pop((*key_path, "<key>"), None)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*key_path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise YamlFileError(self.path, node.start_mark.line + 1, str(exc.problem)) from None


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts alias uses, so a billion-laughs file stops early."""

    alias_budget = MAX_ALIASES

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_budget -= 1
            if self.alias_budget < 0:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases", event.start_mark
                )
        return super().compose_node(parent, index)


def parse_yaml(text: str, path: str) -> YamlDocument:
    """Parse YAML text; errors name ``path`` and the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise YamlFileError(path, 1, f"file is larger than {MAX_FILE_BYTES} bytes")
    loader = _CountingLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlFileError(path, line, str(exc.problem or exc.context or "invalid YAML")) from None
    except yaml.YAMLError as exc:
        raise YamlFileError(path, 1, str(exc)) from None
    finally:
        loader.dispose()
    if node is None:
        return YamlDocument(path, None, {(): 1})
    builder = _Builder(path)
    data = builder.build(node, ())
    return YamlDocument(path, data, builder.lines)


def load_yaml(path: str | Path) -> YamlDocument:
    """Read and parse a YAML file; unreadable files raise YamlFileError too."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise YamlFileError(name, 0, exc.strerror or str(exc)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise YamlFileError(name, 1, f"file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlFileError(name, line, "file is not valid UTF-8") from None
    return parse_yaml(text, name)
