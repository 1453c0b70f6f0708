"""Fixtures shared by the unit tests: a toolstack state directory and registry; a small guest
memory and a file writer for the boot loaders' tests."""

from __future__ import annotations

import pytest

from hypyr.arch.x86 import layout
from hypyr.memory import GuestMemory
from hypyr.toolstack.registry import Registry

MiB = 1 << 20


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


@pytest.fixture
def mem():
    """64 MiB of guest RAM (PC layout), closed afterwards."""
    m = GuestMemory.anonymous(layout.ram_layout(64 * MiB), hugepages=False)
    yield m
    m.close()


@pytest.fixture
def write(tmp_path):
    """write(data, name="kernel") -> the path of a new file holding data."""
    def w(data, name="kernel"):
        p = tmp_path / name
        p.write_bytes(data)
        return p
    return w
