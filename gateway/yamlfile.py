"""Load a sysadmin-edited YAML file safely, remembering where each key stands.

PyYAML's ``safe_load`` keeps the last of two duplicate keys without a word and
forgets line numbers, so validation errors could not say ``file:line:column``.
This module composes the node tree itself (safe constructors only), refuses
duplicate keys, anchors past a small budget and oversized files, and returns
the data with a map from key path to (line, column).

A hostile file gets the same one-line error as a mistaken one: PyYAML composes
recursively, so nesting is bounded (1,000 nested ``[`` would otherwise raise
RecursionError), aliases may expand to a bounded number of nodes (a 1 KB file of
aliases to aliases would otherwise fill the memory), and files are read only if
they are regular files, opened without blocking (a FIFO in place of the file
would otherwise wait for a writer forever).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 50
MAX_DEPTH = 64  # nesting levels; about three stack frames each while composing and building
MAX_ALIAS_NODES = 10_000  # nodes that aliases may add to the document when expanded
_LOOSE_ADDRESS = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")

KeyPath = tuple[str | int, ...]


@dataclass
class YamlDocument:
    """The loaded data of one file and the position of every key and list item."""

    path: str
    data: Any
    lines: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)  # (line, column)

    def position(self, key_path: KeyPath) -> tuple[int, int]:
        """(line, column) of ``key_path``, or of its nearest ancestor that has one."""
        path = tuple(key_path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), (1, 1))

    def line_of(self, key_path: KeyPath) -> int:
        return self.position(key_path)[0]

    def where(self, key_path: KeyPath) -> str:
        """``file:line:column`` of a key, the way compilers point at a mistake."""
        line, column = self.position(key_path)
        return f"{self.path}:{line}:{column}"


class YamlFileError(Exception):
    """A file that is not acceptable YAML; ``str()`` is ``file:line:column: message``."""

    def __init__(self, path: str, line: int, message: str, column: int = 1) -> None:
        # Line 0: the file as a whole (it could not be read).
        super().__init__(f"{path}:{line}:{column}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.line = line
        self.column = column
        self.message = message

    @classmethod
    def at(cls, path: str, mark: Any, message: str) -> YamlFileError:
        """The error at a PyYAML mark (0-based line and column)."""
        line, column = _at(mark)
        return cls(path, line, message, column)


def _at(mark: Any) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


class _Builder:
    def __init__(self, path: str, nodes: int) -> None:
        self.path = path
        self.lines: dict[KeyPath, tuple[int, int]] = {}
        # Each alias is built as a copy of what it names: the document's own nodes
        # plus a bounded number of copies (two aliases a level, 25 levels: 2**25).
        self.budget = nodes + MAX_ALIAS_NODES
        self.seen: set[int] = set()  # nodes built once: meeting one again is an alias
        self.alias: KeyPath | None = None  # where the outermost alias being expanded is
        self.open: set[int] = set()  # collections being built, to refuse cycles
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, key_path: KeyPath) -> Any:
        self.lines.setdefault(key_path, _at(node.start_mark))
        outermost = self.alias is None and id(node) in self.seen
        if outermost:
            self.alias = key_path
        self.seen.add(id(node))
        try:
            return self._node(node, key_path)
        finally:
            if outermost:
                self.alias = None

    def _node(self, node: yaml.Node, key_path: KeyPath) -> Any:
        self.budget -= 1
        if self.budget < 0 or len(key_path) >= MAX_DEPTH:
            # Only aliases get here (the composer bounds the document's own depth):
            # point at the alias, not at the copy of the anchored node.
            line, column = self.lines[self.alias or key_path]
            raise YamlFileError(self.path, line, (
                f"aliases expand to more than {MAX_ALIAS_NODES} nodes" if self.budget < 0
                else f"aliases nest deeper than {MAX_DEPTH} levels"), column)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self.open:  # `a: &x {b: *x}` would never end
                raise YamlFileError.at(self.path, node.start_mark,
                                       "an alias refers to a node that contains it")
            self.open.add(id(node))
            try:
                return self._collection(node, key_path)
            finally:
                self.open.discard(id(node))
        assert isinstance(node, yaml.ScalarNode)
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise YamlFileError.at(self.path, node.start_mark, str(exc.problem)) from None

    def _collection(self, node: yaml.Node, key_path: KeyPath) -> Any:
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YamlFileError.at(self.path, key_node.start_mark,
                                           "merge keys (<<) are not supported")
                key = self.build(key_node, (*key_path, "<key>"))
                if not isinstance(key, str | int | bool | float):
                    raise YamlFileError.at(self.path, key_node.start_mark,
                                           "a key must be a plain scalar")
                if key in result:
                    raise YamlFileError.at(self.path, key_node.start_mark,
                                           f"duplicate key {key!r}")
                self.lines[(*key_path, str(key))] = _at(key_node.start_mark)
                result[key] = self.build(value_node, (*key_path, str(key)))
            self.lines.pop((*key_path, "<key>"), None)
            return result
        return [self.build(item, (*key_path, i)) for i, item in enumerate(node.value)]


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts alias uses, so a billion-laughs file stops early, and
    bounds nesting before PyYAML's recursive composer runs out of stack."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_budget = MAX_ALIASES
        self.depth = 0
        self.nodes = 0  # composed, for the builder's budget

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_budget -= 1
            if self.alias_budget < 0:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
            )
        self.depth += 1
        self.nodes += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, path: str) -> YamlDocument:
    """Parse YAML text; errors name ``path`` and the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise YamlFileError(path, 0, f"file is larger than {MAX_FILE_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = str(exc.problem or exc.context or "invalid YAML")
        if mark is None:
            raise YamlFileError(path, 1, message) from None
        raise YamlFileError.at(path, mark, message) from None
    except yaml.YAMLError as exc:
        raise YamlFileError(path, 1, str(exc)) from None
    finally:
        loader.dispose()
    if node is None:
        return YamlDocument(path, None, {(): (1, 1)})
    builder = _Builder(path, loader.nodes)
    data = builder.build(node, ())
    return YamlDocument(path, data, builder.lines)


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES, read without blocking.

    A FIFO opened for reading waits for a writer, so the file is opened with
    O_NONBLOCK and refused from its fstat unless it is a regular file (a FIFO,
    a directory, a device).  A missing file raises FileNotFoundError, for the
    caller to decide; every other problem is a YamlFileError naming the file.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise YamlFileError(name, 0, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else (
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file")
            raise YamlFileError(name, 0, f"not a regular file ({kind})")
        if st.st_size > MAX_FILE_BYTES:
            raise YamlFileError(name, 0, f"file is larger than {MAX_FILE_BYTES} bytes "
                                         f"({st.st_size} bytes)")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:  # the file may grow after the fstat
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise YamlFileError(name, 0, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def load_yaml(path: str | Path) -> YamlDocument:
    """Read and parse a YAML file; unreadable files raise YamlFileError too."""
    name = str(path)
    try:
        raw = read_regular(path)
    except FileNotFoundError as exc:
        raise YamlFileError(name, 0, exc.strerror or str(exc)) from None
    return parse_bytes(raw, name)


def parse_bytes(raw: bytes, path: str) -> YamlDocument:
    """Parse a file's bytes: size limit, UTF-8, then YAML; errors name ``path`` and the line."""
    if len(raw) > MAX_FILE_BYTES:
        raise YamlFileError(path, 0, f"file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlFileError(path, line, "file is not valid UTF-8") from None
    return parse_yaml(text, path)


class Checker:
    """Collects ``file:line:column: message`` problems while validating a document.

    Validators subclass it: each check reports and carries on, so one run names
    every mistake in a file, not just the first.
    """

    def __init__(self, doc: YamlDocument) -> None:
        self.doc = doc
        self.problems: list[str] = []

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(f"{self.doc.where(path)}: {message}")

    def mapping(self, value: Any, path: KeyPath, keys: Collection[str],
                what: str) -> dict[str, Any] | None:
        """``value`` if it is a mapping; unknown keys are reported, not dropped silently."""
        if not isinstance(value, dict):
            self.problem(path, f"{what} must be a mapping")
            return None
        for key in value:
            if key not in keys:
                self.problem((*path, str(key)),
                             f"unknown key {key!r} in {what} (known: {', '.join(sorted(keys))})")
        return value

    def string_list(self, value: Any, path: KeyPath, what: str) -> list[str]:
        """A list of strings; a single string counts as a list of one."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(path, f"{what} must be a list of strings")
            return []
        return value

    def date(self, value: Any, path: KeyPath, what: str,
             hint: str = "a date such as 2027-06-30") -> date | None:
        """A calendar date (YAML 2027-06-30); a date-time or anything else is reported."""
        if isinstance(value, datetime) or not isinstance(value, date):
            self.problem(path, f"{what} takes {hint}")
            return None
        return value

    def address(self, value: Any, path: KeyPath) -> str | None:
        """One mail address (local@domain, no spaces)."""
        if not isinstance(value, str) or not _LOOSE_ADDRESS.match(value):
            self.problem(path, f"not an address: {value!r}")
            return None
        return value

    def boolean(self, spec: dict[str, Any], key: str, path: KeyPath, default: bool) -> bool:
        value = spec.get(key, default)
        if not isinstance(value, bool):
            self.problem((*path, key), f"{key} must be true or false")
            return default
        return value
