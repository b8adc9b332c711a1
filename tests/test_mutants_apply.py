"""The deliberately broken copies of `tests/mutants.py` still apply to the library as it is.

Each mutant is a text edit whose `old` text must occur exactly once in its module: when the
library changes under it, the edit silently stops meaning anything (issue 14's check would then
test nothing), so this fails and names the stale edit. Running the mutants themselves takes
~25 minutes (`python tests/mutants.py`, results in tests/MUTATIONS.md) and is not part of the
suite.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mutants
import pytest


@pytest.mark.parametrize("name", sorted(mutants.MUTANTS))
def test_mutant_edit_applies_once(name):
    module, edits, tests = mutants.MUTANTS[name]
    source = Path(importlib.util.find_spec(module).origin).read_text()
    for old, new in edits:
        assert source.count(old) == 1, f"{name}: {old!r} occurs {source.count(old)} times"
        assert new != old
    assert tests and all(
        Path(t).exists() or t.startswith("-") or not t.startswith("tests/") for t in tests
    )
