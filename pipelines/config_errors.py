"""Config files fail with file:line:column, the way compilers report errors.

>>> try:
...     load_yaml("a: [1, 2", "rules.yaml")
... except ConfigError as error:
...     print(error.filename, error.line, error.column)
rules.yaml 1 9
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

Marks = dict[tuple[Any, ...], tuple[int, int]]


class ConfigError(ValueError):
    """A problem in a config file, located at ``file:line:column`` (1-based)."""

    def __init__(self, filename: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{filename}:{line}:{column}: {message}")
        self.filename, self.line, self.column, self.message = filename, line, column, message


def _marks(node: yaml.Node, path: tuple[Any, ...], out: Marks) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _marks(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _marks(item, (*path, index), out)


def load_yaml(text: str, filename: str) -> tuple[Any, Marks]:
    """Parse YAML safely; return the data and the (line, column) of every key path, for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        summary = " ".join(str(exc).split())
        raise ConfigError(filename, line, column, f"invalid YAML: {summary[:200]}") from exc
    marks: Marks = {}
    if node is not None:
        _marks(node, (), marks)
    return data, marks


def error_at(filename: str, marks: Marks) -> Callable[[tuple[Any, ...], str], ConfigError]:
    """A maker of errors located at a key path of the file, or at its nearest ancestor that has a position (a
    value that is missing or was computed has none of its own).

    >>> data, marks = load_yaml("rules:\\n  - name: x\\n    when: 3\\n", "rules.yaml")
    >>> fail = error_at("rules.yaml", marks)
    >>> str(fail(("rules", 0, "when"), "expected a mapping"))
    'rules.yaml:3:5: expected a mapping'
    >>> str(fail(("rules", 0, "severity"), "missing"))
    'rules.yaml:2:5: missing'
    """

    def error(path: tuple[Any, ...], message: str) -> ConfigError:
        while path and path not in marks:
            path = path[:-1]
        line, column = marks.get(path, (1, 1))
        return ConfigError(filename, line, column, message)

    return error
