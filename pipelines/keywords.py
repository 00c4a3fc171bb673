"""Reduce chat text to keyword tags, so the text itself never has to be stored.

>>> tagger = KeywordTagger({"price_objection": ["budget", "预算"], "delivery_pressure": ["go-live"]})
>>> tagger.tags("Our BUDGET is tight and go-live is in May")
['delivery_pressure', 'price_objection']
>>> tagger.tags("预算不够")
['price_objection']
>>> tagger.tags("budgetary")  # whole words only for latin terms
[]
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from dealpulse.pipelines.config_errors import ConfigError, load_yaml


def _pattern(term: str) -> str:
    escaped = re.escape(term.lower())
    if term.isascii():
        return rf"(?<![\w-]){escaped}(?![\w-])"
    return escaped


class KeywordTagger:
    """Finds keyword tags in text with one compiled regular expression (one pass per message)."""

    def __init__(self, dictionary: dict[str, list[str]]) -> None:
        self.dictionary = dictionary
        groups = []
        self._tag_of_group: dict[str, str] = {}
        for index, (tag, terms) in enumerate(dictionary.items()):
            group = f"t{index}"
            self._tag_of_group[group] = tag
            groups.append(f"(?P<{group}>" + "|".join(_pattern(t) for t in terms) + ")")
        self._regex = re.compile("|".join(groups)) if groups else None

    def tags(self, text: str) -> list[str]:
        """The sorted, distinct tags whose terms occur in ``text``."""
        if self._regex is None:
            return []
        found = {self._tag_of_group[m.lastgroup] for m in self._regex.finditer(text.lower()) if m.lastgroup}
        return sorted(found)

    @classmethod
    def default(cls) -> KeywordTagger:
        text = resources.files("dealpulse.pipelines").joinpath("keywords.yaml").read_text(encoding="utf-8")
        return cls(parse_dictionary(text, "keywords.yaml"))

    @classmethod
    def from_file(cls, path: Path) -> KeywordTagger:
        return cls(parse_dictionary(path.read_text(encoding="utf-8"), str(path)))


def parse_dictionary(text: str, filename: str) -> dict[str, list[str]]:
    """Parse and check a keyword dictionary; errors name file:line:column."""
    data, marks = load_yaml(text, filename)
    if not isinstance(data, dict):
        raise ConfigError(filename, 1, 1, "a keyword dictionary maps tag names to lists of terms")
    result: dict[str, list[str]] = {}
    for tag, terms in data.items():
        line, column = marks.get((tag,), (1, 1))
        if not isinstance(tag, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", tag):
            raise ConfigError(filename, line, column, f"tag {tag!r} must be snake_case")
        if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms):
            raise ConfigError(filename, line, column, f"tag {tag!r} needs a non-empty list of non-empty terms")
        result[tag] = [t.strip() for t in terms]
    return result
