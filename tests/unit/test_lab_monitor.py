"""Reading L1's CPU state from QEMU's human monitor when the lab is found wedged."""

import socket
import threading

from hypyr.lab import monitor

REGS = """\
CPU#0
RAX=0000000000000000 RBX=ffff888100a3c000 RCX=0000000000000001 RDX=0000000000000000
RSI=0000000000000083 RDI=ffffffff82a0f8c0 RBP=0000000000000000 RSP=ffffc90000093e98
RIP=ffffffff81b3c0e4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CPU#1
RAX=0000000000000001 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=00007f3a5c1d2e16 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
"""


def test_parse_registers():
    cpus = monitor.parse_registers(REGS)
    assert cpus == [monitor.CpuState(0, 0xffffffff81b3c0e4, 0, True),
                    monitor.CpuState(1, 0x00007f3a5c1d2e16, 3, False)]
    assert monitor.parse_registers("garbage") == []


def test_symbols_and_describe(tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T _stext\nffffffff81b3c0c0 t default_idle\n"
                  "ffffffff81b3c200 T default_idle_call\nffffffff82000000 D some_data\nbad line\n")
    sym = monitor.Symbols.load(ks)
    assert sym.lookup(0xffffffff81b3c0e4) == "default_idle+0x24"
    assert sym.lookup(0xffffffff80000000) is None  # below every symbol
    assert sym.lookup(0xffffffff90000000) is None  # far past the last one
    assert monitor.Symbols.load(tmp_path / "missing") is None
    lines = monitor.describe(monitor.parse_registers(REGS), sym)
    assert lines == ["CPU 0: RIP=0xffffffff81b3c0e4 kernel mode, halted (default_idle+0x24 if in L1's kernel)",
                     "CPU 1: RIP=0x00007f3a5c1d2e16 user mode"]


def _fake_hmp(path, answers, ready):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    with conn, srv:
        conn.sendall(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
        f = conn.makefile("rb")
        for line in f:
            cmd = line.decode().strip()
            conn.sendall(b"\x1b[K" + cmd.encode() + b"\r\n" + answers.get(cmd, "unknown\n").encode() + b"(qemu) ")


def test_query_against_a_monitor(tmp_path):
    sock = tmp_path / "m.sock"
    ready = threading.Event()
    t = threading.Thread(target=_fake_hmp, args=(sock, {"info registers -a": REGS}, ready), daemon=True)
    t.start()
    ready.wait(5)
    text = monitor.query(sock, ["info registers -a"])
    assert text is not None and len(monitor.parse_registers(text)) == 2
    assert monitor.query(tmp_path / "nothing.sock", ["info cpus"]) is None


def test_query_gives_up_on_a_silent_monitor(tmp_path):
    sock = tmp_path / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock))
    srv.listen(1)
    with srv:
        assert monitor.query(sock, ["info registers -a"], timeout=0.3) is None
