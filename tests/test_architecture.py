"""The architecture holds: the import-linter contracts of pyproject.toml (layers, no sibling cycles, function-level
imports included), and no module grows past what a newcomer can hold."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "weibull_monitor"
MAX_MODULE_LINES = 500


def test_the_import_contracts_are_kept(monkeypatch):
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, "run `lint-imports` for details"


def test_no_module_is_longer_than_a_newcomer_can_hold():
    long = {
        str(path.relative_to(ROOT)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
