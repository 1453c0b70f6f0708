"""Fixtures shared by the toolstack's unit tests."""

from __future__ import annotations

import pytest

from hypyr.toolstack.registry import Registry


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private toolstack state directory (HYPYR_STATE_DIR), not yet created."""
    d = tmp_path / "state"
    monkeypatch.setenv("HYPYR_STATE_DIR", str(d))
    return d


@pytest.fixture
def reg(state):
    """A Registry in that state directory, closed afterwards."""
    with Registry() as r:
        yield r
