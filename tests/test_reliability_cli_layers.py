"""The CLI goes through the api only (issue 11, item 3): no verb module imports a part directly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parents[1] / "src" / "fleetprune" / "cli"
PARTS = re.compile(r"^\s*(from|import) fleetprune\.(profiler|cluster|tables|pruner|report|training)\b", re.M)


@pytest.mark.parametrize("verb", ["profile", "tables", "fleet", "report"])
def test_the_verb_imports_only_the_api_errors_and_models(verb):
    text = (CLI / f"{verb}.py").read_text()
    assert not PARTS.findall(text), f"cli/{verb}.py imports {PARTS.findall(text)}"
    ours = set(re.findall(r"^\s*(?:from|import) (fleetprune(?:\.\w+)?)", text, re.M))
    assert ours <= {"fleetprune.api", "fleetprune.errors", "fleetprune.models", "fleetprune.cli"}, ours
