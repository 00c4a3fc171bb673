"""Config files fail with file:line:column, the way compilers report errors.

>>> try:
...     load_yaml("a: [1, 2", "rules.yaml")
... except ConfigError as error:
...     print(error.filename, error.line, error.column)
rules.yaml 1 9
"""

from __future__ import annotations

from typing import Any

import yaml


class ConfigError(ValueError):
    """A problem in a config file, located at ``file:line:column`` (1-based)."""

    def __init__(self, filename: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{filename}:{line}:{column}: {message}")
        self.filename, self.line, self.column, self.message = filename, line, column, message


def _marks(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _marks(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _marks(item, (*path, index), out)


def load_yaml(text: str, filename: str) -> tuple[Any, dict[tuple[Any, ...], tuple[int, int]]]:
    """Parse YAML safely; return the data and the (line, column) of every key path, for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        summary = " ".join(str(exc).split())
        raise ConfigError(filename, line, column, f"invalid YAML: {summary[:200]}") from exc
    marks: dict[tuple[Any, ...], tuple[int, int]] = {}
    if node is not None:
        _marks(node, (), marks)
    return data, marks
