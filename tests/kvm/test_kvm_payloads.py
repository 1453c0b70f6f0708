"""The hand-assembled payloads are exactly what their assembly text says (checked with GNU as)."""

from __future__ import annotations

import shutil
import subprocess

import payloads as P
import pytest

pytestmark = pytest.mark.no_kvm


@pytest.mark.parametrize("payload", P.ALL + [P.exit_status(0), P.exit_status(255)], ids=lambda p: p.name)
def test_payload_bytes_match_their_assembly(payload, tmp_path):
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("GNU as/objcopy not installed")
    src = tmp_path / "p.s"
    src.write_text(f".intel_syntax noprefix\n.code{payload.bits}\n{payload.asm}\n")
    subprocess.run(["as", "-o", str(tmp_path / "p.o"), str(src)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "p.o"), str(tmp_path / "p.bin")],
                   check=True, capture_output=True)
    assert (tmp_path / "p.bin").read_bytes().hex(" ") == payload.code.hex(" ")


def test_payloads_are_tiny():
    for p in P.ALL:
        assert 0 < len(p.code) < 0x800, p.name  # below MSG_ADDR/COUNTER_ADDR/DATA_ADDR when loaded at CODE_ADDR
