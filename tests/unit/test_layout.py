"""The dependency direction agents -> pipelines -> models, and no bare top-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "pipelines": ("faust", "dealpulse.agents", "mode"),
    "models": ("faust", "dealpulse.agents", "dealpulse.pipelines", "mode"),
    "agents": (),
}
BARE = ("models", "agents", "pipelines")


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for path in files:
        for name in imports(path):
            for banned in FORBIDDEN[package]:
                assert not (name == banned or name.startswith(banned + ".")), f"{path}: imports {name}"
            assert name.split(".")[0] not in BARE, f"{path}: bare import {name}; use dealpulse.{name}"


def test_required_top_level() -> None:
    for name in (
        "pipelines",
        "agents",
        "models",
        "deploy",
        "tests",
        "docker-compose.yml",
        "pyproject.toml",
        "README.md",
    ):
        assert (ROOT / name).exists(), name


def test_installed_names_map_to_the_folders() -> None:
    import dealpulse.agents
    import dealpulse.models
    import dealpulse.pipelines

    for module, folder in (
        (dealpulse.pipelines, "pipelines"),
        (dealpulse.agents, "agents"),
        (dealpulse.models, "models"),
    ):
        assert Path(module.__file__ or "").resolve().parent == ROOT / folder
