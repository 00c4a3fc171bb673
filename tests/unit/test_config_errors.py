from __future__ import annotations

from pathlib import Path

import pytest

from dealpulse.pipelines.config_errors import ConfigError
from dealpulse.pipelines.keywords import KeywordTagger, parse_dictionary


def test_bad_yaml_reports_file_line_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dictionary("price_objection:\n  - budget\n competitor: [x\n", "kw.yaml")
    assert str(info.value).startswith("kw.yaml:3:")


def test_bad_entry_points_at_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dictionary("price_objection:\n  - budget\nBadTag:\n  - x\n", "kw.yaml")
    assert (info.value.line, info.value.column) == (3, 1) and "snake_case" in info.value.message


def test_custom_dictionary_file(tmp_path: Path) -> None:
    path = tmp_path / "kw.yaml"
    path.write_text("security_review:\n  - SOC 2\n  - 等保\n", encoding="utf-8")
    assert KeywordTagger.from_file(path).tags("need the soc 2 report and 等保 docs") == ["security_review"]
